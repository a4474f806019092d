"""BLAS ``sgemm`` callable from ``@njit`` code, on raw addresses, plus a single-thread guard.

Why not ``np.dot`` inside the kernel: it only takes contiguous operands, so each head's q/k/v would
have to be copied out of the packed ``[B, N, 3*D]`` projection first. BLAS itself takes a leading
dimension, so a head is simply the matrix at offset ``h*head_dim`` with leading dimension ``3*D``:
no copy at all, and the output is written straight into the head-merged ``[B, N, D]`` array.

The call goes through Numba's own exported ``numba_xxgemm`` helper (the one ``np.dot`` uses, backed
by SciPy's BLAS) declared as an external function, rather than a ctypes pointer: a ctypes global
makes Numba refuse ``cache=True``, and recompiling the kernel costs seconds in every process.
"""

from __future__ import annotations

import threading

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic
from numba.np.linalg import ensure_blas

ensure_blas()  # raises a clear ImportError when SciPy (which provides the BLAS) is missing

_F32P = types.CPointer(types.float32)
_xxgemm = types.ExternalFunction(
    "numba_xxgemm",
    types.intc(types.char, types.char, types.char,      # kind, transa, transb
               types.intp, types.intp, types.intp,      # m, n, k
               _F32P, _F32P, types.intp,                # alpha, a, lda
               _F32P, types.intp,                       # b, ldb
               _F32P, _F32P, types.intp),               # beta, c, ldc
)

TRANS = ord("T")
NO_TRANS = ord("N")


@intrinsic
def f32_ptr(typingctx, address):  # type: ignore[no-untyped-def]
    """An integer byte address (``arr.ctypes.data + offset``) as a ``float32*``."""
    sig = _F32P(types.intp)

    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        return builder.inttoptr(args[0], context.get_value_type(_F32P))

    return sig, codegen


@intrinsic
def i32_bits_as_f32(typingctx, bits):  # type: ignore[no-untyped-def]
    """Reinterpret an int32's bits as a float32 (free; lets an exp build 2**n from its exponent)."""
    sig = types.float32(types.int32)

    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        return builder.bitcast(args[0], ir.FloatType())

    return sig, codegen


@njit(inline="always")
def sgemm(transa, transb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc, scalars):  # type: ignore[no-untyped-def]
    """Column-major ``C[m, n] = alpha * op(A) @ op(B) + beta * C`` on byte addresses ``a, b, c``.

    A row-major matrix with row stride ``ld`` is the column-major transpose with the same ``ld``,
    which is how callers express row-major products. ``scalars`` is a float32 scratch of length 2
    (BLAS takes alpha and beta by pointer).
    """
    scalars[0] = alpha
    scalars[1] = beta
    base = scalars.ctypes.data
    _xxgemm(ord("s"), transa, transb, m, n, k, f32_ptr(base), f32_ptr(a), lda, f32_ptr(b), ldb,
            f32_ptr(base + 4), f32_ptr(c), ldc)


@njit(cache=True)
def _resolve_sgemm() -> None:
    one = np.ones(1, np.float32)
    res = np.zeros(1, np.float32)
    scalars = np.empty(2, np.float32)
    sgemm(NO_TRANS, NO_TRANS, 1, 1, 1, 1.0, one.ctypes.data, 1, one.ctypes.data, 1, 0.0,
          res.ctypes.data, 1, scalars)


# Numba's helper looks SciPy's sgemm up on first use, taking the GIL to do so. A parallel kernel's
# worker threads must never be the first caller (the main thread holds the GIL while it waits for
# them), so resolve it once here, from a plain single-threaded function.
_resolve_sgemm()


# -- keeping the BLAS single-threaded --------------------------------------------------------------
# The kernels parallelise over (batch, head, query block) themselves. SciPy's OpenBLAS would also
# spread each product of a few million flops over its own threads, oversubscribing the cores (and
# making a "1 thread" measurement use two). Switching it per call is not an option: it costs a few
# microseconds each time and OpenBLAS ignores the request from any thread but the first one that
# made it. So, on a kernel's first use, SciPy's BLAS is set to one thread for the whole process.
_lock = threading.Lock()
_limited = False


def _scipy_blas_controllers() -> list:
    import os

    import scipy
    from threadpoolctl import ThreadpoolController

    blas = ThreadpoolController().select(user_api="blas").lib_controllers
    # pip wheels bundle SciPy's own BLAS next to the package (scipy.libs); elsewhere (conda, distro
    # packages) SciPy shares the process's BLAS, which then is the one to limit.
    scipy_root = os.path.dirname(os.path.dirname(os.path.abspath(scipy.__file__)))
    own = [c for c in blas if os.path.abspath(c.filepath).startswith(os.path.join(scipy_root, "scipy"))]
    return own or list(blas)


def limit_scipy_blas_threads() -> None:
    """Set the BLAS behind SciPy (and so behind these kernels) to one thread; idempotent."""
    global _limited
    if _limited:
        return
    with _lock:
        if not _limited:
            for controller in _scipy_blas_controllers():
                controller.set_num_threads(1)
            _limited = True
