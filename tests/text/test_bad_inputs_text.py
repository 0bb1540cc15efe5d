"""Bad inputs to the text models and tokenizers: each fails with a ValueError naming the argument (never a
traceback from inside torch or the tokenizers library, never a silent wrong result); integer labels of any
dtype are accepted and give the int64 loss."""
from __future__ import annotations

import functools
import json

import pytest
import torch

import visionformers as vf
from visionformers.text import BPETokenizer, ByteTokenizer, GPTConfig, TextConditioner, load_tokenizer


@functools.cache
def model(name: str):
    torch.manual_seed(0)
    return vf.create_model(name).eval()


@functools.cache
def bpe():
    return BPETokenizer.train(["the cat sat on the mat", "a dog and a log"] * 10, vocab_size=300)


def ids(b=2, n=5, hi=50):
    return torch.randint(0, hi, (b, n), generator=torch.Generator().manual_seed(b * 100 + n))


# ---- 1. labels of any integer dtype: converted to int64 inside the loss ---------------------------------


@pytest.mark.parametrize("dtype", [torch.int32, torch.int16, torch.uint8])
def test_gpt_integer_labels_give_the_int64_loss(dtype):
    x = ids()
    expected = model("gpt_tiny")(x, labels=x).loss
    torch.testing.assert_close(model("gpt_tiny")(x, labels=x.to(dtype)).loss, expected, rtol=0, atol=0)


def test_bert_mlm_int32_labels_give_the_int64_loss():
    x = ids()
    labels = torch.full_like(x, -100)
    labels[:, 1] = x[:, 1]
    expected = model("bert_tiny_mlm")(x, labels=labels).loss
    torch.testing.assert_close(model("bert_tiny_mlm")(x, labels=labels.int()).loss, expected, rtol=0, atol=0)


@pytest.mark.parametrize("name", ["bert_tiny_cls", "encoder_tiny"])
def test_classifier_int32_labels_give_the_int64_loss(name):
    x, labels = ids(), torch.tensor([0, 1])
    expected = model(name)(x, labels=labels).loss
    torch.testing.assert_close(model(name)(x, labels=labels.int()).loss, expected, rtol=0, atol=0)


def test_uint8_label_values_are_compared_after_widening():
    # as uint8, vocab_size=261 would wrap to 5 (rejecting label 200) and -100 to 156 (ignoring label 156)
    x = ids(1, 4)
    labels = torch.tensor([[0, 200, 156, 255]])
    expected = model("gpt_tiny")(x, labels=labels).loss
    torch.testing.assert_close(model("gpt_tiny")(x, labels=labels.to(torch.uint8)).loss, expected, rtol=0, atol=0)


def test_gpt_labels_need_two_tokens():
    with pytest.raises(ValueError, match=r"labels=.*\(2, 1\).*at least 2 tokens"):
        model("gpt_tiny")(ids(2, 1), labels=ids(2, 1))


# ---- 2. input_ids dtypes: int64 / int32 accepted, other integer dtypes rejected --------------------------


def test_int32_input_ids_match_int64():
    x = ids()
    torch.testing.assert_close(model("gpt_tiny")(x.int()).logits, model("gpt_tiny")(x).logits, rtol=0, atol=0)
    assert torch.equal(model("gpt_tiny").generate(x.int(), 3), model("gpt_tiny").generate(x, 3))


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int8, torch.int16, torch.bool, torch.float32])
@pytest.mark.parametrize("name", ["gpt_tiny", "bert_tiny", "t5_tiny_encoder", "encoder_tiny"])
def test_other_id_dtypes_are_rejected(name, dtype):
    with pytest.raises(ValueError, match=rf"input_ids=.*{dtype}.*torch.long or torch.int32"):
        model(name)(ids().to(dtype))


def test_token_type_ids_dtype():
    with pytest.raises(ValueError, match=r"token_type_ids=.*torch.uint8"):
        model("bert_tiny")(ids(), token_type_ids=torch.zeros(2, 5, dtype=torch.uint8))


# ---- 3. empty batches and empty sequences ------------------------------------------------------------


@pytest.mark.parametrize("shape", [(0, 3), (2, 0)])
@pytest.mark.parametrize("name", ["gpt_tiny", "bert_tiny", "bert_tiny_cls", "t5_tiny_encoder", "encoder_tiny"])
def test_empty_input_ids(name, shape):
    with pytest.raises(ValueError, match=r"input_ids=.*at least one"):
        model(name)(torch.zeros(shape, dtype=torch.long))


@pytest.mark.parametrize("shape", [(0, 3), (2, 0)])
def test_empty_input_ids_generate(shape):
    with pytest.raises(ValueError, match=r"input_ids=.*at least one"):
        model("gpt_tiny").generate(torch.zeros(shape, dtype=torch.long), 2)
    with pytest.raises(ValueError, match=r"input_ids=.*at least one"):
        model("t5_tiny").generate(torch.zeros(shape, dtype=torch.long), 2)


