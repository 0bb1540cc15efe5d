"""Checks of the inputs shared by the diffusion networks (UNet, DiT): ``(x, t, class_labels, context, context_mask)``.

Each check raises the project's ValueError naming the argument, the value and what the model accepts, so a
wrong call fails at the entry point instead of deep inside a convolution or an attention kernel.
"""
from __future__ import annotations

import torch

from visionformers._validate import check_dtype, check_tensor, fail

__all__ = ["check_timesteps", "class_labels_or_null", "check_context", "pooled_context"]


def check_timesteps(t, batch: int, device: torch.device) -> torch.Tensor:
    """t: a number, a 0-d tensor or a (B,) tensor, integer or fractional -> (B,) float tensor on ``device``."""
    if isinstance(t, (int, float)) and not isinstance(t, bool):
        t = torch.tensor(float(t), device=device)
    if not isinstance(t, torch.Tensor) or t.dtype == torch.bool or t.is_complex():
        fail("t", t, f"a number, a 0-d tensor or a ({batch},) tensor of (possibly fractional) timesteps")
    if t.ndim == 0:
        return t.float().expand(batch).to(device)
    if t.shape != (batch,):
        fail("t", t, f"a 0-d tensor or shape ({batch},): one timestep per sample of x")
    return t.float().to(device)


def class_labels_or_null(class_labels, num_classes: int | None, batch: int, device: torch.device) -> torch.Tensor | None:
    """Validated (B,) long labels; None on a class-conditional model means the null class (unconditional).

    Class id ``num_classes`` is the learned null class of classifier-free guidance (Ho & Salimans 2022).
    """
    if num_classes is None:
        if class_labels is not None:
            fail("class_labels", class_labels, "None: this model is unconditional (build it with num_classes=...)")
        return None
    if class_labels is None:
        return torch.full((batch,), num_classes, dtype=torch.long, device=device)
    check_tensor("class_labels", class_labels, ndim=1, integer=True)
    if class_labels.shape[0] != batch:
        fail("class_labels", class_labels, f"shape ({batch},): one label per sample of x")
    if not torch.compiler.is_compiling() and class_labels.numel():
        lo, hi = int(class_labels.min()), int(class_labels.max())
        if lo < 0 or hi > num_classes:
            fail("class_labels", class_labels,
                 f"class ids in [0, {num_classes}) or {num_classes} for the null class (got ids {lo}..{hi})")
    return class_labels.to(device=device, dtype=torch.long)


def check_context(context, context_mask, context_dim: int | None, batch: int, dtype: torch.dtype | None = None) -> None:
    """context (B, M, context_dim) float (of the model's parameter ``dtype`` when given, any under autocast);
    context_mask None or (B, M) bool, True = attend that token."""
    if context_dim is None:
        if context is not None or context_mask is not None:
            name, value = ("context", context) if context is not None else ("context_mask", context_mask)
            fail(name, value, "None: this model has no cross-attention (build it with context_dim=...)")
        return
    if context is None:
        fail("context", None, f"a (B, M, {context_dim}) tensor: this model cross-attends to a context")
    check_tensor("context", context, ndim=3, floating=True)
    if dtype is not None:
        check_dtype("context", context, dtype)
    if context.shape[0] != batch or context.shape[-1] != context_dim:
        fail("context", context, f"shape ({batch}, M, {context_dim})")
    if context_mask is not None:
        check_tensor("context_mask", context_mask, ndim=2)
        if context_mask.dtype != torch.bool or tuple(context_mask.shape) != (batch, context.shape[1]):
            fail("context_mask", context_mask, f"a bool tensor of shape ({batch}, {context.shape[1]}), True = attend")


def pooled_context(context: torch.Tensor, context_mask: torch.Tensor | None) -> torch.Tensor:
    """(B, M, C) context -> (B, C), the mean of its real tokens (of all M without a mask).

    The pooled text embedding that Imagen's U-Net adds to the timestep embedding, beside cross-attention to the whole
    sequence (Saharia et al. 2022, "Neural network architecture"; after GLIDE, Nichol et al. 2022, whose text
    transformer's final token replaces the class embedding): a global signal every residual block sees.
    """
    if context_mask is None:
        return context.mean(1)
    weights = context_mask.to(context.dtype).unsqueeze(-1)  # (B, M, 1)
    return (context * weights).sum(1) / weights.sum(1).clamp(min=1)
