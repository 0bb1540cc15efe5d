"""Parity with transformers: random small models, converted with from_hf, compared in fp32 eval mode."""
import warnings

import pytest
import torch
import transformers as hf

from visionformers.convert.from_hf import (
    config_from_hf,
    detect_hf_architecture,
    from_hf,
)
from visionformers.hub import load_into
from visionformers.text import (
    GPT,
    T5,
    Bert,
    BertForMaskedLM,
    BertForSequenceClassification,
    T5Encoder,
)

warnings.filterwarnings("ignore", module="transformers")
TOL = dict(atol=1e-4, rtol=0)  # max abs diff <= 1e-4


def spice(model, std=0.3):
    """Larger random weights: varied greedy tokens and logits far from uniform, so parity is not vacuous."""
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.normal_(0, std)
    return model


def convert(ref, cls, hf_config):
    ours = cls(config_from_hf(hf_config)).eval()
    load_into(ours, from_hf(ref.state_dict()))
    return ours


@pytest.fixture(scope="module")
def gpt2_pair():
    torch.manual_seed(0)
    cfg = hf.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=100, n_positions=64, bos_token_id=0, eos_token_id=1)
    ref = spice(hf.GPT2LMHeadModel(cfg)).eval()
    return ref, convert(ref, GPT, cfg)


def test_gpt2_logits(gpt2_pair):
    ref, ours = gpt2_pair
    ids = torch.randint(0, 100, (2, 24))
    with torch.no_grad():
        expected = ref(ids).logits
    torch.testing.assert_close(ours(ids).logits, expected, **TOL)
    assert expected.std() > 1  # far from uniform


def test_gpt2_greedy_generation_identical(gpt2_pair):
    ref, ours = gpt2_pair
    ids = torch.randint(2, 100, (2, 8))
    with torch.no_grad():
        expected = ref.generate(ids, do_sample=False, max_new_tokens=20, pad_token_id=1, eos_token_id=1)
    out = ours.generate(ids, 20, eos_token_id=1)
    assert out.tolist() == expected.tolist()
    assert len(set(out[0, 8:].tolist())) > 3


def test_gpt2_base_model_hidden_states():
    cfg = hf.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=50, n_positions=32)
    ref = spice(hf.GPT2Model(cfg), 0.1).eval()
    ours = convert(ref, GPT, cfg)
    ids = torch.randint(0, 50, (2, 10))
    with torch.no_grad():
        expected = ref(ids).last_hidden_state
    torch.testing.assert_close(ours.forward_features(ids), expected, **TOL)


BERT_CFG = dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, intermediate_size=128, vocab_size=100,
                max_position_embeddings=64)


def bert_inputs():
    ids = torch.randint(0, 100, (2, 16))
    mask = torch.ones(2, 16, dtype=torch.long)
    mask[1, 11:] = 0
    return ids, mask, torch.randint(0, 2, (2, 16))


def test_bert_sequence_and_pooled_output():
    cfg = hf.BertConfig(**BERT_CFG)
    ref = spice(hf.BertModel(cfg), 0.1).eval()
    ours = convert(ref, Bert, cfg)
    ids, mask, types = bert_inputs()
    with torch.no_grad():
        expected = ref(ids, attention_mask=mask, token_type_ids=types)
    seq, pooled = ours(ids, mask, types)
    torch.testing.assert_close(seq, expected.last_hidden_state, **TOL)
    torch.testing.assert_close(pooled, expected.pooler_output, **TOL)


@pytest.mark.parametrize("head", ["mlm", "cls"])
def test_bert_heads(head):
    cfg = hf.BertConfig(**BERT_CFG, num_labels=3)
    ref_cls, cls = (hf.BertForMaskedLM, BertForMaskedLM) if head == "mlm" else (hf.BertForSequenceClassification, BertForSequenceClassification)
    ref = spice(ref_cls(cfg), 0.1).eval()
    ours = convert(ref, cls, cfg)
    ids, mask, types = bert_inputs()
    with torch.no_grad():
        expected = ref(ids, attention_mask=mask, token_type_ids=types).logits
    torch.testing.assert_close(ours(ids, mask, types).logits, expected, **TOL)


