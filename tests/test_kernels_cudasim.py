"""The CUDA attention kernel in processes of its own: in Numba's CUDA simulator, and compiled to PTX.

The simulator has to be switched on (and CUDA_HOME set, for the PTX build) before ``numba.cuda`` is
first imported, so neither can share this process (which may already hold the real ``numba.cuda``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).parent


def _run(args: list[str], timeout: float, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=HERE.parent, env=dict(os.environ, **env),
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.cudasim
@pytest.mark.timeout(150)
def test_cuda_attention_kernel_in_the_simulator():
    proc = _run(["-m", "pytest", "-q", "-p", "no:cacheprovider", str(HERE / "cudasim_attention.py")],
                timeout=140, NUMBA_ENABLE_CUDASIM="1")
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout and "skipped" not in proc.stdout, proc.stdout[-2000:]


@pytest.mark.timeout(150)
def test_cuda_attention_kernel_compiles_to_ptx_for_real_gpus():
    nvcc = pytest.importorskip("nvidia.cuda_nvcc", reason="NVVM wheel (nvidia-cuda-nvcc-cu12) not installed")
    proc = _run([str(HERE / "cuda_ptx_check.py")], timeout=140, CUDA_HOME=list(nvcc.__path__)[0],
                NUMBA_ENABLE_CUDASIM="0")
    assert proc.returncode == 0, proc.stderr[-4000:]
    builds = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(builds) == 6  # 3 compute capabilities x (float32, float16) input
    for build in builds:
        assert build["entry"] and build["shared_loads"] > 0, build  # a kernel reading its smem tiles
        assert build["f64_ops"] == 0, build  # fp32 arithmetic throughout (fp64 is slow on GPUs)
