"""Native softmax attention for short sequences (at most ``MAX_TOKENS`` keys): CPU fp32 inference.

Swin attends inside 7x7 windows: 49 queries and keys per (window, head), head dim 32. ATen's CPU flash attention
is built for long sequences and spends most of such a call on its tiling, and its (B, H, N, D) output costs one
more copy into the (B, N, H*D) rows of the output projection. ``csrc/short_attention.c`` computes one (batch, head)
pair per task and writes (B, N, H, D) memory directly; ``short_attention`` returns it as the (B, H, N, D) view SDPA
would, so the caller's transpose back is free. Up to ``QKV_MAX_TOKENS`` keys a task holds its scores in registers
(Swin-T's 64 windows x 3 heads of stage 1, 2 threads, Zen 3: SDPA and the copy 1.76 ms, the kernel 1.18 ms); up
to ``MAX_TOKENS`` it runs as two products with the native GEMM's micro-kernel around the softmax (ViT-B's 197
tokens, 8 images x 12 heads of 64: SDPA and the copy 11.8 ms, the kernel 8.0 ms; BERT's 128: 3.7 and 3.6 ms).

``qkv_attention`` runs the qkv projection (the native GEMM's kernel, ``csrc/gemm_kernel.h``) and the attention
together, a few windows per task group, so that a window's q, k, v are read from L2 cache rather than from a
(B, N, 3, H, D) tensor that went through memory: ``Attention`` takes it for plain self-attention of at most
``QKV_MAX_TOKENS`` tokens in CPU inference where the GEMM takes the product. Swin-T inference (batch 8, 2 cores,
Zen 3): 1.05x (median of 10 paired rounds) over the projection and the attention as two calls; the floats are
identical, the kernels being the same.

``window_block`` goes one step further for a plain pre-norm block over windows (``TransformerBlock.forward_windows``):
norm, qkv projection, attention, output projection with the residual, norm and MLP with the residual, a group of
windows at a time in one native call (``vf_window_block``), so that no activation of the block goes through memory
and the Python between the calls is gone. Swin-T inference (batch 8, 2 cores, Zen 3): stage 1 1.22x, the whole
model 1.04x over the per-op native calls (``bench/RESULTS.md``).

Taken by ``nn.attention.attend`` for inference (no autograd, no dropout) on CPU fp32 tensors with Nq == Nk <=
``MAX_TOKENS``, a head dim that is a multiple of the vector width, q / k / v in any strides with contiguous
rows, and an additive float bias (or none) whose last two dims are a contiguous (N, N) block; everything else goes
to SDPA. Results agree with SDPA's to float rounding (scores in the same order; exp within 2 ulp).
"""
from __future__ import annotations

import ctypes

import torch
import torch.nn.functional as F
from torch import nn

from visionformers.native import build as _native
from visionformers.nn.fused import is_layer_norm
from visionformers.nn.gemm import ACT_CODES, packed
from visionformers.nn.linear import GEMM_MAX_K, gemm_taken, native_ready

__all__ = ["short_attention", "qkv_attention", "window_block", "native_short_attention_available", "MAX_TOKENS",
           "QKV_MAX_TOKENS"]

MAX_TOKENS = 256  # csrc/short_attention.c's MAX_LONG_N
QKV_MAX_TOKENS = 64  # its MAX_N: scores in registers, and vf_qkv_attention
_MAX_HEAD_DIM = 128
_F32 = torch.float32
_LONGS = ctypes.c_long * 3


