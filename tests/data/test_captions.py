import json

import pytest

from visionformers.data import CAPTION_TEMPLATES, DIGIT_NAMES, digit_caption, load_captions


def test_every_template_renders_every_digit():
    for t in range(len(CAPTION_TEMPLATES)):
        for d in range(10):
            cap = digit_caption(d, t)
            assert "{" not in cap and (DIGIT_NAMES[d] in cap or str(d) in cap)
            assert "a eight" not in cap


def test_template_index_wraps_and_bad_label():
    assert digit_caption(7, 0) == digit_caption(7, len(CAPTION_TEMPLATES)) == "a handwritten seven"
    with pytest.raises(ValueError, match="label=10"):
        digit_caption(10)


def test_load_captions_jsonl(tmp_path):
    p = tmp_path / "metadata.jsonl"
    p.write_text(json.dumps({"file_name": "a/1.png", "text": "one"}) + "\n\n"
                 + json.dumps({"file_name": "2.png", "caption": "two"}) + "\n")
    assert load_captions(p) == {"a/1.png": "one", "2.png": "two"}


def test_load_captions_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        load_captions(tmp_path / "missing.jsonl")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"file_name": "x.png", "text": "ok"}\n{"name": "y.png"}\n')
    with pytest.raises(ValueError, match="line 2"):
        load_captions(bad)
    bad.write_text("not json\n")
    with pytest.raises(ValueError, match="line 1"):
        load_captions(bad)
