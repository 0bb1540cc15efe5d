"""The one MLP: Linear -> activation -> Linear, with gated variants (SwiGLU, GEGLU).

Position-wise feed-forward network FFN(x) = act(x W1 + b1) W2 + b2 (Vaswani et al. 2017, eq. 2, with ReLU);
GELU x * Phi(x) and its tanh approximation (Hendrycks & Gimpel 2016, sec. 2); gated variants
FFN(x) = (act(x W) * (x V)) W2 (Shazeer 2020, "GLU Variants Improve Transformer", sec. 2).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from visionformers._validate import check_bool, check_choice, check_int, check_probability
from visionformers.nn.fused import native_bias_act_, native_epilogue_available
from visionformers.nn.gemm import ACT_CODES, gemm
from visionformers.nn.linear import NATIVE_MAX_ROWS, Linear, gemm_taken, linear, native_inference_ready

__all__ = ["Mlp", "ACTIVATIONS", "activation"]

ACTIVATIONS = ("gelu", "gelu_tanh", "relu", "silu", "swiglu", "geglu", "geglu_tanh")
_GATED = {"swiglu": "silu", "geglu": "gelu", "geglu_tanh": "gelu_tanh"}


def activation(name: str, x: torch.Tensor) -> torch.Tensor:
    """Elementwise activation by name; "gelu_tanh" is GPT-2's tanh approximation ("gelu_new")."""
    if name == "gelu":
        return F.gelu(x)
    if name == "gelu_tanh":
        return F.gelu(x, approximate="tanh")
    if name == "relu":
        return F.relu(x)
    return F.silu(x)


def activation_(name: str, x: torch.Tensor) -> torch.Tensor:
    """In-place ``activation`` (no new (N, hidden) buffer); only where autograd does not need x."""
    if name in ("gelu", "gelu_tanh"):
        return torch.ops.aten.gelu_(x, approximate="tanh" if name == "gelu_tanh" else "none")
    if name == "relu":
        return x.relu_()
    return F.silu(x, inplace=True)


def bias_act_(h: torch.Tensor, bias: torch.Tensor | None, act: str) -> torch.Tensor:
    """In-place ``activation(h + bias)``, one fused pass where the native kernel takes it (``nn.fused``)."""
    if native_bias_act_(h, bias, act):
        return h
    return activation_(act, h if bias is None else h.add_(bias))


class Mlp(nn.Module):
    """Position-wise feed-forward network; gated variants compute act(x W) * (x V) with one fused matmul."""

    def __init__(
        self,
        dim: int,
        hidden_dim: int,
        out_dim: int | None = None,
        act: str = "gelu",
        bias: bool = True,
        drop: float = 0.0,
    ):
        super().__init__()
        check_choice("act", act, ACTIVATIONS)
        check_int("dim", dim)
        check_int("hidden_dim", hidden_dim)
        check_int("out_dim", out_dim, optional=True)
        check_bool("bias", bias)
        check_probability("drop", drop)
        self.act, self.gated = act, act in _GATED
        self.fc1 = Linear(dim, 2 * hidden_dim if self.gated else hidden_dim, bias=bias)
        self.fc2 = Linear(hidden_dim, out_dim or dim, bias=bias)
        self.drop = nn.Dropout(drop)

    def hidden(self, x: torch.Tensor) -> torch.Tensor:
        """act(x W1 + b1), or act(x W) * (x V) when gated: (..., dim) -> (..., hidden_dim), fc2's input."""
        if self.gated:
            gate, up = self.fc1(x).chunk(2, dim=-1)  # fc1 rows: [gate; up]
            return activation(_GATED[self.act], gate) * up
        if torch.is_grad_enabled():
            return activation(self.act, self.fc1(x))
        # inference: nothing keeps fc1's output for backward, so the activation reuses its memory; with many
        # rows the product runs bias-free and the bias joins the activation's pass
        w, b = self.fc1.weight, self.fc1.bias
        if self.act in ACT_CODES and gemm_taken(x, w, b):  # the activation in the product's epilogue
            out = gemm(x, w, b, act=self.act)
            if out is not None:
                return out[0]
        if x.numel() > NATIVE_MAX_ROWS * x.shape[-1] and b is not None and native_epilogue_available() and native_inference_ready(x, w, b):
            return bias_act_(linear(x, w), b, self.act)
        return activation_(self.act, self.fc1(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., dim) -> (..., out_dim)."""
        h = self.hidden(x)
        if self.training and self.drop.p > 0:  # else skip the no-op module calls (decoding runs this per token)
            return self.drop(self.fc2(self.drop(h)))
        return self.fc2(h)
