"""devit_mq: collaborative vision-transformer inference across edge devices (DeViT).

``devit_mq.Client`` is the entry point for applications; it is imported lazily so that
``import devit_mq`` (and ``devit-mq --help``) stays cheap.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["Client", "__version__"]


def __getattr__(name: str) -> Any:
    if name == "Client":
        from devit_mq.nodes.runtime import Client

        return Client
    raise AttributeError(f"module 'devit_mq' has no attribute {name!r}")
