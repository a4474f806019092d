"""devit_mq: collaborative vision-transformer inference across edge devices (DeViT)."""

__version__ = "0.1.0"
