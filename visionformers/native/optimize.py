"""``optimize(model)``: the one call that attaches the CPU inference speed-ups to a model, from outside it.

What it does, each chosen by what the machine has (never by a timing), in place:

- every ``nn.Linear`` becomes a ``RowsLinear`` where the ``linear_rows`` kernel is built and pays (same parameters,
  state dict and values up to float rounding): products of at most ``MAX_ROWS`` rows in CPU fp32 inference, the
  matrix-vector products of token-by-token decoding, go to the ``visionformers::linear_rows`` op. It pays where
  MKL runs a one-row product on a single core, which is what it does on CPUs without AVX-512; on AVX-512 CPUs
  MKL's one-row products already read memory at full bandwidth, and the kernel is not attached unless asked
  (``kernels=True``);
- every other CPU weight matrix with more rows than columns (embeddings, tied output heads, and every linear
  weight where the kernel is missing) is stored column-major: same values, transposed strides. Decoding multiplies
  one row by each matrix, and CPU BLAS streams a wide (out > in) matrix markedly faster as (in, out) rows;
- 4-D (convolution) weights on CPU are stored channels-last, so that oneDNN runs the convolutions in NHWC without
  reordering each weight on every call (``model.to(memory_format=torch.channels_last)``).

Training is not changed by any of this (autograd takes ``F.linear``; any strides train), but training code never
calls it; CPU sampling, evaluation, decoding and the demo may. ``VISIONFORMERS_NATIVE=0`` keeps the kernel off
(the layouts still apply).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from visionformers._validate import check_bool, fail
from visionformers.native import ops

__all__ = ["optimize", "kernels_pay", "RowsLinear", "MAX_ROWS"]

# Rows up to which RowsLinear takes the kernel: decoding's 1-16 rows per step; beyond, a blocked BLAS product wins.
MAX_ROWS = 16


class RowsLinear(nn.Linear):
    """``nn.Linear`` whose few-row products in CPU fp32 inference run ``visionformers::linear_rows``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, b = self.weight, self.bias
        if (
            x.dtype == torch.float32 and w.dtype == torch.float32 and x.device.type == "cpu" and w.device.type == "cpu"
            and x.numel() <= MAX_ROWS * self.in_features and x.ndim and x.shape[-1] == self.in_features
            and not (torch.is_grad_enabled() and (x.requires_grad or w.requires_grad))
        ):
            return ops.linear_rows(x, w, b)
        return F.linear(x, w, b)


def _column_major_(weight: torch.Tensor) -> None:
    """Store a wide CPU matrix (out > in) as its (in, out) transpose, values and shape unchanged."""
    if weight.device.type == "cpu" and weight.ndim == 2 and weight.shape[0] > weight.shape[1]:
        if weight.stride() != (1, weight.shape[0]):
            with torch.inference_mode(False), torch.no_grad():  # a normal tensor: training may follow
                weight.data = weight.data.t().contiguous().t()


def kernels_pay() -> bool:
    """Whether the decoding kernel is attached by default here: a CPU without AVX-512 (a static choice: the CPU's
    features as PyTorch reports them, the same on every run)."""
    return not torch.backends.cpu.get_cpu_capability().startswith(("AVX512", "AMX"))


def optimize(model: nn.Module, kernels: bool | None = None) -> nn.Module:
    """Attach the CPU inference speed-ups to ``model`` in place (see the module docstring); returns it.

    ``kernels``: None attaches the native kernel where it pays (``kernels_pay``), True wherever it is built,
    False nowhere (the layouts only: what a machine without the kernel gets). Idempotent. Values are unchanged up
    to float rounding; state dicts and parameter names are unchanged.
    """
    if not isinstance(model, nn.Module):
        fail("model", model, "a torch.nn.Module")
    check_bool("kernels", kernels, optional=True)
    kernel = (kernels_pay() if kernels is None else kernels) and ops.kernel_available()
    rows = []  # weights the kernel reads as (out, in) rows: left as they are even where an embedding shares one
    for module in model.modules():
        if kernel and type(module) is nn.Linear and module.weight.device.type == "cpu":
            module.__class__ = RowsLinear  # same object, same parameters: only forward changes
        if isinstance(module, RowsLinear):
            rows.append(module.weight)
            if not module.weight.is_contiguous():
                with torch.inference_mode(False), torch.no_grad():
                    module.weight.data = module.weight.data.contiguous()
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Embedding)) and not any(module.weight is w for w in rows):
            _column_major_(module.weight)
    for p in model.parameters():
        if p.ndim == 4 and p.device.type == "cpu" and not p.is_contiguous(memory_format=torch.channels_last):
            with torch.inference_mode(False), torch.no_grad():
                p.data = p.data.contiguous(memory_format=torch.channels_last)
    return model
