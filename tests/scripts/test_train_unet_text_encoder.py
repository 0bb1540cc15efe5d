"""train_unet.py --text_encoder <transformers dir>: pretrained T5 weights + its tokenizer, carried by the export;
sample grids prompt with the user's captions; a captions file that names no image is an error;
--train_text_encoder trains it jointly, resumes bit-identically (one process and two) and exports it."""
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from _unet_script_helpers import SAMPLE, TINY, TRAIN, assert_same_files, load_script, run, tensors

from visionformers.training import checkpoint as ckpt
from PIL import Image
from safetensors import safe_open

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


def _t5_dir(path):
    cfg = transformers.T5Config(vocab_size=16, d_model=16, d_kv=4, d_ff=32, num_layers=1, num_heads=4,
                                relative_attention_num_buckets=8)
    torch.manual_seed(0)
    transformers.T5EncoderModel(cfg).save_pretrained(path)
    _tokenizer(path)
    return path


def test_pretrained_t5_dir_trains_exports_and_samples(tmp_path):
    t5 = _t5_dir(tmp_path / "t5")
    (tmp_path / "imgs").mkdir()
    images = _folder(tmp_path / "imgs")
    out = tmp_path / "out"
    load_script(TRAIN).main([*TINY, "--max_train_steps", "4", "--checkpointing_steps", "2", "--conditioning", "text",
                             "--text_encoder", str(t5), "--train_data_dir", str(images),
                             "--captions_file", str(images / "captions.jsonl"), "--train_batch_size", "4",
                             "--output_dir", str(out)])
    saved = json.loads((out / "model" / "text_encoder" / "tokenizer.json").read_text())
    assert saved["type"] == "pretrained" and saved["pad_token_id"] == 0
    # the frozen encoder's weights are written once: the second checkpoint links them, and keeps its tokenizer
    first, second = (out / f"checkpoint-{i}" / "text_encoder" for i in (2, 4))
    assert (first / "model.safetensors").stat().st_ino == (second / "model.safetensors").stat().st_ino
    assert json.loads((second / "tokenizer.json").read_text()) == saved
    assert ckpt.checkpoint_problem(second.parent, verify=True) is None
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


def test_train_text_encoder_resumes_bit_identically_and_exports_the_trained_encoder(tmp_path):
    t5 = _t5_dir(tmp_path / "t5")
    (tmp_path / "imgs").mkdir()
    images = _folder(tmp_path / "imgs")
    common = [*TINY, "--conditioning", "text", "--text_encoder", str(t5), "--train_text_encoder",
              "--text_encoder_learning_rate", "3e-4", "--train_data_dir", str(images), "--captions_file",
              str(images / "captions.jsonl"), "--train_batch_size", "2", "--gradient_accumulation_steps", "2",
              "--max_train_steps", "6", "--checkpointing_steps", "3", "--ema_max_decay", "0.5"]
    train = load_script(TRAIN)
    train.main([*common, "--output_dir", str(tmp_path / "a")])
    train.main([*common, "--output_dir", str(tmp_path / "b"), "--stop_after_steps", "3"])
    train.main([*common, "--output_dir", str(tmp_path / "b"), "--resume_from_checkpoint", "latest"])
    a, b = tmp_path / "a", tmp_path / "b"
    assert_same_files(a / "checkpoint-6", b / "checkpoint-6")
    assert_same_files(a / "model", b / "model", names=("model.safetensors", "text_encoder/model.safetensors"))
    # one optimizer over both models, keyed by name, with the encoder's own learning rate
    moments = tensors(a / "checkpoint-6" / "optimizer.safetensors")
    assert {k.split(".")[0] for k in moments} == {"denoiser", "text_encoder"}
    with safe_open(str(a / "checkpoint-6" / "optimizer.safetensors"), "pt") as f:
        skeleton = json.loads(f.metadata()["skeleton"])
    assert sorted({g["initial_lr"] for g in skeleton["param_groups"]}) == [3e-4, 1e-3]

    from visionformers import load_pipeline
    from visionformers.text.pretrained import load_text_encoder

    exported = tensors(a / "model" / "text_encoder" / "model.safetensors")
    ema = tensors(a / "checkpoint-6" / "ema.safetensors")
    original = load_text_encoder(t5)[0].state_dict()
    assert exported.keys() == original.keys()
    for k in exported:  # the exported encoder is the EMA of the trained one, which moved away from the T5 it began as
        assert torch.equal(exported[k], ema["text_encoder.encoder." + k]), k
    assert max((exported[k] - original[k]).abs().max() for k in exported) > 1e-4
    from_export, from_checkpoint = load_pipeline(a / "model"), load_pipeline(a / "checkpoint-6")
    for x, y in ((from_export.model, from_checkpoint.model), (from_export.text_encoder, from_checkpoint.text_encoder)):
        for (k, v), w in zip(x.state_dict().items(), y.state_dict().values()):
            assert torch.equal(v, w), k
    images = from_export.sample(2, prompts=["blue zero"], steps=2, guidance_scale=2.0,
                                generator=torch.Generator().manual_seed(0))
    assert images.shape == (2, 3, 8, 8) and torch.isfinite(images).all()  # the folder loads as RGB


