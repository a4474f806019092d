"""A sub-model's forward on NumPy arrays, without torch: what the ``numpy`` and ``numba`` edge
executors run.

:class:`ArrayViT` computes exactly what :meth:`VisionTransformer.forward_prefix` computes (the
final-norm CLS and DIST tokens an edge sends) from the same timm-layout weights, read straight from
the bundle's safetensors with safetensors' NumPy API. The ops come from a module passed in
(:mod:`devit_mq.kernels.vit_numpy` or :mod:`devit_mq.kernels.vit_numba`, same names), matrix
products included (BLAS in both).

Layout: images stay channels-last (``[B, H, W, C]``, as on the wire), so the convolutions are
im2col + one matrix product whose ``[B*H*W, C_out]`` result is channels-last again, with no
transposes. Tokens are a ``[B*T, D]`` matrix between blocks.

Two exact shortcuts, both because nothing after the last attention mixes tokens: the last block's
attention is computed for the prefix queries only, and its projection and MLP run on the prefix
rows only; the final norm rides on the last residual add.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from devit_mq.kernels import vit_numpy

from .config import ViTConfig
from .manifest import BundleError, Manifest, load_manifest, part_path

_f32 = np.float32


def expected_shapes(cfg: ViTConfig) -> dict[str, tuple[int, ...]]:
    """Every key of a sub-model's timm-layout state dict and its shape (what a bundle part holds)."""
    d, p = cfg.embed_dim, cfg.patch_size
    shapes: dict[str, tuple[int, ...]] = {}
    proj_in = cfg.in_chans
    if cfg.stem == "conv":
        c = cfg.stem_channels
        for i, c_in in ((0, cfg.in_chans), (2, c)):  # nn.Sequential(conv, GELU, conv, GELU)
            shapes[f"patch_embed.stem.{i}.weight"] = (c, c_in, 3, 3)
            shapes[f"patch_embed.stem.{i}.bias"] = (c,)
        proj_in = c
    shapes["patch_embed.proj.weight"] = (d, proj_in, p, p)
    shapes["patch_embed.proj.bias"] = (d,)
    shapes["cls_token"] = (1, 1, d)
    if cfg.distilled:
        shapes["dist_token"] = (1, 1, d)
    shapes["pos_embed"] = (1, cfg.num_tokens, d)
    for i in range(cfg.depth):
        b, inner, hidden = f"blocks.{i}.", cfg.attn_width(i), cfg.mlp_at(i)
        layers = {"norm1": (d,), "attn.qkv": (3 * inner, d), "attn.proj": (d, inner), "norm2": (d,),
                  "mlp.fc1": (hidden, d), "mlp.fc2": (d, hidden)}
        for name, shape in layers.items():
            shapes[b + name + ".weight"] = shape
            if name != "attn.qkv" or cfg.qkv_bias:
                shapes[b + name + ".bias"] = (shape[0],)
    shapes["norm.weight"] = shapes["norm.bias"] = (d,)
    heads = ["head"] + (["head_dist"] if cfg.distilled else [])
    for head in heads if cfg.num_classes else []:
        shapes[f"{head}.weight"] = (cfg.num_classes, d)
        shapes[f"{head}.bias"] = (cfg.num_classes,)
    return shapes


def check_weights(cfg: ViTConfig, weights: dict[str, np.ndarray], where: str) -> None:
    """BundleError naming the first missing, unexpected or mis-shaped keys of ``weights``."""
    shapes = expected_shapes(cfg)
    missing = sorted(set(shapes) - set(weights))
    unexpected = sorted(set(weights) - set(shapes))
    if missing or unexpected:
        raise BundleError(f"{where}: missing keys {missing[:5]}, unexpected keys {unexpected[:5]}")
    for key, shape in shapes.items():
        if tuple(weights[key].shape) != shape:
            raise BundleError(f"{where}: {key} has shape {tuple(weights[key].shape)}, the configured model "
                              f"needs {shape}")


