"""Import timm as a *reference implementation* without torchvision.

timm is the ground truth for checkpoint compatibility, but it imports torchvision at module level
(for data transforms and a frozen batch-norm helper that ViT never uses), and PyPI's torchvision does
not work beside the pinned torch. The tests therefore install timm without dependencies and satisfy
its torchvision imports with inert placeholder modules. Nothing in a ViT/DeiT forward pass touches
them, so the logits compared are timm's own.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
import types


class _PlaceholderMeta(type):
    def __getattr__(cls, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        return _PlaceholderMeta(name, (), {})


class _PlaceholderModule(types.ModuleType):
    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        return _PlaceholderMeta(name, (), {})


class _TorchvisionPlaceholder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path, target=None):
        if fullname == "torchvision" or fullname.startswith("torchvision."):
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        return _PlaceholderModule(spec.name)

    def exec_module(self, module):
        module.__path__ = []


def import_timm():
    """timm, or None when it is not installed (the compatibility tests then skip)."""
    try:
        import torchvision  # noqa: F401  (a working real one wins)
    except Exception:
        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[name]
        sys.meta_path.insert(0, _TorchvisionPlaceholder())
    try:
        import timm
    except ImportError:
        return None
    return timm
