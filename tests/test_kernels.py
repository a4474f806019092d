"""The Numba CPU attention kernel and the references the CUDA kernel's logic is checked against."""

from __future__ import annotations

import numba
import numpy as np
import pytest
from devit_mq.kernels import attention_cpu
from devit_mq.kernels.attention_reference import attention_reference, tiled_attention_reference
from hypothesis import given, settings
from hypothesis import strategies as st

# (batch, heads, tokens, head_dim): odd token counts, batch 1, one head, head_dim not a multiple of 8,
# a single token, and ViT-Tiny's real shape.
SHAPES = [(1, 3, 197, 64), (2, 1, 17, 5), (3, 2, 50, 64), (1, 1, 1, 1), (2, 4, 301, 12),
          (1, 6, 65, 7), (4, 3, 2, 33), (1, 2, 513, 16)]


def make_qkv(batch: int, heads: int, tokens: int, head_dim: int, scale: float = 1.0,
             seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((batch, tokens, 3 * heads * head_dim)) * scale).astype(np.float32)


@pytest.fixture(params=[1, 2], ids=["1thread", "2threads"])
def threads(request):
    previous = numba.get_num_threads()
    numba.set_num_threads(min(request.param, numba.config.NUMBA_NUM_THREADS))
    yield request.param
    numba.set_num_threads(previous)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_cpu_kernel_matches_reference(shape, threads):
    batch, heads, tokens, head_dim = shape
    qkv = make_qkv(*shape)
    out = attention_cpu.fused_attention(qkv, heads)
    assert out.shape == (batch, tokens, heads * head_dim) and out.dtype == np.float32
    np.testing.assert_allclose(out, attention_reference(qkv, heads), rtol=0, atol=2e-5)


@settings(max_examples=40, deadline=None)
@given(batch=st.integers(1, 3), heads=st.integers(1, 4), tokens=st.integers(1, 70),
       head_dim=st.integers(1, 40), scale=st.sampled_from([0.1, 1.0, 4.0]), seed=st.integers(0, 2**16))
def test_cpu_kernel_matches_reference_on_random_shapes(batch, heads, tokens, head_dim, scale, seed):
    qkv = make_qkv(batch, heads, tokens, head_dim, scale, seed)
    out = attention_cpu.fused_attention(qkv, heads)
    np.testing.assert_allclose(out, attention_reference(qkv, heads), rtol=0, atol=1e-4 * max(scale, 1.0))


def test_cpu_kernel_is_stable_for_large_logits():
    # scores of several hundred: a softmax without the max subtracted overflows float32's exp
    qkv = make_qkv(2, 3, 40, 16, scale=30.0)
    out = attention_cpu.fused_attention(qkv, 3)
    assert np.isfinite(out).all()
    ref = attention_reference(qkv, 3)
    np.testing.assert_allclose(out, ref, rtol=0, atol=1e-4 * np.abs(ref).max())


def test_cpu_kernel_exp_is_accurate_over_the_softmax_range():
    x = np.linspace(-87.0, 0.0, 100_001, dtype=np.float32)

    @numba.njit
    def exp_all(values):
        out = np.empty_like(values)
        for i in range(values.size):
            out[i] = attention_cpu._exp_nonpositive(values[i])
        return out

    got = exp_all(x)
    want = np.exp(x.astype(np.float64))
    assert np.max(np.abs(got - want) / want) < 2e-7  # numpy's own float32 exp reaches 2e-7
    assert exp_all(np.array([-1e4, -np.inf], np.float32)).max() < 1e-37  # clamped, not garbage


def test_cpu_kernel_propagates_nan_to_the_affected_head_only():
    qkv = make_qkv(1, 2, 9, 4)
    qkv[0, 3, 2 * 4 + 1] = np.nan  # a key of head 0
    out = attention_cpu.fused_attention(qkv, 2)
    assert np.isnan(out[0, :, :4]).all()
    assert np.isfinite(out[0, :, 4:]).all()


def test_cpu_kernel_accepts_an_empty_batch():
    out = attention_cpu.fused_attention(np.zeros((0, 7, 12), np.float32), 2)
    assert out.shape == (0, 7, 4) and out.dtype == np.float32


def test_cpu_kernel_writes_into_out_and_keeps_nothing_from_a_previous_call():
    qkv_a, qkv_b = make_qkv(2, 3, 31, 8, seed=1), make_qkv(2, 3, 31, 8, seed=2)
    out = np.full((2, 31, 24), np.nan, np.float32)
    assert attention_cpu.fused_attention(qkv_a, 3, out=out) is out
    np.testing.assert_allclose(out, attention_reference(qkv_a, 3), atol=2e-5)
    attention_cpu.fused_attention(qkv_b, 3, out=out)
    np.testing.assert_allclose(out, attention_reference(qkv_b, 3), atol=2e-5)


