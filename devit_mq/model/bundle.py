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

import json
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from .fusion import DeViTEnsemble, FusionHead

# the manifest and the file layout need no torch: they live in .manifest
from .manifest import (
    BUNDLE_FORMAT,
    MANIFEST,
    STORAGE_DTYPE_NAMES,
    BundleError,
    Manifest,
    _part_file,
    _sha256,
    load_manifest,
    part_path,
)
from .vit import VisionTransformer

STORAGE_DTYPES = dict(zip(STORAGE_DTYPE_NAMES, (torch.float32, torch.float16), strict=True))


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
