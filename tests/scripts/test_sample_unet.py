"""sample_unet.py: loads an export or a checkpoint, writes grid + per-image PNGs + settings; bad input is named.
(1 vs 2 processes giving identical images is checked in test_train_unet.py, after a multi-process run.)"""
import json

import numpy as np
import pytest
import torch
from _unet_script_helpers import SAMPLE, TINY, TRAIN, load_script
from PIL import Image
from safetensors.torch import load_file

from visionformers.training import pipeline


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("trained")
    load_script(TRAIN).main([*TINY, "--max_train_steps", "2", "--checkpointing_steps", "2", "--output_dir", str(out)])
    return out


def _pngs(d):
    return [np.asarray(Image.open(p)) for p in sorted((d / "images").glob("*.png"))]


def test_export_and_checkpoint_ema_give_the_same_images(trained, tmp_path):
    sample = load_script(SAMPLE)
    args = ["--num_images", "3", "--num_inference_steps", "2", "--class_labels", "7", "--seed", "5"]
    sample.main(["--model_path", str(trained / "model"), *args, "--output_dir", str(tmp_path / "a")])
    sample.main(["--model_path", str(trained / "checkpoint-2"), *args, "--output_dir", str(tmp_path / "b")])
    a, b = _pngs(tmp_path / "a"), _pngs(tmp_path / "b")
    assert len(a) == 3 and all(np.array_equal(x, y) for x, y in zip(a, b))
    assert a[0].shape == (8, 8)
    record = json.loads((tmp_path / "a" / "settings.json").read_text())
    assert [im["class_label"] for im in record["images"]] == [7, 7, 7]
    assert [im["seed"] for im in record["images"]] == [5, 6, 7]
    assert record["diffusion"]["conditioning"] == "class" and record["sampler"] == "ddim"
    assert Image.open(tmp_path / "a" / "grid.png").size[0] > 8


def test_checkpoint_loads_ema_or_raw_weights(trained):
    ema, _, _ = pipeline.load_denoiser(trained / "checkpoint-2")
    raw, settings, _ = pipeline.load_denoiser(trained / "checkpoint-2", use_ema=False)
    for name, files in (("ema", ema), ("model", raw)):
        saved = load_file(str(trained / "checkpoint-2" / f"{name}.safetensors"))
        assert all(torch.equal(v, saved[k]) for k, v in files.state_dict().items())
    assert not all(torch.equal(a, b) for a, b in zip(ema.parameters(), raw.parameters()))
    assert settings["num_classes"] == 10 and settings["resolution"] == 8 and not ema.training


def test_bad_inputs_are_named(trained, tmp_path):
    sample = load_script(SAMPLE)
    with pytest.raises(ValueError, match="class_labels"):
        sample.main(["--model_path", str(trained / "model"), "--class_labels", "12", "--num_images", "1",
                     "--output_dir", str(tmp_path)])
    with pytest.raises(FileNotFoundError, match="diffusion.json"):
        sample.main(["--model_path", str(tmp_path), "--output_dir", str(tmp_path / "x")])
    with pytest.raises(FileNotFoundError, match="model path"):
        sample.main(["--model_path", str(tmp_path / "nope")])


@pytest.mark.parametrize("train_text_encoder", [False, True])
def test_text_conditioning_trains_exports_and_samples(tmp_path, train_text_encoder):
    out = tmp_path / "text"
    flag = "--train_text_encoder" if train_text_encoder else "--no-train_text_encoder"
    load_script(TRAIN).main([*TINY, "--max_train_steps", "2", "--checkpointing_steps", "2", "--conditioning", "text",
                             flag, "--output_dir", str(out)])
    assert (out / "model" / "text_encoder" / "model.safetensors").is_file()
    # a frozen encoder is a model directory of the checkpoint; a trained one is in the checkpoint's own state dict
    files = json.loads((out / "checkpoint-2" / "state.json").read_text())["files"]
    assert ("text_encoder/model.safetensors" in files) != train_text_encoder and "text_encoder/config.json" in files
    sample = load_script(SAMPLE)
    args = ["--prompts", "the digit three", "7", "--num_images", "3", "--num_inference_steps", "2"]
    sample.main(["--model_path", str(out / "model"), *args, "--output_dir", str(tmp_path / "a")])
    sample.main(["--model_path", str(out / "checkpoint-2"), *args, "--output_dir", str(tmp_path / "b")])
    assert all(np.array_equal(x, y) for x, y in zip(_pngs(tmp_path / "a"), _pngs(tmp_path / "b")))
    record = json.loads((tmp_path / "a" / "settings.json").read_text())
    assert [im["prompt"] for im in record["images"]] == ["the digit three", "7", "the digit three"]
    with pytest.raises(SystemExit, match="prompts"):
        sample.main(["--model_path", str(out / "model"), "--output_dir", str(tmp_path / "c")])


def test_flow_model_trains_exports_and_samples_without_extra_flags(tmp_path):
    out = tmp_path / "flow"
    load_script(TRAIN).main([*TINY, "--max_train_steps", "2", "--checkpointing_steps", "0", "--noise_schedule", "flow",
                             "--flow_shift", "2", "--timestep_sampling", "logit_normal", "--output_dir", str(out)])
    settings = json.loads((out / "model" / "diffusion.json").read_text())
    assert settings["noise_schedule"] == "flow" and settings["flow_shift"] == 2.0
    assert settings["prediction_type"] == "flow"
    assert repr(pipeline.schedule_from(settings)) == "RectifiedFlow(shift=2.0, num_train_steps=1000)"
    sample = load_script(SAMPLE)
    args = ["--model_path", str(out / "model"), "--num_images", "3", "--num_inference_steps", "2"]
    sample.main([*args, "--guidance_interval", "0.5", "inf", "--guidance_rescale", "0.7",
                 "--output_dir", str(tmp_path / "a")])
    record = json.loads((tmp_path / "a" / "settings.json").read_text())
    assert record["sampler"] == "heun" and len(_pngs(tmp_path / "a")) == 3
    with pytest.raises(ValueError, match="sampler='ddim'.*RectifiedFlow"):
        sample.main([*args, "--sampler", "ddim", "--output_dir", str(tmp_path / "b")])
    with pytest.raises(ValueError, match="--guidance_interval"):
        sample.main([*args, "--guidance_interval", "2", "1", "--output_dir", str(tmp_path / "b")])


@pytest.mark.parametrize("flags, match", [
    (["--prediction_type", "eps"], "prediction_type='eps'.*RectifiedFlow"),
    (["--sampler", "ddpm"], "sampler='ddpm'"),
    (["--flow_shift", "0"], "--flow_shift=0.0"),
    (["--logit_std", "0"], "--logit_std=0.0"),
])
def test_bad_flow_flags_are_named(flags, match, tmp_path):
    with pytest.raises(ValueError, match=match):
        load_script(TRAIN).main([*TINY, "--max_train_steps", "1", "--noise_schedule", "flow", *flags,
                                 "--output_dir", str(tmp_path)])
