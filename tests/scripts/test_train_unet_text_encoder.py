"""train_unet.py --text_encoder <transformers dir>: pretrained T5 weights + its tokenizer, carried by the export;
sample grids prompt with the user's captions; a captions file that names no image is an error."""
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from _unet_script_helpers import SAMPLE, TINY, TRAIN, load_script
from PIL import Image

sys.path.insert(0, str(Path(__file__).parents[1] / "text"))
transformers = pytest.importorskip("transformers")
from test_pretrained import _tokenizer  # noqa: E402


def _folder(root):
    rng = np.random.default_rng(0)
    rows = []
    for i in range(4):
        Image.fromarray(rng.integers(0, 255, (8, 8), dtype=np.uint8), mode="L").save(root / f"{i}.png")
        rows.append({"file_name": f"{i}.png", "text": ["a red digit", "blue zero", "seven on a ground", "a digit"][i]})
    (root / "captions.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    return root


def test_pretrained_t5_dir_trains_exports_and_samples(tmp_path):
    t5 = tmp_path / "t5"
    cfg = transformers.T5Config(vocab_size=16, d_model=16, d_kv=4, d_ff=32, num_layers=1, num_heads=4,
                                relative_attention_num_buckets=8)
    transformers.T5EncoderModel(cfg).save_pretrained(t5)
    _tokenizer(t5)
    (tmp_path / "imgs").mkdir()
    images = _folder(tmp_path / "imgs")
    out = tmp_path / "out"
    load_script(TRAIN).main([*TINY, "--max_train_steps", "2", "--checkpointing_steps", "2", "--conditioning", "text",
                             "--text_encoder", str(t5), "--train_data_dir", str(images),
                             "--captions_file", str(images / "captions.jsonl"), "--train_batch_size", "4",
                             "--output_dir", str(out)])
    saved = json.loads((out / "model" / "text_encoder" / "tokenizer.json").read_text())
    assert saved["type"] == "pretrained" and saved["pad_token_id"] == 0
    from visionformers.training import pipeline

    _, _, conditioner = pipeline.load_denoiser(out / "model")
    ids = conditioner.tokenize(["a red digit"])["input_ids"]
    assert ids.tolist() == [[3, 4, 6, 1]]  # the word-level ids of tokenizer.json, then </s>
    ref = transformers.T5EncoderModel.from_pretrained(t5).eval()
    with torch.no_grad():
        context, _ = conditioner(["a red digit"])
        assert torch.allclose(context, ref(input_ids=ids).last_hidden_state, atol=1e-5)
    load_script(SAMPLE).main(["--model_path", str(out / "model"), "--prompts", "blue zero", "--num_images", "2",
                              "--num_inference_steps", "2", "--output_dir", str(tmp_path / "s")])
    assert len(list((tmp_path / "s" / "images").glob("*.png"))) == 2


def test_sample_prompts_come_from_the_captions(tmp_path):
    from visionformers import data

    train = load_script(TRAIN)
    ds = data.ImageFolderDataset(_folder(tmp_path), 8, captions_file=tmp_path / "captions.jsonl")
    assert train.sample_prompts(ds, 4) == ["a red digit", "blue zero", "seven on a ground", "a digit"]
    (tmp_path / "other.jsonl").write_text(json.dumps({"file_name": "elsewhere/x.png", "text": "x"}))
    with pytest.raises(ValueError, match="captions_file"):
        data.ImageFolderDataset(tmp_path, 8, captions_file=tmp_path / "other.jsonl")
