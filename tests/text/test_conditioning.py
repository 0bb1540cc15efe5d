import pytest
import torch

import visionformers as vf
from visionformers.text import ByteTokenizer, TextConditioner


@pytest.mark.parametrize("preset", ["t5_tiny_encoder", "t5_tiny", "bert_tiny", "gpt_tiny"])
def test_context_and_mask(preset):
    cond = TextConditioner(preset, max_length=16)
    context, mask = cond(["a red square", ""])  # "" is the null prompt of classifier-free guidance
    assert context.shape == (2, 14, cond.context_dim) and mask.shape == (2, 14)
    assert mask.sum(1).tolist() == [14, 2]
    assert torch.isfinite(context).all() and (context[~mask] == 0).all()
    assert cond.context_dim == cond.encoder.config.dim


def test_padding_does_not_change_a_prompt():
    cond = TextConditioner("bert_tiny")
    alone, _ = cond(["hi"])
    batched, mask = cond(["hi", "a much longer prompt"])
    torch.testing.assert_close(batched[0, : alone.shape[1]], alone[0], atol=1e-5, rtol=1e-5)


def test_truncation_and_fixed_length():
    cond = TextConditioner("t5_tiny_encoder", max_length=8, pad_to_max_length=True)
    context, mask = cond(["x" * 50, "y"])
    assert context.shape[:2] == (2, 8) and mask[0].all() and mask[1].sum() == 3


def test_frozen_has_no_gradients_and_stays_in_eval():
    cond = TextConditioner("t5_tiny_encoder", dropout=0.5)
    cond.train()
    assert not cond.encoder.training
    assert not any(p.requires_grad for p in cond.parameters())
    a, _ = cond(["same"])
    b, _ = cond(["same"])
    assert torch.equal(a, b) and not a.requires_grad


def test_trained_jointly_gets_gradients():
    cond = TextConditioner("bert_tiny", freeze=False)
    context, mask = cond(["a prompt", "b"])
    (context.square() * mask[..., None]).sum().backward()
    assert cond.encoder.token_embed.weight.grad.abs().sum() > 0


def test_wraps_a_model_and_its_tokenizer():
    encoder = vf.create_model("t5_tiny_encoder")
    cond = TextConditioner(encoder, ByteTokenizer())
    assert cond.encoder is encoder and cond.device == torch.device("cpu")


def test_bad_arguments():
    with pytest.raises(ValueError, match="encoder"):
        TextConditioner(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="max_length"):
        TextConditioner("gpt_tiny", max_length=1000)
    with pytest.raises(ValueError, match="tokenizer"):
        TextConditioner("bert_tiny", vocab_size=100)
    with pytest.raises(ValueError, match="texts"):
        TextConditioner("t5_tiny_encoder")([])
