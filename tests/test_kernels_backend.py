"""The kernels as attention backends of VisionTransformer, and the start-up backend selection."""

from __future__ import annotations

import subprocess
import sys

import numba
import pytest
import torch

from devit_mq.model import (
    BackendUnavailable,
    VisionTransformer,
    ViTConfig,
    get_backend,
    select_backend,
    time_backends,
)
from devit_mq.model.attention import torch_attention

# token counts 17, 50, 65, 10 (odd ones included); one head; head_dim 64, 5, 12, 7 (not multiples of 8)
CONFIGS = {
    "tiny-like": ViTConfig(img_size=32, patch_size=8, embed_dim=192, depth=2, num_heads=3, num_classes=7),
    "one-head-hd5": ViTConfig(img_size=28, patch_size=4, embed_dim=5, depth=2, num_heads=1, num_classes=3),
    "hd12-deit": ViTConfig(img_size=32, patch_size=4, embed_dim=48, depth=3, num_heads=4, num_classes=5,
                           distilled=True),
    "hd7-convstem": ViTConfig(img_size=9, patch_size=3, embed_dim=14, depth=1, num_heads=2, num_classes=2,
                              stem="conv", stem_channels=4),
}


def _trained_looking(cfg: ViTConfig, seed: int = 0) -> VisionTransformer:
    """A model whose attention is not nearly uniform: timm's init (std 0.02) gives almost flat
    softmaxes that would hide errors, so the weights are scaled up."""
    torch.manual_seed(seed)
    model = VisionTransformer(cfg).eval()
    with torch.no_grad():
        for block in model.blocks:
            block.attn.qkv.weight.mul_(25.0)
    return model


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_vit_numba_backend_matches_torch_backend(name, batch):
    cfg = CONFIGS[name]
    model = _trained_looking(cfg)
    x = torch.randn(batch, cfg.in_chans, cfg.img_size, cfg.img_size)
    with torch.inference_mode():
        want, _ = model.forward_tokens(x)
        model.set_attention_backend("numba")
        got, _ = model.forward_tokens(x)
        got_logits = model(x)
        model.set_attention_backend("torch")
        want_logits = model(x)
    assert (got - want).abs().max().item() <= 1e-4
    assert (got_logits - want_logits).abs().max().item() <= 1e-4


def test_config_backend_numba_builds_a_numba_model_with_the_same_outputs():
    cfg = CONFIGS["tiny-like"]
    reference = _trained_looking(cfg, seed=3)
    model = VisionTransformer(cfg.replace(attention_backend="numba")).eval()
    model.load_state_dict(reference.state_dict())
    assert model.attention_backend == "numba"
    x = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        assert (model(x) - reference(x)).abs().max().item() <= 1e-4


def test_numba_backend_attention_matches_sdpa_at_vit_tiny_shape():
    qkv = torch.randn(2, 197, 3 * 192) * 3
    with torch.inference_mode():
        diff = (get_backend("numba")(qkv, 3) - torch_attention(qkv, 3)).abs().max().item()
    assert diff <= 1e-4


def test_vit_numba_backend_handles_an_empty_batch():
    model = VisionTransformer(CONFIGS["one-head-hd5"].replace(attention_backend="numba")).eval()
    with torch.inference_mode():
        assert model(torch.zeros(0, 3, 28, 28)).shape == (0, 3)


def test_numba_backend_follows_torch_thread_count():
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        get_backend("numba")(torch.randn(1, 5, 12), 2)
        assert numba.get_num_threads() == 1
    finally:
        torch.set_num_threads(previous)


@pytest.mark.timeout(60)
def test_numba_backend_leaves_torch_thread_count_alone():
    # a fresh process: Numba's thread pool starts once per process, and starting it used to reset
    # torch's (OpenMP) thread count to all cores
    code = (
        "import torch; torch.set_num_threads(1)\n"
        "from devit_mq.model import get_backend\n"
        "get_backend('numba')(torch.randn(2, 5, 12), 2)\n"
        "print(torch.get_num_threads())\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=50)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split()[-1] == "1"


def test_training_with_numba_backend_falls_back_to_torch_for_gradients():
    model = VisionTransformer(CONFIGS["one-head-hd5"].replace(attention_backend="numba"))
    out = model(torch.randn(2, 3, 28, 28))
    out.sum().backward()  # the numba kernel has no backward: vit.py must have used SDPA here
    assert model.blocks[0].attn.qkv.weight.grad is not None


def test_numba_backend_rejects_non_float32_with_a_named_error():
    with pytest.raises(TypeError, match="float32"):
        get_backend("numba")(torch.randn(1, 5, 12, dtype=torch.float64), 2)


def test_cuda_backend_without_device_says_why():
    from numba import cuda

    if cuda.is_available():
        pytest.skip("a CUDA device (or the simulator) is present")
    with pytest.raises(BackendUnavailable, match="no CUDA device"):
        get_backend("cuda")
    model = VisionTransformer(CONFIGS["one-head-hd5"])
    with pytest.raises(BackendUnavailable, match="no CUDA device"):
        model.set_attention_backend("cuda")
    assert model.attention_backend == "torch"


def test_select_backend_picks_a_measured_candidate_and_installs_it():
    model = VisionTransformer(CONFIGS["tiny-like"]).eval()
    best = select_backend(model, batch_size=2, candidates=("torch", "numba", "cuda", "nope"), reps=3)
    assert best in ("torch", "numba")
    assert model.attention_backend == best


def test_select_backend_without_apply_leaves_the_model_alone():
    model = VisionTransformer(CONFIGS["tiny-like"]).eval()
    best = select_backend(model, candidates=("numba",), reps=2, apply=False)
    assert best == "numba" and model.attention_backend == "torch"


def test_select_backend_falls_back_to_torch_when_nothing_runs():
    model = VisionTransformer(CONFIGS["tiny-like"].replace(attention_backend="numba")).eval()
    assert select_backend(model, candidates=("nope",), reps=1) == "torch"
    assert model.attention_backend == "torch"


def test_time_backends_skips_a_backend_that_disagrees_with_torch():
    from devit_mq.model.attention import _BACKENDS, register_backend

    register_backend("broken-for-test", lambda qkv, heads: torch_attention(qkv, heads) + 1e-2)
    try:
        timings = time_backends(2, torch.randn(1, 9, 24), ["torch", "broken-for-test"], reps=2)
    finally:
        _BACKENDS.pop("broken-for-test")
    assert set(timings) == {"torch"} and timings["torch"] > 0


def test_select_backend_rejects_bad_batch_size():
    with pytest.raises(ValueError, match="batch_size"):
        select_backend(VisionTransformer(CONFIGS["tiny-like"]), batch_size=0)
