"""A device profile: measured sub-model latencies on one device, and the cost model fitted to them.

A profile answers "how long does this sub-model's forward take on that device?" for any shape
(width, depth, heads, MLP size, and the per-block shapes of a pruned model) without running it
there. :mod:`.measure` times whole batch-1 forwards of random-weight models over a grid of shapes;
the cost model is linear in what the forward computes (:func:`cost_features`), fitted with
non-negative least squares, so every term is a time per unit of work (never a negative cost that
a search could exploit).

File format (JSON, :func:`save_profile` / :func:`load_profile`)::

    {"format": "devit-mq-device-profile", "version": 1,
     "device": NAME, "executor": "numba" | "numpy" | "torch", "threads": INT,
     "cpu_quota": CPUs or null, "cfs_period_ms": ms or null,     # the CPU cap it was measured under
     "speed": 1.0,                   # < 1: measured on an emulated slower device (an edge's `speed:`)
     "gap_ms": 3.0,                  # idle before each timed forward (a batch-1 edge between requests)
     "input": {img_size, in_chans, patch_size, stem, stem_channels, distilled},
     "samples": [{"embed_dim", "num_heads", "mlp_hidden", "depth", "ms"}, ...],   # whole forwards
     "blocks":  [{"embed_dim", "num_heads", "mlp_hidden", "ms_per_block"}, ...],  # depth 3 - depth 1
     "model": {"features": [NAME, ...], "coef_ms": [...], "fit_median_rel_error", "fit_max_rel_error"},
     "host": {...}, "measured_at": ISO-8601}
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from devit_mq.model import ViTConfig

FORMAT = "devit-mq-device-profile"
VERSION = 1
EXECUTORS = ("numba", "numpy", "torch")
# The input side a profile was measured for: a model with another one computes other tokens.
INPUT_KEYS = ("img_size", "in_chans", "patch_size", "stem", "stem_channels", "distilled")
FEATURES = ("call", "embed_mmacs", "linear_mmacs", "attention_mmacs", "elementwise_m", "heads", "blocks")


class ProfileError(ValueError):
    """A profile file is missing, malformed, or does not fit the model asked about; says which."""


def cost_features(cfg: ViTConfig) -> np.ndarray:
    """What one batch-1 forward of ``cfg`` computes, in the units of :data:`FEATURES`.

    Mirrors the torch-free forward (:class:`~devit_mq.model.numpy_vit.ArrayViT`): every block runs
    QKV on all ``T`` tokens; the last block attends with the prefix queries only and runs its
    projection and MLP on the ``P`` prefix rows only. ``elementwise`` counts the values layer norms,
    GELUs and residual adds touch; ``heads`` and ``blocks`` carry the per-call costs of the kernels."""
    t, p, d = cfg.num_tokens, cfg.num_prefix_tokens, cfg.embed_dim
    linear = attention = elementwise = heads = 0.0
    for i in range(cfg.depth):
        inner, hidden, h = cfg.attn_width(i), cfg.mlp_at(i), cfg.heads_at(i)
        rows = p if i == cfg.depth - 1 else t  # rows past the attention
        linear += t * d * 3 * inner + rows * (inner * d + 2 * d * hidden)
        attention += 2 * rows * t * inner
        elementwise += t * d + rows * (2 * d + hidden)
        heads += h
    patch_in = cfg.stem_channels if cfg.stem == "conv" else cfg.in_chans
    embed = cfg.num_patches * d * patch_in * cfg.patch_size ** 2
    if cfg.stem == "conv":
        embed += cfg.img_size ** 2 * 9 * (cfg.in_chans * cfg.stem_channels + cfg.stem_channels ** 2)
    return np.array([1.0, embed / 1e6, linear / 1e6, attention / 1e6, elementwise / 1e6, heads, cfg.depth])


def input_of(cfg: ViTConfig) -> dict[str, Any]:
    return {k: getattr(cfg, k) for k in INPUT_KEYS}


@dataclass
class DeviceProfile:
    """One device's measurements and fitted cost model (see the module docstring for the fields)."""

    device: str
    executor: str
    threads: int
    input: dict[str, Any]
    samples: list[dict[str, Any]]
    cpu_quota: float | None = None
    cfs_period_ms: float | None = None
    speed: float = 1.0  # the emulated device speed it was measured at (EmulatedSpeed; 1: none)
    gap_ms: float = 0.0  # idle before each timed forward (profiles before this field: none)
    blocks: list[dict[str, Any]] = field(default_factory=list)
    coef_ms: list[float] = field(default_factory=list)
    fit_median_rel_error: float = math.nan
    fit_max_rel_error: float = math.nan
    host: dict[str, Any] = field(default_factory=dict)
    measured_at: str = ""

    # -- the cost model ---------------------------------------------------------------------------
    def sample_config(self, sample: dict[str, Any]) -> ViTConfig:
        """The model a sample timed (random weights; only its shape matters)."""
        return ViTConfig(embed_dim=sample["embed_dim"], depth=sample["depth"], num_heads=sample["num_heads"],
                         mlp_ratio=sample["mlp_hidden"] / sample["embed_dim"], **self.input)

    def fit(self) -> DeviceProfile:
        """Fit the non-negative cost coefficients to the samples (in place); returns self."""
        from scipy.optimize import nnls

        if len(self.samples) < len(FEATURES):
            raise ProfileError(f"{self.device}: {len(self.samples)} samples cannot fit {len(FEATURES)} coefficients")
        x = np.stack([cost_features(self.sample_config(s)) for s in self.samples])
        y = np.array([s["ms"] for s in self.samples])
        # relative errors matter (a 0.3 ms model and a 30 ms one alike): weight each row by 1/y
        coef, _ = nnls(x / y[:, None], np.ones_like(y))
        self.coef_ms = [float(c) for c in coef]
        rel = np.abs(x @ coef - y) / y
        self.fit_median_rel_error, self.fit_max_rel_error = float(np.median(rel)), float(rel.max())
        return self

    def predict_ms(self, cfg: ViTConfig) -> float:
        """Predicted batch-1 forward latency of ``cfg`` on this device, in ms."""
        if not self.coef_ms:
            raise ProfileError(f"profile {self.device!r} has no fitted cost model")
        theirs = input_of(cfg)
        if theirs != self.input:
            diff = {k: (self.input.get(k), v) for k, v in theirs.items() if self.input.get(k) != v}
            raise ProfileError(f"profile {self.device!r} was measured for other inputs: (profile, model) = {diff}")
        return float(cost_features(cfg) @ np.array(self.coef_ms))

    # -- files ------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        model = {"features": list(FEATURES), "coef_ms": data.pop("coef_ms"),
                 "fit_median_rel_error": data.pop("fit_median_rel_error"),
                 "fit_max_rel_error": data.pop("fit_max_rel_error")}
        return {"format": FORMAT, "version": VERSION, **data, "model": model}

    @classmethod
    def from_dict(cls, data: Any, where: str = "profile") -> DeviceProfile:
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ProfileError(f"{where}: not a device profile (no \"format\": \"{FORMAT}\")")
        if data.get("version") != VERSION:
            raise ProfileError(f"{where}: profile version {data.get('version')!r}, this build reads {VERSION}")
        try:
            model = data["model"]
            if list(model["features"]) != list(FEATURES):
                raise ProfileError(f"{where}: cost model features {model['features']} differ from {list(FEATURES)}")
            profile = cls(device=_str(data["device"]), executor=data["executor"], threads=int(data["threads"]),
                          input=dict(data["input"]), samples=list(data["samples"]), cpu_quota=data.get("cpu_quota"),
                          cfs_period_ms=data.get("cfs_period_ms"), speed=float(data.get("speed", 1.0)),
                          gap_ms=float(data.get("gap_ms", 0.0)),
                          blocks=list(data.get("blocks", [])),
                          coef_ms=[float(c) for c in model["coef_ms"]],
                          fit_median_rel_error=float(model["fit_median_rel_error"]),
                          fit_max_rel_error=float(model["fit_max_rel_error"]),
                          host=dict(data.get("host", {})), measured_at=str(data.get("measured_at", "")))
        except (KeyError, TypeError, ValueError) as exc:
            if isinstance(exc, ProfileError):
                raise
            raise ProfileError(f"{where}: malformed profile ({type(exc).__name__}: {exc})") from None
        if profile.executor not in EXECUTORS:
            raise ProfileError(f"{where}: executor {profile.executor!r} is not one of {EXECUTORS}")
        if sorted(profile.input) != sorted(INPUT_KEYS):
            raise ProfileError(f"{where}: input needs exactly {list(INPUT_KEYS)}, got {sorted(profile.input)}")
        if len(profile.coef_ms) != len(FEATURES) or any(not math.isfinite(c) or c < 0 for c in profile.coef_ms):
            raise ProfileError(f"{where}: coef_ms must be {len(FEATURES)} finite non-negative numbers")
        return profile


def _str(value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError(f"device must be a non-empty string, got {value!r}")
    return value


def save_profile(profile: DeviceProfile, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(profile.to_dict(), indent=1) + "\n")
    return path


def load_profile(path: str | Path) -> DeviceProfile:
    """The profile in ``path``; ProfileError naming the file if it is missing or malformed."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ProfileError(f"device profile {path}: no such file") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ProfileError(f"device profile {path}: cannot read it as JSON ({exc})") from None
    return DeviceProfile.from_dict(data, where=f"device profile {path}")
