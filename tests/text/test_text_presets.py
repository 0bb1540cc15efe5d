"""Every text preset: forward + backward at tiny size with a gradient for every parameter; published sizes."""
import dataclasses

import pytest
import torch

import visionformers as vf
from visionformers.registry import get_preset

TEXT_FAMILIES = ("gpt", "gpt2", "bert", "t5", "transformer", "encoder")
TEXT_PRESETS = [n for n in vf.list_models() if n.split("_")[0] in TEXT_FAMILIES]


def tiny_overrides(config) -> dict:
    """Shrink widths and depths but keep each preset's structure (norm placement, heads, activations)."""
    fields = {f.name for f in dataclasses.fields(config)}
    heads = config.num_heads
    out = {"vocab_size": 261}
    if "head_dim" in fields:  # T5: head_dim is independent of dim
        out.update(dim=32, head_dim=4, mlp_hidden_dim=48)
    else:
        out.update(dim=2 * heads if heads > 8 else 4 * heads)
        if "mlp_hidden_dim" in fields:
            out["mlp_hidden_dim"] = 48
    for name in ("depth", "decoder_depth", "encoder_depth"):
        if name in fields:
            out[name] = 2
    if "max_len" in fields:
        out["max_len"] = 32
    for name in ("pad_token_id", "eos_token_id", "decoder_start_token_id", "bos_token_id"):
        if name in fields and getattr(config, name) is not None and getattr(config, name) >= 261:
            out[name] = 258
    return out


def run_preset(model, cls_name: str, ids: torch.Tensor) -> torch.Tensor:
    """A scalar that depends on every output of the model."""
    if cls_name in ("T5", "Seq2SeqTransformer"):
        return model(ids, ids[:, :5], attention_mask=torch.ones_like(ids)).square().mean()
    if cls_name == "T5Encoder":
        return model(ids).square().mean()
    if cls_name == "Bert":
        seq, pooled = model(ids, torch.ones_like(ids), torch.zeros_like(ids))
        return seq.square().mean() + pooled.square().mean()
    if cls_name in ("BertForSequenceClassification", "EncoderClassifier"):
        return model(ids, labels=torch.zeros(ids.shape[0], dtype=torch.long)).loss
    return model(ids, labels=ids).loss  # GPT, BertForMaskedLM


@pytest.mark.parametrize("name", TEXT_PRESETS)
def test_preset_forward_backward_reaches_every_parameter(name):
    cls, config = get_preset(name)
    model = vf.create_model(name, **tiny_overrides(config))
    ids = torch.randint(0, 256, (2, 9))
    loss = run_preset(model, cls.__name__, ids)
    assert torch.isfinite(loss)
    loss.backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not no_grad, f"{name}: parameters without gradient: {no_grad}"


# Published sizes. HF's counts of the released checkpoints; the papers round differently in places
# (BERT-large "340M", T5-large "770M", T5-3B "3B"), noted beside each.
PUBLISHED = {
    "gpt_small": 117e6,  # Radford et al. 2018 (GPT-1)
    "gpt2": 124.44e6,  # HF gpt2 (the paper's table says 117M)
    "gpt2_medium": 354.8e6,  # HF "355M"
    "gpt2_large": 774.0e6,  # HF "774M"
    "gpt2_xl": 1557.6e6,  # HF "1.5B"
    "bert_base": 110e6,  # Devlin et al. 2019
    "bert_large": 335.1e6,  # HF bert-large (paper: "340M")
    "t5_small": 60.5e6,  # Raffel et al. 2020 "60M"
    "t5_base": 222.9e6,  # paper "220M"
    "t5_large": 737.7e6,  # paper "770M"
    "t5_xl": 2851.6e6,  # T5-3B, paper "3B"
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_big_preset_parameter_count(name):
    with torch.device("meta"):  # no memory is allocated
        model = vf.create_model(name)
    count = sum(p.numel() for p in model.parameters())
    assert abs(count - PUBLISHED[name]) / PUBLISHED[name] < 0.01, f"{name}: {count / 1e6:.1f}M"


def test_transformer_base_size_matches_vaswani_architecture():
    """Vaswani et al. 2017, sec. 3 (d_model 512, d_ff 2048, 6 + 6 layers, a shared 37k embedding), counted
    in closed form. Table 3 rounds "base" to 65M; the architecture as described has 63.1M."""
    d, d_ff, layers, vocab = 512, 2048, 6, 37000
    attention = 4 * (d * d + d)  # q, k, v, output projections with biases
    ffn = 2 * d * d_ff + d_ff + d
    norm = 2 * d
    encoder_layer = attention + ffn + 2 * norm
    decoder_layer = 2 * attention + ffn + 3 * norm  # self-attention, cross-attention, FFN
    expected = vocab * d + layers * (encoder_layer + decoder_layer)  # tied input/output embedding
    with torch.device("meta"):
        model = vf.create_model("transformer_base")
    assert sum(p.numel() for p in model.parameters()) == expected == 63_082_496