"""GPT: a decoder-only causal language model (Radford et al. 2018 "GPT-1", 2019 "GPT-2").

Token + learned position embeddings, a stack of causal ``nn.TransformerBlock`` (post-norm for GPT-1,
pre-norm with a final LayerNorm for GPT-2) and an output layer tied to the token embedding.
``model(input_ids, labels=None)`` returns ``ModelOutput(logits, loss)``; ``generate`` decodes with a
pre-allocated KV cache, so each new token costs one single-token forward pass.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from visionformers._validate import check_choice, check_number, fail
from visionformers.nn import KVCache, LearnedPositionEmbedding, TransformerBlock
from visionformers.nn.grad_checkpoint import set_block_checkpointing
from visionformers.nn.mlp import ACTIVATIONS
from visionformers.text.common import ModelOutput, check_input_ids, check_token_id, shifted_cross_entropy
from visionformers.text.generation import check_generation_args, decode

__all__ = ["GPTConfig", "GPT"]

GPT2_EOS = 50256  # <|endoftext|> of GPT-2's vocabulary, the default eos_token_id


@dataclass(frozen=True)
class GPTConfig:
    vocab_size: int = 50257  # GPT-2's byte-level BPE; kept unpadded so HF checkpoints load as they are
    max_len: int = 1024  # learned positions: the longest context the model can read
    dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    mlp_act: str = "gelu_tanh"  # GPT-1/2 used the tanh approximation of GELU ("gelu_new")
    pre_norm: bool = True  # GPT-2 moved LayerNorm to the input of each sub-block (Radford et al. 2019, sec. 2.3)
    norm_eps: float = 1e-5
    dropout: float = 0.1  # embedding and residual dropout (training only)
    attn_drop: float = 0.1
    init_std: float = 0.02
    tie_embeddings: bool = True  # output layer = token embedding^T (Press & Wolf 2017)
    eos_token_id: int | None = GPT2_EOS  # <|endoftext|>; a hint for callers, generate() takes its own eos

    def __post_init__(self):
        for name in ("vocab_size", "max_len", "dim", "depth", "num_heads"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                fail(name, value, "a positive integer")
        if self.dim % self.num_heads:
            fail("dim", self.dim, f"a multiple of num_heads={self.num_heads}")
        check_choice("mlp_act", self.mlp_act, ACTIVATIONS)
        for name in ("dropout", "attn_drop"):
            if not 0 <= getattr(self, name) < 1:
                fail(name, getattr(self, name), "a probability in [0, 1)")
        check_number("init_std", self.init_std, at_least=0)
        check_token_id("eos_token_id", self.eos_token_id, self.vocab_size, optional=True,
                       note=f" (GPT-2's default {GPT2_EOS} needs its 50257-token vocabulary)")


class GPT(nn.Module):
    """Decoder-only causal language model with tied input/output embeddings."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = c = config
        self.token_embed = nn.Embedding(c.vocab_size, c.dim)
        self.pos_embed = LearnedPositionEmbedding(c.max_len, c.dim, init_std=c.init_std)
        self.drop = nn.Dropout(c.dropout)
        self.blocks = nn.ModuleList(
            TransformerBlock(
                c.dim, c.num_heads, c.mlp_ratio, qkv_bias=True, mlp_act=c.mlp_act, norm_eps=c.norm_eps,
                pre_norm=c.pre_norm, attn_drop=c.attn_drop, proj_drop=c.dropout, is_causal=True,
            )
            for _ in range(c.depth)
        )
        self.norm = nn.LayerNorm(c.dim, eps=c.norm_eps) if c.pre_norm else nn.Identity()
        self.lm_head = None if c.tie_embeddings else nn.Linear(c.dim, c.vocab_size, bias=False)
        self.initialize_weights()

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each transformer block's activations in the backward pass (same gradients, less memory)."""
        set_block_checkpointing(self, enable)

    def initialize_weights(self) -> None:
        """N(0, 0.02) weights, zero biases; residual projections scaled by 1/sqrt(2 * depth) (GPT-2, sec. 2.3)."""
        std = self.config.init_std
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=std)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)
        for block in self.blocks:
            for proj in (block.attn.proj, block.mlp.fc2):
                nn.init.normal_(proj.weight, std=std / math.sqrt(2 * self.config.depth))

    def output_weight(self) -> torch.Tensor:
        return self.token_embed.weight if self.lm_head is None else self.lm_head.weight

    def forward_features(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, N) ids -> (B, N, dim) final hidden states (after the last norm)."""
        check_input_ids(input_ids, self.config.vocab_size, self.config.max_len)
        return self._hidden(input_ids)

    def _hidden(self, input_ids: torch.Tensor, kv_caches: list[KVCache] | None = None) -> torch.Tensor:
        """Unchecked forward; with ``kv_caches`` the ids continue the cached positions."""
        n = input_ids.shape[1]
        offset = kv_caches[0].length if kv_caches else 0
        x = self.token_embed(input_ids) + self.pos_embed(n, offset)  # (B, N, dim)
        if self.training:
            x = self.drop(x)
        caches = kv_caches or [None] * len(self.blocks)
        for block, cache in zip(self.blocks, caches):
            x = block(x, kv_cache=cache)
        return self.norm(x)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None) -> ModelOutput:
        """input_ids (B, N) -> ModelOutput(logits (B, N, vocab), loss).

        With ``labels`` (B, N) (usually the input ids; -100 = ignore), loss is the mean cross-entropy of
        position t predicting labels[t + 1].
        """
        check_input_ids(input_ids, self.config.vocab_size, self.config.max_len)
        if labels is not None and (not isinstance(labels, torch.Tensor) or labels.shape != input_ids.shape):
            fail("labels", labels, f"a tensor of shape {tuple(input_ids.shape)} like input_ids")
        logits = F.linear(self._hidden(input_ids), self.output_weight())  # (B, N, vocab)
        loss = shifted_cross_entropy(logits, labels) if labels is not None else None
        return ModelOutput(logits, loss)

    @torch.inference_mode()
    def generate(
        self,
        input_ids: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        do_sample: bool = False,
        eos_token_id: int | None = None,
        generator: torch.Generator | None = None,
        pad_token_id: int | None = None,
    ) -> torch.Tensor:
        """Continue (B, N) prompts by up to ``max_new_tokens`` -> (B, N + T) ids.

        Greedy unless ``do_sample``. Rows that emitted ``eos_token_id`` are padded with ``pad_token_id``
        (default: eos) and decoding stops once every row has finished. Call ``model.eval()`` first:
        dropout follows the module's mode. ``vf.native.optimize(model)`` speeds up CPU decoding.
        """
        c = self.config
        check_input_ids(input_ids, c.vocab_size, c.max_len)
        check_generation_args(
            max_new_tokens, temperature, top_k, top_p, do_sample, eos_token_id,
            pad_token_id=pad_token_id, vocab_size=c.vocab_size,
        )
        n = input_ids.shape[1]
        if n + max_new_tokens > c.max_len:
            fail("max_new_tokens", max_new_tokens, f"at most max_len - prompt length = {c.max_len} - {n} = {c.max_len - n}")
        caches = [KVCache(max_len=n + max_new_tokens) for _ in self.blocks]  # allocated once, filled in place
        weight = self.output_weight()

        def step(ids: torch.Tensor) -> torch.Tensor:
            h = self._hidden(ids, caches)[:, -1]  # (B, dim): only the last position is needed
            return F.linear(h, weight)  # (B, vocab)

        new = decode(
            step, input_ids, max_new_tokens, eos_token_id=eos_token_id, pad_token_id=pad_token_id,
            temperature=temperature, top_k=top_k, top_p=top_p, do_sample=do_sample, generator=generator,
        )
        return torch.cat([input_ids, new], dim=1)
