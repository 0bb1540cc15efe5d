"""train_lm.py -> generate_text.py, in-process with a tiny GPT on a tiny text file."""
import importlib.util
from pathlib import Path

import pytest

import visionformers as vf
from visionformers.text import load_tokenizer

REPO = Path(__file__).resolve().parents[2]
TINY = ["--model_overrides", '{"dim": 32, "depth": 1, "num_heads": 2, "max_len": 64}', "--block_size", "32",
        "--train_batch_size", "4", "--max_train_steps", "6", "--eval_steps", "3", "--lr_warmup_steps", "2",
        "--sample_tokens", "8"]


def load(path: Path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("the quick brown fox jumps over the lazy dog.\n" * 40)
    return path


@pytest.mark.parametrize("tokenizer", ["byte", "bpe"])
def test_train_then_generate(tmp_path, corpus, tokenizer, capsys):
    out = tmp_path / "lm"
    args = [str(corpus), "--output_dir", str(out), "--tokenizer", tokenizer, "--vocab_size", "300", *TINY]
    load(REPO / "train_scripts" / "train_lm.py").main(args)
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in out.iterdir()}
    assert "val loss" in capsys.readouterr().out
    model, tok = vf.from_pretrained(out), load_tokenizer(out)
    assert model.config.vocab_size == tok.vocab_size
    generate = load(REPO / "sample_scripts" / "generate_text.py").main
    texts = generate([str(out), "--prompt", "the quick", "--max_new_tokens", "10", "--num_samples", "2", "--top_p", "0.9"])
    assert len(texts) == 2 and all(t.startswith("the quick") for t in texts)
    greedy = generate([str(out), "--prompt", "the", "--greedy", "--max_new_tokens", "5", "--num_samples", "2"])
    assert greedy[0] == greedy[1]
    with pytest.raises(ValueError, match="top_p"):
        generate([str(out), "--prompt", "the", "--top_p", "1.5"])


def test_missing_text_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="text_file"):
        load(REPO / "train_scripts" / "train_lm.py").main([str(tmp_path / "none.txt"), *TINY])


def test_early_stopping_ends_the_run(tmp_path, corpus, capsys):
    # min_delta 100: no evaluation after the first improves, so patience 1 stops at the second (step 2 of 6)
    args = [str(corpus), "--output_dir", str(tmp_path / "lm"), *TINY, "--eval_steps", "1", "--sample_tokens", "0",
            "--early_stopping_patience", "1", "--early_stopping_min_delta", "100"]
    load(REPO / "train_scripts" / "train_lm.py").main(args)
    out = capsys.readouterr().out
    assert "early stopping at step 2: val_loss" in out and "step      3" not in out
    with pytest.raises(ValueError, match="early_stopping_metric.*top1"):
        load(REPO / "train_scripts" / "train_lm.py").main([*args, "--early_stopping_metric", "top1"])
