"""The Numba-CUDA attention kernel in Numba's CUDA simulator (tiny shapes: the simulator is slow).

Not collected by the default run (the simulator must be switched on before ``numba.cuda`` is first
imported, which a shared pytest process cannot promise): ``test_kernels_cudasim.py`` runs this file
in its own pytest process with ``NUMBA_ENABLE_CUDASIM=1``.
"""

from __future__ import annotations

import numba
import numpy as np
import pytest

if not numba.config.ENABLE_CUDASIM:  # pragma: no cover - guards against a direct run without it
    pytest.exit("run with NUMBA_ENABLE_CUDASIM=1 (see tests/test_kernels_cudasim.py)", returncode=4)

from devit_mq.kernels import attention_cuda  # noqa: E402
from devit_mq.kernels.attention_reference import attention_reference, tiled_attention_reference  # noqa: E402
from numba import cuda  # noqa: E402


def make_qkv(batch, heads, tokens, head_dim, seed=0, scale=1.0, dtype=np.float32):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((batch, tokens, 3 * heads * head_dim)) * scale).astype(dtype)


# (batch, heads, tokens, head_dim, block_q, block_k): partial query blocks and key tiles, a tile
# larger than the sequence, one-key tiles, several blocks per head
CASES = [(1, 1, 16, 8, 8, 8), (2, 2, 13, 5, 4, 8), (1, 2, 16, 8, 16, 32), (1, 1, 11, 3, 16, 1),
         (1, 1, 1, 4, 2, 2)]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c)))
def test_kernel_matches_references(case):
    batch, heads, tokens, head_dim, block_q, block_k = case
    qkv = make_qkv(batch, heads, tokens, head_dim, seed=sum(case), scale=2.0)
    out = attention_cuda.fused_attention(qkv, heads, block_q=block_q, block_k=block_k)
    assert isinstance(out, np.ndarray) and out.dtype == np.float32
    np.testing.assert_allclose(out, attention_reference(qkv, heads), rtol=1e-6, atol=1e-5)
    np.testing.assert_allclose(out, tiled_attention_reference(qkv, heads, block_q, block_k),
                               rtol=1e-6, atol=1e-6)


def test_kernel_default_tiles_and_fp16_input():
    qkv = make_qkv(1, 2, 16, 8, seed=3, dtype=np.float16)
    out = attention_cuda.fused_attention(qkv, 2)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, attention_reference(qkv.astype(np.float32), 2), atol=1e-5)


def test_kernel_on_device_arrays_stays_on_device_and_fills_out():
    qkv = make_qkv(2, 1, 12, 4, seed=5)
    d_out = cuda.device_array((2, 12, 4), np.float32)
    result = attention_cuda.fused_attention(cuda.to_device(qkv), 1, out=d_out, block_q=8, block_k=4)
    assert result is d_out
    np.testing.assert_allclose(d_out.copy_to_host(), attention_reference(qkv, 1), atol=1e-5)


def test_kernel_accepts_an_empty_batch():
    out = attention_cuda.fused_attention(np.zeros((0, 5, 6), np.float32), 1)
    assert out.shape == (0, 5, 2) and out.dtype == np.float32
    with pytest.raises(ValueError, match="no tokens"):
        attention_cuda.fused_attention(np.zeros((1, 0, 6), np.float32), 1)


def test_kernel_fills_host_out():
    qkv = make_qkv(1, 1, 9, 4, seed=6)
    out = np.full((1, 9, 4), np.nan, np.float32)
    assert attention_cuda.fused_attention(qkv, 1, out=out, block_q=4, block_k=4) is out
    np.testing.assert_allclose(out, attention_reference(qkv, 1), atol=1e-5)


@pytest.mark.parametrize("qkv, heads, kwargs, error, match", [
    (np.zeros((1, 4, 12), np.float64), 2, {}, TypeError, "float32 or float16"),
    (np.zeros((1, 4, 3 * 130), np.float32), 1, {}, ValueError, "MAX_HEAD_DIM"),
    (np.zeros((1, 4, 12), np.float32), 5, {}, ValueError, "num_heads"),
    (np.zeros((1, 4, 12), np.float32), 2, {"block_k": 0}, ValueError, "positive"),
    (np.zeros((1, 4, 12), np.float32), 2, {"out": np.zeros((1, 4, 3), np.float32)}, ValueError, "out"),
    ([[1.0]], 1, {}, TypeError, "numpy array or a CUDA array"),
])
def test_kernel_rejects_bad_input(qkv, heads, kwargs, error, match):
    with pytest.raises(error, match=match):
        attention_cuda.fused_attention(qkv, heads, **kwargs)


def test_host_out_for_device_input_is_rejected():
    with pytest.raises(TypeError, match="where qkv lives"):
        attention_cuda.fused_attention(cuda.to_device(make_qkv(1, 1, 4, 2)), 1,
                                       out=np.zeros((1, 4, 2), np.float32))


def test_vit_cuda_backend_matches_torch_backend():
    import torch

    from devit_mq.model import VisionTransformer, ViTConfig

    torch.manual_seed(0)
    cfg = ViTConfig(img_size=12, patch_size=4, embed_dim=12, depth=1, num_heads=2, num_classes=3)
    model = VisionTransformer(cfg).eval()
    x = torch.randn(1, 3, 12, 12)
    with torch.inference_mode():
        want, _ = model.forward_tokens(x)
        model.set_attention_backend("cuda")
        got, _ = model.forward_tokens(x)
    assert model.attention_backend == "cuda"
    assert (got - want).abs().max().item() <= 1e-4
