"""The bundle's manifest and file layout, without torch: what every node reads first.

The manifest (``manifest.json``: classes, class groups, sub-model and fusion configs, the input
spec, each file's SHA-256) and the lookup of a part's safetensors file live here, apart from the
torch modules in :mod:`devit_mq.model.bundle`, so that an edge running the NumPy forward, the
aggregator and a client can read a bundle with no torch installed.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from devit_mq.protocol import MANIFEST_FILE

from .config import ConfigError, FusionConfig, ViTConfig

BUNDLE_FORMAT = "devit-mq-bundle"
BUNDLE_VERSION = 1
MANIFEST = MANIFEST_FILE  # one name for the trainer, the nodes and the topology checker
STORAGE_DTYPE_NAMES = ("float32", "float16")  # how a bundle may store its weights


class BundleError(ValueError):
    """A bundle is missing, corrupt, of an unknown version or inconsistent; the message says which."""


@dataclass(frozen=True)
class InputSpec:
    """How raw uint8 images become model input (applied on the edge, so images travel as uint8)."""

    img_size: int
    in_chans: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "mean", tuple(float(m) for m in self.mean))
        object.__setattr__(self, "std", tuple(float(s) for s in self.std))
        if len(self.mean) != self.in_chans or len(self.std) != self.in_chans:
            raise BundleError(f"input: mean/std need {self.in_chans} values, got {self.mean} / {self.std}")
        if any(s <= 0 for s in self.std):
            raise BundleError(f"input: std must be positive, got {self.std}")

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """The uint8 image layout on the wire: ``(H, W, C)``."""
        return (self.img_size, self.img_size, self.in_chans)

    def _channels_last(self, images: np.ndarray) -> np.ndarray:
        """uint8 ``[B, H, W, C]`` (or ``[B, H, W]`` for one channel), checked against the bundle's
        input; ValueError naming the expected shape otherwise."""
        x = np.asarray(images)
        if x.ndim == 3 and self.in_chans == 1:
            x = x[..., None]
        if x.ndim != 4 or tuple(x.shape[1:]) != self.image_shape:
            raise ValueError(f"expected images [B, {', '.join(map(str, self.image_shape))}], got {tuple(x.shape)}")
        return x

    def to_array(self, images: np.ndarray) -> np.ndarray:
        """uint8 images -> normalised float32 ``[B, H, W, C]`` (channels last, as on the wire: the
        NumPy forward works in that layout), computed in the same order as :meth:`to_tensor`."""
        x = self._channels_last(images).astype(np.float32) / np.float32(255.0)
        x -= np.asarray(self.mean, np.float32)
        x /= np.asarray(self.std, np.float32)
        return x

    def to_tensor(self, images: Any) -> Any:
        """uint8 ``[B, H, W, C]`` (or ``[B, H, W]`` for one channel) -> normalised float torch tensor
        ``[B, C, H, W]`` (torch is imported here only: the manifest itself needs no torch)."""
        import torch

        if isinstance(images, torch.Tensor):
            images = images.numpy()
        x = self._channels_last(images)
        if not x.flags.writeable:
            x = x.copy()  # a view of a received frame: torch wants writable memory
        t = torch.as_tensor(x).permute(0, 3, 1, 2).float().div_(255.0)
        mean = torch.tensor(self.mean).view(1, -1, 1, 1)
        std = torch.tensor(self.std).view(1, -1, 1, 1)
        return (t - mean) / std

    def to_dict(self) -> dict[str, Any]:
        return {"img_size": self.img_size, "in_chans": self.in_chans,
                "mean": list(self.mean), "std": list(self.std)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> InputSpec:
        try:
            return cls(int(data["img_size"]), int(data["in_chans"]), data["mean"], data["std"])
        except (KeyError, TypeError) as exc:
            raise BundleError(f"manifest 'input' is malformed: {exc!r}") from exc


@dataclass
class Manifest:
    classes: list[str]
    class_groups: list[list[int]]
    submodels: list[ViTConfig]
    fusion: FusionConfig
    input: InputSpec
    teacher: ViTConfig | None = None
    storage_dtype: str = "float32"
    metadata: dict[str, Any] = field(default_factory=dict)
    files: dict[str, dict[str, str]] = field(default_factory=dict)  # part -> {"file", "sha256"}

    def __post_init__(self) -> None:
        self.validate()

    @property
    def num_parts(self) -> int:
        return len(self.submodels)

    def validate(self) -> None:
        n_cls = len(self.classes)
        if len(self.class_groups) != len(self.submodels):
            raise BundleError(
                f"{len(self.class_groups)} class groups but {len(self.submodels)} sub-models"
            )
        flat = sorted(c for g in self.class_groups for c in g)
        if flat != list(range(n_cls)):
            raise BundleError(f"class_groups must partition classes 0..{n_cls - 1} disjointly, got {self.class_groups}")
        dims = tuple(c.embed_dim for c in self.submodels)
        if dims != self.fusion.in_dims:
            raise BundleError(f"sub-model widths {dims} do not match fusion.in_dims {self.fusion.in_dims}")
        if self.fusion.num_classes != n_cls:
            raise BundleError(f"fusion has {self.fusion.num_classes} classes, manifest lists {n_cls}")
        for i, cfg in enumerate(self.submodels):
            if cfg.num_prefix_tokens != self.fusion.num_prefix_tokens:
                raise BundleError(f"sub-model {i} sends {cfg.num_prefix_tokens} token(s), fusion expects "
                                  f"{self.fusion.num_prefix_tokens}")
            if (cfg.img_size, cfg.in_chans) != (self.input.img_size, self.input.in_chans):
                raise BundleError(f"sub-model {i} input {cfg.img_size}px x{cfg.in_chans} does not match "
                                  f"the bundle input {self.input.img_size}px x{self.input.in_chans}")
        if self.storage_dtype not in STORAGE_DTYPE_NAMES:
            raise BundleError(f"storage_dtype must be one of {list(STORAGE_DTYPE_NAMES)}, got {self.storage_dtype!r}")

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": BUNDLE_FORMAT,
            "version": BUNDLE_VERSION,
            "classes": list(self.classes),
            "class_groups": [list(g) for g in self.class_groups],
            "input": self.input.to_dict(),
            "submodels": [c.to_dict() for c in self.submodels],
            "fusion": self.fusion.to_dict(),
            "teacher": self.teacher.to_dict() if self.teacher else None,
            "storage_dtype": self.storage_dtype,
            "files": self.files,
            "metadata": self.metadata,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Manifest:
        if not isinstance(data, dict) or data.get("format") != BUNDLE_FORMAT:
            raise BundleError(f"not a devit-mq bundle manifest (format={data.get('format')!r})"
                              if isinstance(data, dict) else "manifest is not a JSON object")
        if data.get("version") != BUNDLE_VERSION:
            raise BundleError(f"unknown bundle version {data.get('version')!r}; this devit-mq reads "
                              f"version {BUNDLE_VERSION}")
        try:
            subs = [ViTConfig.from_dict(c, f"submodels[{i}]") for i, c in enumerate(data["submodels"])]
            teacher = data.get("teacher")
            return cls(
                classes=[str(c) for c in data["classes"]],
                class_groups=[[int(c) for c in g] for g in data["class_groups"]],
                submodels=subs,
                fusion=FusionConfig.from_dict(data["fusion"], "fusion"),
                input=InputSpec.from_dict(data["input"]),
                teacher=ViTConfig.from_dict(teacher, "teacher") if teacher else None,
                storage_dtype=data.get("storage_dtype", "float32"),
                metadata=dict(data.get("metadata") or {}),
                files=dict(data.get("files") or {}),
            )
        except KeyError as exc:
            raise BundleError(f"manifest is missing required key {exc}") from exc
        except ConfigError as exc:
            raise BundleError(f"manifest: {exc}") from exc


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _part_file(part: str) -> str:
    return f"{part}.safetensors"


def load_manifest(directory: str | Path) -> Manifest:
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise BundleError(f"no bundle at {directory}: {path} does not exist")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BundleError(f"{path} is not valid JSON: {exc}") from exc
    return Manifest.from_dict(data)


def part_path(directory: str | Path, manifest: Manifest, part: str, verify: bool = True) -> Path:
    """The file of bundle part ``part``; with ``verify``, its SHA-256 must be the manifest's.
    BundleError (naming the part and the file) if it is unknown, missing or corrupt."""
    directory = Path(directory)
    entry = manifest.files.get(part)
    if entry is None:
        raise BundleError(f"bundle {directory} has no part {part!r} (parts: {sorted(manifest.files)})")
    path = directory / entry["file"]
    if not path.is_file():
        raise BundleError(f"bundle part {part!r}: file {path} is missing")
    if verify and _sha256(path) != entry.get("sha256"):
        raise BundleError(f"bundle part {part!r}: {path} does not match its SHA-256 in the manifest "
                          "(corrupt or replaced file)")
    return path


def verify_bundle(directory: str | Path, manifest: Manifest | None = None) -> list[str]:
    """Check every file the manifest records against its SHA-256 (the check loading does); returns
    one message per missing or corrupt file (empty: the bundle is intact)."""
    manifest = manifest or load_manifest(directory)
    problems = []
    for part in sorted(manifest.files):
        try:
            part_path(directory, manifest, part, verify=True)
        except BundleError as exc:
            problems.append(str(exc))
    return problems


