"""diffusers' ``AutoencoderKL`` weights <-> visionformers' (``vision/autoencoder_kl.py``), both directions.

The two layouts hold the same tensors under other names, except the middle blocks' attention: diffusers keeps
q, k and v as three linears (``to_q`` / ``to_k`` / ``to_v`` / ``to_out.0``; before diffusers 0.14 ``query`` /
``key`` / ``value`` / ``proj_attn``, and 1x1 convolutions in LDM's original files), ours one ``qkv`` product.

    overrides, sd = vae_from_diffusers(diffusers_state_dict, diffusers_config)   # config.json as a dict, or None
    vae = vf.create_model("vae_sd", **overrides); vae.load_state_dict(sd)
    diffusers_config, sd = vae_to_diffusers(vae)                                  # AutoencoderKL(**config)
"""
from __future__ import annotations

import dataclasses

import torch

from visionformers._validate import fail
from visionformers.convert._common import check_state_dict, count_indices
from visionformers.vision.autoencoder_kl import AutoencoderKL, AutoencoderKLConfig

__all__ = ["vae_from_diffusers", "vae_to_diffusers"]

SOURCE = "diffusers AutoencoderKL"
_ATTN_NEW = ("to_q", "to_k", "to_v", "to_out.0")
_ATTN_LEGACY = ("query", "key", "value", "proj_attn")


def _resnet_pairs(ours: str, theirs: str, has_skip: bool) -> list[tuple[str, str]]:
    names = [("norm1", "norm1"), ("conv1", "conv1"), ("norm2", "norm2"), ("conv2", "conv2")]
    if has_skip:
        names.append(("skip", "conv_shortcut"))
    return [(f"{ours}.{a}", f"{theirs}.{b}") for a, b in names]


def _mid_pairs(ours: str, theirs: str, attention: bool) -> list[tuple[str, str]]:
    pairs = _resnet_pairs(f"{ours}.res1", f"{theirs}.resnets.0", False)
    pairs += _resnet_pairs(f"{ours}.res2", f"{theirs}.resnets.1", False)
    if attention:
        pairs.append((f"{ours}.attn.norm", f"{theirs}.attentions.0.group_norm"))
    return pairs


def _module_pairs(c: AutoencoderKLConfig) -> list[tuple[str, str]]:
    """(our module, diffusers module) for every module with a weight and a bias, attention projections aside."""
    widths = c.block_out_channels
    pairs = [("encoder.conv_in", "encoder.conv_in"), ("encoder.norm_out", "encoder.conv_norm_out"),
             ("encoder.conv_out", "encoder.conv_out"), ("decoder.conv_in", "decoder.conv_in"),
             ("decoder.norm_out", "decoder.conv_norm_out"), ("decoder.conv_out", "decoder.conv_out")]
    prev = widths[0]
    for i, w in enumerate(widths):
        for j in range(c.layers_per_block):
            pairs += _resnet_pairs(f"encoder.levels.{i}.resnets.{j}", f"encoder.down_blocks.{i}.resnets.{j}",
                                   j == 0 and prev != w)
        if i < len(widths) - 1:
            pairs.append((f"encoder.levels.{i}.resample.conv", f"encoder.down_blocks.{i}.downsamplers.0.conv"))
        prev = w
    rev = tuple(reversed(widths))
    prev = rev[0]
    for i, w in enumerate(rev):
        for j in range(c.layers_per_block + 1):
            pairs += _resnet_pairs(f"decoder.levels.{i}.resnets.{j}", f"decoder.up_blocks.{i}.resnets.{j}",
                                   j == 0 and prev != w)
        if i < len(rev) - 1:
            pairs.append((f"decoder.levels.{i}.resample.conv", f"decoder.up_blocks.{i}.upsamplers.0.conv"))
        prev = w
    pairs += _mid_pairs("encoder.mid", "encoder.mid_block", c.mid_block_attention)
    pairs += _mid_pairs("decoder.mid", "decoder.mid_block", c.mid_block_attention)
    if c.use_quant_conv:
        pairs.append(("quant_conv", "quant_conv"))
    if c.use_post_quant_conv:
        pairs.append(("post_quant_conv", "post_quant_conv"))
    return pairs


