"""Pretrained text encoders from transformers model directories, with their own tokenizers.

``load_text_encoder(dir)`` reads a directory written by transformers' ``save_pretrained`` (a T5 / T5 encoder,
BERT or GPT-2: ``config.json``, ``model.safetensors`` or ``pytorch_model.bin`` read with ``weights_only=True``, and
the fast tokenizer's ``tokenizer.json``), converts the weights with ``vf.convert.from_hf`` and wraps the tokenizer
file with the ``tokenizers`` library, so token ids (and the special tokens the tokenizer adds, e.g. T5's ``</s>``,
BERT's ``[CLS] ... [SEP]``) are the ones the weights were trained with.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from torch import nn

from visionformers._validate import check_path, fail
from visionformers.text.tokenizer import TOKENIZER_NAME, Tokenizer, _require_tokenizers

__all__ = ["PretrainedTokenizer", "load_text_encoder", "is_transformers_dir"]

MAX_JSON_BYTES = 64 << 20  # a tokenizer.json of a 250k vocabulary is ~20 MB; refuse absurd files before parsing
WEIGHTS = ("model.safetensors", "pytorch_model.bin")
MODEL_TYPES = ("t5", "bert", "gpt2")


def _read_json(path: Path, what: str):
    if not path.is_file():
        raise FileNotFoundError(f"{str(path)!r} is missing; a transformers {what} is written by save_pretrained")
    if path.stat().st_size > MAX_JSON_BYTES:
        raise ValueError(f"{str(path)!r} is {path.stat().st_size} bytes; accepted: at most {MAX_JSON_BYTES}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{str(path)!r} is not valid JSON ({e})") from None


class PretrainedTokenizer(Tokenizer):
    """A transformers fast tokenizer (``tokenizer.json``) as our Tokenizer: its own special tokens and padding id."""

    kind = "pretrained"

    def __init__(self, backend, pad_token_id: int):
        tk = _require_tokenizers()
        if not isinstance(backend, tk.Tokenizer):
            fail("backend", type(backend).__name__, "a tokenizers.Tokenizer")
        self.backend = backend
        self.vocab_size = backend.get_vocab_size()
        if isinstance(pad_token_id, bool) or not isinstance(pad_token_id, int) or not 0 <= pad_token_id < self.vocab_size:
            fail("pad_token_id", pad_token_id, f"a token id in [0, {self.vocab_size})")
        self.special_ids = {"<pad>": pad_token_id}

    @classmethod
    def from_file(cls, path: str | os.PathLike, pad_token_id: int) -> PretrainedTokenizer:
        tk = _require_tokenizers()
        data = _read_json(Path(path), "tokenizer")
        try:
            backend = tk.Tokenizer.from_str(json.dumps(data))
        except Exception as e:  # the tokenizers library raises a bare Exception for a malformed file
            raise ValueError(f"{str(path)!r} is not accepted by the tokenizers library ({e})") from None
        backend.no_truncation()
        backend.no_padding()  # we pad (and cut) batches ourselves
        return cls(backend, pad_token_id)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """str -> ids with the tokenizer's own special tokens (its post-processor) when ``add_special_tokens``."""
        if not isinstance(text, str):
            fail("text", text, "a str")
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def _encode(self, text: str) -> list[int]:
        return self.backend.encode(text, add_special_tokens=False).ids

    def _decode(self, ids: list[int], skip_special_tokens: bool) -> str:
        return self.backend.decode(ids, skip_special_tokens=skip_special_tokens)

    def to_dict(self) -> dict:
        return {"type": self.kind, "pad_token_id": self.pad_token_id, "backend": json.loads(self.backend.to_str())}


def is_transformers_dir(path) -> bool:
    """True for a directory holding a transformers ``config.json`` (with ``model_type``)."""
    if not isinstance(path, (str, os.PathLike)) or not (Path(path) / "config.json").is_file():
        return False
    try:
        return "model_type" in _read_json(Path(path) / "config.json", "model")
    except ValueError:
        return False


def load_text_encoder(directory: str | os.PathLike) -> tuple[nn.Module, PretrainedTokenizer]:
    """(encoder, tokenizer) from a transformers T5 / T5-encoder, BERT or GPT-2 directory; the encoder in eval mode.

    A full T5 (``T5ForConditionalGeneration``) keeps its encoder only; a BERT with a head keeps its backbone.
    """
    from visionformers.convert.from_hf import config_from_hf, from_hf
    from visionformers.hub import load_into, load_weights_file
    from visionformers.text.bert import Bert
    from visionformers.text.gpt import GPT
    from visionformers.text.t5 import T5Encoder

    check_path("directory", directory)
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"text encoder directory {str(directory)!r} does not exist")
    hf_config = _read_json(directory / "config.json", "model")
    kind = hf_config.get("model_type") if isinstance(hf_config, dict) else None
    if kind not in MODEL_TYPES:
        raise ValueError(f"{str(directory / 'config.json')!r}: model_type={kind!r} is not supported as a text "
                         f"encoder; accepted: {list(MODEL_TYPES)}")
    weights = next((directory / w for w in WEIGHTS if (directory / w).is_file()), None)
    if weights is None:
        raise FileNotFoundError(f"text encoder directory {str(directory)!r} has no weights; expected one of {list(WEIGHTS)}")
    config = config_from_hf(hf_config)
    state = from_hf(load_weights_file(weights, name="weights file"), config)
    cls = {"t5": T5Encoder, "bert": Bert, "gpt2": GPT}[kind]
    model = cls(config)
    own = model.state_dict()
    if kind == "bert" and not any(k in own for k in state):
        state = {k[len("bert."):]: v for k, v in state.items() if k.startswith("bert.")}
    if kind in ("t5", "bert"):  # a T5's decoder, a BERT head: not part of the encoder
        state = {k: v for k, v in state.items() if k in own}
    load_into(model, state, source=str(weights))
    pad = hf_config.get("pad_token_id")
    if pad is None:  # GPT-2 has no padding token; the causal encoder never attends to right padding anyway
        pad = hf_config.get("eos_token_id", 0)
    tokenizer = PretrainedTokenizer.from_file(directory / TOKENIZER_NAME, pad)
    return model.eval(), tokenizer


def load_saved_tokenizer(directory: str | os.PathLike) -> Tokenizer:
    """The tokenizer saved beside an encoder (``tokenizer.json`` from ``Tokenizer.save``)."""
    from visionformers.text.tokenizer import load_tokenizer

    data = _read_json(Path(directory) / TOKENIZER_NAME, "tokenizer")
    if isinstance(data, dict) and data.get("type") == PretrainedTokenizer.kind:
        tk = _require_tokenizers()
        try:
            backend = tk.Tokenizer.from_str(json.dumps(data["backend"]))
        except Exception as e:
            raise ValueError(f"{str(Path(directory) / TOKENIZER_NAME)!r}: backend is not accepted ({e})") from None
        return PretrainedTokenizer(backend, data.get("pad_token_id"))
    return load_tokenizer(directory)

