"""BERT: a bidirectional post-norm encoder (Devlin et al. 2019) with masked-LM and classification heads.

Embeddings are token + learned position + token type, then LayerNorm. The encoder is a stack of
post-norm ``nn.TransformerBlock`` with a key-padding mask; the pooler maps the first ([CLS]) token
through Linear + tanh (sec. 3, fig. 2).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from visionformers._validate import check_choice, check_number, check_tensor, fail
from visionformers.nn import LearnedPositionEmbedding, TransformerBlock
from visionformers.nn.grad_checkpoint import set_block_checkpointing
from visionformers.nn.mlp import ACTIVATIONS, activation
from visionformers.text.common import ModelOutput, check_input_ids, padding_mask, token_cross_entropy

__all__ = ["BertConfig", "Bert", "BertForMaskedLM", "BertForSequenceClassification"]


@dataclass(frozen=True)
class BertConfig:
    vocab_size: int = 30522  # uncased WordPiece vocabulary
    max_len: int = 512  # learned positions
    type_vocab_size: int = 2  # segment A / B (sentence pairs)
    dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_hidden_dim: int = 3072
    mlp_act: str = "gelu"  # exact erf GELU, as the released checkpoints
    norm_eps: float = 1e-12  # the TF original's LayerNorm epsilon
    dropout: float = 0.1  # hidden dropout (training only)
    attn_drop: float = 0.1
    init_std: float = 0.02
    num_labels: int = 2  # classes of BertForSequenceClassification (unused by the other heads)

    def __post_init__(self):
        for name in ("vocab_size", "max_len", "type_vocab_size", "dim", "depth", "num_heads", "mlp_hidden_dim", "num_labels"):
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


def _init_bert(module: nn.Module, std: float) -> None:
    """N(0, std) for Linear / Embedding weights, zero biases (BERT's truncated-normal-like init)."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=std)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)


class Bert(nn.Module):
    """BERT encoder: (input_ids, attention_mask, token_type_ids) -> (sequence_output, pooled_output)."""

    def __init__(self, config: BertConfig, add_pooler: bool = True):
        super().__init__()
        self.config = c = config
        self.token_embed = nn.Embedding(c.vocab_size, c.dim)
        self.pos_embed = LearnedPositionEmbedding(c.max_len, c.dim, init_std=c.init_std)
        self.type_embed = nn.Embedding(c.type_vocab_size, c.dim)
        self.embed_norm = nn.LayerNorm(c.dim, eps=c.norm_eps)
        self.drop = nn.Dropout(c.dropout)
        self.blocks = nn.ModuleList(
            TransformerBlock(
                c.dim, c.num_heads, mlp_hidden_dim=c.mlp_hidden_dim, qkv_bias=True, mlp_act=c.mlp_act,
                norm_eps=c.norm_eps, pre_norm=False, attn_drop=c.attn_drop, proj_drop=c.dropout,
            )
            for _ in range(c.depth)
        )
        # the masked-LM model has no pooler (as HF's BertForMaskedLM), so no parameter goes without a gradient
        self.pooler = nn.Linear(c.dim, c.dim) if add_pooler else None
        _init_bert(self, c.init_std)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each transformer block's activations in the backward pass (same gradients, less memory)."""
        set_block_checkpointing(self, enable)

    def forward_features(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, token_type_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        """(B, N) ids -> (B, N, dim) sequence output; ``attention_mask`` (B, N) is True / 1 for real tokens."""
        c = self.config
        check_input_ids(input_ids, c.vocab_size, c.max_len)
        mask = padding_mask(attention_mask, input_ids)
        if token_type_ids is None:
            types = self.type_embed.weight[0]  # all segment A: skip the gather
        else:
            if not isinstance(token_type_ids, torch.Tensor) or token_type_ids.shape != input_ids.shape:
                fail("token_type_ids", token_type_ids, f"a tensor of shape {tuple(input_ids.shape)} like input_ids")
            check_input_ids(token_type_ids, c.type_vocab_size, name="token_type_ids")
            types = self.type_embed(token_type_ids)
        x = self.token_embed(input_ids) + self.pos_embed(input_ids.shape[1]) + types  # (B, N, dim)
        x = self.drop(self.embed_norm(x))
        for block in self.blocks:
            x = block(x, mask=mask)
        return x

    def pool(self, sequence_output: torch.Tensor) -> torch.Tensor:
        """(B, N, dim) -> (B, dim): tanh(W h_[CLS] + b)."""
        if self.pooler is None:
            fail("pooler", None, "a Bert built with add_pooler=True")
        check_tensor("sequence_output", sequence_output, ndim=3, floating=True)
        if sequence_output.shape[1] == 0 or sequence_output.shape[2] != self.config.dim:
            fail("sequence_output", sequence_output, f"shape (B, N >= 1, dim={self.config.dim}), the encoder's output")
        return torch.tanh(self.pooler(sequence_output[:, 0]))

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, token_type_ids: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """-> (sequence_output (B, N, dim), pooled_output (B, dim), None without a pooler)."""
        seq = self.forward_features(input_ids, attention_mask, token_type_ids)
        return seq, (self.pool(seq) if self.pooler is not None else None)


class BertForMaskedLM(nn.Module):
    """BERT + the masked-LM head: Linear-GELU-LayerNorm then the tied token embedding plus a bias (sec. 3.1)."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.config = c = config
        self.bert = Bert(c, add_pooler=False)
        self.mlm_dense = nn.Linear(c.dim, c.dim)
        self.mlm_norm = nn.LayerNorm(c.dim, eps=c.norm_eps)
        self.mlm_bias = nn.Parameter(torch.zeros(c.vocab_size))
        _init_bert(self.mlm_dense, c.init_std)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each transformer block's activations in the backward pass (same gradients, less memory)."""
        set_block_checkpointing(self, enable)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
    ) -> ModelOutput:
        """-> ModelOutput(logits (B, N, vocab), loss); ``labels`` (B, N) hold the original ids at masked positions, -100 elsewhere."""
        h = self.bert.forward_features(input_ids, attention_mask, token_type_ids)
        h = self.mlm_norm(activation(self.config.mlp_act, self.mlm_dense(h)))
        logits = F.linear(h, self.bert.token_embed.weight, self.mlm_bias)  # (B, N, vocab)
        if labels is not None and (not isinstance(labels, torch.Tensor) or labels.shape != input_ids.shape):
            fail("labels", labels, f"a tensor of shape {tuple(input_ids.shape)} like input_ids")
        return ModelOutput(logits, token_cross_entropy(logits, labels) if labels is not None else None)


class BertForSequenceClassification(nn.Module):
    """BERT + dropout + Linear on the pooled [CLS] output -> ``config.num_labels`` logits."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.config = c = config
        self.bert = Bert(c)
        self.drop = nn.Dropout(c.dropout)
        self.classifier = nn.Linear(c.dim, c.num_labels)
        _init_bert(self.classifier, c.init_std)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each transformer block's activations in the backward pass (same gradients, less memory)."""
        set_block_checkpointing(self, enable)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
    ) -> ModelOutput:
        """-> ModelOutput(logits (B, num_labels), loss); ``labels`` (B,) class ids."""
        _, pooled = self.bert(input_ids, attention_mask, token_type_ids)
        logits = self.classifier(self.drop(pooled))  # (B, num_labels)
        if labels is not None and (not isinstance(labels, torch.Tensor) or labels.shape != (input_ids.shape[0],)):
            fail("labels", labels, f"a (B,)=({input_ids.shape[0]},) tensor of class ids")
        return ModelOutput(logits, token_cross_entropy(logits, labels) if labels is not None else None)
