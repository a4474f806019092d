"""Compile the CUDA attention kernel to PTX without a GPU: proof that it builds for real hardware.

The simulator runs the kernel as Python, so it cannot catch what Numba's CUDA compiler rejects (it
once rejected the builtin ``min`` in the kernel body). This script compiles the real kernel with
NVVM from the ``nvidia-cuda-nvcc-cu12`` wheel for a few compute capabilities and both input
dtypes, and prints one JSON line per build. ``test_kernels_cudasim.py`` runs it in a subprocess:
CUDA_HOME must point at the wheel before ``numba.cuda`` is imported.
"""

from __future__ import annotations

import json
import re
import sys
import types as pytypes

import numba.cuda.dispatcher
from numba import cuda, types

CAPABILITIES = [(7, 5), (8, 0), (9, 0)]


def main() -> int:
    from devit_mq.kernels import attention_cuda

    kernel = attention_cuda._kernel(attention_cuda.DEFAULT_BLOCK_Q, attention_cuda.DEFAULT_BLOCK_K,
                                    attention_cuda.MAX_HEAD_DIM)
    for cc in CAPABILITIES:
        # Device functions are compiled for the *current* device's capability; there is no device
        # here, so answer for it (the only part of this check that stands in for the hardware).
        numba.cuda.dispatcher.get_current_device = lambda cc=cc: pytypes.SimpleNamespace(compute_capability=cc)
        for dtype in (types.float32, types.float16):
            sig = (types.Array(dtype, 3, "C"), types.Array(types.float32, 3, "C"), types.int64,
                   types.int64, types.float32)
            ptx, _ = cuda.compile_ptx(kernel.py_func, sig, cc=cc)
            print(json.dumps({
                "cc": list(cc), "dtype": str(dtype), "ptx_lines": ptx.count("\n"),
                "entry": bool(re.search(r"\.entry\s", ptx)),
                "shared_loads": len(re.findall(r"ld\.shared", ptx)),
                "f64_ops": len(re.findall(r"\.f64\b", ptx)),
            }), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
