"""Pretrained transformers text encoders: same token ids and the same context as transformers' encoder."""
import pytest
import torch

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

from visionformers.text.conditioning import TextConditioner  # noqa: E402
from visionformers.text.pretrained import load_saved_tokenizer, load_text_encoder  # noqa: E402

PROMPTS = ["a red digit seven", "seven", "", "a blue zero on a red ground"]


def _tokenizer(directory):
    """A tiny T5-style word-level tokenizer built with the tokenizers library (no download): <pad>=0, </s>=1."""
    words = ["<pad>", "</s>", "<unk>", "a", "red", "blue", "digit", "seven", "zero", "on", "ground"]
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.post_processor = tokenizers.processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    tok.save(str(directory / "tokenizer.json"))


@pytest.fixture(scope="module")
def t5_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("t5")
    cfg = transformers.T5Config(vocab_size=16, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                                feed_forward_proj="gated-gelu", relative_attention_num_buckets=8)
    torch.manual_seed(0)
    model = transformers.T5EncoderModel(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    model.save_pretrained(d)
    _tokenizer(d)
    return d, model


def test_t5_dir_gives_transformers_context(t5_dir):
    d, ref = t5_dir
    encoder, tokenizer = load_text_encoder(d)
    hf_tok = transformers.PreTrainedTokenizerFast(tokenizer_file=str(d / "tokenizer.json"), pad_token="<pad>")
    batch = hf_tok(PROMPTS, padding=True, return_tensors="pt")
    ours = TextConditioner(encoder, tokenizer)
    tokens = ours.tokenize(PROMPTS)
    assert torch.equal(tokens["input_ids"], batch["input_ids"])
    assert torch.equal(tokens["attention_mask"], batch["attention_mask"].bool())
    with torch.no_grad():
        expected = ref(**batch).last_hidden_state
        context, mask = ours(PROMPTS)
    assert torch.allclose(context[mask], expected[mask], atol=1e-5)


def test_saved_tokenizer_round_trips(t5_dir, tmp_path):
    _, tokenizer = load_text_encoder(t5_dir[0])
    tokenizer.save(tmp_path)
    again = load_saved_tokenizer(tmp_path)
    assert [again.encode(p) for p in PROMPTS] == [tokenizer.encode(p) for p in PROMPTS]


def test_bad_text_encoder_dirs_are_named(t5_dir, tmp_path):
    import json

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ValueError, match="llama"):
        load_text_encoder(tmp_path)
    (tmp_path / "config.json").write_text((t5_dir[0] / "config.json").read_text())
    with pytest.raises(FileNotFoundError, match="no weights"):
        load_text_encoder(tmp_path)
