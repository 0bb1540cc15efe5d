"""train_unet.py --vae: latent DiT / UNet with class, text or no conditioning, exact resume with the latent cache,
sampling from the exported directory with no extra flag, and the bad inputs of latent training."""
from __future__ import annotations

import json

import pytest
import torch
from _unet_script_helpers import SAMPLE, TINY, TRAIN, assert_same_files, load_script
from PIL import Image

import visionformers as vf

DIT = ["--model", "dit_tiny", "--model_overrides", '{"patch_size": 1, "hidden_size": 16, "depth": 1, "num_heads": 2}']
COMMON = ["--resolution", "8", "--train_batch_size", "8", "--num_samples", "4", "--num_inference_steps", "2",
          "--lr_warmup_steps", "1", "--logging_steps", "2"]


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory):
    torch.manual_seed(0)  # factor 2: 8 px digits -> 4 x 4 latents of 4 channels
    vae = vf.create_model("vae_tiny", in_channels=1, out_channels=1, block_out_channels=(8, 8), norm_num_groups=4,
                          sample_size=8, scaling_factor=0.7)
    return vf.save_pretrained(vae, tmp_path_factory.mktemp("vae") / "vae")


@pytest.fixture(scope="module")
def train():
    return load_script(TRAIN).main


@pytest.fixture(scope="module")
def sample():
    return load_script(SAMPLE).main


def test_latent_dit_resumes_exactly_then_samples_pixels(tmp_path, vae_dir, train, sample, capsys):
    common = [*DIT, *COMMON, "--vae", str(vae_dir), "--max_train_steps", "4", "--checkpointing_steps", "2"]
    train([*common, "--output_dir", str(tmp_path / "a")])
    train([*common, "--output_dir", str(tmp_path / "b"), "--stop_after_steps", "2"])
    capsys.readouterr()
    train([*common, "--output_dir", str(tmp_path / "b"), "--resume_from_checkpoint", "latest"])
    out = capsys.readouterr().out
    assert "reused" in out and "encoded" not in out  # the resumed run reads the cache the first one wrote
    assert_same_files(tmp_path / "a" / "checkpoint-4", tmp_path / "b" / "checkpoint-4")
    # the frozen VAE's bytes exist once per run: later checkpoints (of the resumed run too) hard-link them
    for run in "ab":
        inodes = {(tmp_path / run / f"checkpoint-{i}" / "vae" / "model.safetensors").stat().st_ino for i in (2, 4)}
        assert len(inodes) == 1, run
    model = tmp_path / "b" / "model"
    settings = json.loads((model / "diffusion.json").read_text())
    assert settings["latent"] == {"vae": "vae", "channels": 4, "size": 4, "factor": 2, "scaling_factor": 0.7,
                                  "shift_factor": 0.0}
    assert settings["resolution"] == 8 and (model / "vae" / "model.safetensors").is_file()
    assert vf.from_pretrained(model).config.in_channels == 4
    sample(["--model_path", str(model), "--num_images", "3", "--num_inference_steps", "2",
            "--output_dir", str(tmp_path / "s")])
    assert Image.open(tmp_path / "s" / "images" / "000000.png").size == (8, 8)  # decoded to pixels


@pytest.mark.parametrize("model,conditioning", [("unet", "text"), ("dit", "none")])
def test_latent_unet_and_dit_any_conditioning(tmp_path, vae_dir, train, sample, model, conditioning):
    args = [*(TINY[:4] if model == "unet" else DIT), *COMMON, "--vae", str(vae_dir), "--max_train_steps", "2",
            "--checkpointing_steps", "2", "--conditioning", conditioning, "--output_dir", str(tmp_path / "run"),
            "--latent_cache_dir", str(tmp_path / "cache")]
    train(args)
    extra = ["--prompts", "a digit three"] if conditioning == "text" else []
    sample(["--model_path", str(tmp_path / "run" / "checkpoint-2"), "--num_images", "2", "--num_inference_steps", "2",
            "--output_dir", str(tmp_path / "s"), *extra])
    assert Image.open(tmp_path / "s" / "images" / "000001.png").size == (8, 8)
    assert (tmp_path / "cache" / "manifest.json").is_file()


def test_bad_latent_inputs(tmp_path, vae_dir, train):
    base = [*COMMON, "--vae", str(vae_dir), "--output_dir", str(tmp_path / "o"), "--max_train_steps", "1"]
    with pytest.raises(ValueError, match="in_channels.*follows the VAE"):
        train([*base, "--model", "dit_tiny", "--model_overrides", '{"in_channels": 1}'])
    with pytest.raises(ValueError, match="sample_size.*follows the VAE"):
        train([*base, "--model", "dit_tiny", "--model_overrides", '{"sample_size": 8}'])
    with pytest.raises(ValueError, match="--resolution=9.*factor 2"):
        train([*base, "--model", "dit_tiny", "--resolution", "9"])
    with pytest.raises(FileNotFoundError, match="--vae"):
        train([*base[:-4], "--vae", str(tmp_path / "nothing")])
    with pytest.raises(ValueError, match="AutoencoderKL"):
        not_vae = vf.save_pretrained(vf.create_model("dit_tiny"), tmp_path / "dit")
        train([*COMMON, "--vae", str(not_vae), "--output_dir", str(tmp_path / "o")])
    with pytest.raises(ValueError, match="the data's 1 channel"):
        rgb = vf.save_pretrained(vf.create_model("vae_tiny", block_out_channels=(8, 8), norm_num_groups=4,
                                                 sample_size=8), tmp_path / "rgb")
        train([*COMMON, "--vae", str(rgb), "--model", "dit_tiny", "--output_dir", str(tmp_path / "o")])
    with pytest.raises(ValueError, match="--latent_cache_dir"):
        train([*COMMON, "--latent_cache_dir", str(tmp_path / "c"), "--output_dir", str(tmp_path / "o")])
