"""T5: the text-to-text encoder-decoder (Raffel et al. 2020, sec. 2.1).

Pre-norm ``nn.TransformerBlock`` stacks with RMSNorm, no biases anywhere, unscaled attention logits
(the 1/sqrt(d) is folded into the initialisation), and a learned relative position bias computed by the
first layer's bucket table and shared by every layer of the stack (``nn.T5RelativeBias``). The output
layer is tied to the shared embedding with the v1.0 rescaling d_model^-0.5, as HF applies when tied.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from visionformers._validate import check_choice, fail
from visionformers.nn import KVCache, RMSNorm, T5RelativeBias, TransformerBlock
from visionformers.nn.grad_checkpoint import set_block_checkpointing
from visionformers.nn.mlp import ACTIVATIONS
from visionformers.text.common import (
    check_batch_match, check_decode_inputs, check_input_ids, check_token_id, padding_mask,
)
from visionformers.text.generation import check_generation_args, generate_seq2seq

__all__ = ["T5Config", "T5", "T5Encoder"]


@dataclass(frozen=True)
class T5Config:
    vocab_size: int = 32128  # 32k SentencePiece pieces padded to a multiple of 128
    dim: int = 512  # d_model
    head_dim: int = 64  # d_kv; independent of dim / num_heads (T5-3B: 32 heads of 128 with d_model 1024)
    mlp_hidden_dim: int = 2048  # d_ff
    depth: int = 6  # encoder layers
    decoder_depth: int = 6
    num_heads: int = 8
    num_buckets: int = 32  # relative position buckets, half exact, half log-spaced
    max_distance: int = 128  # offsets beyond this share the last bucket
    mlp_act: str = "relu"  # v1.0; v1.1 uses gated GELU ("geglu_tanh")
    norm_eps: float = 1e-6
    dropout: float = 0.1  # training only
    tie_embeddings: bool = True  # v1.0 ties the output layer (and rescales by dim^-0.5); v1.1 does not
    init_factor: float = 1.0  # HF's initializer_factor, scales every init std
    pad_token_id: int = 0
    eos_token_id: int = 1
    decoder_start_token_id: int = 0  # T5 starts decoding from <pad>

    def __post_init__(self):
        for name in ("vocab_size", "dim", "head_dim", "mlp_hidden_dim", "depth", "decoder_depth", "num_heads", "num_buckets", "max_distance"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                fail(name, value, "a positive integer")
        check_choice("mlp_act", self.mlp_act, ACTIVATIONS)
        if not 0 <= self.dropout < 1:
            fail("dropout", self.dropout, "a probability in [0, 1)")
        for name in ("pad_token_id", "eos_token_id", "decoder_start_token_id"):
            check_token_id(name, getattr(self, name), self.vocab_size)


class T5Stack(nn.Module):
    """One T5 stack: relative bias + blocks + final RMSNorm; the decoder stack is causal with cross-attention."""

    def __init__(self, c: T5Config, is_decoder: bool):
        super().__init__()
        self.is_decoder = is_decoder
        self.rel_bias = T5RelativeBias(c.num_heads, c.num_buckets, c.max_distance, bidirectional=not is_decoder)
        self.blocks = nn.ModuleList(
            TransformerBlock(
                c.dim, c.num_heads, mlp_hidden_dim=c.mlp_hidden_dim, head_dim=c.head_dim, qkv_bias=False,
                proj_bias=False, attn_scale=1.0, mlp_act=c.mlp_act, mlp_bias=False, norm="rmsnorm",
                norm_eps=c.norm_eps, pre_norm=True, cross_attention=is_decoder, is_causal=is_decoder,
                attn_drop=c.dropout, proj_drop=c.dropout,
            )
            for _ in range(c.decoder_depth if is_decoder else c.depth)
        )
        self.norm = RMSNorm(c.dim, eps=c.norm_eps)
        self.drop = nn.Dropout(c.dropout)

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor | None = None,
        context: torch.Tensor | None = None,
        context_mask: torch.Tensor | None = None,
        kv_caches: list[KVCache] | None = None,
        cross_kv_caches: list[KVCache] | None = None,
    ) -> torch.Tensor:
        """x (B, N, dim) embeddings -> (B, N, dim); with ``kv_caches`` x continues the cached positions."""
        n = x.shape[1]
        offset = kv_caches[0].length if kv_caches else 0
        bias = self.rel_bias(n, offset + n)  # (1, H, N, offset + N), shared by every layer
        x = self.drop(x)
        caches = kv_caches or [None] * len(self.blocks)
        cross = cross_kv_caches or [None] * len(self.blocks)
        for block, cache, cross_cache in zip(self.blocks, caches, cross):
            x = block(x, mask=mask, bias=bias, context=context, context_mask=context_mask, kv_cache=cache, cross_kv_cache=cross_cache)
        return self.drop(self.norm(x))


def _init_t5(model: nn.Module, c: T5Config) -> None:
    """Mesh-TensorFlow's init, as HF's T5 ``_init_weights``: std chosen so unscaled attention logits stay O(1)."""
    f, d = c.init_factor, c.dim
    inner = c.num_heads * c.head_dim
    for m in model.modules():
        if isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=f * 1.0)
        elif isinstance(m, T5RelativeBias):
            nn.init.normal_(m.embedding.weight, std=f * d**-0.5)
        elif isinstance(m, TransformerBlock):
            for attn in (m.attn, m.cross_attn):
                if attn is None:
                    continue
                if attn.is_cross:
                    nn.init.normal_(attn.q.weight, std=f * (d * c.head_dim) ** -0.5)
                    nn.init.normal_(attn.kv.weight, std=f * d**-0.5)
                else:
                    q, kv = attn.qkv.weight.data.split([inner, 2 * inner])
                    nn.init.normal_(q, std=f * (d * c.head_dim) ** -0.5)
                    nn.init.normal_(kv, std=f * d**-0.5)
                nn.init.normal_(attn.proj.weight, std=f * inner**-0.5)
            nn.init.normal_(m.mlp.fc1.weight, std=f * d**-0.5)
            nn.init.normal_(m.mlp.fc2.weight, std=f * c.mlp_hidden_dim**-0.5)


class T5Encoder(nn.Module):
    """The T5 encoder alone: (B, N) ids -> (B, N, dim), e.g. as a text-conditioning backbone."""

    def __init__(self, config: T5Config):
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.dim)
        self.encoder = T5Stack(config, is_decoder=False)
        _init_t5(self, config)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each transformer block's activations in the backward pass (same gradients, less memory)."""
        set_block_checkpointing(self, enable)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids (B, N), attention_mask (B, N) True/1 = real token -> hidden states (B, N, dim)."""
        check_input_ids(input_ids, self.config.vocab_size)
        return self.encoder(self.embed(input_ids), mask=padding_mask(attention_mask, input_ids))

    forward_features = forward


class T5(nn.Module):
    """T5 encoder-decoder with an LM head: (input_ids, decoder_input_ids, attention_mask) -> logits."""

    def __init__(self, config: T5Config):
        super().__init__()
        self.config = c = config
        self.embed = nn.Embedding(c.vocab_size, c.dim)  # shared by encoder, decoder and (tied) output
        self.encoder = T5Stack(c, is_decoder=False)
        self.decoder = T5Stack(c, is_decoder=True)
        self.lm_head = None if c.tie_embeddings else nn.Linear(c.dim, c.vocab_size, bias=False)
        _init_t5(self, c)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each transformer block's activations in the backward pass (same gradients, less memory)."""
        set_block_checkpointing(self, enable)

    @property
    def num_decoder_layers(self) -> int:
        return len(self.decoder.blocks)

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, M) ids -> (B, M, dim) encoder states."""
        check_input_ids(input_ids, self.config.vocab_size)
        return self._encode(input_ids, padding_mask(attention_mask, input_ids))

    forward_features = encode

    def _encode(self, input_ids: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """Unchecked ``encode``: ``mask`` is already a checked bool mask or None."""
        return self.encoder(self.embed(input_ids), mask=mask)

    def decode(
        self,
        decoder_input_ids: torch.Tensor,
        memory: torch.Tensor,
        memory_mask: torch.Tensor | None = None,
        kv_caches: list[KVCache] | None = None,
        cross_kv_caches: list[KVCache] | None = None,
    ) -> torch.Tensor:
        """(B, N) decoder ids + (B, M, dim) encoder states (+ (B, M) memory_mask, True = real token) -> (B, N, vocab) logits."""
        memory_mask = check_decode_inputs(decoder_input_ids, memory, memory_mask, self.config.vocab_size, self.config.dim)
        return self._decode(decoder_input_ids, memory, memory_mask, kv_caches, cross_kv_caches)

    def _decode(
        self,
        decoder_input_ids: torch.Tensor,
        memory: torch.Tensor,
        memory_mask: torch.Tensor | None = None,
        kv_caches: list[KVCache] | None = None,
        cross_kv_caches: list[KVCache] | None = None,
    ) -> torch.Tensor:
        """Unchecked ``decode`` (forward and generation pass checked arguments); ``memory_mask`` is bool or None."""
        h = self.decoder(
            self.embed(decoder_input_ids), context=memory, context_mask=memory_mask,
            kv_caches=kv_caches, cross_kv_caches=cross_kv_caches,
        )
        if self.lm_head is not None:
            return self.lm_head(h)
        return F.linear(h * self.config.dim**-0.5, self.embed.weight)  # tied: rescale as Mesh-TF / HF

    def forward(
        self, input_ids: torch.Tensor, decoder_input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """input_ids (B, M), decoder_input_ids (B, N) (start token first), attention_mask (B, M) -> logits (B, N, vocab)."""
        check_input_ids(input_ids, self.config.vocab_size)
        check_input_ids(decoder_input_ids, self.config.vocab_size, name="decoder_input_ids")
        check_batch_match(decoder_input_ids, "decoder_input_ids", input_ids.shape[0], "input_ids")
        mask = padding_mask(attention_mask, input_ids)
        return self._decode(decoder_input_ids, self._encode(input_ids, mask), mask)

    @torch.inference_mode()
    def generate(
        self,
        input_ids: torch.Tensor,
        max_new_tokens: int = 20,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        do_sample: bool = False,
        eos_token_id: int | None = None,
        generator: torch.Generator | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """-> (B, 1 + T) decoder ids starting with ``decoder_start_token_id`` (HF's layout).

        ``eos_token_id`` defaults to the config's; finished rows are padded with ``pad_token_id``.
        Self-attention keys are cached per step and cross-attention keys once per prompt.
        """
        c = self.config
        eos = c.eos_token_id if eos_token_id is None else eos_token_id
        check_generation_args(max_new_tokens, temperature, top_k, top_p, do_sample, eos, vocab_size=c.vocab_size)
        check_input_ids(input_ids, c.vocab_size)
        mask = padding_mask(attention_mask, input_ids)
        return generate_seq2seq(
            self, input_ids, mask, max_new_tokens, start_token_id=c.decoder_start_token_id, eos_token_id=eos,
            pad_token_id=c.pad_token_id, temperature=temperature, top_k=top_k, top_p=top_p, do_sample=do_sample,
            generator=generator,
        )
