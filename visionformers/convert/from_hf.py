"""Hugging Face transformers state dicts -> visionformers state dicts (GPT-2, BERT, T5).

``from_hf(state_dict)`` detects the architecture from its keys and renames / reshapes every tensor:
GPT-2's ``Conv1D`` weights are stored (in, out) and are transposed to ``nn.Linear``'s (out, in);
separate q / k / v projections are concatenated into our fused ``qkv`` (cross-attention: ``kv``).
``config_from_hf(hf_config)`` builds the matching visionformers config from a transformers config
(read by attribute, so transformers is never imported here). Foreign parameter names live only here.
"""
from __future__ import annotations

import re

import torch

from visionformers.convert._common import check_blocks_complete, complete_state_dict

__all__ = ["from_hf", "config_from_hf", "detect_hf_architecture"]


def detect_hf_architecture(state_dict: dict[str, torch.Tensor]) -> str:
    """-> "gpt2", "bert" or "t5"; ValueError for anything else."""
    if not isinstance(state_dict, dict) or not state_dict:
        raise ValueError(f"state_dict={type(state_dict).__name__} is not accepted; expected a non-empty dict of tensors")
    keys = list(state_dict)
    if any(re.search(r"(^|\.)h\.\d+\.attn\.c_attn\.weight$", k) for k in keys):
        return "gpt2"
    if any(re.search(r"(^|\.)encoder\.layer\.\d+\.attention\.self\.query\.weight$", k) for k in keys):
        return "bert"
    if any(re.search(r"^encoder\.block\.\d+\.layer\.0\.SelfAttention\.q\.weight$", k) for k in keys):
        return "t5"
    raise ValueError(
        f"state_dict with keys {keys[:4]}... is not accepted; expected a transformers GPT-2, BERT or T5 state dict"
    )


def from_hf(state_dict: dict[str, torch.Tensor], config=None, *, return_config: bool = False):
    """Convert a transformers GPT-2 / BERT / T5 state dict (any head listed below) to visionformers names.

    GPT2Model / GPT2LMHeadModel -> ``GPT``; BertModel -> ``Bert``; BertForMaskedLM ->
    ``BertForMaskedLM``; BertForSequenceClassification -> ``BertForSequenceClassification``;
    T5ForConditionalGeneration / T5Model -> ``T5``; T5EncoderModel -> ``T5Encoder``.
    Tied copies (lm_head = embedding) are dropped; the model re-ties them.
    With ``return_config`` returns ``(config, state_dict)``: sizes are read from the weights, the head
    count (which no weight shape tells for GPT-2 / BERT) from ``config`` or else dim // 64, as in every
    released GPT-2 and BERT; the rest are the family's defaults (better: ``config_from_hf(hf_config)``).
    """
    arch = detect_hf_architecture(state_dict)
    with complete_state_dict(f"transformers {arch}"):
        out = {"gpt2": _gpt2, "bert": _bert, "t5": _t5}[arch](state_dict)
        check_blocks_complete(out, f"transformers {arch}")
        inferred = _infer_config(arch, out, config)  # also when not returned: it needs the embeddings, norms, ...
    return (inferred, out) if return_config else out