def _configure(lib) -> None:
    lib.vf_short_attention.argtypes = ([ctypes.c_void_p] * 5 + [ctypes.c_long] * 4 + [ctypes.c_void_p] * 4
                                       + [ctypes.c_float, ctypes.c_int])
    lib.vf_short_attention.restype = ctypes.c_int
    lib.vf_qkv_attention.argtypes = ([ctypes.c_void_p] * 5 + [ctypes.c_long] * 5 + [ctypes.c_void_p]
                                     + [ctypes.c_float, ctypes.c_int])
    lib.vf_qkv_attention.restype = ctypes.c_int
    lib.vf_vector_width.argtypes, lib.vf_vector_width.restype = [], ctypes.c_int
    p, n, f = ctypes.c_void_p, ctypes.c_long, ctypes.c_float
    lib.vf_window_block.argtypes = [p, p, n, p, n, n, n, p, p, f, p, p, n, n, p, p, f, p, p, p, p, f, p, p, ctypes.c_int,
                                    n, p, p, ctypes.c_int]
    lib.vf_window_block.restype = ctypes.c_int


def _run(lib, q, k, v, bias, scale) -> torch.Tensor | None:
    """The kernel on (B, H, N, D) views and a bias from ``_bias_4d`` (or None)."""
    b, h, n, d = q.shape
    out = torch.empty(b, n, h, d, dtype=_F32)
    bs = None if bias is None else _LONGS(bias.stride(0), bias.stride(1), 0)
    done = lib.vf_short_attention(
        q.data_ptr(), k.data_ptr(), v.data_ptr(), None if bias is None else bias.data_ptr(), out.data_ptr(), b, h, n, d,
        _LONGS(*q.stride()[:3]), _LONGS(*k.stride()[:3]), _LONGS(*v.stride()[:3]), bs, scale, torch.get_num_threads(),
    )
    return out.transpose(1, 2) if done == 0 else None


def _self_check(lib) -> bool:
    """Against the one attention's math path on strided views of one qkv tensor, with a per-batch bias holding
    -inf, a broadcast bias, no bias, a ragged length (two vector widths and a tail) and a long one (the products'
    path, with a head dim of three vector widths: a partial panel), threaded."""
    from visionformers.nn.attention import attend_math  # (imports this module: resolved at the first call)

    g = torch.Generator().manual_seed(0)
    width = lib.vf_vector_width()
    with torch.inference_mode():
        for n, d, heads in ((49, 2 * width, 3), (13, width, 2), (100, 3 * width, 2)):
            qkv = torch.randn(5, n, 3, heads, d, generator=g)
            q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
            per_batch = torch.randn(5, heads, n, n, generator=g).masked_fill(torch.rand(5, 1, n, n, generator=g) < 0.3,
                                                                             float("-inf"))
            per_batch[..., torch.arange(n), torch.arange(n)] = 0.0  # no fully masked row
            for bias in (per_batch, torch.randn(1, heads, n, n, generator=g), None):
                got = _run(lib, q, k, v, None if bias is None else _bias_4d(bias, 5, heads, n), d**-0.5)
                ref = attend_math(q, k, v, bias=bias)[0]
                if got is None or not torch.allclose(got, ref, rtol=1e-4, atol=1e-5):
                    return False
        return _qkv_attention_agrees(lib, g, attend_math) and _window_block_agrees(lib, g, attend_math)


def _qkv_attention_agrees(lib, g: torch.Generator, attend_math) -> bool:
    """vf_qkv_attention against F.linear + the math path: 25 windows of 13 tokens (groups of windows and a ragged
    last group), two heads, a per-window bias holding -inf. True where the GEMM kernel is not built (the fused
    path then never runs)."""
    from visionformers.nn import gemm as gemm_mod

    gemm_lib = gemm_mod._KERNEL.get()
    if gemm_lib is None:
        return True
    b, n, heads, d, c = 25, 13, 2, lib.vf_vector_width(), 40
    x, w, qb = torch.randn(b, n, c, generator=g), 0.2 * torch.randn(3 * heads * d, c, generator=g), torch.randn(3 * heads * d, generator=g)
    bias = torch.randn(b, heads, n, n, generator=g).masked_fill(torch.rand(b, 1, n, n, generator=g) < 0.3, float("-inf"))
    bias[..., torch.arange(n), torch.arange(n)] = 0.0
    out, panels = torch.empty(b, n, heads * d), gemm_mod._pack(gemm_lib, w)  # (panels held: a temporary is freed)
    lib.vf_qkv_attention(x.data_ptr(), panels.data_ptr(), qb.data_ptr(), bias.data_ptr(),
                         out.data_ptr(), b, heads, n, d, c, _LONGS(bias.stride(0), bias.stride(1), 0), d**-0.5,
                         torch.get_num_threads())
    q, k, v = F.linear(x, w, qb).view(b, n, 3, heads, d).permute(2, 0, 3, 1, 4).unbind(0)
    ref = attend_math(q, k, v, bias=bias)[0].transpose(1, 2).reshape(b, n, heads * d)
    return torch.allclose(out, ref, rtol=1e-4, atol=1e-5)


