"""The bundle: one directory that every node loads its own part from.

Layout::

    bundle/
      manifest.json            format, version, classes, class groups, configs, input spec, checksums
      submodel_0.safetensors   one file per sub-model: an edge reads only its own
      submodel_1.safetensors
      fusion.safetensors       the aggregator reads only this
      teacher.safetensors      optional (benchmarks and reports)

Weights are safetensors (no pickle, memory-mapped, partial reads); the manifest is plain JSON so any
tool can read it. Every file's SHA-256 is recorded, so a truncated or swapped file fails loudly.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from devit_mq.protocol import MANIFEST_FILE

from .config import ConfigError, FusionConfig, ViTConfig
from .fusion import DeViTEnsemble, FusionHead
from .vit import VisionTransformer

BUNDLE_FORMAT = "devit-mq-bundle"
BUNDLE_VERSION = 1
MANIFEST = MANIFEST_FILE  # one name for the trainer, the nodes and the topology checker
STORAGE_DTYPES = {"float32": torch.float32, "float16": torch.float16}


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

    def to_tensor(self, images: np.ndarray | torch.Tensor) -> torch.Tensor:
        """uint8 ``[B, H, W, C]`` (or ``[B, H, W]`` for one channel) -> normalised float ``[B, C, H, W]``."""
        if isinstance(images, np.ndarray) and not images.flags.writeable:
            images = images.copy()  # a view of a received frame: torch wants writable memory
        x = torch.as_tensor(np.asarray(images))
        if x.ndim == 3 and self.in_chans == 1:
            x = x.unsqueeze(-1)
        if x.ndim != 4 or tuple(x.shape[1:]) != self.image_shape:
            raise ValueError(f"expected images [B, {', '.join(map(str, self.image_shape))}], got {tuple(x.shape)}")
        x = x.permute(0, 3, 1, 2).float().div_(255.0)
        mean = torch.tensor(self.mean).view(1, -1, 1, 1)
        std = torch.tensor(self.std).view(1, -1, 1, 1)
        return (x - mean) / std

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
        if self.storage_dtype not in STORAGE_DTYPES:
            raise BundleError(f"storage_dtype must be one of {sorted(STORAGE_DTYPES)}, got {self.storage_dtype!r}")

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


def save_bundle(
    directory: str | Path,
    manifest: Manifest,
    ensemble: DeViTEnsemble,
    teacher: VisionTransformer | None = None,
) -> Path:
    """Write the manifest and one safetensors file per part; returns the directory."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    dtype = STORAGE_DTYPES[manifest.storage_dtype]
    parts: dict[str, nn.Module] = {f"submodel_{i}": m for i, m in enumerate(ensemble.submodels)}
    parts["fusion"] = ensemble.fusion
    if teacher is not None:
        parts["teacher"] = teacher
        manifest.teacher = teacher.config
    files = {}
    for part, module in parts.items():
        tensors = {k: v.detach().to("cpu", dtype if v.is_floating_point() else v.dtype).contiguous()
                   for k, v in module.state_dict().items()}
        path = out / _part_file(part)
        save_file(tensors, str(path), metadata={"part": part, "format": BUNDLE_FORMAT})
        files[part] = {"file": path.name, "sha256": _sha256(path)}
    manifest.files = files
    manifest.validate()
    tmp = out / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest.to_dict(), indent=2) + "\n")
    tmp.replace(out / MANIFEST)
    return out


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


def _load_part(directory: Path, manifest: Manifest, part: str, module: nn.Module, verify: bool) -> None:
    path = part_path(directory, manifest, part, verify)
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as exc:
        raise BundleError(f"bundle part {part!r}: cannot read {path}: {exc}") from exc
    own = module.state_dict()
    missing = sorted(set(own) - set(tensors))
    unexpected = sorted(set(tensors) - set(own))
    if missing or unexpected:
        raise BundleError(f"bundle part {part!r}: missing keys {missing[:5]}, unexpected keys {unexpected[:5]}")
    for key, value in tensors.items():
        if tuple(value.shape) != tuple(own[key].shape):
            raise BundleError(f"bundle part {part!r}: {key} has shape {tuple(value.shape)}, "
                              f"the configured model needs {tuple(own[key].shape)}")
    module.load_state_dict({k: v.to(own[k].dtype) for k, v in tensors.items()}, strict=True)


def load_submodel(
    directory: str | Path, index: int, manifest: Manifest | None = None, verify: bool = True,
    attention_backend: str | None = None,
) -> VisionTransformer:
    """Load only sub-model ``index`` (what one edge needs), in eval mode."""
    directory = Path(directory)
    manifest = manifest or load_manifest(directory)
    if not 0 <= index < manifest.num_parts:
        raise BundleError(f"sub-model index {index} out of range: bundle has {manifest.num_parts}")
    config = manifest.submodels[index]
    if attention_backend is not None:
        config = config.replace(attention_backend=attention_backend)
    model = VisionTransformer(config)
    _load_part(directory, manifest, f"submodel_{index}", model, verify)
    return model.eval()


def load_fusion(directory: str | Path, manifest: Manifest | None = None, verify: bool = True) -> FusionHead:
    """Load only the fusion head (what the aggregator needs), in eval mode."""
    directory = Path(directory)
    manifest = manifest or load_manifest(directory)
    head = FusionHead(manifest.fusion)
    _load_part(directory, manifest, "fusion", head, verify)
    return head.eval()


def load_teacher(directory: str | Path, manifest: Manifest | None = None, verify: bool = True) -> VisionTransformer:
    directory = Path(directory)
    manifest = manifest or load_manifest(directory)
    if manifest.teacher is None:
        raise BundleError(f"bundle {directory} ships no teacher")
    model = VisionTransformer(manifest.teacher)
    _load_part(directory, manifest, "teacher", model, verify)
    return model.eval()


def load_ensemble(directory: str | Path, verify: bool = True) -> tuple[DeViTEnsemble, Manifest]:
    directory = Path(directory)
    manifest = load_manifest(directory)
    subs: Sequence[VisionTransformer] = [
        load_submodel(directory, i, manifest, verify) for i in range(manifest.num_parts)
    ]
    ensemble = DeViTEnsemble(subs, load_fusion(directory, manifest, verify))
    return ensemble.eval(), manifest
