"""Normalisation layers: LayerNorm, RMSNorm, and the adaptive modulation of adaLN / adaLN-Zero."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from visionformers._validate import check_bool, check_choice, check_int, check_number

__all__ = ["RMSNorm", "make_norm", "modulate", "AdaLNModulation", "NORMS"]

NORMS = ("layernorm", "rmsnorm")


class RMSNorm(nn.Module):
    """Root-mean-square norm, x / sqrt(mean(x^2) + eps) * weight (Zhang & Sennrich 2019, eq. 4).

    Computed in float32 and cast back, as T5's LayerNorm does, so bf16/fp16 inputs lose no precision.
    """

    def __init__(self, dim: int, eps: float = 1e-6, affine: bool = True):
        super().__init__()
        check_int("dim", dim)
        check_number("eps", eps, at_least=0)
        check_bool("affine", affine)
        self.dim, self.eps = dim, eps
        self.weight = nn.Parameter(torch.ones(dim)) if affine else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.rms_norm(x.float(), (self.dim,), eps=self.eps)
        if self.weight is not None:
            y = y * self.weight.float()
        return y.to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.dim}, eps={self.eps}, affine={self.weight is not None}"


def make_norm(kind: str, dim: int, eps: float = 1e-6, affine: bool = True, bias: bool = True) -> nn.Module:
    """Build a norm by name: "layernorm" (Ba et al. 2016) or "rmsnorm"."""
    check_choice("norm", kind, NORMS)
    check_int("dim", dim)
    check_number("eps", eps, at_least=0)
    if kind == "rmsnorm":
        return RMSNorm(dim, eps=eps, affine=affine)
    return nn.LayerNorm(dim, eps=eps, elementwise_affine=affine, bias=bias and affine)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN modulation x * (1 + scale) + shift (Peebles & Xie 2023, sec. 3.2; a FiLM layer, Perez et al. 2018).

    (B, C) shift/scale broadcast over the tokens of x (B, N, C); "1 +" makes zero modulation the identity.
    """
    return torch.addcmul(shift.unsqueeze(1), x, 1 + scale.unsqueeze(1))


class AdaLNModulation(nn.Module):
    """SiLU -> Linear producing ``num_chunks`` (B, dim) modulation vectors from a conditioning vector.

    Zero-initialised so each adaLN-Zero block starts as the identity (Peebles & Xie 2023, sec. 3.2).
    """

    def __init__(self, cond_dim: int, dim: int, num_chunks: int):
        super().__init__()
        self.num_chunks = num_chunks
        self.linear = nn.Linear(cond_dim, num_chunks * dim)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, cond: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """cond (B, cond_dim) -> num_chunks tensors of (B, dim)."""
        return self.linear(F.silu(cond)).chunk(self.num_chunks, dim=-1)
