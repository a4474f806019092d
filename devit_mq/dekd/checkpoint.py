"""Per-stage checkpoints (safetensors + a JSON sidecar) so ``--resume`` skips finished stages.

A stage is reused only if the hash of everything that determines it (data, configs, upstream stages)
is unchanged; otherwise it is retrained and overwritten."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file
from torch import nn


def stage_key(*parts: Any) -> str:
    blob = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


class StageStore:
    def __init__(self, directory: str | Path, resume: bool) -> None:
        self.directory = Path(directory)
        self.resume = resume
        self.directory.mkdir(parents=True, exist_ok=True)

    def _paths(self, name: str) -> tuple[Path, Path]:
        return self.directory / f"{name}.safetensors", self.directory / f"{name}.json"

    def load(self, name: str, key: str, modules: dict[str, nn.Module], verbose: bool = True) -> dict[str, Any] | None:
        """Load a finished stage into ``modules`` and return its stats, or None to (re)train it."""
        weights, meta_path = self._paths(name)
        if not self.resume or not weights.is_file() or not meta_path.is_file():
            return None
        meta = json.loads(meta_path.read_text())
        if meta.get("key") != key:
            if verbose:
                print(f"[resume] stage {name}: configuration changed since the checkpoint; retraining")
            return None
        tensors = load_file(str(weights))
        for prefix, module in modules.items():
            own = {k[len(prefix) + 1:]: v for k, v in tensors.items() if k.startswith(prefix + ".")}
            module.load_state_dict(own, strict=True)
            module.eval()
        if verbose:
            print(f"[resume] stage {name}: loaded from {weights}")
        return dict(meta.get("stats", {}))

    def save(self, name: str, key: str, modules: dict[str, nn.Module], stats: dict[str, Any]) -> None:
        weights, meta_path = self._paths(name)
        tensors = {f"{prefix}.{k}": v.detach().cpu().contiguous()
                   for prefix, module in modules.items() for k, v in module.state_dict().items()}
        save_file(tensors, str(weights))
        meta_path.write_text(json.dumps({"key": key, "stats": stats}, indent=2) + "\n")
