"""vf.load_pipeline: diffusers pipeline dirs sample the same images as diffusers; our dirs; label names."""
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent / "convert"))
sys.path.insert(0, str(Path(__file__).parent / "scripts"))
from _diffusers_models import ddpm_cifar10_unet, diffusers  # noqa: E402
from _unet_script_helpers import SAMPLE, load_script  # noqa: E402

import visionformers as vf  # noqa: E402
from visionformers.pipeline import Pipeline  # noqa: E402


def _unet():
    """A shrunk ddpm-cifar10-32 UNet whose random output is scaled down, so that images are not all saturated."""
    unet = ddpm_cifar10_unet()
    with torch.no_grad():
        unet.conv_out.weight.mul_(0.2)
        unet.conv_out.bias.mul_(0.2)
    return unet


def _ours(model_dir, out, *args):
    load_script(SAMPLE).main(["--model_path", str(model_dir), "--num_images", "3", "--batch_size", "3", "--seed", "11",
                              "--output_dir", str(out), *args])
    return [np.asarray(Image.open(p)).astype(int) for p in sorted((out / "images").glob("*.png"))]


def _theirs(pipe, steps, **kw):
    """diffusers' pipeline called image by image, image i with a CPU generator seeded 11 + i."""
    images = []
    for i in range(3):
        x = pipe(batch_size=1, generator=torch.Generator().manual_seed(11 + i), num_inference_steps=steps,
                 output_type="np", **kw).images[0]  # (H, W, C) in [0, 1]
        images.append((x * 255).round().astype(int))
    return images


@pytest.mark.parametrize("kind", ["ddim", "dpmpp_2m"])
def test_sample_unet_gives_diffusers_images(kind, tmp_path):
    unet = _unet()
    if kind == "ddim":  # ddpm-cifar10-32's scheduler settings plus a leading spacing with an offset
        scheduler = diffusers.DDIMScheduler(clip_sample=True, set_alpha_to_one=False, steps_offset=1)
        pipe = diffusers.DDIMPipeline(unet, scheduler)
    else:  # DPM-Solver++(2M), linspace spacing, v-prediction
        scheduler = diffusers.DPMSolverMultistepScheduler(prediction_type="v_prediction")
        pipe = diffusers.DDPMPipeline(unet, scheduler)
    pipe.save_pretrained(tmp_path / "pipe")
    pipe.set_progress_bar_config(disable=True)
    ours = _ours(tmp_path / "pipe", tmp_path / "out", "--sampler", kind, "--num_inference_steps", "8")
    theirs = _theirs(pipe, 8, **({"eta": 0.0} if kind == "ddim" else {}))
    assert len(ours) == 3
    for a, b in zip(ours, theirs):
        assert a.shape == b.shape == (16, 16, 3)
        assert np.abs(a - b).max() <= 1
        assert a.std() > 5  # a real image, not a constant one


def test_ddpm_pipeline_loads_with_its_sampler_and_matches(tmp_path):
    unet = _unet()
    pipe = diffusers.DDPMPipeline(unet, diffusers.DDPMScheduler(num_train_timesteps=50))
    pipe.save_pretrained(tmp_path / "pipe")
    pipe.set_progress_bar_config(disable=True)
    loaded = vf.load_pipeline(tmp_path / "pipe")
    assert loaded.default_sampler == "ddpm" and loaded.conditioning == "none" and loaded.sample_shape == (3, 16, 16)
    ours = loaded.sample(1, steps=5, generator=torch.Generator().manual_seed(3))  # (1, 3, 16, 16) in [-1, 1]
    theirs = pipe(generator=torch.Generator().manual_seed(3), num_inference_steps=5, output_type="np").images[0]
    assert np.abs((ours[0].permute(1, 2, 0).numpy() + 1) / 2 - theirs).max() < 2e-3