def _window_block_agrees(lib, g: torch.Generator, attend_math) -> bool:
    """vf_window_block against the block's PyTorch ops: 2 images of 5 windows of 13 tokens (ragged groups), read
    through a gather, two heads, a per-window bias holding -inf. True where the GEMM kernel is not built."""
    from visionformers.nn import gemm as gemm_mod

    gemm_lib = gemm_mod._KERNEL.get()
    if gemm_lib is None:
        return True
    b, n, heads, d = 2, 13, 2, lib.vf_vector_width()
    c, length, hidden = heads * d, 5 * n, 3 * heads * d
    w = {name: 0.3 * torch.randn(shape, generator=g) for name, shape in
         (("qkv", (3 * c, c)), ("proj", (c, c)), ("fc1", (hidden, c)), ("fc2", (c, hidden)))}
    bs = {name: torch.randn(t.shape[0], generator=g) for name, t in w.items()}
    g1, be1, g2, be2 = (torch.randn(c, generator=g) for _ in range(4))
    x, gather = torch.randn(b, length, c, generator=g), torch.randperm(length, generator=g)
    bias = torch.randn(b * 5, heads, n, n, generator=g).masked_fill(torch.rand(b * 5, 1, n, n, generator=g) < 0.3,
                                                                   float("-inf"))
    bias[..., torch.arange(n), torch.arange(n)] = 0.0
    panels = {name: gemm_mod._pack(gemm_lib, t) for name, t in w.items()}
    out = torch.empty_like(x)
    done = lib.vf_window_block(
        x.data_ptr(), gather.data_ptr(), length, out.data_ptr(), b * 5, n, c, g1.data_ptr(), be1.data_ptr(), 1e-5,
        panels["qkv"].data_ptr(), bs["qkv"].data_ptr(), heads, d, bias.data_ptr(), _LONGS(bias.stride(0), bias.stride(1), 0),
        d**-0.5, panels["proj"].data_ptr(), bs["proj"].data_ptr(), g2.data_ptr(), be2.data_ptr(), 1e-5,
        panels["fc1"].data_ptr(), bs["fc1"].data_ptr(), ACT_CODES["gelu"], hidden, panels["fc2"].data_ptr(),
        bs["fc2"].data_ptr(), torch.get_num_threads(),
    )
    xw = x[:, gather].reshape(b * 5, n, c)
    q, k, v = F.linear(F.layer_norm(xw, (c,), g1, be1, 1e-5), w["qkv"], bs["qkv"]).view(b * 5, n, 3, heads, d).permute(
        2, 0, 3, 1, 4).unbind(0)
    s = xw + F.linear(attend_math(q, k, v, bias=bias)[0].transpose(1, 2).reshape(b * 5, n, c), w["proj"], bs["proj"])
    hid = F.gelu(F.linear(F.layer_norm(s, (c,), g2, be2, 1e-5), w["fc1"], bs["fc1"]))
    ref = (s + F.linear(hid, w["fc2"], bs["fc2"])).view(b, length, c)
    return done == 0 and torch.allclose(out, ref, rtol=1e-4, atol=1e-4)


_KERNEL = _native.Kernel("short_attention", _configure, _self_check)


def native_short_attention_available() -> bool:
    """Whether ``short_attention`` has its native kernel here (builds it on the first call)."""
    return _KERNEL.get() is not None


