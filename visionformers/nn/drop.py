"""Dropout (Srivastava et al. 2014) and stochastic depth (Huang et al. 2016).

``dropout`` is ``F.dropout`` with, on CPU fp32, a counter-based mask (``csrc/dropout.c``): element i of a call is
kept by a hash of (seed, i), the seed drawn from PyTorch's generator, so ``torch.manual_seed`` makes it
reproducible, any thread can compute any element, and backward recomputes the mask instead of storing it.
ATen's CPU dropout draws from a sequential Mersenne Twister, ~10 ms for a 16 x 128 x 32 x 32 map on one core;
the kernel takes well under a millisecond. The masks differ from ATen's (another random stream), not their law.
"""
from __future__ import annotations

import ctypes

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from visionformers.native import build as _native
from visionformers._validate import check_probability
from visionformers.nn.linear import native_ready

__all__ = ["dropout", "drop_path", "DropPath"]


def _configure(lib) -> None:
    lib.vf_dropout.argtypes = [ctypes.c_void_p] * 2 + [ctypes.c_long, ctypes.c_uint64, ctypes.c_uint32, ctypes.c_float, ctypes.c_int]
    lib.vf_dropout.restype = None


def _apply(lib, x: torch.Tensor, seed: int, p: float, out: torch.Tensor | None = None) -> torch.Tensor:
    out = torch.empty_like(x) if out is None else out  # empty_like keeps x's (dense) strides
    threshold = min(round(p * 2**24), 2**24)
    lib.vf_dropout(x.data_ptr(), out.data_ptr(), x.numel(), seed, threshold, 1.0 / (1.0 - p), torch.get_num_threads())
    return out


def _self_check(lib) -> bool:
    """The kept fraction, the scale, and a mask that depends on the seed only, on a ragged length."""
    x = torch.ones(100_003)
    a, b = _apply(lib, x, 12345, 0.3), _apply(lib, x, 12345, 0.3)
    kept = (a != 0).double().mean().item()
    ok = torch.equal(a, b) and abs(kept - 0.7) < 0.01 and torch.allclose(a[a != 0], torch.tensor(1 / 0.7))
    ok = ok and not torch.equal(a, _apply(lib, x, 54321, 0.3))
    return bool(ok)


_KERNEL = _native.Kernel("dropout", _configure, _self_check)


def _memory_format(x: torch.Tensor):
    """The layout whose memory order the mask follows, or None for a tensor that is not dense."""
    if x.is_contiguous():
        return torch.contiguous_format
    if x.ndim == 4 and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return None


class _Dropout(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, p, seed, fmt):
        ctx.p, ctx.seed, ctx.fmt, ctx.lib = p, seed, fmt, _KERNEL.get()  # backward: the forward's library
        return _apply(ctx.lib, x, seed, p)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        # the same mask and scale, element for element: grad in the forward input's memory order
        return _apply(ctx.lib, grad.contiguous(memory_format=ctx.fmt), ctx.seed, ctx.p), None, None, None


def dropout(x: torch.Tensor, p: float, training: bool = True, inplace: bool = False) -> torch.Tensor:
    """Zero each element with probability p and scale the rest by 1 / (1 - p) (``F.dropout``'s contract)."""
    if not training or p == 0.0:
        return x
    fmt = _memory_format(x) if 0.0 < p < 1.0 else None
    if fmt is None or not native_ready(x, inference=False, memory_format=fmt) or _KERNEL.get() is None:
        # in place only outside autograd: ATen's in-place dropout keeps a float mask for backward, 4x the bool one
        return F.dropout(x, p, training=True, inplace=inplace and not (torch.is_grad_enabled() and x.requires_grad))
    seed = int(torch.randint(0, 2**63 - 1, (), dtype=torch.int64).item())  # from PyTorch's generator
    if torch.is_grad_enabled() and x.requires_grad:
        return _Dropout.apply(x, p, seed, fmt)
    return _apply(_KERNEL.get(), x, seed, p, out=x if inplace else None)


def drop_path(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Zero whole samples with probability p and rescale the kept ones by 1 / (1 - p)."""
    if p == 0.0 or not training:
        return x
    keep = 1.0 - p
    mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
    return x * mask.div_(keep)


class DropPath(nn.Module):
    """Module form of ``drop_path``; the identity in eval mode."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        check_probability("p", p)
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return drop_path(x, self.p, self.training)

    def extra_repr(self) -> str:
        return f"p={self.p}"
