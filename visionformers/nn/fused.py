"""Fused inference epilogues: a product's bias with the activation, or with the residual add and the next norm.

ATen runs ``act(x W^T + b)`` as a product that first copies b into every output row (addmm), then a pass for
the activation; ``norm(residual + (x W^T + b))`` as the product, an add and a LayerNorm, each a pass over the
activations. ``csrc/epilogue.c`` does each of these epilogues in one pass after a bias-free product. On Swin-T's
stage 1 (3136 x 96 -> 384 x 96) that takes the MLP's first layer from 0.88 to 0.71 ms and its second, with the
residual, from 0.83 to 0.70 ms (2 cores).

Taken for inference on CPU fp32 contiguous tensors (the checks of ``nn.linear``'s native path); everything
else, and any machine where the kernel cannot be built, runs the same math as PyTorch ops. The native results
agree with PyTorch's to float rounding: GELU's erf is a rational fit with |error| <= 4.3e-7.
"""
from __future__ import annotations

import ctypes

import torch
import torch.nn.functional as F
from torch import nn

from visionformers.native import build as _native
from visionformers.nn.gemm import ACT_CODES, gather_norm_gemm, gemm
from visionformers.nn.gemm import mlp as mlp_product
from visionformers.nn.linear import (
    GEMM_MAX_K,
    NATIVE_MAX_ROWS,
    gemm_chosen,
    gemm_taken,
    linear,
    native_inference_ready,
)

__all__ = ["native_bias_act_", "linear_add_norm", "mlp_add_norm", "gather_norm_linear", "native_epilogue_available",
           "is_layer_norm"]

_REFERENCE = {"gelu": F.gelu, "gelu_tanh": lambda z: F.gelu(z, approximate="tanh"), "relu": F.relu, "silu": F.silu}


def _ptr(t: torch.Tensor | None):
    return None if t is None else t.data_ptr()


def _configure(lib) -> None:
    lib.vf_bias_act.argtypes = [ctypes.c_void_p] * 2 + [ctypes.c_long] * 2 + [ctypes.c_int] * 2
    lib.vf_add_norm.argtypes = [ctypes.c_void_p] * 7 + [ctypes.c_long] * 2 + [ctypes.c_float, ctypes.c_int]
    lib.vf_bias_act.restype = lib.vf_add_norm.restype = None


def _self_check(lib) -> bool:
    """Both kernels against PyTorch on a ragged shape (37 columns: two vectors and a tail), threaded."""
    g = torch.Generator().manual_seed(0)
    m, n = 1000, 37
    h, b = 3 * torch.randn(m, n, generator=g), torch.randn(n, generator=g)
    ok = True
    for act, code in ACT_CODES.items():
        out = h.clone()
        lib.vf_bias_act(out.data_ptr(), b.data_ptr(), m, n, code, torch.get_num_threads())
        ok &= torch.allclose(out, _REFERENCE[act](h + b), rtol=1e-5, atol=1e-5)
    x, y, w, beta = (torch.randn(m, n, generator=g), torch.randn(m, n, generator=g),
                     torch.randn(n, generator=g), torch.randn(n, generator=g))
    s, out = torch.empty(m, n), torch.empty(m, n)
    lib.vf_add_norm(x.data_ptr(), y.data_ptr(), b.data_ptr(), s.data_ptr(), out.data_ptr(), w.data_ptr(),
                    beta.data_ptr(), m, n, 1e-5, torch.get_num_threads())
    ref = x + (y + b)
    ok &= torch.allclose(s, ref, rtol=1e-6, atol=1e-6)
    ok &= torch.allclose(out, F.layer_norm(ref, (n,), w, beta, 1e-5), rtol=1e-5, atol=1e-5)
    return bool(ok)


_KERNEL = _native.Kernel("epilogue", _configure, _self_check)


def native_epilogue_available() -> bool:
    """Whether the fused epilogues have their native kernel here (builds it on the first call)."""
    return _KERNEL.get() is not None


def is_layer_norm(norm: nn.Module | None, width: int) -> bool:
    """Whether ``norm`` is a plain LayerNorm over the last ``width`` features: what the native epilogues compute."""
    return type(norm) is nn.LayerNorm and norm.normalized_shape == (width,)


def _native_rows(*tensors: torch.Tensor | None) -> int:
    """Rows of the first tensor when all can go to the kernel (CPU fp32 contiguous, inference), else 0."""
    if _KERNEL.get() is None or not native_inference_ready(*(t for t in tensors if t is not None)):
        return 0
    first = tensors[0]
    return first.numel() // first.shape[-1] if first.ndim and first.shape[-1] else 0


def native_bias_act_(h: torch.Tensor, bias: torch.Tensor | None, act: str) -> bool:
    """h = act(h + bias) in place, natively; False (h untouched) where the kernel cannot take it."""
    rows = _native_rows(h, bias) if act in ACT_CODES else 0
    if rows:
        _KERNEL.get().vf_bias_act(h.data_ptr(), _ptr(bias), rows, h.shape[-1], ACT_CODES[act], torch.get_num_threads())
    return bool(rows)


