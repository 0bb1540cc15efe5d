import pytest
import torch

from visionformers.text import BPETokenizer, ByteTokenizer, load_tokenizer


def test_byte_roundtrip_unicode():
    tok = ByteTokenizer()
    text = "héllo wörld ✓ 123"
    ids = tok.encode(text)
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text
    assert tok.decode(ids, skip_special_tokens=False) == f"<bos>{text}<eos>"
    assert tok.vocab_size == 261 and tok.mask_token_id == 260 and tok.pad_token_id == 256


def test_batch_padding_and_truncation():
    tok = ByteTokenizer()
    batch = tok(["ab", "abcdef", ""])
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert ids.shape == (3, 8) and mask.dtype == torch.bool
    assert mask.sum(1).tolist() == [4, 8, 2]  # "" keeps <bos><eos>: a usable null prompt
    assert (ids[~mask] == tok.pad_token_id).all()
    cut = tok(["abcdefgh"], max_length=5)["input_ids"][0].tolist()
    assert cut == [tok.bos_token_id, 97, 98, 99, tok.eos_token_id]  # the final <eos> survives
    fixed = tok(["a"], max_length=6, padding="max_length")
    assert fixed["input_ids"].shape == (1, 6)
    assert tok.batch_decode(ids) == ["ab", "abcdef", ""]


def test_bad_arguments():
    tok = ByteTokenizer()
    with pytest.raises(ValueError, match="texts"):
        tok([1, 2])
    with pytest.raises(ValueError, match="max_length"):
        tok(["a"], max_length=1)
    with pytest.raises(ValueError, match="padding"):
        tok(["a"], padding="longer")
    with pytest.raises(ValueError, match="max_length"):
        tok(["a"], padding="max_length")


def test_save_and_load(tmp_path):
    ByteTokenizer().save(tmp_path)
    assert isinstance(load_tokenizer(tmp_path), ByteTokenizer)
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        load_tokenizer(tmp_path / "missing")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "tokenizer.json").write_text('{"type": "wordpiece"}')
    with pytest.raises(ValueError, match="wordpiece"):
        load_tokenizer(tmp_path / "bad")


def test_bpe_train_roundtrip_save_load(tmp_path):
    corpus = ["the cat sat on the mat", "the dog sat on the log", "a cat and a dog"] * 20
    tok = BPETokenizer.train(corpus, vocab_size=300, min_frequency=2)
    assert tok.vocab_size <= 300 and tok.pad_token_id == 0 and tok.mask_token_id == 4
    text = "the cat sat on the log, ünïcode!"
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert len(tok.encode("the cat sat on the mat", add_special_tokens=False)) < len("the cat sat on the mat")  # merges
    tok.save(tmp_path)
    again = load_tokenizer(tmp_path)
    assert isinstance(again, BPETokenizer) and again.encode(text) == ids
    path = tmp_path / "corpus.txt"
    path.write_text("\n".join(corpus))
    assert BPETokenizer.train(path, vocab_size=300).vocab_size > 261
    with pytest.raises(ValueError, match="vocab_size"):
        BPETokenizer.train(corpus, vocab_size=100)
    with pytest.raises(FileNotFoundError):
        BPETokenizer.train(tmp_path / "nope.txt")