def _config_from_diffusers(config: dict) -> dict:
    """diffusers' AutoencoderKL config.json -> our config fields; layouts we do not build are a ValueError."""
    if not isinstance(config, dict):
        fail("config", config, "None or a dict (diffusers' AutoencoderKL config.json)")
    name = config.get("_class_name", "AutoencoderKL")
    if name != "AutoencoderKL":
        fail("config['_class_name']", name, "'AutoencoderKL'")
    for key, block in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
        types = config.get(key, (block,))
        if not isinstance(types, (list, tuple)) or any(t != block for t in types):
            fail(f"config[{key!r}]", types, f"a list of {block!r} (the only block of AutoencoderKL we build)")
    if config.get("act_fn", "silu") != "silu":
        fail("config['act_fn']", config.get("act_fn"), "'silu'")
    for key in ("latents_mean", "latents_std"):
        if config.get(key) is not None:
            fail(f"config[{key!r}]", config[key], "None (per-channel latent statistics are not supported; "
                 "scaling_factor / shift_factor are)")
    sample_size = config.get("sample_size", 32)
    if isinstance(sample_size, (list, tuple)):
        sample_size = sample_size[0]
    widths = config.get("block_out_channels", (64,))
    if not isinstance(widths, (list, tuple)):
        fail("config['block_out_channels']", widths, "a list of ints")
    out = dict(in_channels=config.get("in_channels", 3), out_channels=config.get("out_channels", 3),
               latent_channels=config.get("latent_channels", 4), block_out_channels=tuple(widths),
               layers_per_block=config.get("layers_per_block", 1), norm_num_groups=config.get("norm_num_groups", 32),
               mid_block_attention=config.get("mid_block_add_attention", True),
               use_quant_conv=config.get("use_quant_conv", True),
               use_post_quant_conv=config.get("use_post_quant_conv", True), sample_size=sample_size,
               scaling_factor=float(config.get("scaling_factor", 0.18215)),
               shift_factor=float(config.get("shift_factor") or 0.0))
    return out


def _config_from_state_dict(sd: dict) -> dict:
    """The shape-given fields, read off the tensors (GroupNorm groups and the scaling cannot be: defaults)."""
    try:
        levels = count_indices(sd, r"^encoder\.down_blocks\.(\d+)\.")
        widths = tuple(sd[f"encoder.down_blocks.{i}.resnets.0.conv1.weight"].shape[0] for i in range(levels))
        return dict(in_channels=sd["encoder.conv_in.weight"].shape[1], out_channels=sd["decoder.conv_out.weight"].shape[0],
                    latent_channels=sd["decoder.conv_in.weight"].shape[1], block_out_channels=widths,
                    layers_per_block=count_indices(sd, r"^encoder\.down_blocks\.0\.resnets\.(\d+)\."),
                    mid_block_attention=any(k.startswith("encoder.mid_block.attentions.0.") for k in sd),
                    use_quant_conv="quant_conv.weight" in sd, use_post_quant_conv="post_quant_conv.weight" in sd)
    except KeyError as e:
        raise ValueError(f"state_dict ({SOURCE}) lacks {e.args[0]!r}; expected the state dict of a whole "
                         "diffusers AutoencoderKL") from None


def _attention_names(sd: dict, prefix: str) -> tuple[str, ...]:
    if f"{prefix}.to_q.weight" in sd:
        return _ATTN_NEW
    if f"{prefix}.query.weight" in sd:
        return _ATTN_LEGACY
    raise ValueError(f"state_dict ({SOURCE}) has no attention weights under {prefix!r} (neither to_q/to_k/to_v/"
                     "to_out.0 nor query/key/value/proj_attn); pass mid_block_add_attention=False in config if "
                     "the model has none")


def _linear(w: torch.Tensor) -> torch.Tensor:
    return w.reshape(w.shape[0], w.shape[1]) if w.ndim == 4 else w  # LDM's 1x1 convs (C, C, 1, 1) -> (C, C)


