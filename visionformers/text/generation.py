"""Token-by-token decoding shared by GPT, T5 and the encoder-decoder Transformer.

A model supplies a ``step`` function that takes the newest tokens and returns next-token logits,
keeping its keys and values in ``nn.KVCache`` objects, so each step costs one token's forward pass.
``next_token`` is greedy (argmax) or samples with temperature, top-k (Fan et al. 2018) and nucleus
top-p (Holtzman et al. 2020, sec. 3.1) filtering, in that order, as HF's generate does.
"""
from __future__ import annotations

from collections.abc import Callable

import torch

from visionformers._validate import fail, is_number
from visionformers.nn import KVCache
from visionformers.text.common import check_token_id

__all__ = ["check_generation_args", "next_token", "decode", "generate_seq2seq"]


def check_generation_args(
    max_new_tokens, temperature, top_k, top_p, do_sample, eos_token_id=None, *, pad_token_id=None, vocab_size=None
) -> None:
    """ValueError naming the first bad sampling argument; special token ids must lie in [0, vocab_size)."""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        fail("max_new_tokens", max_new_tokens, "an integer >= 0")
    if not is_number(temperature):  # bools, strings, NaN and inf
        fail("temperature", temperature, "a finite number > 0")
    if do_sample and temperature <= 0:
        fail("temperature", temperature, "a number > 0 when do_sample=True (use do_sample=False for greedy)")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k <= 0):
        fail("top_k", top_k, "None or an integer >= 1")
    if top_p is not None and (isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0 < top_p <= 1):
        fail("top_p", top_p, "None or a number in (0, 1]")
    check_token_id("eos_token_id", eos_token_id, vocab_size, optional=True)
    check_token_id("pad_token_id", pad_token_id, vocab_size, optional=True)


def next_token(
    logits: torch.Tensor,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    do_sample: bool = False,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """(B, V) logits -> (B,) token ids: argmax, or a sample from the filtered, tempered softmax."""
    if not do_sample:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]  # (B, 1) smallest kept logit
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # drop a token when the tokens ranked above it already hold top_p of the mass (the first always stays)
        drop_sorted = (probs.cumsum(dim=-1) - probs) > top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


def decode(
    step: Callable[[torch.Tensor], torch.Tensor],
    tokens: torch.Tensor,
    max_new_tokens: int,
    *,
    eos_token_id: int | None = None,
    pad_token_id: int | None = None,
    **sampling,
) -> torch.Tensor:
    """Run ``step`` on ``tokens`` (B, n), then once per new token; return the new tokens (B, T <= max_new_tokens).

    ``step(tokens) -> (B, V)`` logits of the last position. A row that emitted ``eos_token_id`` is
    padded with ``pad_token_id`` (default: eos) and decoding stops when every row has finished.
    """
    b = tokens.shape[0]
    if max_new_tokens == 0:
        return tokens.new_empty(b, 0)
    pad = eos_token_id if pad_token_id is None else pad_token_id
    finished = torch.zeros(b, dtype=torch.bool, device=tokens.device)
    out = []
    logits = step(tokens)
    for i in range(max_new_tokens):
        new = next_token(logits, **sampling)  # (B,)
        if eos_token_id is not None:
            new = new.masked_fill(finished, pad)
            finished = finished | (new == eos_token_id)
        out.append(new)
        if i + 1 == max_new_tokens or (eos_token_id is not None and bool(finished.all())):
            break
        logits = step(new[:, None])
    return torch.stack(out, dim=1)


def generate_seq2seq(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    max_new_tokens: int,
    *,
    start_token_id: int,
    eos_token_id: int | None,
    pad_token_id: int | None,
    **sampling,
) -> torch.Tensor:
    """Encode once, then decode with cached self-attention and cross-attention keys -> (B, 1 + T) with the start token.

    ``model`` provides ``encode(input_ids, attention_mask) -> (B, M, C)``, ``decode(ids, memory,
    memory_mask, kv_caches, cross_kv_caches) -> (B, n, V)`` and ``num_decoder_layers``; an unchecked ``_decode``
    with the same signature, when present, is used for the steps (their ids are the model's own, already valid).
    """
    memory = model.encode(input_ids, attention_mask)  # (B, M, C)
    mask = None if attention_mask is None else attention_mask.bool()
    decode_step = getattr(model, "_decode", model.decode)
    depth = model.num_decoder_layers
    caches = [KVCache(max_len=max_new_tokens + 1) for _ in range(depth)]
    cross = [KVCache() for _ in range(depth)]  # filled on the first step, reused after
    start = torch.full((input_ids.shape[0], 1), start_token_id, dtype=torch.long, device=input_ids.device)

    def step(ids: torch.Tensor) -> torch.Tensor:
        return decode_step(ids, memory, mask, caches, cross)[:, -1]  # (B, V)

    new = decode(step, start, max_new_tokens, eos_token_id=eos_token_id, pad_token_id=pad_token_id, **sampling)
    return torch.cat([start, new], dim=1)
