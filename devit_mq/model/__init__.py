"""ViT/DeiT encoder (timm layout), attention backends, fusion head, ensemble and bundle.

Names are resolved on first use (PEP 562), so ``from devit_mq.model import load_manifest`` or
``devit_mq.model.numpy_vit`` never imports torch: only the torch modules' own names do
(an edge running the NumPy forward, the aggregator and a client stay torch-free).
"""

from __future__ import annotations

import importlib
from typing import Any

# public name -> the submodule that defines it
_EXPORTS: dict[str, str] = {
    **dict.fromkeys(("BackendUnavailable", "available_backends", "get_backend", "register_backend"), "attention"),
    **dict.fromkeys(("load_ensemble", "load_fusion", "load_submodel", "load_teacher", "save_bundle"), "bundle"),
    **dict.fromkeys(("BundleError", "InputSpec", "Manifest", "load_manifest"), "manifest"),
    **dict.fromkeys(("select_backend", "time_backends"), "calibrate"),
    **dict.fromkeys(("ConfigError", "FusionConfig", "ViTConfig", "preset"), "config"),
    **dict.fromkeys(("DeViTEnsemble", "FusionHead", "concat_features"), "fusion"),
    **dict.fromkeys(("VisionTransformer", "block_macs", "count_parameters", "vit_flops", "vit_macs"), "vit"),
}
__all__ = sorted(_EXPORTS)

def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