def test_label_names_and_class_conditioning(tmp_path):
    unet = ddpm_cifar10_unet(num_class_embeds=3)
    diffusers.DDIMPipeline(unet, diffusers.DDIMScheduler()).save_pretrained(tmp_path / "pipe")
    pipe = vf.load_pipeline(tmp_path / "pipe")
    assert pipe.conditioning == "class" and pipe.num_classes == 3
    pipe.label_names = ["tench, Tinca tinca", "goldfish", "great white shark"]
    assert pipe.class_ids(["goldfish", "Tinca tinca", 2, "0"]).tolist() == [1, 0, 2, 0]
    with pytest.raises(ValueError, match="class_labels"):
        pipe.class_ids(["golden retriever"])
    with pytest.raises(ValueError, match="class_labels"):
        pipe.class_ids([3])
    images = pipe.sample(2, steps=2, class_labels=["great white shark"], guidance_scale=2.0,
                         generator=torch.Generator().manual_seed(0))
    assert images.shape == (2, 3, 16, 16) and torch.isfinite(images).all()


def test_bad_pipeline_dirs_are_named(tmp_path):
    import json

    (tmp_path / "p").mkdir()
    (tmp_path / "p" / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    with pytest.raises(ValueError, match="StableDiffusionPipeline"):
        vf.load_pipeline(tmp_path / "p")
    (tmp_path / "p" / "model_index.json").write_text(json.dumps({"_class_name": "DDIMPipeline"}))
    with pytest.raises(FileNotFoundError, match="unet"):
        vf.load_pipeline(tmp_path / "p")
    with pytest.raises(FileNotFoundError, match="model path"):
        vf.load_pipeline(tmp_path / "missing")


def test_our_model_dir_knows_its_prediction_type(tmp_path):
    """The loader reads diffusion.json, so sampling a v-trained model needs no prediction_type argument."""
    import json

    model = vf.create_model("unet_tiny", base_channels=8, channel_mults=(1, 2), num_res_blocks=1,
                            attention_resolutions=(4,), attention_head_dim=8, norm_groups=4, sample_size=8,
                            num_classes=None)
    vf.save_pretrained(model, tmp_path)
    settings = {"noise_schedule": "cosine", "num_train_timesteps": 100, "prediction_type": "v", "conditioning": "none",
                "num_classes": None, "class_names": None, "text_encoder": None, "context_dim": None, "channels": 1,
                "resolution": 8}
    (tmp_path / "diffusion.json").write_text(json.dumps(settings))
    pipe = vf.load_pipeline(tmp_path)
    assert isinstance(pipe, Pipeline) and pipe.prediction_type == "v" and pipe.schedule.num_train_steps == 100
    assert pipe.sample(2, steps=3, generator=torch.Generator().manual_seed(0)).shape == (2, 1, 8, 8)


def test_dit_pipeline_with_vae_and_label_names(tmp_path):
    """DiTPipeline: transformer + VAE + scheduler + id2label; without guidance the same images as diffusers."""
    import json

    pytest.importorskip("visionformers.convert.diffusers_vae")
    from _diffusers_models import dit_xl_2, perturb

    vae = perturb(diffusers.AutoencoderKL(block_out_channels=(8, 8), norm_num_groups=4, latent_channels=4,
                                          down_block_types=("DownEncoderBlock2D",) * 2,
                                          up_block_types=("UpDecoderBlock2D",) * 2, sample_size=16))
    pipe = diffusers.DiTPipeline(dit_xl_2(), vae, diffusers.DDIMScheduler(clip_sample=False))
    pipe.save_pretrained(tmp_path / "dit")
    index = json.loads((tmp_path / "dit" / "model_index.json").read_text())
    index["id2label"] = {str(i): f"class {i}" for i in range(1000)} | {"207": "golden retriever"}
    (tmp_path / "dit" / "model_index.json").write_text(json.dumps(index))
    pipe.set_progress_bar_config(disable=True)
    ours = vf.load_pipeline(tmp_path / "dit")
    assert ours.vae is not None and ours.label_names[207] == "golden retriever" and ours.sample_shape == (4, 8, 8)
    images = ours.sample(1, steps=4, class_labels=["golden retriever"], generator=torch.Generator().manual_seed(0))
    theirs = pipe(class_labels=[207], guidance_scale=1.0, num_inference_steps=4, output_type="np",
                  generator=torch.Generator().manual_seed(0)).images[0]
    assert images.shape == (1, 3, 16, 16)
    assert np.abs(((images[0].permute(1, 2, 0).numpy() + 1) / 2).clip(0, 1) - theirs).max() < 2e-3