def _infer_config(arch: str, sd: dict[str, torch.Tensor], config):
    """Our config from converted weights (see ``from_hf``); ``config`` supplies the head count when given."""
    import dataclasses

    prefix = "bert." if arch == "bert" and any(k.startswith("bert.") for k in sd) else ""
    depth = 1 + max(int(m.group(1)) for k in sd if (m := re.match(rf"{prefix}(?:encoder\.)?blocks\.(\d+)\.", k)))
    if arch == "t5":
        from visionformers.text.t5 import T5Config

        heads = sd["encoder.rel_bias.embedding.weight"].shape[1]
        q_rows, dim = sd["encoder.blocks.0.attn.qkv.weight"].shape
        fc1 = sd["encoder.blocks.0.mlp.fc1.weight"].shape[0]
        gated = fc1 == 2 * sd["encoder.blocks.0.mlp.fc2.weight"].shape[1]  # [gate; up] rows
        dec = [int(m.group(1)) for k in sd if (m := re.match(r"decoder\.blocks\.(\d+)\.", k))]
        return T5Config(
            vocab_size=sd["embed.weight"].shape[0], dim=dim, head_dim=q_rows // 3 // heads,
            mlp_hidden_dim=fc1 // 2 if gated else fc1, depth=depth, decoder_depth=max(dec) + 1 if dec else depth,
            num_heads=heads, num_buckets=sd["encoder.rel_bias.embedding.weight"].shape[0],
            mlp_act="geglu_tanh" if gated else "relu", tie_embeddings="lm_head.weight" not in sd,
        )
    vocab, dim = sd[f"{prefix}token_embed.weight"].shape
    heads = config.num_heads if config is not None and config.dim == dim else max(dim // 64, 1)
    fields = dict(vocab_size=vocab, max_len=sd[f"{prefix}pos_embed.weight"].shape[0], dim=dim, depth=depth, num_heads=heads)
    if arch == "gpt2":
        from visionformers.text.gpt import GPTConfig

        base = config if isinstance(config, GPTConfig) else GPTConfig()
        hidden = sd["blocks.0.mlp.fc1.weight"].shape[0]
        return dataclasses.replace(base, **fields, mlp_ratio=hidden / dim, tie_embeddings="lm_head.weight" not in sd,
                                   eos_token_id=_token_in_vocab(base.eos_token_id, vocab))
    from visionformers.text.bert import BertConfig

    base = config if isinstance(config, BertConfig) else BertConfig()
    labels = sd["classifier.weight"].shape[0] if "classifier.weight" in sd else base.num_labels
    return dataclasses.replace(
        base, **fields, type_vocab_size=sd[f"{prefix}type_embed.weight"].shape[0],
        mlp_hidden_dim=sd[f"{prefix}blocks.0.mlp.fc1.weight"].shape[0], num_labels=labels,
    )


def _unmapped(left: list[str], arch: str) -> None:
    if left:
        raise ValueError(f"state_dict has {len(left)} {arch} key(s) this converter does not know: {left[:6]}")


def _gpt2(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out, left = {}, []
    tied = sd.get("lm_head.weight")
    wte = sd.get("transformer.wte.weight", sd.get("wte.weight"))
    for key, t in sd.items():
        k = key.removeprefix("transformer.")
        if k.endswith((".attn.bias", ".attn.masked_bias")):
            continue  # causal-mask buffers of old checkpoints
        if k == "lm_head.weight":
            if tied is not None and wte is not None and not torch.equal(tied, wte):
                out["lm_head.weight"] = t  # untied head
            continue
        m = re.fullmatch(r"h\.(\d+)\.(.+)", k)
        if m:
            i, rest = m.groups()
            name = {
                "ln_1": "norm1", "ln_2": "norm2", "attn.c_attn": "attn.qkv", "attn.c_proj": "attn.proj",
                "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2",
            }
            mod, _, param = rest.rpartition(".")
            if mod not in name:
                left.append(key)
                continue
            conv1d = mod.startswith(("attn.", "mlp.")) and param == "weight"
            out[f"blocks.{i}.{name[mod]}.{param}"] = t.t().contiguous() if conv1d else t  # Conv1D (in, out) -> (out, in)
            continue
        simple = {"wte.weight": "token_embed.weight", "wpe.weight": "pos_embed.weight", "ln_f.weight": "norm.weight", "ln_f.bias": "norm.bias"}
        if k in simple:
            out[simple[k]] = t
        else:
            left.append(key)
    _unmapped(left, "GPT-2")
    return out


_BERT_LAYER = {
    "attention.output.dense": "attn.proj",
    "attention.output.LayerNorm": "norm1",
    "intermediate.dense": "mlp.fc1",
    "output.dense": "mlp.fc2",
    "output.LayerNorm": "norm2",
}
_BERT_EMBED = {
    "embeddings.word_embeddings.weight": "token_embed.weight",
    "embeddings.position_embeddings.weight": "pos_embed.weight",
    "embeddings.token_type_embeddings.weight": "type_embed.weight",
    "embeddings.LayerNorm.weight": "embed_norm.weight",
    "embeddings.LayerNorm.bias": "embed_norm.bias",
    "pooler.dense.weight": "pooler.weight",
    "pooler.dense.bias": "pooler.bias",
}
_BERT_HEADS = {
    "cls.predictions.transform.dense.weight": "mlm_dense.weight",
    "cls.predictions.transform.dense.bias": "mlm_dense.bias",
    "cls.predictions.transform.LayerNorm.weight": "mlm_norm.weight",
    "cls.predictions.transform.LayerNorm.bias": "mlm_norm.bias",
    "cls.predictions.bias": "mlm_bias",
    "classifier.weight": "classifier.weight",
    "classifier.bias": "classifier.bias",
}
# tied copies, buffers, and the next-sentence head we do not model
_BERT_SKIP = ("cls.predictions.decoder.weight", "cls.predictions.decoder.bias", "embeddings.position_ids",
              "embeddings.token_type_ids", "cls.seq_relationship.weight", "cls.seq_relationship.bias")


def _bert(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out, left = {}, []
    qkv: dict[tuple[str, str, str], dict[str, torch.Tensor]] = {}
    for key, t in sd.items():
        prefix = "bert." if key.startswith("bert.") else ""
        k = key.removeprefix("bert.")
        if k.endswith(_BERT_SKIP):
            continue
        m = re.fullmatch(r"encoder\.layer\.(\d+)\.(.+)\.(weight|bias)", k)
        if m:
            i, mod, param = m.groups()
            sm = re.fullmatch(r"attention\.self\.(query|key|value)", mod)
            if sm:
                qkv.setdefault((prefix, i, param), {})[sm.group(1)] = t
            elif mod in _BERT_LAYER:
                out[f"{prefix}blocks.{i}.{_BERT_LAYER[mod]}.{param}"] = t
            else:
                left.append(key)
        elif k in _BERT_EMBED:
            out[prefix + _BERT_EMBED[k]] = t
        elif key in _BERT_HEADS:
            out[_BERT_HEADS[key]] = t
        else:
            left.append(key)
    for (prefix, i, param), parts in qkv.items():
        out[f"{prefix}blocks.{i}.attn.qkv.{param}"] = torch.cat([parts["query"], parts["key"], parts["value"]], dim=0)
    _unmapped(left, "BERT")
    return out


def _t5(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out, left = {}, []
    groups: dict[str, dict[str, torch.Tensor]] = {}  # fused target -> parts to concatenate
    for key, t in sd.items():
        if key in ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight"):
            continue  # copies of shared.weight
        if key == "shared.weight":
            out["embed.weight"] = t
            continue
        if key == "lm_head.weight":
            if "shared.weight" not in sd or not torch.equal(t, sd["shared.weight"]):
                out["lm_head.weight"] = t  # v1.1: untied output layer
            continue
        m = re.fullmatch(r"(encoder|decoder)\.final_layer_norm\.weight", key)
        if m:
            out[f"{m.group(1)}.norm.weight"] = t
            continue
        m = re.fullmatch(r"(encoder|decoder)\.block\.(\d+)\.layer\.(\d)\.(.+)\.weight", key)
        if not m:
            left.append(key)
            continue
        stack, i, j, mod = m.groups()
        dec = stack == "decoder"
        ff_layer = "2" if dec else "1"
        b = f"{stack}.blocks.{i}"
        if mod == "SelfAttention.relative_attention_bias":
            out[f"{stack}.rel_bias.embedding.weight"] = t  # only layer 0 holds it; every layer shares it
        elif j == "0" and mod == "layer_norm":
            out[f"{b}.norm1.weight"] = t
        elif j == "0" and mod in ("SelfAttention.q", "SelfAttention.k", "SelfAttention.v"):
            groups.setdefault(f"{b}.attn.qkv.weight", {})[mod[-1]] = t
        elif j == "0" and mod == "SelfAttention.o":
            out[f"{b}.attn.proj.weight"] = t
        elif dec and j == "1" and mod == "layer_norm":
            out[f"{b}.norm_cross.weight"] = t
        elif dec and j == "1" and mod == "EncDecAttention.q":
            out[f"{b}.cross_attn.q.weight"] = t
        elif dec and j == "1" and mod in ("EncDecAttention.k", "EncDecAttention.v"):
            groups.setdefault(f"{b}.cross_attn.kv.weight", {})[mod[-1]] = t
        elif dec and j == "1" and mod == "EncDecAttention.o":
            out[f"{b}.cross_attn.proj.weight"] = t
        elif j == ff_layer and mod == "layer_norm":
            out[f"{b}.norm2.weight"] = t
        elif j == ff_layer and mod in ("DenseReluDense.wi", "DenseReluDense.wi_0", "DenseReluDense.wi_1"):
            groups.setdefault(f"{b}.mlp.fc1.weight", {})[mod.rpartition(".")[2]] = t
        elif j == ff_layer and mod == "DenseReluDense.wo":
            out[f"{b}.mlp.fc2.weight"] = t
        else:
            left.append(key)
    order = {"q": 0, "k": 1, "v": 2, "wi": 0, "wi_0": 0, "wi_1": 1}  # gated: [gate; up] as nn.Mlp expects
    for target, parts in groups.items():
        out[target] = torch.cat([parts[p] for p in sorted(parts, key=order.__getitem__)], dim=0)
    _unmapped(left, "T5")
    return out


def _get(cfg, *names, default=None):
    for n in names:
        value = cfg.get(n) if isinstance(cfg, dict) else getattr(cfg, n, None)
        if value is not None:
            return value
    return default


_ACTS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu", "relu": "relu", "silu": "silu"}


def _token_in_vocab(token: int | None, vocab_size: int) -> int | None:
    """transformers keeps GPT-2's eos 50256 in a GPT2Config of any vocabulary size; ours holds only real ids."""
    return token if token is not None and 0 <= token < vocab_size else None


def config_from_hf(hf_config):
    """A transformers GPT2Config / BertConfig / T5Config (or its ``to_dict()``) -> our GPTConfig / BertConfig / T5Config."""
    kind = _get(hf_config, "model_type")
    if kind == "gpt2":
        from visionformers.text.gpt import GPTConfig

        dim = _get(hf_config, "n_embd")
        act = _get(hf_config, "activation_function", default="gelu_new")
        return GPTConfig(
            vocab_size=_get(hf_config, "vocab_size"), max_len=_get(hf_config, "n_positions"), dim=dim,
            depth=_get(hf_config, "n_layer"), num_heads=_get(hf_config, "n_head"),
            mlp_ratio=_get(hf_config, "n_inner", default=4 * dim) / dim, mlp_act=_ACTS.get(act, act),
            norm_eps=_get(hf_config, "layer_norm_epsilon"), dropout=_get(hf_config, "resid_pdrop"),
            attn_drop=_get(hf_config, "attn_pdrop"), init_std=_get(hf_config, "initializer_range"),
            eos_token_id=_token_in_vocab(_get(hf_config, "eos_token_id"), _get(hf_config, "vocab_size")),
        )
    if kind == "bert":
        from visionformers.text.bert import BertConfig

        act = _get(hf_config, "hidden_act", default="gelu")
        return BertConfig(
            vocab_size=_get(hf_config, "vocab_size"), max_len=_get(hf_config, "max_position_embeddings"),
            type_vocab_size=_get(hf_config, "type_vocab_size"), dim=_get(hf_config, "hidden_size"),
            depth=_get(hf_config, "num_hidden_layers"), num_heads=_get(hf_config, "num_attention_heads"),
            mlp_hidden_dim=_get(hf_config, "intermediate_size"), mlp_act=_ACTS.get(act, act),
            norm_eps=_get(hf_config, "layer_norm_eps"), dropout=_get(hf_config, "hidden_dropout_prob"),
            attn_drop=_get(hf_config, "attention_probs_dropout_prob"), init_std=_get(hf_config, "initializer_range"),
            num_labels=_get(hf_config, "num_labels", default=2),
        )
    if kind == "t5":
        from visionformers.text.t5 import T5Config

        proj = _get(hf_config, "feed_forward_proj", default="relu")
        act = {"relu": "relu", "gated-gelu": "geglu_tanh", "gated-silu": "swiglu"}.get(proj)
        if act is None:
            raise ValueError(f"hf_config.feed_forward_proj={proj!r} is not accepted; expected 'relu', 'gated-gelu' or 'gated-silu'")
        depth = _get(hf_config, "num_layers")
        return T5Config(
            vocab_size=_get(hf_config, "vocab_size"), dim=_get(hf_config, "d_model"), head_dim=_get(hf_config, "d_kv"),
            mlp_hidden_dim=_get(hf_config, "d_ff"), depth=depth, decoder_depth=_get(hf_config, "num_decoder_layers", default=depth),
            num_heads=_get(hf_config, "num_heads"), num_buckets=_get(hf_config, "relative_attention_num_buckets"),
            max_distance=_get(hf_config, "relative_attention_max_distance"), mlp_act=act,
            norm_eps=_get(hf_config, "layer_norm_epsilon"), dropout=_get(hf_config, "dropout_rate"),
            tie_embeddings=_get(hf_config, "scale_decoder_outputs", "tie_word_embeddings", default=True),
            init_factor=float(_get(hf_config, "initializer_factor", default=1.0)),
            pad_token_id=_get(hf_config, "pad_token_id", default=0), eos_token_id=_get(hf_config, "eos_token_id", default=1),
            decoder_start_token_id=_get(hf_config, "decoder_start_token_id", "pad_token_id", default=0),
        )
    raise ValueError(f"hf_config.model_type={kind!r} is not accepted; expected 'gpt2', 'bert' or 't5'")
