import pytest
import torch
import torch.nn.functional as F

import visionformers as vf
from visionformers.text import GPT, ByteTokenizer, load_tokenizer


@pytest.fixture
def gpt():
    return vf.create_model("gpt_tiny", dropout=0.0, attn_drop=0.0).eval()


def greedy_without_cache(model, ids, steps):
    """Oracle: recompute the whole sequence for every new token."""
    for _ in range(steps):
        nxt = model(ids).logits[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, nxt], dim=1)
    return ids


def spice(model, std=0.3):
    """Larger random weights so greedy decoding does not collapse to one repeated token."""
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.normal_(0, std)


def test_logits_and_shifted_loss(gpt):
    ids = torch.randint(0, 256, (2, 12))
    out = gpt(ids, labels=ids)
    assert out.logits.shape == (2, 12, 261)
    expected = F.cross_entropy(out.logits[:, :-1].reshape(-1, 261), ids[:, 1:].reshape(-1))
    torch.testing.assert_close(out.loss, expected)
    logits, loss = gpt(ids)  # a NamedTuple: unpacks as (logits, loss)
    assert loss is None and torch.equal(logits, out.logits)


def test_labels_ignore_index(gpt):
    ids = torch.randint(0, 256, (1, 8))
    labels = ids.clone()
    labels[:, 4:] = -100
    out = gpt(ids, labels=labels)
    expected = F.cross_entropy(out.logits[0, :3], ids[0, 1:4])
    torch.testing.assert_close(out.loss, expected)


def test_kv_cache_generation_equals_recomputation(gpt):
    spice(gpt)
    ids = torch.randint(0, 256, (2, 5))
    expected = greedy_without_cache(gpt, ids, 12)
    assert torch.equal(gpt.generate(ids, 12), expected)
    assert len(set(expected[0, 5:].tolist())) > 1  # the check is not vacuous


def test_causal_no_leak(gpt):
    ids = torch.randint(0, 256, (1, 10))
    changed = ids.clone()
    changed[0, 6:] = (changed[0, 6:] + 1) % 256
    a, b = gpt(ids).logits, gpt(changed).logits
    torch.testing.assert_close(a[:, :6], b[:, :6])
    assert not torch.allclose(a[:, 6:], b[:, 6:])


def test_post_norm_variant_generates():
    model = vf.create_model("gpt_small", vocab_size=261, dim=32, depth=2, num_heads=4, max_len=32).eval()
    ids = torch.randint(0, 256, (1, 4))
    assert torch.equal(model.generate(ids, 6), greedy_without_cache(model, ids, 6))


def test_sampling_is_seeded_and_stops_at_eos(gpt):
    spice(gpt, 0.05)
    ids = torch.randint(0, 256, (3, 4))
    kw = dict(do_sample=True, temperature=0.8, top_k=50, top_p=0.9)
    a = gpt.generate(ids, 10, generator=torch.Generator().manual_seed(1), **kw)
    b = gpt.generate(ids, 10, generator=torch.Generator().manual_seed(1), **kw)
    assert torch.equal(a, b)
    # eos = the first greedy token of row 0: row 0 stops at once, the rest is padded with eos
    eos = int(gpt.generate(ids, 1)[0, -1])
    out = gpt.generate(ids, 10, eos_token_id=eos, pad_token_id=0)
    assert out[0, 4] == eos and (out[0, 5:] == 0).all()


def test_generate_zero_new_tokens(gpt):
    ids = torch.randint(0, 256, (2, 3))
    assert torch.equal(gpt.generate(ids, 0), ids)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(top_p=0.0, do_sample=True), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(temperature=0.0, do_sample=True), "temperature"),
        (dict(temperature=-1.0, do_sample=True), "temperature"),
        (dict(top_k=0), "top_k"),
        (dict(top_k=-3), "top_k"),
        (dict(max_new_tokens=-1), "max_new_tokens"),
        (dict(max_new_tokens=300), "max_new_tokens"),  # beyond max_len=256
    ],
)
def test_generate_bad_arguments(gpt, kwargs, name):
    kwargs = {"max_new_tokens": 4, **kwargs}
    with pytest.raises(ValueError, match=name):
        gpt.generate(torch.zeros(1, 3, dtype=torch.long), **kwargs)


def test_bad_input_ids(gpt):
    with pytest.raises(ValueError, match=r"input_ids.*261.*vocab_size=261"):
        gpt(torch.tensor([[1, 261]]))
    with pytest.raises(ValueError, match=r"input_ids.*-1"):
        gpt(torch.tensor([[1, -1]]))
    with pytest.raises(ValueError, match=r"input_ids.*max_len=256"):
        gpt(torch.zeros(1, 257, dtype=torch.long))
    with pytest.raises(ValueError, match="input_ids"):
        gpt(torch.zeros(2, 3))  # float ids
    with pytest.raises(ValueError, match="labels"):
        gpt(torch.zeros(1, 3, dtype=torch.long), labels=torch.zeros(1, 4, dtype=torch.long))


def test_eval_is_deterministic_with_dropout():
    model = vf.create_model("gpt_tiny", dropout=0.5, attn_drop=0.5).eval()
    ids = torch.randint(0, 256, (2, 6))
    assert torch.equal(model(ids).logits, model(ids).logits)


def test_save_and_load_with_tokenizer(gpt, tmp_path):
    vf.save_pretrained(gpt, tmp_path)
    ByteTokenizer().save(tmp_path)
    model = vf.from_pretrained(tmp_path).eval()
    tok = load_tokenizer(tmp_path)
    ids = torch.tensor([tok.encode("hello")])
    assert isinstance(model, GPT)
    torch.testing.assert_close(model(ids).logits, gpt(ids).logits)
    assert model.token_embed.weight.data_ptr() == model.output_weight().data_ptr()  # still tied