def _bias_4d(bias, b: int, h: int, n: int) -> torch.Tensor | None:
    """bias as (1|B, 1|H, N, N) with contiguous rows, or None where the kernel cannot read it (not an fp32 tensor
    of that shape: a bool mask, a bias broadcast over queries)."""
    if not isinstance(bias, torch.Tensor) or bias.dtype != _F32 or bias.ndim > 4 or bias.shape[-2:] != (n, n) or bias.stride(-1) != 1 or bias.stride(-2) != n:
        return None
    bias = bias[(None,) * (4 - bias.ndim)]  # (1|B, 1|H, N, N)
    if bias.shape[0] not in (1, b) or bias.shape[1] not in (1, h):
        return None
    return bias.as_strided(bias.shape, (0 if bias.shape[0] == 1 else bias.stride(0),
                                        0 if bias.shape[1] == 1 else bias.stride(1), n, 1))


def short_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None,
                    scale: float | None) -> torch.Tensor | None:
    """softmax(scale q k^T + bias) v as a (B, H, N, D) view of (B, N, H, D) memory, natively; None where the kernel
    cannot take it (the caller then runs SDPA). q, k, v: (B, H, N, D); bias: None or additive float."""
    if q.ndim != 4 or k.shape != q.shape or v.shape != q.shape or not 0 < q.shape[2] <= MAX_TOKENS:
        return None
    b, h, n, d = q.shape
    if d > _MAX_HEAD_DIM or not b * h or any(t.stride(-1) != 1 for t in (q, k, v)):
        return None
    if bias is not None:
        bias = _bias_4d(bias, b, h, n)
        if bias is None:
            return None
    if not native_ready(*((q, k, v) if bias is None else (q, k, v, bias)), memory_format=None):
        return None
    lib = _KERNEL.get()
    if lib is None or d % lib.vf_vector_width():
        return None
    return _run(lib, q, k, v, bias, d**-0.5 if scale is None else scale)


def qkv_attention(x: torch.Tensor, qkv: torch.nn.Linear, num_heads: int, bias: torch.Tensor | None,
                  scale: float | None) -> torch.Tensor | None:
    """softmax(scale q k^T + bias) v with q, k, v = split(qkv(x)) into ``num_heads`` heads: (B, N, H*D) heads, the
    projection and the attention of a few windows at a time in one native call (``vf_qkv_attention``), so that
    each window's q, k, v are still in cache when its attention reads them. None where it cannot be taken: x not
    (B, N <= ``QKV_MAX_TOKENS``, dim), the product not the native GEMM's (``nn.linear.gemm_taken``), or a head dim
    or bias the attention kernel does not take (see ``short_attention``)."""
    weight, qkv_bias = qkv.weight, qkv.bias
    if x.ndim != 3 or not 0 < x.shape[1] <= QKV_MAX_TOKENS or weight.shape[0] % (3 * num_heads):
        return None
    b, n, c = x.shape
    d = weight.shape[0] // (3 * num_heads)
    if d > _MAX_HEAD_DIM or not gemm_taken(x, weight, qkv_bias):
        return None
    if bias is not None:
        bias = _bias_4d(bias, b, num_heads, n)
        if bias is None or not native_ready(bias, memory_format=None):
            return None
    lib = _KERNEL.get()
    panels = packed(weight)
    if lib is None or panels is None or d % lib.vf_vector_width():
        return None
    out = torch.empty(b, n, num_heads * d, dtype=_F32)
    bs = None if bias is None else _LONGS(bias.stride(0), bias.stride(1), 0)
    done = lib.vf_qkv_attention(
        x.data_ptr(), panels.data_ptr(), None if qkv_bias is None else qkv_bias.data_ptr(),
        None if bias is None else bias.data_ptr(), out.data_ptr(), b, num_heads, n, d, c, bs,
        d**-0.5 if scale is None else scale, torch.get_num_threads(),
    )
    return out if done == 0 else None


