"""Optimizer parameter groups and warm-up learning-rate schedules.

The schedule is a plain callable object inside ``torch.optim.lr_scheduler.LambdaLR``: its state dict is ints,
floats and strings, so a checkpoint stores it as JSON and reloads it exactly.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from visionformers._validate import check_choice, check_number, fail, is_number

LR_SCHEDULES = ("constant", "linear", "cosine")
OPTIMIZERS = ("adamw", "adam", "sgd")


def use_fused(fused: bool | None = None) -> bool:
    """Whether AdamW / Adam use their fused kernel (one launch for every parameter): by default where CUDA is
    available (the models train there in fp32 master weights, so the optimizer state is fp32 too); the CPU
    keeps the for-each implementation."""
    return torch.cuda.is_available() if fused is None else bool(fused)


def adamw(groups, lr: float, betas=(0.9, 0.999), eps: float = 1e-8, fused: bool | None = None, cls=torch.optim.AdamW):
    """``torch.optim.AdamW`` (or ``cls``, e.g. Adam) over ``groups``, fused per :func:`use_fused`."""
    return cls(groups, lr=lr, betas=tuple(betas), eps=eps, fused=use_fused(fused) or None)


def param_groups(model: nn.Module, weight_decay: float, lrs: dict[str, float] | None = None) -> list[dict]:
    """Two groups: decayed matrices / conv kernels, and undecayed biases, norm scales and embeddings' 1-D tables.

    The usual rule (nanoGPT, timm): weight decay on tensors with >= 2 dims only, since decaying a bias or a
    LayerNorm gain pulls it toward 0 rather than regularising a linear map. Frozen parameters are left out.
    ``lrs``: {sub-module name: learning rate} for the parameters under that sub-module (two more groups each, with
    their own ``lr``), e.g. ``{"text_encoder": 1e-5}``; the other parameters use the optimizer's rate.
    """
    lrs = lrs or {}
    for name in lrs:
        if not any(n == name or n.startswith(name + ".") for n, _ in model.named_parameters()):
            fail("lrs", name, "the name of a sub-module with parameters, e.g. 'text_encoder'")
    buckets: dict[tuple[str | None, bool], list] = {}
    for pname, p in model.named_parameters():
        if p.requires_grad:
            owner = next((name for name in lrs if pname.startswith(name + ".")), None)
            buckets.setdefault((owner, p.ndim >= 2), []).append(p)
    groups = []
    for owner in (None, *lrs):
        extra = {} if owner is None else {"lr": lrs[owner]}
        groups += [{"params": buckets.get((owner, True), []), "weight_decay": weight_decay, **extra},
                   {"params": buckets.get((owner, False), []), "weight_decay": 0.0, **extra}]
    return [g for g in groups if g["params"]]


def build_optimizer(
    model: nn.Module,
    name: str = "adamw",
    learning_rate: float = 1e-4,
    weight_decay: float = 0.0,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    fused: bool | None = None,
    lrs: dict[str, float] | None = None,
) -> torch.optim.Optimizer:
    """AdamW (Loshchilov & Hutter 2019), Adam or SGD with momentum 0.9 over :func:`param_groups`; ``fused``:
    see :func:`use_fused` (default: on CUDA); ``lrs``: learning rates of sub-modules (see :func:`param_groups`)."""
    check_choice("name", name, OPTIMIZERS)
    check_number("learning_rate", learning_rate, above=0)
    check_number("weight_decay", weight_decay, at_least=0)
    if not (isinstance(betas, (tuple, list)) and len(betas) == 2 and all(is_number(b) and 0 <= b < 1 for b in betas)):
        fail("betas", betas, "two numbers in [0, 1), e.g. (0.9, 0.999)")
    check_number("eps", eps, above=0)
    if lrs is not None and not isinstance(lrs, dict):
        fail("lrs", lrs, "None or a dict {sub-module name: learning rate}")
    for key, value in (lrs or {}).items():
        check_number(f"lrs[{key!r}]", value, above=0)
    groups = param_groups(model, weight_decay, lrs)
    if not groups:
        fail("model", type(model).__name__, "a model with at least one trainable parameter")
    if name == "sgd":
        return torch.optim.SGD(groups, lr=learning_rate, momentum=0.9)
    cls = torch.optim.AdamW if name == "adamw" else torch.optim.Adam
    return adamw(groups, learning_rate, betas, eps, fused, cls=cls)


class WarmupSchedule:
    """lr multiplier at step s: linear warm-up 0 -> 1 over ``warmup_steps``, then constant, linear to 0, or
    cosine to ``min_ratio`` (Loshchilov & Hutter 2017, SGDR eq. 5, one cycle without restarts) at ``total_steps``."""

    def __init__(self, kind: str, warmup_steps: int, total_steps: int, min_ratio: float = 0.0):
        check_choice("kind", kind, LR_SCHEDULES)
        if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 0:
            fail("warmup_steps", warmup_steps, "an int >= 0")
        if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1:
            fail("total_steps", total_steps, "an int >= 1")
        if not 0 <= min_ratio <= 1:
            fail("min_ratio", min_ratio, "a number in [0, 1]")
        self.kind, self.warmup_steps, self.total_steps, self.min_ratio = kind, warmup_steps, total_steps, min_ratio

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / (self.warmup_steps + 1)  # never exactly 0: step 0 still learns a little
        if self.kind == "constant":
            return 1.0
        progress = min(1.0, (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps))
        if self.kind == "linear":
            return 1.0 - (1.0 - self.min_ratio) * progress
        return self.min_ratio + (1.0 - self.min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_lr_scheduler(
    optimizer: torch.optim.Optimizer, kind: str = "cosine", warmup_steps: int = 0, total_steps: int = 1,
    min_ratio: float = 0.0,
) -> torch.optim.lr_scheduler.LambdaLR:
    """``LambdaLR`` over a :class:`WarmupSchedule`; call ``.step()`` once per optimizer step (skipped or not)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, WarmupSchedule(kind, warmup_steps, total_steps, min_ratio))
