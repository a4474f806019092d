"""Real-scale inputs on a small scale: a timm-format 224x224 patch-16 checkpoint as the teacher, an
ImageFolder read with the standard evaluation transform, and the errors a user can make."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from devit_mq.data import load_dataset
from devit_mq.data.sources import eval_transform
from devit_mq.dekd.cli import main
from devit_mq.model import VisionTransformer, preset

from .timm_reference import import_timm

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ("ant", "bee", "cat")


def _folder(root: Path) -> Path:
    """train/ (5 per class) and val/ (2 per class, the test split) of random RGB JPEGs of odd sizes."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", 5), ("val", 2)):
        for c in CLASSES:
            (root / split / c).mkdir(parents=True)
            for i in range(n):
                h, w = rng.integers(230, 320, 2)
                Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / split / c / f"{i}.jpg")
    return root


def test_eval_transform_is_resize_256_then_centre_crop_224():
    from PIL import Image

    img = np.zeros((256, 256, 3), np.uint8)
    img[16:240, 16:240] = (0, 200, 0)  # a 16-pixel black border around a green square
    out = np.asarray(eval_transform(Image.fromarray(img), 224))
    assert out.shape == (224, 224, 3) and (out == (0, 200, 0)).all()  # the border is cropped away
    wide = eval_transform(Image.fromarray(np.zeros((200, 300, 3), np.uint8)), 224)
    assert wide.size == (224, 224)


def test_imagefolder_with_the_eval_transform(tmp_path):
    root = _folder(tmp_path / "data")
    d = load_dataset(f"imagefolder:{root}", image_size=224, val_size=3)
    assert d.classes == list(CLASSES)
    assert d.train_images.shape == (12, 224, 224, 3) and d.val_images.shape == (3, 224, 224, 3)
    assert d.test_images.shape == (6, 224, 224, 3)
    assert np.bincount(d.val_labels).tolist() == [1, 1, 1]
    # streamed: paths kept, decoded per batch; decoding gives what the transform gives one file
    from PIL import Image

    from devit_mq.data.lazy import LazyImages

    assert isinstance(d.train_images, LazyImages)
    first = d.test_images[0]
    with Image.open(first.paths[0]) as img:
        want = np.asarray(eval_transform(img.convert("RGB"), 224))
    np.testing.assert_array_equal(np.asarray(first)[0], want)
    assert d.train_images[np.array([True] * 6 + [False] * 6)].shape == (6, 224, 224, 3)


def _config(tmp_path: Path, checkpoint: Path, data: Path) -> Path:
    cfg = {
        "name": "timm224", "threads": 1, "device": "cpu",
        "data": {"source": f"imagefolder:{data}", "image_size": 224, "val_size": 3, "normalize": "imagenet"},
        "groups": {"num_groups": 2},
        "teacher": {"model": {"preset": "vit_tiny_patch16_224", "depth": 2}, "checkpoint": str(checkpoint),
                    "reset_head": True,
                    "train": {"epochs": 1, "batch_size": 6, "warmup_epochs": 0, "augment": {"enabled": False}}},
        "students": {"models": [{"preset": "vit_tiny_patch16_224", "embed_dim": 48, "depth": 2, "num_heads": 1}],
                     "train": {"epochs": 1, "batch_size": 6, "warmup_epochs": 0, "augment": {"enabled": False},
                               "val_every": 1}},
        "fusion": {"train": {"epochs": 1, "batch_size": 6, "warmup_epochs": 0, "augment": {"enabled": False}}},
        "ablation": {"enabled": False},
        "output": {"storage_dtype": "float32"},
    }
    path = tmp_path / "timm224.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.timeout(180)