def linear_add_norm(
    x: torch.Tensor, layer: nn.Linear, residual: torch.Tensor, norm: nn.Module | None, keep_sum: bool = True
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """s = residual + layer(x) and h = norm(s): (s, h), s None unless ``keep_sum``, h None without a norm.

    Pre-norm blocks keep both (s is the residual stream, h the next sublayer's input); post-norm ones only h.
    Without a norm, s is always returned.
    """
    keep_sum = keep_sum or norm is None
    weight, bias = layer.weight, layer.bias
    layer_norm = is_layer_norm(norm, weight.shape[0])
    rows = 0
    if norm is None or layer_norm:
        rows = _native_rows(x, weight, bias, residual, *((norm.weight, norm.bias) if layer_norm else ()))
    if not (rows and residual.shape == x.shape[:-1] + (weight.shape[0],)):
        s = residual + layer(x)
        return (s if keep_sum else None), (None if norm is None else norm(s))
    if gemm_taken(x, weight):  # the whole epilogue, norm included, inside the product
        out = gemm(x, weight, bias, residual=residual, keep_sum=keep_sum,
                   norm=None if norm is None else (norm.weight, norm.bias, norm.eps))
        if out is not None:
            return out
    if rows <= NATIVE_MAX_ROWS:  # the rows kernel adds the bias for free
        y, bias = linear(x, weight, bias), None
    else:
        y = linear(x, weight)  # a bias-free product (no addmm bias copy): the bias joins the pass below
    s = y if keep_sum else None
    h = None if norm is None else (torch.empty_like(y) if keep_sum else y)
    w, beta, eps = (None, None, 0.0) if norm is None else (norm.weight, norm.bias, norm.eps)
    _KERNEL.get().vf_add_norm(residual.data_ptr(), y.data_ptr(), _ptr(bias), _ptr(s), _ptr(h), _ptr(w), _ptr(beta),
                     rows, y.shape[-1], eps, torch.get_num_threads())
    return s, h


def mlp_add_norm(
    x: torch.Tensor, mlp: nn.Module, residual: torch.Tensor, norm: nn.Module | None, keep_sum: bool = True
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``linear_add_norm(mlp.hidden(x), mlp.fc2, residual, norm, keep_sum)``: an MLP block's output with its
    residual and the next norm, as one native call (``nn.gemm.mlp``) where the GEMM takes fc1's product."""
    fc1, fc2 = mlp.fc1, mlp.fc2
    if (not mlp.gated and mlp.act in ACT_CODES and residual.shape == x.shape[:-1] + (fc2.weight.shape[0],)
            and (norm is None or is_layer_norm(norm, fc2.weight.shape[0]))
            and gemm_taken(x, fc1.weight, fc1.bias, fc2.weight, fc2.bias, residual,
                           *((norm.weight, norm.bias) if norm is not None else ()))):
        out = mlp_product(x, fc1, mlp.act, fc2, residual=residual, keep_sum=keep_sum,
                          norm=None if norm is None else (norm.weight, norm.bias, norm.eps))
        if out is not None:
            return out if keep_sum or norm is None else (None, out[1])
    return linear_add_norm(mlp.hidden(x), fc2, residual, norm, keep_sum)


def gather_norm_linear(x: torch.Tensor, index: torch.Tensor, group: int, norm: nn.Module | None,
                       layer: nn.Linear) -> torch.Tensor | None:
    """layer(norm(A)) for A (B, Lo, group C) whose row o concatenates the tokens x[:, index[o group + j]], j < group,
    of x (B, L, C); index L reads a zero token (padding): Swin's patch merging from the token stream, in one native
    call (``nn.gemm.gather_norm_gemm``) without the (B, Lo, group C) gather in memory. None where it cannot be taken
    (not CPU fp32 inference, norm not a LayerNorm over group C, more than ``GEMM_MAX_K`` inputs, an index out of
    [0, L]); the caller then gathers and runs the modules."""
    if x.ndim != 3 or group < 1 or index.ndim != 1 or index.numel() % group or index.dtype != torch.long:
        return None
    b, length, c = x.shape
    width = group * c
    if not (norm is None or is_layer_norm(norm, width)) or layer.weight.shape[1] != width or width > GEMM_MAX_K:
        return None
    weight, bias = layer.weight, layer.bias
    params = (weight, bias) + ((norm.weight, norm.bias) if norm is not None else ())
    if (b * (index.numel() // group) <= NATIVE_MAX_ROWS or not index.is_contiguous()
            or not native_inference_ready(x, *(t for t in params if t is not None)) or not gemm_chosen()):
        return None
    if index.numel() and not 0 <= int(index.min()) <= int(index.max()) <= length:
        return None
    return gather_norm_gemm(x, index, group, weight, bias, None if norm is None else (norm.weight, norm.bias, norm.eps))
