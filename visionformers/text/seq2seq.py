"""The classic encoder-decoder Transformer (Vaswani et al. 2017) and an encoder-only classifier.

Both are built from ``TransformerStack``: positions + ``nn.TransformerBlock`` layers (+ a final norm when
pre-norm). The positional scheme is a choice: absolute "sinusoidal" (sec. 3.5) or "learned", "rope"
(Su et al. 2021), "alibi" (Press et al. 2022), "t5" relative buckets (Raffel et al. 2020) or "relative":
learned per-head embeddings of clipped distances read by the queries (relative global attention, Huang et
al. 2018, ``nn.RelativeGlobalAttention``, one table per layer); so are
pre- or post-norm (Xiong et al. 2020) and the initialisation ("xavier" as nn.Transformer,
"normal_0.02" as GPT/BERT, "small_init" N(0, 2/(5d)) of Nguyen & Salazar 2019, sec. 2.2).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from visionformers._validate import check_choice, check_int, check_tensor, fail
from visionformers.nn import (
    KVCache,
    LearnedPositionEmbedding,
    RotaryEmbedding,
    SinusoidalPositionEmbedding,
    T5RelativeBias,
    TransformerBlock,
    alibi_bias,
    make_norm,
)
from visionformers.nn.grad_checkpoint import set_block_checkpointing
from visionformers.nn.mlp import ACTIVATIONS
from visionformers.text.common import (
    ModelOutput, check_attention_mask, check_batch_match, check_decode_inputs, check_input_ids, check_token_id,
    padding_mask, token_cross_entropy,
)
from visionformers.text.generation import check_generation_args, generate_seq2seq

__all__ = ["POSITIONAL_SCHEMES", "INIT_METHODS", "TransformerStack", "Seq2SeqConfig", "Seq2SeqTransformer", "EncoderConfig", "EncoderClassifier"]

POSITIONAL_SCHEMES = ("sinusoidal", "learned", "rope", "alibi", "t5", "relative")
ABSOLUTE = ("sinusoidal", "learned")  # these limit the sequence length to max_len
INIT_METHODS = ("xavier", "normal_0.02", "small_init")


class TransformerStack(nn.Module):
    """Positional scheme + ``depth`` blocks (+ final norm when pre-norm): one encoder or decoder stack."""

    def __init__(
        self,
        *,
        dim: int,
        num_heads: int,
        depth: int,
        mlp_hidden_dim: int,
        pos_embedding: str = "sinusoidal",
        max_len: int = 1024,  # table length of the absolute schemes
        causal: bool = False,
        cross_attention: bool = False,
        pre_norm: bool = False,
        norm_eps: float = 1e-5,
        mlp_act: str = "relu",
        dropout: float = 0.1,
        attn_drop: float = 0.0,
        num_buckets: int = 32,  # "t5" only
        max_distance: int = 128,  # "t5": the last bucket's distance; "relative": distances clipped to +-max_distance
    ):
        super().__init__()
        check_choice("pos_embedding", pos_embedding, POSITIONAL_SCHEMES)
        self.pos_embedding, self.num_heads = pos_embedding, num_heads
        self.pos_table = None
        if pos_embedding == "sinusoidal":
            self.pos_table = SinusoidalPositionEmbedding(dim, max_len)
        elif pos_embedding == "learned":
            self.pos_table = LearnedPositionEmbedding(max_len, dim)
        self.rope = RotaryEmbedding(dim // num_heads) if pos_embedding == "rope" else None
        self.rel_bias = T5RelativeBias(num_heads, num_buckets, max_distance, bidirectional=not causal) if pos_embedding == "t5" else None
        self.drop = nn.Dropout(dropout)
        relative = dict(attn_type="relative", max_distance=max_distance) if pos_embedding == "relative" else {}
        self.blocks = nn.ModuleList(
            TransformerBlock(
                dim, num_heads, mlp_hidden_dim=mlp_hidden_dim, qkv_bias=True, mlp_act=mlp_act, norm_eps=norm_eps,
                pre_norm=pre_norm, cross_attention=cross_attention, is_causal=causal, attn_drop=attn_drop,
                proj_drop=dropout, **relative,
            )
            for _ in range(depth)
        )
        self.norm = make_norm("layernorm", dim, eps=norm_eps) if pre_norm else nn.Identity()

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor | None = None,
        context: torch.Tensor | None = None,
        context_mask: torch.Tensor | None = None,
        kv_caches: list[KVCache] | None = None,
        cross_kv_caches: list[KVCache] | None = None,
    ) -> torch.Tensor:
        """x (B, N, dim) token embeddings -> (B, N, dim); with ``kv_caches`` x continues the cached positions."""
        n = x.shape[1]
        offset = kv_caches[0].length if kv_caches else 0
        if self.pos_table is not None:
            x = x + self.pos_table(n, offset)  # (N, dim) broadcast over the batch
        rope = self.rope(n, offset) if self.rope is not None else None  # (cos, sin) of the new positions
        bias = None  # (1, H, N, offset + N), computed once and shared by every layer
        if self.rel_bias is not None:
            bias = self.rel_bias(n, offset + n)
        elif self.pos_embedding == "alibi":
            bias = alibi_bias(self.num_heads, n, offset + n, device=x.device).to(x.dtype)
        x = self.drop(x)
        caches = kv_caches or [None] * len(self.blocks)
        cross = cross_kv_caches or [None] * len(self.blocks)
        for block, cache, cross_cache in zip(self.blocks, caches, cross):
            x = block(x, mask=mask, bias=bias, rope=rope, context=context, context_mask=context_mask, kv_cache=cache, cross_kv_cache=cross_cache)
        return self.norm(x)


def init_weights(module: nn.Module, method: str, dim: int) -> None:
    """Initialise every Linear / Embedding weight by ``method``; zero biases (norms keep weight 1, bias 0)."""
    check_choice("init", method, INIT_METHODS)
    for m in module.modules():
        weight = m.weight if isinstance(m, (nn.Linear, nn.Embedding, LearnedPositionEmbedding)) else None
        if weight is None:
            continue
        if method == "xavier":
            nn.init.xavier_uniform_(weight)
        else:
            nn.init.normal_(weight, std=0.02 if method == "normal_0.02" else math.sqrt(2 / (5 * dim)))
        if getattr(m, "bias", None) is not None:
            nn.init.zeros_(m.bias)


def _check_common(c) -> None:
    for name in ("vocab_size", "dim", "num_heads", "mlp_hidden_dim", "max_len"):
        value = getattr(c, name)
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            fail(name, value, "a positive integer")
    if c.dim % c.num_heads:
        fail("dim", c.dim, f"a multiple of num_heads={c.num_heads}")
    check_choice("pos_embedding", c.pos_embedding, POSITIONAL_SCHEMES)
    for name in ("num_buckets", "max_distance"):
        check_int(name, getattr(c, name))
    check_choice("init", c.init, INIT_METHODS)
    check_choice("mlp_act", c.mlp_act, ACTIVATIONS)
    if c.pos_embedding == "rope" and (c.dim // c.num_heads) % 2:
        fail("dim", c.dim, "dim / num_heads even for RoPE")
    for name in ("dropout", "attn_drop"):
        if not 0 <= getattr(c, name) < 1:
            fail(name, getattr(c, name), "a probability in [0, 1)")


def _stack_kwargs(c) -> dict:
    return dict(
        dim=c.dim, num_heads=c.num_heads, mlp_hidden_dim=c.mlp_hidden_dim, pos_embedding=c.pos_embedding,
        max_len=c.max_len, pre_norm=c.pre_norm, norm_eps=c.norm_eps, mlp_act=c.mlp_act, dropout=c.dropout,
        attn_drop=c.attn_drop, num_buckets=c.num_buckets, max_distance=c.max_distance,
    )


@dataclass(frozen=True)
class Seq2SeqConfig:
    vocab_size: int = 37000  # Vaswani base: one BPE vocabulary shared by source and target (sec. 5.1)
    dim: int = 512
    num_heads: int = 8
    encoder_depth: int = 6
    decoder_depth: int = 6
    mlp_hidden_dim: int = 2048
    dropout: float = 0.1  # residual and embedding dropout, P_drop of sec. 5.4
    attn_drop: float = 0.0
    pos_embedding: str = "sinusoidal"  # one of POSITIONAL_SCHEMES
    max_len: int = 1024  # longest sequence for the absolute schemes
    pre_norm: bool = False  # the original is post-norm; pre-norm trains without warm-up (Xiong et al. 2020)
    norm_eps: float = 1e-5
    mlp_act: str = "relu"
    init: str = "xavier"  # one of INIT_METHODS
    scale_embeddings: bool = True  # multiply embeddings by sqrt(dim) (sec. 3.4)
    tie_embeddings: bool = True  # encoder, decoder and output share one matrix (sec. 3.4)
    num_buckets: int = 32  # "t5" relative positions
    max_distance: int = 128  # "t5" buckets' range; "relative": distances clipped to +-max_distance
    pad_token_id: int = 256  # defaults follow ByteTokenizer's special ids
    bos_token_id: int = 257  # decoding starts from <bos>
    eos_token_id: int = 258

    def __post_init__(self):
        _check_common(self)
        for name in ("encoder_depth", "decoder_depth"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                fail(name, value, "a positive integer")
        for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
            check_token_id(name, getattr(self, name), self.vocab_size)


class Seq2SeqTransformer(nn.Module):
    """Encoder-decoder Transformer: (input_ids, decoder_input_ids, attention_mask) -> logits (B, N, vocab)."""

    def __init__(self, config: Seq2SeqConfig):
        super().__init__()
        self.config = c = config
        self.embed = nn.Embedding(c.vocab_size, c.dim)
        self.encoder = TransformerStack(depth=c.encoder_depth, **_stack_kwargs(c))
        self.decoder = TransformerStack(depth=c.decoder_depth, causal=True, cross_attention=True, **_stack_kwargs(c))
        self.lm_head = None if c.tie_embeddings else nn.Linear(c.dim, c.vocab_size, bias=False)
        init_weights(self, c.init, c.dim)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each transformer block's activations in the backward pass (same gradients, less memory)."""
        set_block_checkpointing(self, enable)

    @property
    def num_decoder_layers(self) -> int:
        return len(self.decoder.blocks)

    def _max_len(self) -> int | None:
        return self.config.max_len if self.config.pos_embedding in ABSOLUTE else None

    def _embed(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)  # (B, N, dim)
        return x * math.sqrt(self.config.dim) if self.config.scale_embeddings else x

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, M) ids -> (B, M, dim) memory."""
        check_input_ids(input_ids, self.config.vocab_size, self._max_len())
        return self._encode(input_ids, padding_mask(attention_mask, input_ids))

    def _encode(self, input_ids: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """Unchecked ``encode``: ``mask`` is already a checked bool mask or None."""
        return self.encoder(self._embed(input_ids), mask=mask)

    def decode(
        self,
        decoder_input_ids: torch.Tensor,
        memory: torch.Tensor,
        memory_mask: torch.Tensor | None = None,
        kv_caches: list[KVCache] | None = None,
        cross_kv_caches: list[KVCache] | None = None,
    ) -> torch.Tensor:
        """(B, N) target ids + (B, M, dim) memory (+ (B, M) memory_mask, True = real token) -> (B, N, vocab) logits."""
        c = self.config
        memory_mask = check_decode_inputs(decoder_input_ids, memory, memory_mask, c.vocab_size, c.dim, self._max_len())
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
            self._embed(decoder_input_ids), context=memory, context_mask=memory_mask,
            kv_caches=kv_caches, cross_kv_caches=cross_kv_caches,
        )
        return self.lm_head(h) if self.lm_head is not None else F.linear(h, self.embed.weight)

    def forward(
        self, input_ids: torch.Tensor, decoder_input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """input_ids (B, M), decoder_input_ids (B, N) (<bos> first), attention_mask (B, M) -> logits (B, N, vocab)."""
        check_input_ids(input_ids, self.config.vocab_size, self._max_len())
        check_input_ids(decoder_input_ids, self.config.vocab_size, self._max_len(), name="decoder_input_ids")
        check_batch_match(decoder_input_ids, "decoder_input_ids", input_ids.shape[0], "input_ids")
        mask = padding_mask(attention_mask, input_ids)
        return self._decode(decoder_input_ids, self._encode(input_ids, mask), mask)

    @torch.inference_mode()
    def generate(
        self,
        input_ids: torch.Tensor,
        max_new_tokens: int = 64,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        do_sample: bool = False,
        eos_token_id: int | None = None,
        generator: torch.Generator | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """-> (B, 1 + T) target ids starting with <bos>; ``eos_token_id`` defaults to the config's."""
        c = self.config
        eos = c.eos_token_id if eos_token_id is None else eos_token_id
        check_generation_args(max_new_tokens, temperature, top_k, top_p, do_sample, eos, vocab_size=c.vocab_size)
        check_input_ids(input_ids, c.vocab_size, self._max_len())
        if self._max_len() is not None and max_new_tokens + 1 > c.max_len:
            fail("max_new_tokens", max_new_tokens, f"at most max_len - 1 = {c.max_len - 1} (absolute positions)")
        return generate_seq2seq(
            self, input_ids, padding_mask(attention_mask, input_ids), max_new_tokens, start_token_id=c.bos_token_id,
            eos_token_id=eos, pad_token_id=c.pad_token_id, temperature=temperature, top_k=top_k, top_p=top_p,
            do_sample=do_sample, generator=generator,
        )


