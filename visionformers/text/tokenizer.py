"""Tokenizers: a byte-level one that needs no files, and a byte-level BPE trained on your own text.

Both map text to ids and back, pad batches into ``(input_ids, attention_mask)`` tensors and save to
``tokenizer.json`` beside a model (``save(dir)`` / ``load_tokenizer(dir)``). The BPE tokenizer uses the
``tokenizers`` library (the "bpe" extra); it is imported only when a BPE tokenizer is built or loaded.
"""
from __future__ import annotations

import json
import numbers
import os
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch

from visionformers._io import atomic_write_bytes
from visionformers._validate import check_choice, check_device, check_path, fail

__all__ = ["Tokenizer", "ByteTokenizer", "BPETokenizer", "load_tokenizer", "SPECIAL_TOKENS", "TOKENIZER_NAME"]

TOKENIZER_NAME = "tokenizer.json"
SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<unk>", "<mask>")


class Tokenizer(ABC):
    """Shared batching, padding and saving; subclasses implement ``_encode`` / ``_decode`` and ``to_dict``."""

    kind = "base"
    vocab_size: int
    special_ids: dict[str, int]  # "<pad>" -> id, ...

    @property
    def pad_token_id(self) -> int:
        return self.special_ids["<pad>"]

    @property
    def bos_token_id(self) -> int:
        return self.special_ids["<bos>"]

    @property
    def eos_token_id(self) -> int:
        return self.special_ids["<eos>"]

    @property
    def unk_token_id(self) -> int:
        return self.special_ids["<unk>"]

    @property
    def mask_token_id(self) -> int:
        return self.special_ids["<mask>"]

    def __len__(self) -> int:
        return self.vocab_size

    @abstractmethod
    def _encode(self, text: str) -> list[int]:
        """str -> ids without special tokens."""

    @abstractmethod
    def _decode(self, ids: list[int], skip_special_tokens: bool) -> str:
        """ids -> str."""

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """str -> ids, wrapped as <bos> ... <eos> when ``add_special_tokens``."""
        if not isinstance(text, str):
            fail("text", text, "a str")
        ids = self._encode(text)
        return [self.bos_token_id, *ids, self.eos_token_id] if add_special_tokens else ids

    def decode(self, ids: Sequence[int] | torch.Tensor, skip_special_tokens: bool = True) -> str:
        """ids (a list of ints or a 1D integer tensor, each in [0, vocab_size)) -> str; decoding stops at nothing,
        special tokens are dropped or shown."""
        return self._decode(self._check_ids(ids, "ids"), skip_special_tokens)

    def batch_decode(self, ids: torch.Tensor | Sequence[Sequence[int]], skip_special_tokens: bool = True) -> list[str]:
        """ids (a 2D integer tensor or a list of lists of ints) -> one str per row."""
        if isinstance(ids, torch.Tensor) or hasattr(ids, "tolist"):  # a tensor or a NumPy array
            if getattr(ids, "ndim", None) != 2:
                fail("ids", ids if isinstance(ids, torch.Tensor) else type(ids).__name__,
                     "a 2D tensor or a list of lists of ints (use decode for one sequence)")
        elif isinstance(ids, (str, bytes)) or not isinstance(ids, Iterable):
            fail("ids", ids, "a 2D tensor or a list of lists of ints (use decode for one sequence)")
        return [self._decode(self._check_ids(row, f"ids[{i}]"), skip_special_tokens) for i, row in enumerate(ids)]

    def _check_ids(self, ids, name: str) -> list[int]:
        """One sequence of token ids -> list of int; ValueError unless every id is an integer in [0, vocab_size)."""
        accepted = f"a list of ints or a 1D integer tensor of token ids in [0, vocab_size={self.vocab_size})"
        if isinstance(ids, torch.Tensor):
            if ids.ndim != 1:
                fail(name, ids, f"{accepted} (use batch_decode for a batch)")
            if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
                fail(name, ids, accepted)
            values = ids.tolist()
        elif isinstance(ids, (str, bytes)) or not isinstance(ids, Iterable):
            fail(name, ids, accepted)
        else:
            values = ids.tolist() if hasattr(ids, "tolist") else list(ids)  # a NumPy array: Python scalars
        for v in values:
            if isinstance(v, bool) or not isinstance(v, numbers.Integral):
                fail(f"{name} (element {v!r})", ids, accepted)
            if not 0 <= v < self.vocab_size:
                fail(f"{name} (token id {v})", ids, accepted)
        return [int(v) for v in values]

    def __call__(
        self,
        texts: str | Sequence[str],
        max_length: int | None = None,
        padding: str = "longest",
        add_special_tokens: bool = True,
        device: str | torch.device | None = None,
    ) -> dict[str, torch.Tensor]:
        """Batch of strings -> {"input_ids": (B, L) long, "attention_mask": (B, L) bool (True = real token)}.

        Longer texts are cut to ``max_length`` keeping the final <eos>; ``padding="max_length"`` pads every
        row to ``max_length`` (a fixed context length, as CLIP's 77), "longest" to the longest row.
        """
        if isinstance(texts, str):
            texts = [texts]
        if not isinstance(texts, Sequence) or not texts or not all(isinstance(t, str) for t in texts):
            fail("texts", texts, "a str or a non-empty list of str")
        check_choice("padding", padding, ("longest", "max_length"))
        if max_length is not None and (isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2):
            fail("max_length", max_length, "None or an integer >= 2")
        if padding == "max_length" and max_length is None:
            fail("max_length", None, "an integer when padding='max_length'")
        if device is not None:
            check_device("device", device)
        rows = [self.encode(t, add_special_tokens) for t in texts]
        if max_length is not None:
            rows = [r if len(r) <= max_length else (r[: max_length - 1] + [r[-1]] if add_special_tokens else r[:max_length]) for r in rows]
        width = max_length if padding == "max_length" else max(1, max(len(r) for r in rows))
        ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros(len(rows), width, dtype=torch.bool)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
            mask[i, : len(r)] = True
        return {"input_ids": ids.to(device), "attention_mask": mask.to(device)}

    @abstractmethod
    def to_dict(self) -> dict:
        """JSON-ready description from which ``load_tokenizer`` rebuilds this tokenizer."""

    def save(self, directory: str | os.PathLike) -> Path:
        """Write ``tokenizer.json`` into ``directory`` (atomically), beside ``config.json`` of a model."""
        check_path("directory", directory)
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(out / TOKENIZER_NAME, json.dumps(self.to_dict()).encode())
        return out / TOKENIZER_NAME


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes are ids 0..255; <pad>=256, <bos>=257, <eos>=258, <unk>=259, <mask>=260 (vocab 261)."""

    kind = "byte"

    def __init__(self):
        self.special_ids = {tok: 256 + i for i, tok in enumerate(SPECIAL_TOKENS)}
        self.vocab_size = 256 + len(SPECIAL_TOKENS)

    def _encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def _decode(self, ids: list[int], skip_special_tokens: bool) -> str:
        names = {v: k for k, v in self.special_ids.items()}
        out, buf = [], bytearray()
        for i in ids:
            if 0 <= i < 256:
                buf.append(i)
                continue
            out.append(buf.decode("utf-8", errors="replace"))
            buf = bytearray()
            if not skip_special_tokens:
                out.append(names.get(i, "<unk>"))
        out.append(buf.decode("utf-8", errors="replace"))
        return "".join(out)

    def to_dict(self) -> dict:
        return {"type": self.kind, "vocab_size": self.vocab_size}


def _require_tokenizers():
    try:
        import tokenizers
    except ImportError:
        raise ImportError(
            "BPETokenizer needs the `tokenizers` library: pip install 'visionformers[bpe]' (or use ByteTokenizer, "
            "which needs no files)"
        ) from None
    return tokenizers


class BPETokenizer(Tokenizer):
    """Byte-level BPE (Radford et al. 2019, sec. 2.2) trained with the ``tokenizers`` library; specials are ids 0..4."""

    kind = "bpe"

    def __init__(self, backend):
        tk = _require_tokenizers()
        if not isinstance(backend, tk.Tokenizer):
            fail("backend", type(backend).__name__, "a tokenizers.Tokenizer (build one with BPETokenizer.train or load_tokenizer)")
        self.backend = backend  # a tokenizers.Tokenizer
        self.special_ids = {tok: backend.token_to_id(tok) for tok in SPECIAL_TOKENS}
        if any(v is None for v in self.special_ids.values()):
            fail("backend", "a tokenizer without our special tokens", f"a tokenizer holding {list(SPECIAL_TOKENS)}")
        self.vocab_size = backend.get_vocab_size()

    @classmethod
    def train(cls, texts: Iterable[str] | str | os.PathLike, vocab_size: int = 4096, min_frequency: int = 2) -> BPETokenizer:
        """Learn merges from an iterable of strings, or from a text file path."""
        tk = _require_tokenizers()
        if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size <= 256 + len(SPECIAL_TOKENS):
            fail("vocab_size", vocab_size, f"an integer > {256 + len(SPECIAL_TOKENS)} (the byte alphabet plus specials)")
        if isinstance(min_frequency, bool) or not isinstance(min_frequency, int) or min_frequency < 0:
            fail("min_frequency", min_frequency, "an integer >= 0 (merges of rarer pairs are not learned)")
        if isinstance(texts, (str, os.PathLike)):
            path = Path(texts)
            if not path.is_file():
                raise FileNotFoundError(f"texts={str(path)!r} is not a file; pass a text file path or an iterable of str")
            texts = path.read_text(encoding="utf-8").splitlines(keepends=True)
        elif not isinstance(texts, Iterable):
            fail("texts", type(texts).__name__, "an iterable of str or a text file path")
        else:
            texts = _checked_texts(texts)
        backend = tk.Tokenizer(tk.models.BPE(unk_token="<unk>"))
        backend.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
        backend.decoder = tk.decoders.ByteLevel()
        trainer = tk.trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=min_frequency,
            special_tokens=list(SPECIAL_TOKENS),
            initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet(),  # every byte stays encodable
            show_progress=False,
        )
        backend.train_from_iterator(texts, trainer)
        return cls(backend)

    def _encode(self, text: str) -> list[int]:
        return self.backend.encode(text, add_special_tokens=False).ids

    def _decode(self, ids: list[int], skip_special_tokens: bool) -> str:
        return self.backend.decode(ids, skip_special_tokens=skip_special_tokens)

    def to_dict(self) -> dict:
        return {"type": self.kind, "vocab_size": self.vocab_size, "backend": json.loads(self.backend.to_str())}


def _checked_texts(texts: Iterable) -> Iterable[str]:
    """Yield ``texts`` lazily (a corpus may be a generator), raising the ValueError at the first non-str item."""
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            fail(f"texts[{i}]", text, "a str (texts: an iterable of str or a text file path)")
        yield text


def load_tokenizer(directory: str | os.PathLike) -> Tokenizer:
    """Read ``tokenizer.json`` written by ``Tokenizer.save``."""
    check_path("directory", directory)
    path = Path(directory) / TOKENIZER_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{str(path)!r} is missing; save a tokenizer with tokenizer.save(directory)")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{str(path)!r} is not valid JSON ({e})") from None
    kind = data.get("type") if isinstance(data, dict) else None
    if kind == ByteTokenizer.kind:
        return ByteTokenizer()
    if kind == BPETokenizer.kind:
        tk = _require_tokenizers()
        backend = data.get("backend")
        if not isinstance(backend, dict):
            raise ValueError(f"{str(path)!r}: backend={backend!r:.80} is not accepted; expected the tokenizers JSON object "
                             "that BPETokenizer.save writes")
        try:
            backend = tk.Tokenizer.from_str(json.dumps(backend))
        except Exception as e:  # the tokenizers library raises a bare Exception for a malformed model
            raise ValueError(f"{str(path)!r}: backend is not accepted by the tokenizers library ({e})") from None
        try:
            return BPETokenizer(backend)
        except ValueError as e:
            raise ValueError(f"{str(path)!r}: {e}") from None
    raise ValueError(f"{str(path)!r}: type={kind!r} is not accepted; expected 'byte' or 'bpe'")