@pytest.mark.parametrize(
    "qkv, heads, out, error, match",
    [
        (np.zeros((1, 4, 12), np.float64), 2, None, TypeError, "float32"),
        (np.zeros((1, 4, 24), np.float32)[:, :, ::2], 2, None, ValueError, "C-contiguous"),
        (np.zeros((1, 4, 12), np.float32), 5, None, ValueError, "num_heads"),
        (np.zeros((4, 12), np.float32), 2, None, ValueError, "3-d"),
        (np.zeros((1, 0, 12), np.float32), 2, None, ValueError, "no tokens"),
        (np.zeros((0, 0, 12), np.float32), 2, None, ValueError, "no tokens"),
        (np.zeros((1, 4, 12), np.float32), 0, None, ValueError, "positive"),
        (np.zeros((1, 4, 12), np.float32), 2, np.zeros((1, 4, 5), np.float32), ValueError, "out"),
        (np.zeros((1, 4, 12), np.float32), 2, np.zeros((1, 4, 4), np.float64), ValueError, "out"),
    ],
)
def test_cpu_kernel_rejects_bad_input_with_a_named_error(qkv, heads, out, error, match):
    with pytest.raises(error, match=match):
        attention_cpu.fused_attention(qkv, heads, out=out)


@pytest.mark.parametrize("threads_", [1, 2, 3, 8])
@pytest.mark.parametrize("batch, heads, tokens", [(1, 3, 197), (8, 12, 50), (1, 1, 1), (2, 1, 1000)])
def test_query_block_plan_covers_every_row_within_limits(batch, heads, tokens, threads_):
    q_block, chunks = attention_cpu.plan_query_blocks(batch, heads, tokens, threads_)
    n_blocks = -(-tokens // q_block)
    assert 1 <= q_block <= min(tokens, attention_cpu.MAX_QUERY_BLOCK)
    assert (n_blocks - 1) * q_block < tokens <= n_blocks * q_block
    assert 1 <= chunks <= min(threads_, batch * heads * n_blocks)


def test_query_block_plan_balances_two_threads_at_vit_tiny_batch_1():
    q_block, chunks = attention_cpu.plan_query_blocks(1, 3, 197, 2)
    assert chunks == 2 and (3 * -(-197 // q_block)) % 2 == 0


def test_cpu_kernel_keeps_scipys_blas_single_threaded_and_numpys_alone():
    from threadpoolctl import threadpool_info

    before = {lib["filepath"]: lib["num_threads"] for lib in threadpool_info() if lib["user_api"] == "blas"}
    attention_cpu.fused_attention(make_qkv(1, 1, 3, 2), 1)
    after = {lib["filepath"]: lib["num_threads"] for lib in threadpool_info() if lib["user_api"] == "blas"}
    scipy_libs = [path for path in after if "scipy.libs" in path or "/scipy/" in path]
    if not scipy_libs:
        pytest.skip("SciPy shares the process's BLAS here (not a pip wheel layout)")
    assert all(after[path] == 1 for path in scipy_libs)
    assert all(after[path] == before[path] for path in after if path not in scipy_libs)


# -- the reference of the CUDA kernel's schedule ---------------------------------------------------
@pytest.mark.parametrize("block_q, block_k", [(4, 4), (1, 3), (5, 7), (16, 64), (3, 1)])
@pytest.mark.parametrize("shape", [(1, 1, 16, 8), (2, 2, 13, 5), (1, 3, 23, 3)],
                         ids=lambda s: "x".join(map(str, s)))
def test_tiled_online_softmax_reference_matches_plain_reference(shape, block_q, block_k):
    batch, heads, tokens, head_dim = shape
    qkv = make_qkv(*shape, scale=2.0, seed=block_q * 31 + block_k)
    out = tiled_attention_reference(qkv, heads, block_q, block_k)
    np.testing.assert_allclose(out, attention_reference(qkv, heads), rtol=1e-6, atol=1e-5)


def test_tiled_reference_rescales_when_a_later_tile_holds_the_max():
    # the largest score sits in the last tile: every earlier partial sum must be rescaled
    qkv = np.zeros((1, 9, 3), np.float32)
    qkv[0, :, 0] = 1.0                       # q
    qkv[0, :, 1] = np.arange(9) * 3.0        # k: scores grow with the key index
    qkv[0, :, 2] = np.arange(9)              # v
    out = tiled_attention_reference(qkv, 1, block_q=2, block_k=2)
    np.testing.assert_allclose(out, attention_reference(qkv, 1), rtol=1e-6)
    assert out[0, 0, 0] > 7.9  # dominated by the last key, not by the first tile


def test_reference_handles_fp16_input():
    qkv = make_qkv(1, 2, 11, 4).astype(np.float16)
    out = tiled_attention_reference(qkv, 2, 4, 4)
    np.testing.assert_allclose(out, attention_reference(qkv.astype(np.float32), 2), atol=2e-6)
