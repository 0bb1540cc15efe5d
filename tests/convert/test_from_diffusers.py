"""diffusers UNet2DModel / DiT <-> our UNet / DiT: random-weight parity, round trips through diffusers, bad input."""
import json
import pickle

import pytest
import torch
from _diffusers_models import config_of, ddpm_cifar10_unet, diffusers, dit_xl_2, perturb

import visionformers as vf
from visionformers.convert import build_model
from visionformers.convert.from_diffusers import from_diffusers, to_diffusers


def _ours(model):
    return build_model(*from_diffusers(model.state_dict(), config_of(model))).eval()


@pytest.mark.parametrize("overrides", [
    {},  # ddpm-cifar10-32: default time shift, padding 0, one head as wide as the level
    dict(resnet_time_scale_shift="scale_shift", attention_head_dim=8, num_class_embeds=5, flip_sin_to_cos=True,
         freq_shift=0, downsample_padding=1, add_attention=True),  # AdaGN, heads, classes; mid attention without norm
    dict(time_embedding_type="fourier"),  # NCSN++-style Fourier features of log sigma, output / sigma
])
def test_unet2d_parity_and_round_trip(overrides):
    ref = ddpm_cifar10_unet(**overrides)
    ours = _ours(ref)
    x = torch.randn(2, 3, 16, 16)
    t = torch.tensor([0.5, 30.0]) if overrides.get("time_embedding_type") == "fourier" else torch.tensor([3, 871])
    labels = torch.tensor([1, 4]) if "num_class_embeds" in overrides else None
    with torch.no_grad():
        expected = ref(x, t, class_labels=labels).sample
        got = ours(x, t.float(), class_labels=labels)
        assert torch.allclose(got, expected, atol=1e-4, rtol=1e-4), (got - expected).abs().max()
        config, state = to_diffusers(ours)
        back = diffusers.UNet2DModel.from_config(config).eval()
        back.load_state_dict(state)
        assert torch.allclose(back(x, t, class_labels=labels).sample, got, atol=1e-5)


def test_unet_with_classes_gets_a_zero_null_row():
    ours = _ours(ddpm_cifar10_unet(num_class_embeds=3))
    assert ours.config.num_classes == 3 and torch.equal(ours.class_embed.weight[3], torch.zeros(64))


@pytest.mark.parametrize("cls", ["DiTTransformer2DModel", "Transformer2DModel"])
def test_dit_parity_learned_sigma_and_round_trip(cls):
    ref = dit_xl_2()
    config = config_of(ref)
    if cls == "Transformer2DModel":  # the legacy layout: same weights, the DiT fields of Transformer2DModel
        config = {**config, "_class_name": cls, "cross_attention_dim": None, "num_vector_embeds": None}
    ours = build_model(*from_diffusers(ref.state_dict(), config)).eval()
    assert ours.config.learn_sigma and ours.config.num_classes == 1000
    x, t, labels = torch.randn(2, 4, 8, 8), torch.tensor([5, 940]), torch.tensor([207, 1000])  # 1000: the null class
    with torch.no_grad():
        expected = ref(x, t, class_labels=labels).sample  # (2, 8, 8, 8): eps, then the variance interpolation
        got = ours(x, t.float(), class_labels=labels)
        assert got.shape == (2, 8, 8, 8)
        assert torch.allclose(got, expected, atol=1e-4, rtol=1e-4), (got - expected).abs().max()
        config, state = to_diffusers(ours)
        back = diffusers.DiTTransformer2DModel.from_config(config).eval()
        back.load_state_dict(state)
        assert torch.allclose(back(x, t, class_labels=labels).sample, got, atol=1e-5)


def test_model_dirs_load_and_save_both_ways(tmp_path):
    ref = ddpm_cifar10_unet()
    ref.save_pretrained(tmp_path / "theirs", safe_serialization=False)  # a .bin: read with weights_only=True
    ours = vf.from_pretrained(tmp_path / "theirs")
    assert type(ours).__name__ == "UNet" and not ours.training
    vf.save_pretrained(ours, tmp_path / "export", format="diffusers")
    assert (tmp_path / "export" / "diffusion_pytorch_model.safetensors").is_file()
    back = diffusers.UNet2DModel.from_pretrained(tmp_path / "export").eval()
    x, t = torch.randn(1, 3, 16, 16), torch.tensor([500])
    with torch.no_grad():
        assert torch.allclose(back(x, t).sample, ref(x, t).sample, atol=1e-4)
    dit = dit_xl_2()
    dit.save_pretrained(tmp_path / "dit")
    ours_dit = vf.from_pretrained(tmp_path / "dit")
    vf.save_pretrained(ours_dit, tmp_path / "dit_export", format="diffusers")
    back = diffusers.DiTTransformer2DModel.from_pretrained(tmp_path / "dit_export").eval()
    x, t, y = torch.randn(1, 4, 8, 8), torch.tensor([10]), torch.tensor([3])
    with torch.no_grad():
        assert torch.allclose(back(x, t, class_labels=y).sample, dit(x, t, class_labels=y).sample, atol=1e-4)


