"""The self-check of every kernel: the built library against PyTorch before its first use.

A kernel that disagrees (a miscompiled build, a CPU the flags did not foresee) is not used; the caller falls back
to PyTorch ops. The same references serve the tests (``tests/native``).
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

__all__ = ["linear_rows_agrees"]


def linear_rows_agrees(linear_rows: Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]) -> bool:
    """``linear_rows(x, w, b)`` against ``F.linear`` on a serial and a threaded shape, each with a ragged last block
    of rows (R not a multiple of 4) and an odd row count of x, with and without bias."""
    g = torch.Generator().manual_seed(0)
    for m, r, k in ((3, 37, 53), (1, 301, 300)):
        x, w, b = torch.randn(m, k, generator=g), torch.randn(r, k, generator=g), torch.randn(r, generator=g)
        for bias in (b, None):
            if not torch.allclose(linear_rows(x, w, bias), F.linear(x, w, bias), rtol=1e-5, atol=1e-4):
                return False
    return True
