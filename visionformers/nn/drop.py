"""Stochastic depth (Huang et al. 2016, "Deep Networks with Stochastic Depth"); dropout itself is ``F.dropout``."""
from __future__ import annotations

import torch
from torch import nn

from visionformers._validate import check_probability

__all__ = ["drop_path", "DropPath"]


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
