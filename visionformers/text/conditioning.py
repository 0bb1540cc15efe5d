"""Text conditioning for diffusion: strings -> (context, context_mask) for cross-attention.

Wraps a BERT, a T5 encoder (or full T5, whose encoder is used) or a GPT backbone with its tokenizer,
as Imagen conditions on T5 (Saharia et al. 2022) and Stable Diffusion on CLIP's text transformer. The
UNet / DiT take the result as ``model(x, t, context=context, context_mask=context_mask)``. An empty
prompt encodes to its special tokens only, so the null prompt of classifier-free guidance is "".
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from visionformers._validate import check_tensor, fail
from visionformers.text.bert import Bert
from visionformers.text.common import check_attention_mask
from visionformers.text.gpt import GPT
from visionformers.text.t5 import T5, T5Encoder
from visionformers.text.tokenizer import ByteTokenizer, Tokenizer

__all__ = ["TextConditioner", "unused_by_encoding"]

BACKBONES = (Bert, T5Encoder, T5, GPT)


def unused_by_encoding(encoder: nn.Module) -> list[nn.Module]:
    """The parts of a backbone that encoding (``forward_features``) never runs: BERT's pooler, GPT's untied LM head,
    T5's decoder and untied LM head (T5's shared embedding is the encoder's input table, so it is used)."""
    parts = {Bert: ("pooler",), GPT: ("lm_head",), T5: ("decoder", "lm_head")}.get(type(encoder), ())
    return [m for m in (getattr(encoder, name, None) for name in parts) if m is not None]


class TextConditioner(nn.Module):
    """Tokenise a batch of prompts and encode them into (B, L, context_dim) states with a (B, L) mask."""

    def __init__(
        self,
        encoder: nn.Module | str = "t5_tiny_encoder",
        tokenizer: Tokenizer | str | None = None,  # None or "byte": a ByteTokenizer
        *,
        max_length: int = 77,  # prompts are cut to this many tokens (CLIP's 77), keeping the final <eos>
        freeze: bool = True,  # frozen: eval mode, no gradients; False trains jointly with the diffusion model
        # (then the parts encoding never runs, see unused_by_encoding, stay frozen)
        pad_to_max_length: bool = False,  # fixed (B, max_length) context instead of the longest prompt's length
        **overrides,  # config overrides when ``encoder`` is a preset name
    ):
        super().__init__()
        if tokenizer is None or (isinstance(tokenizer, str) and tokenizer == "byte"):
            tokenizer = ByteTokenizer()
        elif not isinstance(tokenizer, Tokenizer):
            fail("tokenizer", tokenizer if isinstance(tokenizer, str) else type(tokenizer).__name__,
                 "a Tokenizer (ByteTokenizer(), BPETokenizer.train(...), load_tokenizer(dir)), None or 'byte'")
        self.tokenizer = tokenizer
        if isinstance(encoder, str):
            from visionformers.registry import create_model

            encoder = create_model(encoder, **overrides)
        elif overrides:
            fail("overrides", sorted(overrides), "none unless `encoder` is a preset name")
        if not isinstance(encoder, BACKBONES):
            fail("encoder", type(encoder).__name__, f"a preset name or one of {[c.__name__ for c in BACKBONES]}")
        vocab = encoder.config.vocab_size
        if self.tokenizer.vocab_size > vocab:
            fail("tokenizer", f"vocab_size={self.tokenizer.vocab_size}", f"at most the encoder's vocab_size={vocab}")
        if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2:
            fail("max_length", max_length, "an integer >= 2")
        if isinstance(encoder, GPT) and max_length > encoder.config.max_len:
            fail("max_length", max_length, f"at most the GPT's max_len={encoder.config.max_len}")
        if isinstance(encoder, Bert) and max_length > encoder.config.max_len:
            fail("max_length", max_length, f"at most the BERT's max_len={encoder.config.max_len}")
        self.encoder, self.max_length, self.frozen, self.pad_to_max_length = encoder, max_length, freeze, pad_to_max_length
        if freeze:
            self.encoder.requires_grad_(False)
            self.encoder.eval()
        else:  # trained: what encoding never runs gets no gradient, so it is frozen (DDP needs every trained one used)
            for module in unused_by_encoding(encoder):
                module.requires_grad_(False)

    @property
    def context_dim(self) -> int:
        """Width C of the context: set the UNet / DiT ``context_dim`` to this."""
        return self.encoder.config.dim

    @property
    def device(self) -> torch.device:
        return next(self.encoder.parameters()).device

    def train(self, mode: bool = True) -> TextConditioner:
        super().train(mode)
        if self.frozen:
            self.encoder.eval()  # a frozen encoder never runs dropout
        return self

    def tokenize(self, prompts: str | Sequence[str]) -> dict[str, torch.Tensor]:
        """-> {"input_ids", "attention_mask"} (B, L) on the encoder's device."""
        if isinstance(prompts, str):
            prompts = [prompts]
        if not isinstance(prompts, Sequence) or not prompts or not all(isinstance(p, str) for p in prompts):
            fail("prompts", prompts, "a str or a non-empty list of str, the texts to encode (\"\" is the null prompt)")
        padding = "max_length" if self.pad_to_max_length else "longest"
        return self.tokenizer(prompts, max_length=self.max_length, padding=padding, device=self.device)

    def encode_ids(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, L) ids + mask -> (B, L, C) states."""
        if isinstance(self.encoder, GPT):
            check_tensor("input_ids", input_ids, ndim=2, integer=True)  # the values: in forward_features
            check_attention_mask(attention_mask, input_ids)  # unused by the causal GPT, but it must fit the ids
            return self.encoder.forward_features(input_ids)  # causal: right padding never reaches real tokens
        return self.encoder.forward_features(input_ids, attention_mask)

    def forward(self, prompts: str | Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """prompts (B strings; "" is the null prompt) -> (context (B, L, C), context_mask (B, L) bool, True = token)."""
        tokens = self.tokenize(prompts)
        ids, mask = tokens["input_ids"], tokens["attention_mask"]
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen):
            context = self.encode_ids(ids, mask)
        # padded positions carry no meaning: zero them so a consumer that ignores the mask sees no garbage
        return context * mask[..., None].to(context.dtype), mask
