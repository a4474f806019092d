"""ViT/DeiT encoder (timm layout), attention backends, fusion head, ensemble and bundle."""

from .attention import BackendUnavailable, available_backends, get_backend, register_backend
from .bundle import (
    BundleError,
    InputSpec,
    Manifest,
    load_ensemble,
    load_fusion,
    load_manifest,
    load_submodel,
    load_teacher,
    save_bundle,
)
from .calibrate import select_backend, time_backends
from .config import ConfigError, FusionConfig, ViTConfig, preset
from .fusion import DeViTEnsemble, FusionHead, concat_features
from .vit import VisionTransformer, count_parameters, vit_flops

__all__ = [
    "BackendUnavailable", "BundleError", "ConfigError", "DeViTEnsemble", "FusionConfig", "FusionHead",
    "InputSpec", "Manifest", "ViTConfig", "VisionTransformer", "available_backends", "concat_features",
    "count_parameters", "get_backend", "load_ensemble", "load_fusion", "load_manifest", "load_submodel",
    "load_teacher", "preset", "register_backend", "save_bundle", "select_backend", "time_backends",
    "vit_flops",
]
