"""Short runs of the text examples (the full runs are documented in their docstrings)."""
import importlib.util
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def load(name: str):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_number_to_words():
    words = load("seq2seq_numbers").number_to_words
    assert words(0) == "zero" and words(15) == "fifteen" and words(40) == "forty"
    assert words(1204) == "one thousand two hundred four"
    assert words(9999) == "nine thousand nine hundred ninety nine"
    assert words(3010) == "three thousand ten" and words(700) == "seven hundred"


@pytest.mark.parametrize("tokenizer", ["bpe", "byte"])
def test_seq2seq_numbers_short_run(tokenizer):
    example = load("seq2seq_numbers")
    result = example.main(["--steps", "20", "--max_number", "300", "--num_test", "20", "--dim", "32", "--batch_size", "16",
                           "--tokenizer", tokenizer, "--log_every", "0"])
    assert result["loss"] < 0.95 * result["first_loss"]  # 20 steps: the loss falls (about 10% by then)
    assert 0.0 <= result["accuracy"] <= 1.0  # exact match needs the full run (>= 95%, see the docstring)
    train, test = example.make_splits(300, 20, 0)
    assert not set(train) & set(test)


def test_text_classification_short_run():
    example = load("text_classification")
    result = example.main(["--steps", "100", "--num_train", "400", "--num_test", "100", "--dim", "32", "--batch_size", "32",
                           "--lr", "3e-3", "--log_every", "0"])
    assert result["loss"] < result["first_loss"] - 0.1  # from ln 2 = 0.69
    assert result["accuracy"] >= 0.6  # above chance (0.5) on unseen sentences after 100 small steps
    train, test = example.make_data(400, 50, 0)
    assert not {t for t, _ in train} & {t for t, _ in test}


@pytest.mark.parametrize("name", ["seq2seq_numbers", "text_classification"])
def test_examples_accept_relative_positions(name):
    args = ["--steps", "3", "--dim", "32", "--batch_size", "8", "--log_every", "0", "--pos_embedding", "relative"]
    args += ["--max_number", "100", "--num_test", "4"] if name == "seq2seq_numbers" else ["--num_train", "40", "--num_test", "8"]
    result = load(name).main(args)
    assert result["loss"] == result["loss"] and 0.0 <= result["accuracy"] <= 1.0  # finite loss, a measured accuracy
