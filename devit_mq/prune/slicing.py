"""A physically smaller sub-model from the heads and MLP neurons kept in each block.

Head ``h`` of a block owns rows ``t*inner + h*head_dim ... + head_dim`` of ``attn.qkv`` (``t`` = q, k,
v) and the same columns of ``attn.proj``; neuron ``j`` owns row ``j`` of ``mlp.fc1`` and column
``j`` of ``mlp.fc2``. Slicing keeps exactly those, so the sliced model computes what the original
computes with the dropped heads' outputs and neurons' activations set to zero
(:func:`masked`, the reference the tests hold it to).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch

from ..model import VisionTransformer


def _check(model: VisionTransformer, keep: Sequence[Sequence[int]], sizes: Sequence[int], what: str) -> None:
    if len(keep) != len(sizes):
        raise ValueError(f"{what}: {len(keep)} blocks given, the model has {len(sizes)}")
    for i, (k, size) in enumerate(zip(keep, sizes, strict=True)):
        if not k or len(set(k)) != len(k) or not all(0 <= j < size for j in k):
            raise ValueError(f"{what}[{i}]: need distinct indices in 0..{size - 1}, at least one, got {list(k)}")


def head_rows(heads: Sequence[int], num_heads: int, head_dim: int) -> torch.Tensor:
    """Row indices of ``attn.qkv`` for the kept ``heads`` (q rows, then k, then v)."""
    inner = num_heads * head_dim
    per = [t * inner + h * head_dim + j for t in range(3) for h in heads for j in range(head_dim)]
    return torch.tensor(per, dtype=torch.long)


def head_columns(heads: Sequence[int], head_dim: int) -> torch.Tensor:
    """Column indices of ``attn.proj`` (the head-merged width) for the kept ``heads``."""
    return torch.tensor([h * head_dim + j for h in heads for j in range(head_dim)], dtype=torch.long)


@torch.no_grad()
def slice_model(model: VisionTransformer, heads: Sequence[Sequence[int]],
                neurons: Sequence[Sequence[int]]) -> VisionTransformer:
    """A new model keeping, in block ``i``, heads ``heads[i]`` and MLP neurons ``neurons[i]`` (indices
    into that block's current heads/neurons; order kept as given, sorted is conventional)."""
    cfg = model.config
    _check(model, heads, [cfg.heads_at(i) for i in range(cfg.depth)], "heads")
    _check(model, neurons, [cfg.mlp_at(i) for i in range(cfg.depth)], "neurons")
    new_cfg = cfg.replace(block_heads=tuple(len(h) for h in heads), block_mlp=tuple(len(n) for n in neurons))
    small = VisionTransformer(new_cfg)
    state = model.state_dict()
    out = dict(state)
    hd = cfg.head_dim
    for i in range(cfg.depth):
        b = f"blocks.{i}."
        rows = head_rows(list(heads[i]), cfg.heads_at(i), hd)
        cols = head_columns(list(heads[i]), hd)
        out[b + "attn.qkv.weight"] = state[b + "attn.qkv.weight"][rows]
        if cfg.qkv_bias:
            out[b + "attn.qkv.bias"] = state[b + "attn.qkv.bias"][rows]
        out[b + "attn.proj.weight"] = state[b + "attn.proj.weight"][:, cols]
        keep = torch.tensor(list(neurons[i]), dtype=torch.long)
        out[b + "mlp.fc1.weight"] = state[b + "mlp.fc1.weight"][keep]
        out[b + "mlp.fc1.bias"] = state[b + "mlp.fc1.bias"][keep]
        out[b + "mlp.fc2.weight"] = state[b + "mlp.fc2.weight"][:, keep]
    small.load_state_dict({k: v.clone() for k, v in out.items()}, strict=True)
    small.set_attention_backend(model.attention_backend)
    return small.eval()


@contextlib.contextmanager
def masked(model: VisionTransformer, heads: Sequence[Sequence[int]],
           neurons: Sequence[Sequence[int]]) -> Iterator[VisionTransformer]:
    """``model`` with every head not in ``heads[i]`` and every neuron not in ``neurons[i]`` giving zero
    (its input to ``attn.proj`` / ``mlp.fc2`` multiplied by 0) while the context lasts."""
    cfg = model.config
    handles = []

    def hook(mask: torch.Tensor):
        return lambda _module, args: (args[0] * mask.to(args[0].dtype),)

    for i, block in enumerate(model.blocks):
        head_mask = torch.zeros(cfg.heads_at(i), cfg.head_dim)
        head_mask[list(heads[i])] = 1.0
        neuron_mask = torch.zeros(cfg.mlp_at(i))
        neuron_mask[list(neurons[i])] = 1.0
        handles.append(block.attn.proj.register_forward_pre_hook(hook(head_mask.flatten())))
        handles.append(block.mlp.fc2.register_forward_pre_hook(hook(neuron_mask)))
    try:
        yield model
    finally:
        for h in handles:
            h.remove()
