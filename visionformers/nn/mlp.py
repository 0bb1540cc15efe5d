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
    """``activation`` in place, for a fresh tensor that autograd does not need."""
    if name in ("gelu", "gelu_tanh"):
        return torch.ops.aten.gelu_(x, approximate="tanh" if name == "gelu_tanh" else "none")
    return x.relu_() if name == "relu" else F.silu(x, inplace=True)


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
        self.fc1 = nn.Linear(dim, 2 * hidden_dim if self.gated else hidden_dim, bias=bias)
        self.fc2 = nn.Linear(hidden_dim, out_dim or dim, bias=bias)
        self.drop = nn.Dropout(drop)

    def hidden(self, x: torch.Tensor) -> torch.Tensor:
        """act(x W1 + b1), or act(x W) * (x V) when gated: (..., dim) -> (..., hidden_dim), fc2's input."""
        if self.gated:
            gate, up = self.fc1(x).chunk(2, dim=-1)  # fc1 rows: [gate; up]
            return activation(_GATED[self.act], gate) * up
        if torch.is_grad_enabled():
            return activation(self.act, self.fc1(x))
        return activation_(self.act, self.fc1(x))  # inference: fc1's output is reused, one (N, hidden) buffer less

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., dim) -> (..., out_dim)."""
        return self.drop(self.fc2(self.drop(self.hidden(x))))