def test_timm_checkpoint_teacher_on_an_imagefolder(tmp_path):
    timm = import_timm()
    torch.manual_seed(0)
    if timm is not None:  # the checkpoint as timm itself writes it (random weights, ImageNet head)
        reference = timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=2)
        state = reference.state_dict()
    else:
        state = VisionTransformer(preset("vit_tiny_patch16_224", depth=2)).state_dict()
    ckpt = tmp_path / "vit_tiny_depth2.pth"
    torch.save({"model": state, "epoch": 300}, ckpt)  # nested as timm/DeiT training scripts save it
    path = _config(tmp_path, ckpt, _folder(tmp_path / "data"))
    out = tmp_path / "bundle"
    assert main([str(path), "--out", str(out), "--stop-after", "teacher"]) == 0
    from safetensors.torch import load_file

    # one epoch of fine-tuning from the checkpoint: every key kept, the head re-sized to 3 classes
    stage = load_file(str(tmp_path / "bundle.work" / "teacher.safetensors"))
    assert stage["teacher.head.weight"].shape == (3, 192) and state["head.weight"].shape == (1000, 192)
    assert {k[len("teacher."):] for k in stage} == set(state)
    # epochs: 0 keeps the checkpoint's weights exactly (head re-initialised)
    cfg = yaml.safe_load(path.read_text())
    cfg["teacher"]["train"]["epochs"] = 0
    path.write_text(yaml.safe_dump(cfg))
    assert main([str(path), "--out", str(out)]) == 0
    stage = load_file(str(tmp_path / "bundle.work" / "teacher.safetensors"))
    for k, v in state.items():
        if not k.startswith("head"):
            assert torch.equal(stage[f"teacher.{k}"], v), k
    report = json.loads((out / "report.json").read_text())
    assert report["num_train"] == 12 and report["num_val"] == 3 and report["num_test"] == 6
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["input"]["img_size"] == 224 and manifest["input"]["mean"] == [0.485, 0.456, 0.406]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("change,match", [
    ({"teacher": {"checkpoint": "/nonexistent/vit.pth"}}, "teacher.checkpoint: /nonexistent/vit.pth does not exist"),
    ({"teacher": {"checkpoint": "GARBAGE"}}, "not a readable torch checkpoint"),
    ({"teacher": {"reset_head": False}}, "teacher.reset_head: true"),
    ({"data": {"source": "imagefolder:/nonexistent/folder"}}, "ImageFolder: expected /nonexistent/folder/train"),
    ({"device": "cuda"}, "sees no CUDA GPU"),
    ({"device": "tpu"}, "device must be one of"),
    ({"teacher": {"model": {"preset": "vit_huge_patch99"}}}, "teacher.model.preset: unknown 'vit_huge_patch99'"),
    ({"data": {"normalize": "imagenet", "image_size": None}}, None),
])
def test_user_mistakes_are_one_named_error(tmp_path, capsys, change, match):
    if change.get("device") == "cuda" and torch.cuda.is_available():
        pytest.skip("a GPU is present")
    state = VisionTransformer(preset("vit_tiny_patch16_224", depth=2)).state_dict()
    ckpt = tmp_path / "vit.pth"
    torch.save(state, ckpt)
    cfg = yaml.safe_load(_config(tmp_path, ckpt, _folder(tmp_path / "data")).read_text())
    for section, values in change.items():
        if isinstance(values, dict):
            cfg[section].update(values)
        else:
            cfg[section] = values
    if cfg["teacher"]["checkpoint"] == "GARBAGE":
        (tmp_path / "bad.pth").write_bytes(b"not a checkpoint")
        cfg["teacher"]["checkpoint"] = str(tmp_path / "bad.pth")
    if match is None:  # images of another size than the preset's 224: the model config names it
        match = "expects {'img_size': 224}"
        cfg["data"].pop("image_size")
        cfg["data"]["source"] += "-small"
        _small_folder(Path(cfg["data"]["source"].split(":", 1)[1]))
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main([str(path), "--out", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err
    assert match in err and "Traceback" not in err


def _small_folder(root: Path) -> None:
    from PIL import Image

    for split in ("train", "val"):
        for c in CLASSES:
            (root / split / c).mkdir(parents=True)
            for i in range(3):
                Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(root / split / c / f"{i}.png")
