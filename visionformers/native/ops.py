"""Torch ops backed by native kernels (``torch.library.custom_op``), so that eager mode, ``torch.compile`` and
``torch.export`` all see one op with a shape function instead of a foreign call.

``visionformers::linear_rows(x, weight, bias)`` is ``F.linear`` for a few rows of x: the matrix-vector products of
token-by-token decoding, which only stream W from memory. ``csrc/linear_rows.c`` splits the rows of W over
PyTorch's threads; each output is one vectorised dot product in a fixed order, so the result does not depend on
the number of threads or the load of the machine. It agrees with ``F.linear`` to float rounding (another
summation order). Where the kernel cannot be built (no compiler, not Linux, ``VISIONFORMERS_NATIVE=0``, a failed
self-check) the op runs ``F.linear``: callers see the op either way.
"""
import ctypes
import threading
from typing import Optional

import torch
import torch.nn.functional as F

from visionformers.native import build as _native
from visionformers.native.check import linear_rows_agrees

__all__ = ["linear_rows", "kernel_available"]

_UNSET = object()
_lib: object = _UNSET
_lock = threading.Lock()


def _run(lib, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """The kernel on contiguous CPU fp32 tensors: x (..., K), weight (R, K), bias (R,) or None -> (..., R)."""
    rows, k = weight.shape
    x, weight = x.contiguous(), weight.contiguous()
    bias = None if bias is None else bias.contiguous()
    y = torch.empty(x.shape[:-1] + (rows,), dtype=torch.float32)
    lib.vf_linear_rows(weight.data_ptr(), x.data_ptr(), None if bias is None else bias.data_ptr(), y.data_ptr(),
                       x.numel() // k, rows, k, torch.get_num_threads())
    return y


def _kernel():
    """The built and self-checked library, or None (remembered for the process)."""
    global _lib
    if _lib is _UNSET:
        with _lock:
            if _lib is _UNSET:
                lib = _native.load("linear_rows", symbols=["vf_linear_rows"])
                if lib is not None:
                    lib.vf_linear_rows.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_long] * 3 + [ctypes.c_int]
                    lib.vf_linear_rows.restype = None
                    if not linear_rows_agrees(lambda x, w, b: _run(lib, x, w, b)):
                        lib = None
                _lib = lib
    return _lib


def kernel_available() -> bool:
    """Whether ``visionformers::linear_rows`` runs its native kernel here (builds it on the first call)."""
    return _kernel() is not None


@torch.library.custom_op("visionformers::linear_rows", mutates_args=(), device_types="cpu")
def linear_rows(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """x W^T + b for CPU fp32 x (..., K), weight (R, K), bias (R,) or None -> (..., R); no autograd."""
    lib = _kernel()
    if lib is None or x.dtype != torch.float32 or weight.dtype != torch.float32:
        return F.linear(x, weight, bias)
    return _run(lib, x, weight, bias)


@linear_rows.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    return x.new_empty(x.shape[:-1] + (weight.shape[0],))
