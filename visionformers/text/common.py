"""Pieces every text model shares: the output tuple, input checks and the token losses."""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from visionformers._validate import check_tensor, fail

__all__ = [
    "ModelOutput", "check_input_ids", "check_attention_mask", "drop_full_mask", "padding_mask",
    "token_cross_entropy", "shifted_cross_entropy",
]

IGNORE_INDEX = -100  # label value that contributes no loss (PyTorch's and HF's convention)


class ModelOutput(NamedTuple):
    """``(logits, loss)``; ``loss`` is None without labels. A NamedTuple: ``out.logits`` or ``logits, loss = out``."""

    logits: torch.Tensor
    loss: torch.Tensor | None = None


def check_input_ids(
    input_ids, vocab_size: int, max_len: int | None = None, name: str = "input_ids", check_values: bool = True
) -> None:
    """(B, N) integer ids in [0, vocab_size), at most ``max_len`` long when the model has learned positions."""
    check_tensor(name, input_ids, ndim=2, integer=True)
    if input_ids.shape[1] == 0:
        fail(name, input_ids, "at least one token per sequence")
    if max_len is not None and input_ids.shape[1] > max_len:
        fail(name, input_ids, f"at most max_len={max_len} tokens per sequence (the model's learned positions)")
    if check_values and input_ids.numel() and not torch.compiler.is_compiling():  # a value check breaks the graph
        lo, hi = int(input_ids.min()), int(input_ids.max())
        if lo < 0 or hi >= vocab_size:
            bad = lo if lo < 0 else hi
            fail(f"{name} (token id {bad})", input_ids, f"token ids in [0, vocab_size={vocab_size})")


def check_attention_mask(attention_mask, input_ids: torch.Tensor, name: str = "attention_mask") -> torch.Tensor:
    """A (B, N) 0/1 or bool padding mask matching ``input_ids``; returns it as bool (True = real token)."""
    if not isinstance(attention_mask, torch.Tensor):
        fail(name, type(attention_mask).__name__, f"a (B, N)={tuple(input_ids.shape)} bool or 0/1 tensor")
    if attention_mask.shape != input_ids.shape:
        fail(name, attention_mask, f"shape (B, N)={tuple(input_ids.shape)}, the shape of input_ids")
    if attention_mask.is_floating_point():
        fail(name, attention_mask, "a bool or 0/1 integer mask (True/1 = attend)")
    return attention_mask.bool()


def drop_full_mask(mask: torch.Tensor | None) -> torch.Tensor | None:
    """None for an absent or all-True padding mask (the unmasked fused kernel is faster), else the mask.
    Under torch.compile the mask is kept: testing it would be a data-dependent branch."""
    if mask is None or torch.compiler.is_compiling() or not bool(mask.all()):
        return mask
    return None


def padding_mask(attention_mask, input_ids: torch.Tensor) -> torch.Tensor | None:
    """A checked bool (B, N) padding mask, or None when there is none or it masks nothing."""
    return None if attention_mask is None else drop_full_mask(check_attention_mask(attention_mask, input_ids))


def token_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of (..., V) logits against (...) labels; label -100 is ignored."""
    check_tensor("labels", labels, integer=True)
    if not torch.compiler.is_compiling():  # a value check breaks the graph
        _check_label_values(labels, logits.shape[-1])
    return F.cross_entropy(logits.flatten(0, -2).float(), labels.flatten(), ignore_index=IGNORE_INDEX)  # (B*N, V) vs (B*N,)


def _check_label_values(labels: torch.Tensor, vocab_size: int) -> None:
    bad = (labels != IGNORE_INDEX) & ((labels < 0) | (labels >= vocab_size))  # else an IndexError inside torch
    if bad.any():
        fail(f"labels (id {int(labels[bad][0])})", labels, f"ids in [0, {vocab_size}) or {IGNORE_INDEX} (ignored)")


def shifted_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Next-token loss: position t predicts labels[t + 1] (labels usually equal input_ids)."""
    return token_cross_entropy(logits[:, :-1], labels[:, 1:])