def test_train_text_encoder_two_processes_resume(tmp_path):
    common = [*TINY, "--conditioning", "text", "--train_text_encoder", "--max_train_steps", "4",
              "--checkpointing_steps", "2"]
    run(TRAIN, [*common, "--output_dir", str(tmp_path / "split"), "--stop_after_steps", "2"], nproc=2)
    run(TRAIN, [*common, "--output_dir", str(tmp_path / "split"), "--resume_from_checkpoint", "latest"], nproc=2)
    run(TRAIN, [*common, "--output_dir", str(tmp_path / "straight")], nproc=2)
    # equal up to fp32 round-off (gloo all-reduce order), encoder included
    assert_same_files(tmp_path / "split" / "checkpoint-4", tmp_path / "straight" / "checkpoint-4", atol=1e-6)
    weights = tensors(tmp_path / "straight" / "checkpoint-4" / "model.safetensors")
    assert {k.split(".")[0] for k in weights} == {"denoiser", "text_encoder"}


@pytest.mark.parametrize("flags, message", [
    (["--train_text_encoder"], "--train_text_encoder needs --conditioning text"),
    (["--conditioning", "text", "--no-train_text_encoder", "--text_encoder_learning_rate", "1e-4"],
     "applies to --train_text_encoder"),
    (["--conditioning", "text", "--train_text_encoder", "--text_encoder_learning_rate", "0"],
     "--text_encoder_learning_rate"),
    (["--conditioning", "text", "--text_encoder", "no/such/dir"], "text_encoder='no/such/dir'.*transformers model"),
])
def test_train_text_encoder_bad_flags(tmp_path, flags, message):
    with pytest.raises(ValueError, match=message):
        load_script(TRAIN).main([*TINY, *flags, "--max_train_steps", "1", "--output_dir", str(tmp_path)])


def test_resume_must_keep_train_text_encoder(tmp_path):
    common = [*TINY, "--conditioning", "text", "--max_train_steps", "4", "--checkpointing_steps", "2",
              "--output_dir", str(tmp_path)]
    train = load_script(TRAIN)
    train.main([*common, "--stop_after_steps", "2"])  # a preset encoder (random weights) is trained by default
    assert ckpt.read_state(tmp_path / "checkpoint-2")["config"]["train_text_encoder"] is True
    with pytest.raises(ValueError, match="--train_text_encoder false"):
        train.main([*common, "--no-train_text_encoder", "--resume_from_checkpoint", "latest"])
    # a run saved before the flag existed kept its encoder frozen: resuming it must say so, not train it
    state = json.loads((tmp_path / "checkpoint-2" / "state.json").read_text())
    del state["config"]["train_text_encoder"]
    (tmp_path / "checkpoint-2" / "state.json").write_text(json.dumps(state))
    (tmp_path / "run.json").unlink()
    with pytest.raises(ValueError, match="--train_text_encoder true \\(saved: false\\)"):
        train.main([*common, "--resume_from_checkpoint", "latest"])


def test_text_defaults_pretrained_frozen_preset_trained_both_pooled(tmp_path):
    train = load_script(TRAIN)
    preset = train.parse_args(["--conditioning", "text"])
    pretrained = train.parse_args(["--conditioning", "text", "--text_encoder", str(_t5_dir(tmp_path / "t5"))])
    assert preset.train_text_encoder is True and pretrained.train_text_encoder is False
    assert train.parse_args([]).train_text_encoder is False  # class conditioning: no text encoder
    from visionformers.training import pipeline

    assert pipeline.build_denoiser("unet_tiny", 1, 8, context_dim=16).config.pooled_context is True
    assert pipeline.build_denoiser("dit_tiny", 1, 8, context_dim=16).config.pooled_context is True
    assert pipeline.build_denoiser("unet_tiny", 1, 8, context_dim=16,
                                   overrides={"pooled_context": False}).config.pooled_context is False
    assert pipeline.build_denoiser("unet_tiny", 1, 8, num_classes=3).config.pooled_context is False


def test_prompt_following_example(tmp_path):
    import importlib.util

    from visionformers.data import CAPTION_TEMPLATES, digit_caption

    spec = importlib.util.spec_from_file_location("prompt_following", TRAIN.parents[1] / "examples" / "prompt_following.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    prompts, digits = example.prompts_of(30, 1)
    assert digits.tolist() == [i % 10 for i in range(30)]
    assert prompts[0] == digit_caption(0, 1) and prompts[10] == digit_caption(0, 2) and len(CAPTION_TEMPLATES) > 3
    load_script(TRAIN).main([*TINY, "--max_train_steps", "2", "--conditioning", "text", "--output_dir", str(tmp_path)])
    rows = example.main([f"tiny={tmp_path / 'model'}", "--num_images", "10", "--rounds", "2", "--num_inference_steps",
                         "2", "--output", str(tmp_path / "pf.json")])
    assert json.loads((tmp_path / "pf.json").read_text()) == rows
    (row,) = rows
    assert row["prompts"] == 20 and len(row["per_round"]) == 2 and row["followed"] == round(sum(row["per_round"]) * 10)
