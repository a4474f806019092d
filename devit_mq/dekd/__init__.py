"""DEKD: decompose a teacher ViT into N class-group sub-models plus a fusion head (DeViT)."""

from .config import DEKDConfig, load_config
from .losses import feature_dropout_mask, fusion_loss, hard_kd, qkv_relation_loss, relation_kl
from .quant import codec_ste, int8_dequantize, int8_quantize, simulate_codec
from .split import split_classes

__all__ = ["DEKDConfig", "codec_ste", "feature_dropout_mask", "fusion_loss", "hard_kd", "int8_dequantize",
           "int8_quantize", "load_config", "qkv_relation_loss", "relation_kl", "simulate_codec", "split_classes"]