@dataclass(frozen=True)
class EncoderConfig:
    vocab_size: int = 261  # ByteTokenizer
    dim: int = 256
    num_heads: int = 4
    depth: int = 4
    mlp_hidden_dim: int = 1024
    dropout: float = 0.1
    attn_drop: float = 0.0
    pos_embedding: str = "learned"
    max_len: int = 512
    pre_norm: bool = True
    norm_eps: float = 1e-5
    mlp_act: str = "gelu"
    init: str = "normal_0.02"
    scale_embeddings: bool = False  # sqrt(dim) scaling suits xavier-initialised embeddings only
    num_buckets: int = 32
    max_distance: int = 128
    num_classes: int = 2
    pooling: str = "mean"  # "mean" over real tokens, or "first" (the <bos>/[CLS] token)

    def __post_init__(self):
        _check_common(self)
        if isinstance(self.depth, bool) or not isinstance(self.depth, int) or self.depth <= 0:
            fail("depth", self.depth, "a positive integer")
        if isinstance(self.num_classes, bool) or not isinstance(self.num_classes, int) or self.num_classes <= 0:
            fail("num_classes", self.num_classes, "a positive integer")
        check_choice("pooling", self.pooling, ("mean", "first"))


class EncoderClassifier(nn.Module):
    """Transformer encoder + pooling + Linear: text classification, or sentence embeddings via ``embed``."""

    def __init__(self, config: EncoderConfig):
        super().__init__()
        self.config = c = config
        self.embed_tokens = nn.Embedding(c.vocab_size, c.dim)
        self.encoder = TransformerStack(depth=c.depth, **_stack_kwargs(c))
        self.head = nn.Linear(c.dim, c.num_classes)
        init_weights(self, c.init, c.dim)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each transformer block's activations in the backward pass (same gradients, less memory)."""
        set_block_checkpointing(self, enable)

    def forward_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, N) ids -> (B, N, dim) token states."""
        max_len = self.config.max_len if self.config.pos_embedding in ABSOLUTE else None
        check_input_ids(input_ids, self.config.vocab_size, max_len)
        x = self.embed_tokens(input_ids)
        x = x * math.sqrt(self.config.dim) if self.config.scale_embeddings else x
        return self.encoder(x, mask=padding_mask(attention_mask, input_ids))

    def forward_head(self, x: torch.Tensor, attention_mask: torch.Tensor | None = None, pre_logits: bool = False) -> torch.Tensor:
        """(B, N, dim) -> pooled (B, dim) with ``pre_logits``, else logits (B, num_classes)."""
        check_tensor("x", x, ndim=3, floating=True)
        if x.shape[1] == 0 or x.shape[2] != self.config.dim:
            fail("x", x, f"shape (B, N >= 1, dim={self.config.dim}), the output of forward_features")
        if attention_mask is not None:
            attention_mask = check_attention_mask(attention_mask, x, like="x")  # bool: a 0/1 mask weighs 0 or 1
        if self.config.pooling == "first":
            pooled = x[:, 0]
        elif attention_mask is None:
            pooled = x.mean(dim=1)
        else:
            w = attention_mask.to(x.dtype)[..., None]  # (B, N, 1)
            pooled = (x * w).sum(1) / w.sum(1).clamp_min(1)
        return pooled if pre_logits else self.head(pooled)

    def embed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, N) ids -> (B, dim) pooled text embedding."""
        return self.forward_head(self.forward_features(input_ids, attention_mask), attention_mask, pre_logits=True)

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, labels: torch.Tensor | None = None
    ) -> ModelOutput:
        """-> ModelOutput(logits (B, num_classes), loss); ``labels`` (B,) class ids."""
        logits = self.forward_head(self.forward_features(input_ids, attention_mask), attention_mask)
        if labels is not None and (not isinstance(labels, torch.Tensor) or labels.shape != (input_ids.shape[0],)):
            fail("labels", labels, f"a (B,)=({input_ids.shape[0]},) tensor of class ids")
        return ModelOutput(logits, token_cross_entropy(logits, labels) if labels is not None else None)