def window_block(x: torch.Tensor, window_tokens: int, gather: torch.Tensor | None, norm1: nn.LayerNorm, attn,
                 norm2: nn.LayerNorm, mlp, bias: torch.Tensor | None) -> torch.Tensor | None:
    """A whole pre-norm transformer block over windows, ``s = x + proj(attn(norm1(x)))``, ``s + mlp(norm2(s))``, in
    one native call (``vf_window_block``): x (B, L, C) holds L / ``window_tokens`` consecutive windows per image,
    after its tokens are reordered by ``gather`` (L,) (positions in x), when given; attention stays inside each
    window, with ``bias`` as ``qkv_attention``'s (a row per window, in order) or (L / ``window_tokens``, H, N, N):
    one row per window of an image, the same for every image (Swin's shift mask, not tiled). Returns the
    (B, L, C) output in window order, or None where the kernel cannot take it: ``attn`` not plain softmax
    self-attention (``Attention._plain_self_attention``), ``mlp`` gated or with an activation the kernels lack,
    norms that are not LayerNorms over C, a product the native GEMM does not take, or what ``qkv_attention``
    declines. The caller checked the block's structure (pre-norm, no layer scale, inference)."""
    if x.ndim != 3 or window_tokens < 1 or window_tokens > QKV_MAX_TOKENS or x.shape[1] % window_tokens:
        return None
    b, length, c = x.shape
    qkv, proj, fc1, fc2, heads = attn.qkv, attn.proj, mlp.fc1, mlp.fc2, attn.num_heads
    if (not attn._plain_self_attention or mlp.gated or mlp.act not in ACT_CODES or not is_layer_norm(norm1, c)
            or not is_layer_norm(norm2, c) or qkv.weight.shape[0] % (3 * heads) or proj.weight.shape[0] != c
            or fc1.weight.shape[1] != c or fc2.weight.shape != (c, fc1.weight.shape[0])):
        return None
    d = qkv.weight.shape[0] // (3 * heads)
    if d > _MAX_HEAD_DIM or proj.weight.shape[1] != heads * d or proj.weight.shape[1] > GEMM_MAX_K:
        return None
    params = [t for m in (norm1, qkv, proj, norm2, fc1, fc2) for t in (m.weight, m.bias) if t is not None]
    if not gemm_taken(x, qkv.weight, *params):
        return None
    windows, per_image = b * length // window_tokens, length // window_tokens
    period = per_image if bias is not None and bias.ndim == 4 and bias.shape[0] == per_image != windows else 0
    if bias is not None:
        bias = _bias_4d(bias, period or windows, heads, window_tokens)
        if bias is None or not native_ready(bias, memory_format=None):
            return None
    if gather is not None:
        if (gather.dtype != torch.long or gather.shape != (length,) or not gather.is_contiguous() or not gather.is_cpu
                or (length and not 0 <= int(gather.min()) <= int(gather.max()) < length)):
            return None
    lib = _KERNEL.get()
    panels = [packed(m.weight) for m in (qkv, proj, fc1, fc2)]
    if lib is None or any(p is None for p in panels) or d % lib.vf_vector_width():
        return None
    out = torch.empty_like(x)
    scale = d**-0.5 if attn.scale is None else attn.scale
    bs = None if bias is None else _LONGS(bias.stride(0), bias.stride(1), period)
    done = lib.vf_window_block(
        x.data_ptr(), _ptr(gather), length, out.data_ptr(), windows, window_tokens, c,
        _ptr(norm1.weight), _ptr(norm1.bias), norm1.eps, panels[0].data_ptr(), _ptr(qkv.bias), heads, d, _ptr(bias), bs,
        scale, panels[1].data_ptr(), _ptr(proj.bias), _ptr(norm2.weight), _ptr(norm2.bias), norm2.eps,
        panels[2].data_ptr(), _ptr(fc1.bias), ACT_CODES[mlp.act], fc1.weight.shape[0], panels[3].data_ptr(),
        _ptr(fc2.bias), torch.get_num_threads(),
    )
    return out if done == 0 else None


def _ptr(t: torch.Tensor | None):
    return None if t is None else t.data_ptr()
