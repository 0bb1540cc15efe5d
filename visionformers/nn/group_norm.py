"""GroupNorm and the SiLU after it as one step, fused natively for channels-last maps on CPU.

GroupNorm (Wu & He 2018, eq. 1-2) normalises each sample over groups of consecutive channels and all positions.
In a diffusion UNet every residual block runs GroupNorm -> SiLU twice; ATen runs them as two passes each way,
keeps the normalised map for SiLU's backward, and its channels-last GroupNorm backward is about twice as slow as
its NCHW one. ``csrc/group_norm.c`` does both in one forward and one backward (two passes over a sample held in
cache), saving only the input and the per-group statistics. Taken for CPU fp32 channels-last maps with at least
as many samples as threads; everything else runs ``nn.GroupNorm`` and ``F.silu``. Results agree with ATen's to
float rounding (statistics in double).
"""
from __future__ import annotations

import ctypes

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from visionformers.native import build as _native
from visionformers.nn.linear import native_ready

__all__ = ["group_norm_act", "native_group_norm_available"]

_ACT_CODES = {None: 0, "silu": 4}  # csrc/vmath.h's codes


def _configure(lib) -> None:
    lib.vf_group_norm_fwd.argtypes = [ctypes.c_void_p] * 6 + [ctypes.c_long] * 4 + [ctypes.c_float, ctypes.c_int, ctypes.c_int]
    lib.vf_group_norm_bwd.argtypes = [ctypes.c_void_p] * 8 + [ctypes.c_long] * 4 + [ctypes.c_int, ctypes.c_int]
    lib.vf_group_norm_fwd.restype = lib.vf_group_norm_bwd.restype = ctypes.c_int


def _reference(x, weight, bias, groups, eps, act):
    y = F.group_norm(x, groups, weight, bias, eps)
    return y if act is None else F.silu(y)


def _self_check(lib) -> bool:
    """Forward and backward against ATen on a ragged shape (C = 40: two vectors and a tail), threaded."""
    with torch.inference_mode(False), torch.enable_grad():  # the first call may come from inside inference
        return _check_against_aten(lib)


def _check_against_aten(lib) -> bool:
    g = torch.Generator().manual_seed(0)
    x = (3 * torch.randn(4, 40, 5, 7, generator=g) + 1).contiguous(memory_format=torch.channels_last)
    w, b, dy = torch.randn(40, generator=g), torch.randn(40, generator=g), torch.randn(4, 40, 5, 7, generator=g)
    ok = True
    for act in _ACT_CODES:
        xr, wr, br = (t.detach().requires_grad_() for t in (x, w, b))
        _reference(xr, wr, br, 8, 1e-5, act).backward(dy)
        y, mean, rstd = _forward(lib, x, w, b, 8, 1e-5, act)
        dx, dw, db = _backward(lib, dy.contiguous(memory_format=torch.channels_last), x, mean, rstd, w, b, 8, act)
        ok &= torch.allclose(y, _reference(x, w, b, 8, 1e-5, act), rtol=1e-5, atol=1e-5)
        for got, ref in ((dx, xr.grad), (dw, wr.grad), (db, br.grad)):
            ok &= torch.allclose(got, ref, rtol=1e-4, atol=1e-4)
    return bool(ok)


_KERNEL = _native.Kernel("group_norm", _configure, _self_check)


def _ptr(t):
    return None if t is None else t.data_ptr()


def _forward(lib, x, weight, bias, groups, eps, act):
    b, c, h, w = x.shape
    y = torch.empty_like(x, memory_format=torch.channels_last)
    mean, rstd = torch.empty(b, groups), torch.empty(b, groups)
    if lib.vf_group_norm_fwd(x.data_ptr(), _ptr(weight), _ptr(bias), y.data_ptr(), mean.data_ptr(), rstd.data_ptr(),
                             b, h * w, c, groups, eps, _ACT_CODES[act], torch.get_num_threads()):
        raise MemoryError("group_norm: the native kernel could not allocate its scratch buffers")
    return y, mean, rstd


def _backward(lib, dy, x, mean, rstd, weight, bias, groups, act):
    b, c, h, w = x.shape
    dx = torch.empty_like(x, memory_format=torch.channels_last)
    part = torch.empty(b, 2, c, dtype=torch.float64)  # per sample [db; dw]: summed below in a fixed order
    if lib.vf_group_norm_bwd(dy.data_ptr(), x.data_ptr(), mean.data_ptr(), rstd.data_ptr(), _ptr(weight), _ptr(bias),
                             dx.data_ptr(), part.data_ptr(), b, h * w, c, groups, _ACT_CODES[act], torch.get_num_threads()):
        raise MemoryError("group_norm: the native kernel could not allocate its scratch buffers")
    sums = part.sum(0).float()
    return dx, sums[1], sums[0]


class _GroupNormAct(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, groups, eps, act):
        ctx.lib = _KERNEL.get()  # the backward runs the library the forward ran
        y, mean, rstd = _forward(ctx.lib, x, weight, bias, groups, eps, act)
        ctx.save_for_backward(x, mean, rstd, weight, bias)
        ctx.groups, ctx.act = groups, act
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        x, mean, rstd, weight, bias = ctx.saved_tensors
        dy = dy.contiguous(memory_format=torch.channels_last)
        dx, dw, db = _backward(ctx.lib, dy, x, mean, rstd, weight, bias, ctx.groups, ctx.act)
        return dx, dw if ctx.needs_input_grad[1] else None, db if ctx.needs_input_grad[2] else None, None, None, None


def native_group_norm_available() -> bool:
    """Whether ``group_norm_act`` has its native kernel here (builds it on the first call)."""
    return _KERNEL.get() is not None


def group_norm_act(x: torch.Tensor, norm: nn.GroupNorm, act: str | None = None) -> torch.Tensor:
    """``act(norm(x))`` for a (B, C, H, W) map, ``act`` None or "silu"; one fused native step where it can be."""
    weight, bias = (norm.weight, norm.bias) if norm.affine else (None, None)
    params = () if weight is None else (weight, bias)
    if (
        x.ndim == 4 and x.shape[1] == norm.num_channels and x.shape[0] >= torch.get_num_threads() and x.numel()
        and native_ready(x, *params, inference=False, memory_format=torch.channels_last)
        and _KERNEL.get() is not None
    ):
        if torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in params)):
            return _GroupNormAct.apply(x, weight, bias, norm.num_groups, norm.eps, act)
        return _forward(_KERNEL.get(), x, weight, bias, norm.num_groups, norm.eps, act)[0]
    y = norm(x)
    if act is None:
        return y
    return F.silu(y, inplace=not torch.is_grad_enabled())
