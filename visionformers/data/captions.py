"""Captions: templates that turn a digit label into text, and the captions file of a user image folder.

Captions file format (one simple format, the one Hugging Face ``imagefolder`` calls ``metadata.jsonl``):
JSON lines, one object per image, ``{"file_name": "cats/001.png", "text": "a cat on a sofa"}``.
``file_name`` is the image path relative to the dataset root with ``/`` separators; the caption key may be
``"text"`` or ``"caption"``. Blank lines are ignored.
"""
from __future__ import annotations

import json
import os
from collections.abc import Sequence

import torch

DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")

# {name} is the English word, {digit} the numeral. No template has "a {name}", so "eight" never
# becomes "a eight". Varied wording keeps a text encoder from keying on one fixed string.
CAPTION_TEMPLATES = (
    "a handwritten {name}",
    "the digit {digit}",
    "a drawing of the number {name}",
    "a handwritten digit {digit}",
    "the number {name}, written by hand",
    "a small grayscale image of the digit {digit}",
    "a pen sketch of the number {name}",
    "digit {digit}",
)

CAPTION_KEYS = ("text", "caption")


def digit_caption(label: int, template_index: int = 0, templates: Sequence[str] = CAPTION_TEMPLATES) -> str:
    """The caption of digit ``label`` (0..9) with template ``template_index`` (taken modulo the count)."""
    if not 0 <= int(label) <= 9:
        raise ValueError(f"label={label!r} is not accepted; expected a digit 0..9")
    template = templates[int(template_index) % len(templates)]
    return template.format(name=DIGIT_NAMES[int(label)], digit=int(label))


def pick_template(
    index: int, num_templates: int, random: bool, generator: torch.Generator | None = None
) -> int:
    """Template index for item ``index``: ``index % num_templates`` when fixed, uniform when ``random``.

    Random picks use ``generator`` when given, else torch's global RNG, which a DataLoader seeds per worker.
    """
    if not random:
        return index % num_templates
    return int(torch.randint(num_templates, (1,), generator=generator))


def load_captions(path: str | os.PathLike) -> dict[str, str]:
    """Read a JSON-lines captions file into ``{relative/posix/path: caption}``."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"captions_file={path!r} does not exist")
    captions: dict[str, str] = {}
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"captions_file={path!r} line {line_no}: not valid JSON ({e.msg})") from None
            key = next((k for k in CAPTION_KEYS if isinstance(row, dict) and k in row), None)
            if not isinstance(row, dict) or "file_name" not in row or key is None:
                raise ValueError(
                    f"captions_file={path!r} line {line_no}: expected an object with 'file_name' and one of "
                    f"{list(CAPTION_KEYS)}, got {line.strip()[:80]!r}"
                )
            captions[str(row["file_name"]).replace("\\", "/")] = str(row[key])
    return captions


def read_sidecar_caption(image_path: str) -> str | None:
    """The caption in ``<image stem>.txt`` beside the image, or None when there is none."""
    txt = os.path.splitext(image_path)[0] + ".txt"
    if not os.path.isfile(txt):
        return None
    with open(txt, encoding="utf-8") as f:
        return f.read().strip()