@dataclass(frozen=True)
class _Block:
    """One transformer block's weights, float32, matrices ``[out, in]`` as timm stores them."""

    norm1: tuple[np.ndarray, np.ndarray]
    qkv: np.ndarray
    qkv_b: np.ndarray | None
    proj: np.ndarray
    proj_b: np.ndarray
    norm2: tuple[np.ndarray, np.ndarray]
    fc1: np.ndarray
    fc1_b: np.ndarray
    fc2: np.ndarray
    fc2_b: np.ndarray


class ArrayViT:
    """The ViT/DeiT encoder up to the prefix tokens, on NumPy arrays with the given ``ops``."""

    def __init__(self, config: ViTConfig, weights: dict[str, np.ndarray], ops: ModuleType = vit_numpy,
                 where: str = "weights") -> None:
        check_weights(config, weights, where)
        self.config = config
        self.ops = ops
        w = {k: np.ascontiguousarray(v, dtype=_f32) for k, v in weights.items()}  # bundles may store fp16
        self.stem = []  # (weight [C_out, 9*C_in], bias) per 3x3 convolution
        if config.stem == "conv":
            self.stem = [(_conv_matrix(w[f"patch_embed.stem.{i}.weight"]), w[f"patch_embed.stem.{i}.bias"])
                         for i in (0, 2)]
        self.patch = _conv_matrix(w["patch_embed.proj.weight"])  # [D, C*p*p]
        self.patch_b = w["patch_embed.proj.bias"]
        prefix = [w["cls_token"]] + ([w["dist_token"]] if config.distilled else [])
        self.prefix = np.concatenate(prefix, axis=1)[0]  # [P, D]
        self.pos_embed = w["pos_embed"][0]  # [T, D]
        self.blocks = [self._block(w, f"blocks.{i}.") for i in range(config.depth)]
        self.norm = (w["norm.weight"], w["norm.bias"])

    @staticmethod
    def _block(w: dict[str, np.ndarray], b: str) -> _Block:
        return _Block(
            norm1=(w[b + "norm1.weight"], w[b + "norm1.bias"]),
            qkv=w[b + "attn.qkv.weight"], qkv_b=w.get(b + "attn.qkv.bias"),
            proj=w[b + "attn.proj.weight"], proj_b=w[b + "attn.proj.bias"],
            norm2=(w[b + "norm2.weight"], w[b + "norm2.bias"]),
            fc1=w[b + "mlp.fc1.weight"], fc1_b=w[b + "mlp.fc1.bias"],
            fc2=w[b + "mlp.fc2.weight"], fc2_b=w[b + "mlp.fc2.bias"])

    @classmethod
    def from_bundle(cls, directory: str | Path, index: int, manifest: Manifest | None = None,
                    ops: ModuleType = vit_numpy, verify: bool = True) -> ArrayViT:
        """Sub-model ``index`` of a bundle (only its own file is read)."""
        from safetensors import SafetensorError
        from safetensors.numpy import load_file

        manifest = manifest or load_manifest(directory)
        if not 0 <= index < manifest.num_parts:
            raise BundleError(f"sub-model index {index} out of range: bundle has {manifest.num_parts}")
        part = f"submodel_{index}"
        path = part_path(directory, manifest, part, verify)
        try:
            weights = load_file(str(path))
        except (SafetensorError, OSError) as exc:
            raise BundleError(f"bundle part {part!r}: cannot read {path}: {exc}") from exc
        return cls(manifest.submodels[index], weights, ops, where=f"bundle part {part!r}")

    def with_ops(self, ops: ModuleType) -> ArrayViT:
        """The same model (weights shared, not copied) computing with other ``ops``."""
        twin = copy.copy(self)
        twin.ops = ops
        return twin

    @property
    def num_prefix_tokens(self) -> int:
        return self.config.num_prefix_tokens

    # -- forward ----------------------------------------------------------------------------------
    def forward_prefix(self, x: np.ndarray) -> np.ndarray:
        """Normalised float32 images ``[B, H, W, C]`` -> final-norm prefix tokens ``[B, P, D]``."""
        cfg = self.config
        if x.ndim != 4 or x.shape[1:] != (cfg.img_size, cfg.img_size, cfg.in_chans) or x.dtype != _f32:
            raise ValueError(f"expected float32 images [B, {cfg.img_size}, {cfg.img_size}, {cfg.in_chans}], "
                             f"got {x.dtype} {tuple(x.shape)}")
        batch, n_prefix, dim = len(x), self.num_prefix_tokens, cfg.embed_dim
        x = self._tokens(x).reshape(-1, dim)  # [B*T, D]: the residual stream
        ops, blocks = self.ops, self.blocks
        h = ops.layernorm(x, *blocks[0].norm1, cfg.norm_eps)
        for i, blk in enumerate(blocks):
            heads, inner = cfg.heads_at(i), cfg.attn_width(i)  # fewer heads in a pruned block
            qkv = ops.linear(h, blk.qkv, blk.qkv_b).reshape(batch, -1, 3 * inner)
            if i < len(blocks) - 1:
                attended = ops.attention(qkv, heads)
            else:  # only the prefix rows go on from here
                attended = vit_numpy.attention(qkv, heads, queries=n_prefix)
                x = np.ascontiguousarray(x.reshape(batch, -1, dim)[:, :n_prefix]).reshape(-1, dim)
            # biases of proj, fc1 and fc2 ride on the fused op that follows each product
            h = ops.residual_layernorm(x, ops.linear(attended.reshape(-1, inner), blk.proj), blk.proj_b,
                                       *blk.norm2, cfg.norm_eps)
            hidden = ops.bias_gelu(ops.linear(h, blk.fc1), blk.fc1_b)
            norm = blocks[i + 1].norm1 if i < len(blocks) - 1 else self.norm
            h = ops.residual_layernorm(x, ops.linear(hidden, blk.fc2), blk.fc2_b, *norm, cfg.norm_eps)
        return h.reshape(batch, n_prefix, dim)

    def _tokens(self, x: np.ndarray) -> np.ndarray:
        """Images -> prefix + patch tokens with position embeddings, ``[B, T, D]``."""
        for weight, bias in self.stem:
            x = self._conv3x3_gelu(x, weight, bias)
        batch, size, _, chans = x.shape
        p = self.config.patch_size
        grid = size // p
        # non-overlapping p x p patches, each flattened as (C, p, p) like the conv weight
        cols = x.reshape(batch, grid, p, grid, p, chans).transpose(0, 1, 3, 5, 2, 4).reshape(-1, chans * p * p)
        patches = self.ops.linear(cols, self.patch, self.patch_b)
        tokens = np.empty((batch, len(self.pos_embed), self.config.embed_dim), _f32)
        tokens[:, : len(self.prefix)] = self.prefix
        tokens[:, len(self.prefix):] = patches.reshape(batch, grid * grid, -1)
        tokens += self.pos_embed
        return tokens

    def _conv3x3_gelu(self, x: np.ndarray, weight: np.ndarray, bias: np.ndarray) -> np.ndarray:
        """3x3 convolution, padding 1, then GELU: ``[B, H, W, C_in]`` -> ``[B, H, W, C_out]``."""
        batch, height, width, chans = x.shape
        padded = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
        cols = sliding_window_view(padded, (3, 3), axis=(1, 2)).reshape(-1, chans * 9)  # (C, kh, kw) order
        out = self.ops.bias_gelu(self.ops.linear(cols, weight), bias)
        return out.reshape(batch, height, width, -1)


def _conv_matrix(weight: np.ndarray) -> np.ndarray:
    """A conv weight ``[C_out, C_in, kh, kw]`` as the ``[C_out, C_in*kh*kw]`` matrix of im2col."""
    return weight.reshape(len(weight), -1)