@pytest.mark.parametrize("name", ["t5_tiny", "transformer_tiny"])
def test_empty_seq2seq_inputs(name):
    with pytest.raises(ValueError, match=r"input_ids=.*\(0, 3\).*batch size B >= 1"):
        model(name)(torch.zeros(0, 3, dtype=torch.long), torch.zeros(0, 2, dtype=torch.long))
    with pytest.raises(ValueError, match=r"decoder_input_ids=.*\(2, 0\).*at least one token"):
        model(name)(ids(), torch.zeros(2, 0, dtype=torch.long))


# ---- 4. decode() validates like forward ----------------------------------------------------------------


@pytest.mark.parametrize("name", ["t5_tiny", "transformer_tiny"])
def test_decode_validates_ids(name):
    m = model(name)
    memory = m.encode(ids())
    with pytest.raises(ValueError, match=r"decoder_input_ids \(token id 99999\)"):
        m.decode(torch.full((2, 1), 99999), memory)
    with pytest.raises(ValueError, match=r"decoder_input_ids \(token id -1\)"):
        m.decode(torch.full((2, 1), -1), memory)
    with pytest.raises(ValueError, match=r"decoder_input_ids=.*torch.float32"):
        m.decode(torch.ones(2, 2), memory)
    with pytest.raises(ValueError, match=r"decoder_input_ids=.*shape=\(2,\)"):
        m.decode(torch.ones(2, dtype=torch.long), memory)