def vae_from_diffusers(state_dict: dict, config: dict | None = None) -> tuple[dict, dict[str, torch.Tensor]]:
    """diffusers ``AutoencoderKL`` state dict (+ its config.json dict, optional) -> (config overrides, our state dict).

    ``create_model("vae_sd", **overrides)`` (any AutoencoderKL preset) then loads the state dict strictly. Without
    ``config`` the shapes give the layout; ``norm_num_groups``, ``scaling_factor`` and ``shift_factor`` then stay
    the preset's. Attention keys may be the current (``to_q`` ...) or the legacy (``query`` ...) names.
    """
    sd = check_state_dict(state_dict)
    overrides = _config_from_diffusers(config) if config is not None else _config_from_state_dict(sd)
    try:
        c = dataclasses.replace(AutoencoderKLConfig(), **{"norm_num_groups": 1, **overrides})  # groups: no keys
    except ValueError as e:
        raise ValueError(f"config ({SOURCE}) describes no AutoencoderKL we can build: {e}") from None
    out, used = {}, set()

    def take(key: str) -> torch.Tensor:
        if key not in sd:
            raise ValueError(f"state_dict ({SOURCE}) lacks {key!r}, which config {overrides} needs")
        used.add(key)
        return sd[key]

    for ours, theirs in _module_pairs(c):
        for p in ("weight", "bias"):
            out[f"{ours}.{p}"] = take(f"{theirs}.{p}")
    if c.mid_block_attention:
        for part in ("encoder", "decoder"):
            prefix = f"{part}.mid_block.attentions.0"
            q, k, v, o = (f"{prefix}.{n}" for n in _attention_names(sd, prefix))
            out[f"{part}.mid.attn.attn.qkv.weight"] = torch.cat([_linear(take(f"{n}.weight")) for n in (q, k, v)])
            out[f"{part}.mid.attn.attn.qkv.bias"] = torch.cat([take(f"{n}.bias") for n in (q, k, v)])
            out[f"{part}.mid.attn.attn.proj.weight"] = _linear(take(f"{o}.weight"))
            out[f"{part}.mid.attn.attn.proj.bias"] = take(f"{o}.bias")
    left = sorted(set(sd) - used)
    if left:
        raise ValueError(f"state_dict ({SOURCE}) has keys {left[:5]}{' ...' if len(left) > 5 else ''} that config "
                         f"{overrides} does not use; expected a diffusers AutoencoderKL of that layout")
    return overrides, out


def vae_to_diffusers(model: AutoencoderKL) -> tuple[dict, dict[str, torch.Tensor]]:
    """Our AutoencoderKL -> (diffusers config dict, diffusers state dict): ``AutoencoderKL(**config)`` loads it."""
    from visionformers.hub import unwrap_model

    model = unwrap_model(model)
    if not isinstance(model, AutoencoderKL):
        fail("model", type(model).__name__, "a visionformers AutoencoderKL")
    c, sd = model.config, model.state_dict()
    out = {}
    for ours, theirs in _module_pairs(c):
        for p in ("weight", "bias"):
            out[f"{theirs}.{p}"] = sd[f"{ours}.{p}"]
    if c.mid_block_attention:
        for part in ("encoder", "decoder"):
            prefix = f"{part}.mid_block.attentions.0"
            q, k, v = sd[f"{part}.mid.attn.attn.qkv.weight"].chunk(3)  # (C, C) each
            qb, kb, vb = sd[f"{part}.mid.attn.attn.qkv.bias"].chunk(3)
            for name, w, b in (("to_q", q, qb), ("to_k", k, kb), ("to_v", v, vb),
                               ("to_out.0", sd[f"{part}.mid.attn.attn.proj.weight"],
                                sd[f"{part}.mid.attn.attn.proj.bias"])):
                out[f"{prefix}.{name}.weight"], out[f"{prefix}.{name}.bias"] = w.clone(), b.clone()
    levels = len(c.block_out_channels)
    config = {"_class_name": "AutoencoderKL", "in_channels": c.in_channels, "out_channels": c.out_channels,
              "down_block_types": ["DownEncoderBlock2D"] * levels, "up_block_types": ["UpDecoderBlock2D"] * levels,
              "block_out_channels": list(c.block_out_channels), "layers_per_block": c.layers_per_block,
              "act_fn": "silu", "latent_channels": c.latent_channels, "norm_num_groups": c.norm_num_groups,
              "sample_size": c.sample_size, "scaling_factor": c.scaling_factor,
              "shift_factor": c.shift_factor if c.shift_factor else None, "latents_mean": None, "latents_std": None,
              "force_upcast": True, "use_quant_conv": c.use_quant_conv, "use_post_quant_conv": c.use_post_quant_conv,
              "mid_block_add_attention": c.mid_block_attention}
    return config, out
