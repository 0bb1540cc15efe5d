"""Pieces every text model shares: the output tuple, input checks and the token losses."""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from visionformers._validate import check_tensor, fail, is_int

__all__ = [
    "ModelOutput", "check_input_ids", "check_attention_mask", "check_batch_match", "check_decode_inputs", "check_memory",
    "check_token_id", "drop_full_mask",
    "padding_mask", "token_cross_entropy", "shifted_cross_entropy",
]

IGNORE_INDEX = -100  # label value that contributes no loss (PyTorch's and HF's convention)
ID_DTYPES = (torch.long, torch.int32)  # the index dtypes nn.Embedding accepts


class ModelOutput(NamedTuple):
    """``(logits, loss)``; ``loss`` is None without labels. A NamedTuple: ``out.logits`` or ``logits, loss = out``."""

    logits: torch.Tensor
    loss: torch.Tensor | None = None


def check_input_ids(
    input_ids, vocab_size: int, max_len: int | None = None, name: str = "input_ids", check_values: bool = True
) -> None:
    """(B, N) int64 / int32 ids in [0, vocab_size), B >= 1, 1 <= N <= ``max_len`` when the model has learned positions.

    Other integer dtypes (uint8, int16, ...) are rejected rather than converted: nn.Embedding takes only these two."""
    check_tensor(name, input_ids, ndim=2)
    if input_ids.dtype not in ID_DTYPES:
        fail(name, input_ids, "integer token ids of dtype torch.long or torch.int32 (convert with .long())")
    if input_ids.shape[0] == 0:
        fail(name, input_ids, "at least one sequence (batch size B >= 1)")
    if input_ids.shape[1] == 0:
        fail(name, input_ids, "at least one token per sequence")
    if max_len is not None and input_ids.shape[1] > max_len:
        fail(name, input_ids, f"at most max_len={max_len} tokens per sequence (the model's learned positions)")
    if check_values and input_ids.numel() and not torch.compiler.is_compiling():  # a value check breaks the graph
        lo, hi = int(input_ids.min()), int(input_ids.max())
        if lo < 0 or hi >= vocab_size:
            bad = lo if lo < 0 else hi
            fail(f"{name} (token id {bad})", input_ids, f"token ids in [0, vocab_size={vocab_size})")


def check_token_id(name: str, value, vocab_size: int | None, *, optional: bool = False, note: str = "") -> None:
    """A special token id: an int (not a bool) in [0, vocab_size) (any int when vocab_size is None)."""
    if optional and value is None:
        return
    if not is_int(value) or (vocab_size is not None and not 0 <= value < vocab_size):
        where = ("an integer token id" if vocab_size is None
                 else f"a token id in [0, {vocab_size}) (vocab_size={vocab_size})")
        fail(name, value, ("None or " if optional else "") + where + note)


def check_attention_mask(
    attention_mask, input_ids: torch.Tensor, name: str = "attention_mask", like: str = "input_ids"
) -> torch.Tensor:
    """A (B, N) 0/1 or bool padding mask matching ``input_ids`` (any tensor whose first two dims are (B, N), named
    ``like`` in the message); returns it as bool (True = real token)."""
    shape = tuple(input_ids.shape[:2])
    if not isinstance(attention_mask, torch.Tensor):
        fail(name, type(attention_mask).__name__, f"a (B, N)={shape} bool or 0/1 tensor")
    if tuple(attention_mask.shape) != shape:
        fail(name, attention_mask, f"shape (B, N)={shape}, the (B, N) of {like}")
    if attention_mask.is_floating_point() or attention_mask.is_complex():
        fail(name, attention_mask, "a bool or 0/1 integer mask (True/1 = attend)")
    return attention_mask.bool()


def check_batch_match(ids: torch.Tensor, name: str, batch: int, other: str) -> None:
    """``ids`` must have the batch size of ``other`` (no silent broadcasting of a batch of 1)."""
    if ids.shape[0] != batch:
        fail(name, ids, f"batch size {batch}, the batch size of {other}")


def check_memory(memory, ids: torch.Tensor, dim: int, name: str = "memory", ids_name: str = "decoder_input_ids") -> None:
    """(B, M, dim) floating encoder states with the batch size of ``ids`` and M >= 1."""
    check_tensor(name, memory, ndim=3, floating=True)
    if memory.shape[0] != ids.shape[0] or memory.shape[1] == 0 or memory.shape[2] != dim:
        fail(name, memory, f"shape (B, M, dim)=({ids.shape[0]}, M >= 1, {dim}): B of {ids_name}, the model's dim")


def check_decode_inputs(
    decoder_input_ids, memory, memory_mask, vocab_size: int, dim: int, max_len: int | None = None
) -> torch.Tensor | None:
    """The arguments of an encoder-decoder's public ``decode``; returns the bool memory mask (None when absent or
    all True)."""
    check_input_ids(decoder_input_ids, vocab_size, max_len, name="decoder_input_ids")
    check_memory(memory, decoder_input_ids, dim)
    if memory_mask is None:
        return None
    return drop_full_mask(check_attention_mask(memory_mask, memory, name="memory_mask", like="memory"))


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
    """Mean cross-entropy of (..., V) logits against (...) labels of any integer dtype; label -100 is ignored."""
    check_tensor("labels", labels, integer=True)
    labels = labels.long()  # cross_entropy wants int64 targets: a no-op for them, a widening cast for int32 / int16 / uint8
    if not torch.compiler.is_compiling():  # a value check breaks the graph
        _check_label_values(labels, logits.shape[-1])
    return F.cross_entropy(logits.flatten(0, -2).float(), labels.flatten(), ignore_index=IGNORE_INDEX)  # (B*N, V) vs (B*N,)


def _check_label_values(labels: torch.Tensor, vocab_size: int) -> None:
    bad = (labels != IGNORE_INDEX) & ((labels < 0) | (labels >= vocab_size))  # else an IndexError inside torch
    if bad.any():
        fail(f"labels (id {int(labels[bad][0])})", labels, f"ids in [0, {vocab_size}) or {IGNORE_INDEX} (ignored)")


def shifted_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Next-token loss: position t predicts labels[t + 1] (labels usually equal input_ids)."""
    if labels.shape[1] < 2:  # else a mean over no targets: a NaN loss
        fail("labels", labels, "at least 2 tokens per sequence (position t predicts labels[t + 1])")
    return token_cross_entropy(logits[:, :-1], labels[:, 1:])