@pytest.mark.parametrize("name", ["t5_tiny", "transformer_tiny"])
def test_decode_validates_memory_and_mask(name):
    m = model(name)
    memory = m.encode(ids())
    dec = torch.ones(2, 2, dtype=torch.long)
    with pytest.raises(ValueError, match=r"memory=.*\(2, 5, 64\).*\(1, M >= 1, 64\)"):
        m.decode(dec[:1], memory)
    with pytest.raises(ValueError, match=r"memory=.*3 dimensions"):
        m.decode(dec, memory[:, 0])
    with pytest.raises(ValueError, match=r"memory=.*\(2, 5, 32\)"):
        m.decode(dec, memory[..., :32])
    with pytest.raises(ValueError, match=r"memory=.*torch.int64"):
        m.decode(dec, memory.long())
    with pytest.raises(ValueError, match=r"memory_mask=.*\(2, 3\).*\(2, 5\)"):
        m.decode(dec, memory, torch.ones(2, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"memory_mask=.*torch.float32"):
        m.decode(dec, memory, torch.ones(2, 5))


@pytest.mark.parametrize("name", ["t5_tiny", "transformer_tiny"])
def test_checked_decode_equals_forward(name):
    m, x, dec = model(name), ids(), ids(2, 3)
    mask = torch.tensor([[1] * 5, [1] * 3 + [0] * 2])
    expected = m(x, dec, mask)
    torch.testing.assert_close(m.decode(dec, m.encode(x, mask), mask), expected, rtol=0, atol=0)
    torch.testing.assert_close(m.decode(dec, m.encode(x, mask), mask.bool()), expected, rtol=0, atol=0)


# ---- 5. encoder / decoder batch sizes must match -------------------------------------------------------


@pytest.mark.parametrize("name", ["t5_tiny", "transformer_tiny"])
@pytest.mark.parametrize("b_in, b_dec", [(2, 3), (1, 2), (2, 1)])
def test_seq2seq_batch_mismatch(name, b_in, b_dec):
    with pytest.raises(ValueError, match=rf"decoder_input_ids=.*\({b_dec}, 2\).*batch size {b_in}.*input_ids"):
        model(name)(ids(b_in), ids(b_dec, 2))


# ---- 6. GPT config special token ids -----------------------------------------------------------------------


@pytest.mark.parametrize("eos", [9999, 261, -1, "1", True, 1.0])
def test_gpt_config_eos(eos):
    with pytest.raises(ValueError, match=r"eos_token_id=.*vocab_size=261"):
        vf.create_model("gpt_tiny", eos_token_id=eos)


def test_gpt_config_eos_ok():
    assert vf.create_model("gpt_tiny", eos_token_id=260).config.eos_token_id == 260
    assert vf.create_model("gpt_tiny", eos_token_id=None).config.eos_token_id is None
    assert GPTConfig().eos_token_id == 50256  # GPT-2's <|endoftext|>
    with pytest.raises(ValueError, match=r"eos_token_id=50256"):  # GPT-2's default needs GPT-2's vocabulary
        GPTConfig(vocab_size=100)
    assert GPTConfig(vocab_size=100, eos_token_id=None).eos_token_id is None


@pytest.mark.parametrize("name, field", [("t5_tiny", "eos_token_id"), ("transformer_tiny", "bos_token_id")])
def test_seq2seq_config_token_id_types(name, field):
    with pytest.raises(ValueError, match=rf"{field}='1'"):
        vf.create_model(name, **{field: "1"})


def test_seq2seq_config_depth_type():
    with pytest.raises(ValueError, match=r"decoder_depth='2'"):
        vf.create_model("transformer_tiny", decoder_depth="2")


# ---- 7. tokenizers ---------------------------------------------------------------------------------------------


TOKENIZERS = {"byte": ByteTokenizer, "bpe": bpe}


@pytest.mark.parametrize("kind", sorted(TOKENIZERS))
@pytest.mark.parametrize("bad, pattern", [
    ([1000], r"ids \(token id 1000\)"),
    ([-1, 65], r"ids \(token id -1\)"),
    ([65.9], r"ids \(element 65.9\)"),
    ([65.0], r"ids \(element 65.0\)"),
    ([True], r"ids \(element True\)"),
    (["a"], r"ids \(element 'a'\)"),
    ("AB", r"ids='AB'"),
    (65, r"ids=65"),
    (None, r"ids=None"),
    (torch.tensor([65.0, 66.0]), r"ids=.*torch.float32"),
    (torch.tensor([[65, 66]]), r"ids=.*\(1, 2\).*batch_decode"),
    (torch.tensor(65), r"ids=.*shape=\(\)"),
    (torch.tensor([65, 100000]), r"ids \(token id 100000\)"),
])
def test_decode_bad_ids(kind, bad, pattern):
    with pytest.raises(ValueError, match=pattern):
        TOKENIZERS[kind]().decode(bad)


@pytest.mark.parametrize("kind", sorted(TOKENIZERS))
def test_decode_good_ids(kind):
    tok = TOKENIZERS[kind]()
    ids_ = tok.encode("the cat")
    assert tok.decode(ids_) == "the cat"
    assert tok.decode(torch.tensor(ids_)) == "the cat"
    assert tok.decode(torch.tensor(ids_, dtype=torch.int32)) == "the cat"
    assert tok.decode(tuple(ids_)) == "the cat"
    assert tok.decode([]) == ""
    assert tok.batch_decode(torch.tensor([ids_, ids_])) == ["the cat", "the cat"]
    assert tok.batch_decode([ids_, torch.tensor(ids_)]) == ["the cat", "the cat"]


def test_decode_keeps_special_token_behaviour():
    tok = ByteTokenizer()
    ids_ = [tok.bos_token_id, 65, tok.pad_token_id, 66, tok.eos_token_id]
    assert tok.decode(ids_) == "AB"
    assert tok.decode(ids_, skip_special_tokens=False) == "<bos>A<pad>B<eos>"


def test_decode_numpy():
    np = pytest.importorskip("numpy")
    tok = ByteTokenizer()
    assert tok.decode(np.array([65, 66])) == "AB"
    assert tok.decode([np.int64(65)]) == "A"
    with pytest.raises(ValueError, match=r"ids \(element 65.0\)"):
        tok.decode(np.array([65.0]))


@pytest.mark.parametrize("bad, pattern", [
    (torch.tensor([65, 66]), r"ids=.*shape=\(2,\).*2D tensor.*use decode"),
    ([65, 66], r"ids\[0\]=65"),
    ([[65], [999]], r"ids\[1\] \(token id 999\)"),
    (None, r"ids=None"),
    ("AB", r"ids='AB'"),
])
def test_batch_decode_bad_ids(bad, pattern):
    with pytest.raises(ValueError, match=pattern):
        ByteTokenizer().batch_decode(bad)


def test_tokenizer_call_bad_device():
    with pytest.raises(ValueError, match=r"device='gpu'"):
        ByteTokenizer()(["a"], device="gpu")


def test_load_tokenizer_bad_directory():
    with pytest.raises(ValueError, match=r"directory=None"):
        load_tokenizer(None)
    with pytest.raises(ValueError, match=r"directory=None"):
        ByteTokenizer().save(None)


@pytest.mark.parametrize("data, pattern", [
    ({"type": "bpe"}, r"tokenizer.json.*backend=None"),
    ({"type": "bpe", "backend": [1, 2]}, r"tokenizer.json.*backend=\[1, 2\]"),
    ({"type": "bpe", "backend": {"foo": 1}}, r"tokenizer.json.*backend is not accepted by the tokenizers library"),
])
def test_load_tokenizer_bad_bpe_backend(tmp_path, data, pattern):
    (tmp_path / "tokenizer.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match=pattern):
        load_tokenizer(tmp_path)


def test_load_tokenizer_backend_without_special_tokens(tmp_path):
    tk = pytest.importorskip("tokenizers")
    backend = tk.Tokenizer(tk.models.BPE(unk_token="<unk>"))
    (tmp_path / "tokenizer.json").write_text(json.dumps({"type": "bpe", "backend": json.loads(backend.to_str())}))
    with pytest.raises(ValueError, match=r"tokenizer.json.*backend=.*<pad>"):
        load_tokenizer(tmp_path)


def test_bpe_roundtrip_after_checks(tmp_path):
    tok = bpe()
    tok.save(tmp_path)
    again = load_tokenizer(tmp_path)
    assert again.decode(again.encode("a dog")) == "a dog"


@pytest.mark.parametrize("value", [-1, 1.5, True, "2"])
def test_bpe_train_min_frequency(value):
    with pytest.raises(ValueError, match=rf"min_frequency={value!r}"):
        BPETokenizer.train(["ab"], vocab_size=300, min_frequency=value)


def test_bpe_train_bad_texts():
    with pytest.raises(ValueError, match=r"texts='int'"):
        BPETokenizer.train(5, vocab_size=300)
    with pytest.raises(ValueError, match=r"texts\[1\]=None"):
        BPETokenizer.train(["a b", None], vocab_size=300)
    with pytest.raises(ValueError, match=r"texts\[0\]=b'ab'"):
        BPETokenizer.train((t for t in [b"ab"]), vocab_size=300)  # a generator is checked lazily


@pytest.mark.parametrize("backend", ["x", None, 5])
def test_bpe_tokenizer_bad_backend(backend):
    with pytest.raises(ValueError, match=r"backend=.*tokenizers.Tokenizer"):
        BPETokenizer(backend)


# ---- 8. TextConditioner ----------------------------------------------------------------------------------------


def test_text_conditioner_tokenizer_name():
    cond = TextConditioner(tokenizer="byte")
    assert isinstance(cond.tokenizer, ByteTokenizer)


@pytest.mark.parametrize("tokenizer, pattern", [("bpe", r"tokenizer='bpe'"), (5, r"tokenizer='int'"),
                                                (ByteTokenizer, r"tokenizer='ABCMeta'")])
def test_text_conditioner_bad_tokenizer(tokenizer, pattern):
    with pytest.raises(ValueError, match=pattern):
        TextConditioner(tokenizer=tokenizer)


@pytest.mark.parametrize("prompts, pattern", [([], r"prompts=\[\]"), ([1], r"prompts=\[1\]"), (None, r"prompts=None")])
def test_text_conditioner_bad_prompts(prompts, pattern):
    with pytest.raises(ValueError, match=pattern):
        TextConditioner()(prompts)


def test_text_conditioner_gpt_encode_ids_mask():
    cond = TextConditioner("gpt_tiny")
    with pytest.raises(ValueError, match=r"attention_mask=.*\(2, 3\).*\(2, 5\)"):
        cond.encode_ids(ids(), torch.ones(2, 3, dtype=torch.bool))


# ---- 9. pooling heads ---------------------------------------------------------------------------------------------


def test_bert_pool_shapes():
    bert = model("bert_tiny")
    with pytest.raises(ValueError, match=r"sequence_output=.*\(2, 64\).*3 dimensions"):
        bert.pool(torch.zeros(2, 64))
    with pytest.raises(ValueError, match=r"sequence_output=.*\(2, 3, 32\).*dim=64"):
        bert.pool(torch.zeros(2, 3, 32))
    with pytest.raises(ValueError, match=r"sequence_output=.*torch.int64"):
        bert.pool(torch.zeros(2, 3, 64, dtype=torch.long))
    seq, pooled = bert(ids())
    torch.testing.assert_close(bert.pool(seq), pooled)


def test_encoder_classifier_forward_head_shapes():
    enc = model("encoder_tiny")
    x = enc.forward_features(ids())
    with pytest.raises(ValueError, match=r"attention_mask=.*\(2, 3\).*\(2, 5\).* of x"):
        enc.forward_head(x, torch.ones(2, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"attention_mask=.*torch.float32"):
        enc.forward_head(x, torch.ones(2, 5))
    with pytest.raises(ValueError, match=r"x=.*\(2, 64\).*3 dimensions"):
        enc.forward_head(x[:, 0])
    with pytest.raises(ValueError, match=r"x=.*\(2, 5, 32\).*dim=64"):
        enc.forward_head(x[..., :32])


def test_encoder_classifier_int_mask_pools_as_bool():
    enc, x = model("encoder_tiny"), ids()
    mask = torch.tensor([[1] * 5, [1] * 3 + [0] * 2])
    torch.testing.assert_close(enc(x, mask).logits, enc(x, mask.bool()).logits, rtol=0, atol=0)