def _write(d, config, weights=None):
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(json.dumps(config))
    if weights is not None:
        from safetensors.torch import save_file

        save_file(weights, str(d / "diffusion_pytorch_model.safetensors"))
    return d


class _WritesAFile:
    """Unpickling this object would create ``path``: weights_only=True must refuse it before it runs."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_bad_directories_are_named(tmp_path):
    ref = ddpm_cifar10_unet()
    with pytest.raises(ValueError, match="UNet2DConditionModel"):
        vf.from_pretrained(_write(tmp_path / "cls", {"_class_name": "UNet2DConditionModel"}))
    with pytest.raises(FileNotFoundError, match="no weights"):
        vf.from_pretrained(_write(tmp_path / "noweights", config_of(ref)))
    # a pickle .bin whose unpickling would run code: refused, and the code never runs
    evil = _write(tmp_path / "evil", config_of(ref))
    marker = tmp_path / "pwned"
    with open(evil / "diffusion_pytorch_model.bin", "wb") as f:
        pickle.dump({"conv_in.weight": _WritesAFile(marker)}, f)
    with pytest.raises(ValueError, match="not a loadable weights file"):
        vf.from_pretrained(evil)
    assert not marker.exists()
    # weights of another config: named as a mismatch, not a torch size error
    other = ddpm_cifar10_unet(block_out_channels=(8, 16, 16), norm_num_groups=4)
    with pytest.raises(ValueError, match="does not match"):
        vf.from_pretrained(_write(tmp_path / "mismatch", config_of(ref), dict(other.state_dict())))
    extra = {**ref.state_dict(), "foo.weight": torch.zeros(1)}
    with pytest.raises(ValueError, match="foo.weight"):
        vf.from_pretrained(_write(tmp_path / "extra", config_of(ref), extra))


@pytest.mark.parametrize("field, value", [
    ("act_fn", "gelu"), ("center_input_sample", True), ("class_embed_type", "timestep"),
    ("mid_block_scale_factor", 1.414), ("up_block_types", ["UpBlock2D", "UpBlock2D", "UpBlock2D"]),
    ("down_block_types", ["DownBlock2D", "SkipDownBlock2D", "DownBlock2D"]), ("some_new_field", 1),
])
def test_unhonoured_unet_fields_are_named(field, value):
    ref = ddpm_cifar10_unet()
    with pytest.raises(ValueError, match=field):
        from_diffusers(ref.state_dict(), {**config_of(ref), field: value})


def test_dit_embedders_that_differ_per_block_are_refused():
    ref = dit_xl_2()
    state = dict(ref.state_dict())
    key = "transformer_blocks.1.norm1.emb.timestep_embedder.linear_1.bias"
    state[key] = state[key] + 1
    with pytest.raises(ValueError, match="one timestep and label embedder"):
        from_diffusers(state, config_of(ref))
    with pytest.raises(ValueError, match="cross_attention_dim"):
        from_diffusers(ref.state_dict(), {**config_of(ref), "_class_name": "Transformer2DModel", "cross_attention_dim": 8})


def test_unexportable_models_are_named():
    with pytest.raises(ValueError, match="context_dim"):
        to_diffusers(vf.create_model("unet_tiny", base_channels=8, norm_groups=4, attention_head_dim=8, context_dim=16))
    with pytest.raises(ValueError, match="num_classes"):
        to_diffusers(vf.create_model("dit_tiny", time_freq_shift=1.0))
    with pytest.raises(ValueError, match="ViT|VisionTransformer"):
        to_diffusers(vf.create_model("vit_tiny_patch4_32"))
    with pytest.raises(ValueError, match="format"):
        vf.save_pretrained(perturb(torch.nn.Linear(1, 1)), "/tmp/x", format="onnx")
