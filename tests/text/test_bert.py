import pytest
import torch
import torch.nn.functional as F

import visionformers as vf


@pytest.fixture
def bert():
    return vf.create_model("bert_tiny").eval()


def test_outputs_and_shapes(bert):
    ids = torch.randint(0, 256, (3, 10))
    seq, pooled = bert(ids)
    assert seq.shape == (3, 10, 64) and pooled.shape == (3, 64)
    torch.testing.assert_close(pooled, torch.tanh(bert.pooler(seq[:, 0])))


def test_padding_does_not_change_real_tokens(bert):
    ids = torch.randint(0, 256, (1, 7))
    padded = torch.cat([ids, torch.full((1, 5), 256)], dim=1)
    mask = torch.cat([torch.ones(1, 7), torch.zeros(1, 5)], dim=1).long()
    seq, pooled = bert(ids)
    seq_p, pooled_p = bert(padded, attention_mask=mask)
    torch.testing.assert_close(seq_p[:, :7], seq, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(pooled_p, pooled, atol=1e-5, rtol=1e-5)


def test_token_types_matter_and_default_to_zero(bert):
    ids = torch.randint(0, 256, (2, 6))
    zeros, ones = torch.zeros_like(ids), torch.ones_like(ids)
    torch.testing.assert_close(bert(ids)[0], bert(ids, token_type_ids=zeros)[0])
    assert not torch.allclose(bert(ids)[0], bert(ids, token_type_ids=ones)[0])


def test_bidirectional(bert):
    ids = torch.randint(0, 256, (1, 8))
    changed = ids.clone()
    changed[0, -1] = (changed[0, -1] + 1) % 256
    assert not torch.allclose(bert(ids)[0][:, 0], bert(changed)[0][:, 0])  # the first token sees the last


def test_masked_lm_head_is_tied_and_loss_ignores_unmasked():
    model = vf.create_model("bert_tiny_mlm").eval()
    ids = torch.randint(0, 256, (2, 8))
    labels = torch.full_like(ids, -100)
    labels[:, 3] = ids[:, 3]
    out = model(ids, labels=labels)
    assert out.logits.shape == (2, 8, 261)
    torch.testing.assert_close(out.loss, F.cross_entropy(out.logits[:, 3], ids[:, 3]))
    assert model.bert.pooler is None
    names = [n for n, _ in model.named_parameters()]
    assert not any("decoder" in n for n in names)  # the output layer is the token embedding


def test_sequence_classification_loss():
    model = vf.create_model("bert_tiny_cls", num_labels=3).eval()
    ids = torch.randint(0, 256, (4, 5))
    labels = torch.tensor([0, 1, 2, 1])
    out = model(ids, labels=labels)
    assert out.logits.shape == (4, 3)
    torch.testing.assert_close(out.loss, F.cross_entropy(out.logits, labels))


def test_bad_inputs(bert):
    ids = torch.randint(0, 256, (2, 6))
    with pytest.raises(ValueError, match="attention_mask"):
        bert(ids, attention_mask=torch.ones(2, 5))
    with pytest.raises(ValueError, match="attention_mask"):
        bert(ids, attention_mask=torch.ones(2, 6, 6, dtype=torch.long))
    with pytest.raises(ValueError, match="token_type_ids"):
        bert(ids, token_type_ids=torch.full_like(ids, 2))
    with pytest.raises(ValueError, match=r"input_ids.*vocab_size=261"):
        bert(torch.tensor([[5, 300]]))
    with pytest.raises(ValueError, match=r"input_ids.*max_len=256"):
        bert(torch.zeros(1, 257, dtype=torch.long))
    with pytest.raises(ValueError, match="labels"):
        vf.create_model("bert_tiny_cls")(ids, labels=torch.zeros(3, dtype=torch.long))
