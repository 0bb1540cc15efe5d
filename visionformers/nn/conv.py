"""The one 2-D convolution, ``F.conv2d``'s semantics, with Winograd's F(2x2, 3x3) for 3x3 stride-1 convolutions
on CPU.

A diffusion UNet is convolution-bound: on 2 CPU cores ~85% of a training step of ``unet_ddpm_cifar10`` is its
3x3 convolutions, which oneDNN already runs at the machine's fp32 peak. Fewer multiplications is what is left.
Winograd's minimal filtering F(2x2, 3x3) (Lavin & Gray 2016, sec. 4, eq. 8) computes each 2x2 output tile as
``A^T [(G g G^T) (.) (B^T d B)] A``; summed over input channels that is 16 matrix products
(tiles x C_in) @ (C_in x C_out), 16 products per 4 outputs instead of 36. ``csrc/winograd.c`` does the
transforms (additions and subtractions: fp32 accuracy is kept, unlike F(4x4, 3x3)), BLAS the products, over
chunks of tiles small enough to stay in cache. The backward is the same algorithm: the input gradient is the
convolution of the output gradient with the flipped, transposed filters, and the weight gradient is
``G^T [sum over tiles of (B^T d B)^T (A dY A^T)] G``.

Taken for CPU fp32 channels-last inputs with at least ``WINOGRAD_MIN_CHANNELS`` channels in and out, 3x3
filters, stride 1, padding 1, no dilation or groups, outside autocast, ``torch.compile`` and ``torch.func``
transforms; everything else is ``F.conv2d``. Whether it is faster than oneDNN's direct convolution depends on the
CPU: it is measured once per process (``winograd_chosen``); ``VISIONFORMERS_CONV_WINOGRAD=1`` / ``0`` uses it
always / never. Results agree with ``F.conv2d`` to float rounding (max abs difference ~1e-6 at unit scale).
"""
from __future__ import annotations

import ctypes
import os
import threading

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from visionformers.native import build as _native
from visionformers.nn.linear import _speedup, native_ready

__all__ = ["Conv2d", "conv2d", "winograd_chosen", "WINOGRAD_MIN_CHANNELS"]

# Below this many channels (a UNet's 3-channel stem and head) the transforms cost more than the products save.
WINOGRAD_MIN_CHANNELS = 32
# Floats of one transformed chunk (16, tiles, channels): 8 MB, a quarter of a 32 MB L3. Fewer, larger products than
# at 1 << 20 (1.1-1.2x at 256 channels on a Zen 3).
_CHUNK_FLOATS = 1 << 21
_CL = torch.channels_last

# G of F(2x2, 3x3), and G (x) G: row (a, b) maps a 3x3 filter (row-major) to its transformed point (a, b)
_G = torch.tensor([[1.0, 0.0, 0.0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0.0, 0.0, 1.0]], dtype=torch.float64)
_GG = torch.einsum("ar,bs->abrs", _G, _G).reshape(16, 9)


def _configure(lib) -> None:
    lib.vf_wino_in.argtypes = [ctypes.c_void_p] * 2 + [ctypes.c_long] * 7 + [ctypes.c_int]
    lib.vf_wino_out.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_long] * 7 + [ctypes.c_int]
    lib.vf_wino_grad.argtypes = [ctypes.c_void_p] * 2 + [ctypes.c_long] * 7 + [ctypes.c_int]
    lib.vf_wino_in.restype = lib.vf_wino_out.restype = lib.vf_wino_grad.restype = None


def _transform_filters(weight: torch.Tensor) -> torch.Tensor:
    """(C_out, C_in, 3, 3) -> U (16, C_out, C_in) = G g G^T per filter, in the weight's dtype."""
    k, c = weight.shape[:2]
    taps = weight.permute(2, 3, 0, 1).reshape(9, k * c)  # (tap, C_out * C_in): one copy of the 3x3 filters
    # one (16, 9) @ (9, C_out * C_in) product: broadcasting G (x) G over the filters instead runs C_out tiny
    # products, each with its own copy of G (x) G (~6 ms per call of a 256-channel backward here)
    return torch.mm(_GG.to(weight.dtype), taps).view(16, k, c)


