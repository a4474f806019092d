"""Runs tests/cudasim_attention.py in its own pytest process with Numba's CUDA simulator on.

The simulator has to be switched on before ``numba.cuda`` is first imported, so it cannot share
this process (which may already hold the real ``numba.cuda``)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).parent


@pytest.mark.cudasim
@pytest.mark.timeout(150)
def test_cuda_attention_kernel_in_the_simulator():
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1")
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(HERE / "cudasim_attention.py")],
        cwd=HERE.parent, env=env, capture_output=True, text=True, timeout=140,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout and "skipped" not in proc.stdout, proc.stdout[-2000:]