T5_CFG = dict(num_layers=2, d_model=64, num_heads=4, d_kv=16, d_ff=128, vocab_size=100, decoder_start_token_id=0)


@pytest.fixture(scope="module")
def t5_pair():
    torch.manual_seed(0)
    cfg = hf.T5Config(**T5_CFG)
    ref = spice(hf.T5ForConditionalGeneration(cfg)).eval()
    return ref, convert(ref, T5, cfg)


def t5_inputs():
    ids = torch.randint(2, 100, (2, 12))
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0
    return ids, mask


def test_t5_logits(t5_pair):
    ref, ours = t5_pair
    ids, mask = t5_inputs()
    dec = torch.randint(0, 100, (2, 9))
    with torch.no_grad():
        expected = ref(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits
    torch.testing.assert_close(ours(ids, dec, attention_mask=mask), expected, **TOL)


def test_t5_greedy_generation_identical(t5_pair):
    ref, ours = t5_pair
    ids, mask = t5_inputs()
    with torch.no_grad():
        expected = ref.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=20)
    out = ours.generate(ids, 20, attention_mask=mask)
    assert out.tolist() == expected.tolist()
    assert len(set(out[0].tolist())) > 3


def test_t5_encoder_model():
    cfg = hf.T5Config(**T5_CFG)
    ref = spice(hf.T5EncoderModel(cfg)).eval()
    ours = convert(ref, T5Encoder, cfg)
    ids, mask = t5_inputs()
    with torch.no_grad():
        expected = ref(input_ids=ids, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(ours(ids, mask), expected, **TOL)


def test_t5_v1_1_gated_untied():
    cfg = hf.T5Config(**T5_CFG, feed_forward_proj="gated-gelu", tie_word_embeddings=False)
    ref = spice(hf.T5ForConditionalGeneration(cfg)).eval()
    ref.lm_head.weight = torch.nn.Parameter(torch.randn_like(ref.lm_head.weight) * 0.3)  # a v1.1 checkpoint's own head
    ours = convert(ref, T5, cfg)
    assert ours.lm_head is not None and ours.config.mlp_act == "geglu_tanh"
    ids, mask = t5_inputs()
    dec = torch.randint(0, 100, (2, 5))
    with torch.no_grad():
        expected = ref(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits
    torch.testing.assert_close(ours(ids, dec, attention_mask=mask), expected, **TOL)


def test_unknown_architecture_and_keys():
    with pytest.raises(ValueError, match="GPT-2, BERT or T5"):
        from_hf({"conv1.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="state_dict"):
        from_hf({})
    sd = hf.GPT2LMHeadModel(hf.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=20, n_positions=8)).state_dict()
    assert detect_hf_architecture(sd) == "gpt2"
    sd["transformer.h.0.attn.extra.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match="attn.extra"):
        from_hf(sd)
    with pytest.raises(ValueError, match="model_type"):
        config_from_hf({"model_type": "llama"})


@pytest.mark.parametrize("family", ["gpt2", "bert_mlm", "t5", "t5_gated"])
def test_config_inferred_from_weights(family):
    if family == "gpt2":
        cfg = hf.GPT2Config(n_layer=3, n_embd=128, n_head=2, vocab_size=50, n_positions=40)
        ref, cls, expected = hf.GPT2LMHeadModel(cfg), GPT, config_from_hf(cfg)
    elif family == "bert_mlm":
        cfg = hf.BertConfig(**BERT_CFG)
        ref, cls, expected = hf.BertForMaskedLM(cfg), BertForMaskedLM, config_from_hf(cfg)
    else:
        extra = dict(feed_forward_proj="gated-gelu") if family == "t5_gated" else {}
        cfg = hf.T5Config(**T5_CFG, num_decoder_layers=3, **extra)
        ref, cls, expected = hf.T5ForConditionalGeneration(cfg), T5, config_from_hf(cfg)
    config, state = from_hf(ref.state_dict(), return_config=True)
    fields = ("vocab_size", "dim", "depth", "mlp_act") + (("decoder_depth", "head_dim", "mlp_hidden_dim") if "t5" in family else ("max_len",))
    assert {f: getattr(config, f) for f in fields} == {f: getattr(expected, f) for f in fields}
    load_into(cls(config), state)  # every tensor fits