def _tiles(x: torch.Tensor, channels: int) -> tuple[int, int]:
    """2x2 output tiles of the map (B, C, H, W), and tiles per chunk for ``channels``, the wider side."""
    b, _, h, w = x.shape
    tiles = b * ((h + 1) // 2) * ((w + 1) // 2)
    return tiles, max(1, min(tiles, _CHUNK_FLOATS // (16 * channels)))


_local = threading.local()


def _buffers(first: int, second: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Two flat scratch buffers of at least these many elements, kept per thread between calls.

    Fresh multi-MB tensors cost their page faults on every call where the allocator has returned the memory
    to the system in between (glibc trims its heap above a threshold): 16 MB of them doubled the time of a
    128-channel 32x32 convolution here. The buffers never escape a call.
    """
    cached = getattr(_local, "buffers", None)
    if cached is None or cached.dtype != dtype or cached.numel() < first + second:
        with torch.inference_mode(False):  # a plain tensor, usable inside and outside inference mode
            cached = _local.buffers = torch.empty(first + second, dtype=dtype)
    return cached[:first], cached[first:first + second]


def _plane(n: int, channels: int) -> int:
    """Floats between the 16 planes of a (16, n, channels) chunk: n * channels and one cache line, so that the
    planes do not start at the same offset in a 4 KB page (the transforms write 16 planes at once)."""
    return n * channels + 16


def _scratch(n: int, channels: int, buf: torch.Tensor) -> torch.Tensor:
    """(16, n, channels) planes ``_plane`` floats apart in ``buf``."""
    return buf.as_strided((16, n, channels), (_plane(n, channels), channels, 1))


def _winograd(lib, x: torch.Tensor, u: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """conv2d(x, g, bias, padding=1) for channels-last x (B, C_in, H, W) and U = _transform_filters(g)."""
    b, c, h, w = x.shape
    k = u.shape[1]
    y = torch.empty(b, k, h, w, dtype=x.dtype, memory_format=_CL)
    tiles, chunk = _tiles(x, max(c, k))
    vbuf, mbuf = _buffers(16 * _plane(chunk, c), 16 * _plane(chunk, k), x.dtype)
    ut = u.transpose(1, 2)  # (16, C_in, C_out), BLAS reads the transpose in place
    threads = torch.get_num_threads()
    bias_ptr = None if bias is None else bias.data_ptr()
    for t0 in range(0, tiles, chunk):
        n = min(chunk, tiles - t0)
        v, m = _scratch(n, c, vbuf), _scratch(n, k, mbuf)
        lib.vf_wino_in(x.data_ptr(), v.data_ptr(), b, h, w, c, t0, n, v.stride(0), threads)
        torch.bmm(v, ut, out=m)
        lib.vf_wino_out(m.data_ptr(), bias_ptr, y.data_ptr(), b, h, w, k, t0, n, m.stride(0), threads)
    return y


def _filter_grad(lib, x: torch.Tensor, dy: torch.Tensor) -> torch.Tensor:
    """d loss / d g (C_out, C_in, 3, 3) for y = conv2d(x, g, padding=1), channels-last x and dy."""
    b, c, h, w = x.shape
    k = dy.shape[1]
    tiles, chunk = _tiles(x, max(c, k))
    vbuf, zbuf = _buffers(16 * _plane(chunk, c), 16 * _plane(chunk, k), x.dtype)
    du = torch.empty(16, c, k, dtype=x.dtype)
    threads = torch.get_num_threads()
    for t0 in range(0, tiles, chunk):
        n = min(chunk, tiles - t0)
        v, z = _scratch(n, c, vbuf), _scratch(n, k, zbuf)
        lib.vf_wino_in(x.data_ptr(), v.data_ptr(), b, h, w, c, t0, n, v.stride(0), threads)
        lib.vf_wino_grad(dy.data_ptr(), z.data_ptr(), b, h, w, k, t0, n, z.stride(0), threads)
        if t0 == 0:
            torch.bmm(v.transpose(1, 2), z, out=du)
        else:
            du.baddbmm_(v.transpose(1, 2), z)
    taps = torch.matmul(_GG.t().to(x.dtype), du.view(16, c * k))  # (9, C_in * C_out): G^T dU G per filter
    return taps.view(3, 3, c, k).permute(3, 2, 0, 1)  # (C_out, C_in, 3, 3), strides of neither layout


class _Winograd(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.lib = lib = _KERNEL.get()  # the backward runs the library the forward ran
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return _winograd(lib, x, _transform_filters(weight), bias)

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        x, weight = ctx.saved_tensors
        dy = dy.contiguous(memory_format=_CL)
        dx = dw = db = None
        if ctx.needs_input_grad[0]:  # the correlation of dy with the flipped filters, C_out and C_in swapped
            dx = _winograd(ctx.lib, dy, _transform_filters(weight.flip(2, 3).transpose(0, 1)), None)
        if ctx.needs_input_grad[1]:
            layout = _CL if weight.is_contiguous(memory_format=_CL) else torch.contiguous_format
            dw = _filter_grad(ctx.lib, x, dy).contiguous(memory_format=layout)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            db = dy.sum((0, 2, 3))
        return dx, dw, db


def _self_check(lib) -> bool:
    """Forward and backward against F.conv2d on ragged shapes (odd sizes: clipped tiles; 40 channels: a vector
    and a tail), threaded."""
    with torch.inference_mode(False), torch.enable_grad():  # the first call may come from inside inference
        g = torch.Generator().manual_seed(0)
        for b, c, k, h, w in ((2, 40, 24, 7, 5), (3, 16, 33, 6, 9)):
            x = torch.randn(b, c, h, w, generator=g).contiguous(memory_format=_CL).requires_grad_()
            wt = (torch.randn(k, c, 3, 3, generator=g) / (3 * c**0.5)).requires_grad_()
            bias = torch.randn(k, generator=g).requires_grad_()
            dy = torch.randn(b, k, h, w, generator=g)
            ref = F.conv2d(x, wt, bias, padding=1)
            ref_grads = torch.autograd.grad(ref, (x, wt, bias), dy)
            saved, _KERNEL._lib = _KERNEL._lib, lib  # run the library under test, whatever get() said so far
            try:
                out = _Winograd.apply(x, wt, bias)
                grads = torch.autograd.grad(out, (x, wt, bias), dy)
            finally:
                _KERNEL._lib = saved
            if not torch.allclose(out, ref, rtol=1e-4, atol=1e-5):
                return False
            if not all(torch.allclose(a, r, rtol=1e-4, atol=1e-4) for a, r in zip(grads, ref_grads)):
                return False
    return True


_KERNEL = _native.Kernel("winograd", _configure, _self_check)


def _winograd_faster() -> bool:
    """Whether F(2x2, 3x3) runs a UNet's 3x3 convolutions (batch 16, 128 channels at 32x32 and 256 at 16x16,
    channels-last) clearly (5%) faster than oneDNN here: median of paired rounds, ~0.5 s once per process."""
    choice = os.environ.get("VISIONFORMERS_CONV_WINOGRAD", "auto")
    if choice == "0" or _KERNEL.get() is None:
        return False
    if choice == "1":
        return True
    lib = _KERNEL.get()
    g = torch.Generator().manual_seed(0)
    cases = []
    for c, size in ((128, 32), (256, 16)):
        x = torch.randn(16, c, size, size, generator=g).contiguous(memory_format=_CL)
        cases.append((x, torch.randn(c, c, 3, 3, generator=g).contiguous(memory_format=_CL) / (3 * c), torch.zeros(c)))
    with torch.inference_mode():
        ratio = _speedup(lambda: [F.conv2d(x, w, b, padding=1) for x, w, b in cases],
                         lambda: [_winograd(lib, x, _transform_filters(w), b) for x, w, b in cases], 6)
    _native._log.info("Winograd F(2x2, 3x3): %.2fx oneDNN on a UNet's 3x3 convolutions", ratio)
    return ratio >= 1.05


_chosen: bool | None = None  # decided on first use


def winograd_chosen() -> bool:
    """Whether ``conv2d`` sends eligible 3x3 convolutions to Winograd here (measured on the first call)."""
    global _chosen
    if _chosen is None:
        _chosen = _winograd_faster()
    return _chosen


def _eligible(x, weight, bias, stride, padding, dilation, groups) -> bool:
    if x.ndim != 4 or weight.ndim != 4 or groups != 1 or tuple(weight.shape[2:]) != (3, 3):
        return False
    if _pair(stride) != (1, 1) or _pair(dilation) != (1, 1) or padding not in (1, (1, 1), [1, 1], "same"):
        return False
    k, c = weight.shape[:2]
    if x.shape[1] != c or min(c, k) < WINOGRAD_MIN_CHANNELS or not x.numel():
        return False
    if bias is not None and (bias.ndim != 1 or bias.shape[0] != k):
        return False
    layout = _CL if weight.is_contiguous(memory_format=_CL) else torch.contiguous_format
    params = (weight,) if bias is None else (weight, bias)
    return (native_ready(x, inference=False, memory_format=_CL)
            and native_ready(*params, inference=False, memory_format=layout))


def _pair(v):
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


def conv2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, stride=1, padding=0,
           dilation=1, groups: int = 1) -> torch.Tensor:
    """``F.conv2d(x, weight, bias, stride, padding, dilation, groups)``; 3x3 stride-1 padding-1 convolutions of
    CPU fp32 channels-last maps run Winograd's F(2x2, 3x3) where it measures faster than oneDNN."""
    if _eligible(x, weight, bias, stride, padding, dilation, groups) and winograd_chosen():
        if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias)):
            return _Winograd.apply(x, weight, bias)
        return _winograd(_KERNEL.get(), x, _transform_filters(weight), bias)
    return F.conv2d(x, weight, bias, stride, padding, dilation, groups)


class Conv2d(nn.Conv2d):
    """``nn.Conv2d`` (same parameters, initialisation and state dict) whose forward is ``conv2d``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.padding_mode != "zeros":
            return super().forward(x)
        return conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)
