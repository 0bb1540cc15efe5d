"""diffusers-format models: ``UNet2DModel`` and the DiT (``DiTTransformer2DModel``, legacy ``Transformer2DModel``)
to our UNet / DiT and back; ``AutoencoderKL`` goes through ``convert/diffusers_vae.py``.

``from_diffusers(state_dict, config) -> (our config, our state dict)`` reads a diffusers ``config.json`` (as a dict)
and its weights. Every config field is either honoured or named in a ValueError; weights that do not fit the
config are a ValueError too. ``to_diffusers(model) -> (diffusers config, state dict)`` is the inverse, and
``load_diffusers_model`` / ``save_diffusers_model`` read and write whole model directories
(``config.json`` + ``diffusion_pytorch_model.safetensors``, or a ``.bin`` read with ``weights_only=True``).
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch
from torch import nn

from visionformers.vision.dit import DiT, DiTConfig
from visionformers.vision.unet import UNet, UNetConfig

__all__ = ["from_diffusers", "to_diffusers", "load_diffusers_model", "save_diffusers_model", "DIFFUSERS_CLASSES",
           "read_diffusers_config"]

DIFFUSERS_CLASSES = ("UNet2DModel", "DiTTransformer2DModel", "Transformer2DModel", "AutoencoderKL")
WEIGHTS_NAMES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
DIFFUSERS_VERSION = "0.42.1"  # the diffusers release these layouts were checked against (written into exports)
MAX_CONFIG_BYTES = 1 << 20  # a model config is a few kB; refuse to parse anything absurdly large


def _bad(field: str, value, accepted: str, cls: str) -> ValueError:
    return ValueError(f"diffusers {cls} config field {field}={value!r} is not supported; accepted: {accepted}")


def _take(cfg: dict, cls: str, defaults: dict) -> dict:
    """The config's values with diffusers' defaults filled in; an unknown field (not ``_meta``) is a ValueError."""
    unknown = sorted(k for k in cfg if not k.startswith("_") and k not in defaults)
    if unknown:
        raise ValueError(f"diffusers {cls} config field(s) {unknown} are not supported by visionformers; "
                         f"accepted: {sorted(defaults)}")
    return {**defaults, **{k: v for k, v in cfg.items() if not k.startswith("_")}}


def _require(c: dict, cls: str, **allowed) -> None:
    """Fields that only one value (or a few) of can be honoured."""
    for name, ok in allowed.items():
        ok = ok if isinstance(ok, tuple) else (ok,)
        if c[name] not in ok:
            raise _bad(name, c[name], " or ".join(repr(v) for v in ok), cls)


def _square(size, name: str, cls: str) -> int:
    if isinstance(size, (list, tuple)) and len(size) == 2 and size[0] == size[1]:
        size = size[0]
    if not isinstance(size, int) or isinstance(size, bool) or size <= 0:
        raise _bad(name, size, "a positive int (square samples)", cls)
    return size


# --------------------------------------------------------------------------------------------------------------
# Key renames, both ways: "{}" stands for a block index; a rule maps a diffusers prefix to ours.

_UNET_PREFIXES = [
    ("down_blocks.{}.resnets.{}.", "down_levels.{}.resnets.{}."),
    ("down_blocks.{}.attentions.{}.", "down_levels.{}.attentions.{}."),
    ("down_blocks.{}.downsamplers.0.", "down_levels.{}.resample."),
    ("up_blocks.{}.resnets.{}.", "up_levels.{}.resnets.{}."),
    ("up_blocks.{}.attentions.{}.", "up_levels.{}.attentions.{}."),
    ("up_blocks.{}.upsamplers.0.", "up_levels.{}.resample."),
    ("mid_block.resnets.0.", "mid_res1."),
    ("mid_block.attentions.0.", "mid_attn."),
    ("mid_block.resnets.1.", "mid_res2."),
    ("time_embedding.", "time_embed."),
    ("time_proj.", "time_fourier."),
    ("conv_norm_out.", "norm_out."),
    ("conv_in.", "conv_in."),
    ("conv_out.", "conv_out."),
    ("class_embedding.", "class_embed."),
]
_UNET_LEAVES = [("time_emb_proj.", "emb_proj."), ("conv_shortcut.", "skip."), ("group_norm.", "norm."),
                ("to_out.0.", "attn.proj.")]

_DIT_PREFIXES = [
    ("pos_embed.proj.", "patch_embed.proj."),
    ("transformer_blocks.{}.norm1.linear.", "blocks.{}.adaLN.linear."),
    ("transformer_blocks.{}.attn1.", "blocks.{}.attn."),
    ("transformer_blocks.{}.ff.net.0.proj.", "blocks.{}.mlp.fc1."),
    ("transformer_blocks.{}.ff.net.2.", "blocks.{}.mlp.fc2."),
    ("proj_out_1.", "final_adaLN.linear."),
    ("proj_out_2.", "head."),
]
_DIT_LEAVES = [("to_out.0.", "proj.")]
_QKV = ("to_q.", "to_k.", "to_v.")


def _pattern(template: str) -> re.Pattern:
    return re.compile("^" + re.escape(template).replace(r"\{\}", r"(\d+)"))


def _rename(key: str, prefixes, leaves, reverse: bool) -> str | None:
    """A key renamed by the first matching prefix rule and leaf rule (``reverse``: ours -> diffusers), else None."""
    for theirs, ours in prefixes:
        src, dst = (ours, theirs) if reverse else (theirs, ours)
        if m := _pattern(src).match(key):
            rest = key[m.end():]
            for l_theirs, l_ours in leaves:
                l_src, l_dst = (l_ours, l_theirs) if reverse else (l_theirs, l_ours)
                if rest.startswith(l_src):
                    rest = l_dst + rest[len(l_src):]
                    break
            return dst.format(*m.groups()) + rest
    return None


def _convert_keys(state: dict, prefixes, leaves, source: str, qkv_into: str) -> dict:
    """diffusers -> ours: rename every key, fuse to_q/to_k/to_v into one ``qkv_into`` projection; a key that no
    rule knows is a ValueError (the weights are not of the configured model)."""
    out, pending = {}, {}
    for key, value in state.items():
        new = _rename(key, prefixes, leaves, reverse=False)
        if new is None:
            raise ValueError(f"state_dict key {key!r} is not part of a diffusers {source} of this config; the weights "
                             "do not match config.json")
        stem, _, leaf = new.rpartition(".")  # e.g. "...attentions.0.to_q", "weight"
        part = next((q for q in _QKV if stem.endswith(q[:-1])), None)
        if part is None:
            out[new] = value
            continue
        base = stem[: -len(part[:-1])]  # "...attentions.0." (or "blocks.0.attn.")
        pending.setdefault((base, leaf), {})[part] = value
    for (base, leaf), parts in pending.items():
        missing = [p[:-1] for p in _QKV if p not in parts]
        if missing:
            raise ValueError(f"state_dict ({source}) lacks {missing} of the attention at {base!r}; the weights are "
                             "incomplete")
        out[f"{base}{qkv_into}.{leaf}"] = torch.cat([parts[p] for p in _QKV], dim=0)  # (3C, ...) = [q; k; v]
    return out


def _export_keys(state: dict, prefixes, leaves, qkv_from: str) -> dict:
    """ours -> diffusers: the inverse of :func:`_convert_keys` (the fused qkv is split into to_q, to_k, to_v)."""
    out = {}
    for key, value in state.items():
        stem, _, leaf = key.rpartition(".")
        if stem.endswith(qkv_from):
            base = _rename(stem[: -len(qkv_from)] + "to_q." + leaf, prefixes, leaves, reverse=True)
            for part, chunk in zip(_QKV, value.chunk(3, dim=0)):
                out[base.replace("to_q.", part)] = chunk.clone()  # own storage: safetensors refuses shared tensors
            continue
        new = _rename(key, prefixes, leaves, reverse=True)
        if new is None:
            raise ValueError(f"model key {key!r} has no diffusers counterpart")
        out[new] = value
    return out


# --------------------------------------------------------------------------------------------------------------
# UNet2DModel

_UNET2D_DEFAULTS = dict(
    sample_size=None, in_channels=3, out_channels=3, center_input_sample=False, time_embedding_type="positional",
    time_embedding_dim=None, freq_shift=0, flip_sin_to_cos=True,
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
    mid_block_type="UNetMidBlock2D", up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(224, 448, 672, 896), layers_per_block=2, mid_block_scale_factor=1, downsample_padding=1,
    downsample_type="conv", upsample_type="conv", dropout=0.0, act_fn="silu", attention_head_dim=8, norm_num_groups=32,
    attn_norm_num_groups=None, norm_eps=1e-5, resnet_time_scale_shift="default", add_attention=True,
    class_embed_type=None, num_class_embeds=None, num_train_timesteps=None,
)
_DOWN, _UP = ("DownBlock2D", "AttnDownBlock2D"), ("UpBlock2D", "AttnUpBlock2D")


def unet_config_from_diffusers(config: dict) -> UNetConfig:
    """Our ``UNetConfig`` for a diffusers ``UNet2DModel`` config.json (a ValueError names any field we cannot honour)."""
    cls = "UNet2DModel"
    c = _take(config, cls, _UNET2D_DEFAULTS)
    _require(c, cls, center_input_sample=False, time_embedding_type=("positional", "fourier"), act_fn="silu",
             mid_block_type="UNetMidBlock2D", mid_block_scale_factor=(1, 1.0), downsample_type="conv",
             upsample_type="conv", resnet_time_scale_shift=("default", "scale_shift"), class_embed_type=None,
             downsample_padding=(0, 1))
    widths = list(c["block_out_channels"])
    base = widths[0] if widths and isinstance(widths[0], int) else 0
    if base <= 0 or any(not isinstance(w, int) or w % base for w in widths):
        raise _bad("block_out_channels", widths, "positive multiples of the first width", cls)
    down, up = list(c["down_block_types"]), list(c["up_block_types"])
    if len(down) != len(widths) or any(b not in _DOWN for b in down):
        raise _bad("down_block_types", down, f"one of {_DOWN} per entry of block_out_channels", cls)
    mirrored = [_UP[_DOWN.index(b)] for b in reversed(down)]
    if up != mirrored:
        raise _bad("up_block_types", up, f"the mirror of down_block_types, {mirrored}", cls)
    if c["time_embedding_dim"] not in (None, 4 * base):
        raise _bad("time_embedding_dim", c["time_embedding_dim"], f"None or 4 * block_out_channels[0] = {4 * base}", cls)
    scale_shift = c["resnet_time_scale_shift"] == "scale_shift"
    # the middle attention's GroupNorm: attn_norm_num_groups, else norm_num_groups, but none with scale_shift
    if c["attn_norm_num_groups"] not in (None, c["norm_num_groups"]):
        raise _bad("attn_norm_num_groups", c["attn_norm_num_groups"], f"None or norm_num_groups={c['norm_num_groups']}", cls)
    mid_norm = c["attn_norm_num_groups"] is not None or not scale_shift
    in_ch, out_ch = c["in_channels"], c["out_channels"]
    if out_ch not in (in_ch, 2 * in_ch):
        raise _bad("out_channels", out_ch, f"in_channels={in_ch}, or twice that (a learned variance)", cls)
    size = _square(c["sample_size"], "sample_size", cls)
    try:
        return UNetConfig(
            sample_size=size, in_channels=in_ch, base_channels=base, channel_mults=tuple(w // base for w in widths),
            num_res_blocks=c["layers_per_block"],
            attention_resolutions=tuple(size // 2**i for i, b in enumerate(down) if b == "AttnDownBlock2D"),
            attention_head_dim=c["attention_head_dim"], mid_attention=bool(c["add_attention"]),
            dropout=float(c["dropout"]), norm_groups=c["norm_num_groups"], norm_eps=float(c["norm_eps"]),
            use_scale_shift_norm=scale_shift, time_flip_sin_to_cos=bool(c["flip_sin_to_cos"]),
            time_freq_shift=float(c["freq_shift"]), num_classes=c["num_class_embeds"], learn_sigma=out_ch == 2 * in_ch,
            downsample_padding=c["downsample_padding"], time_embedding_type=c["time_embedding_type"],
            mid_attention_norm=mid_norm,
        )
    except ValueError as e:
        raise ValueError(f"diffusers {cls} config cannot be built as a visionformers UNet: {e}") from None


def unet_config_to_diffusers(config: UNetConfig) -> dict:
    """The diffusers ``UNet2DModel`` config.json of our UNet config (a ValueError for what diffusers lacks)."""
    for name, ok in (("context_dim", None), ("self_condition", False)):
        if getattr(config, name) != ok:
            raise ValueError(f"UNet config field {name}={getattr(config, name)!r} has no diffusers UNet2DModel "
                             f"counterpart; accepted for export: {ok!r}")
    if not config.mid_attention_norm and not config.use_scale_shift_norm:
        raise ValueError("UNet config field mid_attention_norm=False needs use_scale_shift_norm=True to be expressed "
                         "in a diffusers UNet2DModel")
    attn = [r in config.attention_resolutions for r in config.level_resolutions]
    return {
        "_class_name": "UNet2DModel", "_diffusers_version": DIFFUSERS_VERSION,
        "sample_size": config.sample_size, "in_channels": config.in_channels, "out_channels": config.out_channels,
        "center_input_sample": False, "time_embedding_type": config.time_embedding_type, "time_embedding_dim": None,
        "freq_shift": config.time_freq_shift, "flip_sin_to_cos": config.time_flip_sin_to_cos,
        "down_block_types": [_DOWN[a] for a in attn], "mid_block_type": "UNetMidBlock2D",
        "up_block_types": [_UP[a] for a in reversed(attn)], "block_out_channels": list(config.level_channels),
        "layers_per_block": config.num_res_blocks, "mid_block_scale_factor": 1,
        "downsample_padding": config.downsample_padding, "downsample_type": "conv", "upsample_type": "conv",
        "dropout": config.dropout, "act_fn": "silu", "attention_head_dim": config.attention_head_dim,
        "norm_num_groups": config.norm_groups,
        "attn_norm_num_groups": config.norm_groups if config.use_scale_shift_norm and config.mid_attention_norm else None,
        "norm_eps": config.norm_eps,
        "resnet_time_scale_shift": "scale_shift" if config.use_scale_shift_norm else "default",
        "add_attention": config.mid_attention, "class_embed_type": None,
        # our table has a learned null class (id num_classes, classifier-free guidance): it travels as one more class
        "num_class_embeds": config.num_classes + 1 if config.num_classes is not None else None,
        "num_train_timesteps": None,
    }


def _unet_from_diffusers(state: dict, config: dict):
    cfg = unet_config_from_diffusers(config)
    out = _convert_keys(state, _UNET_PREFIXES, _UNET_LEAVES, "UNet2DModel", "attn.qkv")
    if cfg.num_classes is not None and "class_embed.weight" in out:
        # diffusers' table has no null class: ours gets a zero row, so id num_classes means "time embedding only"
        table = out["class_embed.weight"]
        out["class_embed.weight"] = torch.cat([table, table.new_zeros(1, table.shape[1])])
    return cfg, out


def _unet_to_diffusers(model: UNet):
    config = unet_config_to_diffusers(model.config)
    return config, _export_keys(model.state_dict(), _UNET_PREFIXES, _UNET_LEAVES, "attn.qkv")


# --------------------------------------------------------------------------------------------------------------
# DiT

_DIT_DEFAULTS = dict(
    num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=None, num_layers=28, dropout=0.0,
    norm_num_groups=32, attention_bias=True, sample_size=32, patch_size=2, activation_fn="gelu-approximate",
    num_embeds_ada_norm=1000, upcast_attention=False, norm_type="ada_norm_zero", norm_elementwise_affine=False,
    norm_eps=1e-5,
)
# Transformer2DModel fields that a DiT layout leaves at their defaults (anything else is another architecture)
_LEGACY_FIXED = dict(cross_attention_dim=None, num_vector_embeds=None, use_linear_projection=False,
                     only_cross_attention=False, double_self_attention=False, caption_channels=None,
                     interpolation_scale=None, use_additional_conditions=None, attention_type="default")
_EMB = "transformer_blocks.{}.norm1.emb."  # diffusers repeats the timestep and label embedders in every block


def dit_config_from_diffusers(config: dict, cls: str = "DiTTransformer2DModel") -> DiTConfig:
    """Our ``DiTConfig`` for a diffusers DiT config.json (``DiTTransformer2DModel`` or the legacy
    ``Transformer2DModel`` with ``norm_type="ada_norm_zero"`` and patches).

    diffusers' LayerNorm before the MLP uses ``norm_eps`` (1e-5 by default) where DiT and we use 1e-6 throughout:
    an epsilon inside the norm of O(1)-variance activations, relative effect ~1e-5; every other field is exact.
    """
    if cls == "Transformer2DModel":
        fixed = {k: v for k, v in config.items() if k in _LEGACY_FIXED}
        for name, ok in _LEGACY_FIXED.items():
            if fixed.get(name, ok) != ok:
                raise _bad(name, fixed[name], f"{ok!r} (only the DiT layout of Transformer2DModel is supported)", cls)
        config = {k: v for k, v in config.items() if k not in _LEGACY_FIXED}
        if config.get("patch_size") is None:
            raise _bad("patch_size", None, "an int (only the patched DiT layout of Transformer2DModel is supported)", cls)
    c = _take(config, cls, _DIT_DEFAULTS)
    _require(c, cls, activation_fn="gelu-approximate", norm_type="ada_norm_zero", attention_bias=True,
             norm_elementwise_affine=False, dropout=(0, 0.0), upcast_attention=(False, True))
    if not isinstance(c["norm_eps"], (int, float)) or not 0 < c["norm_eps"] <= 1e-5:
        raise _bad("norm_eps", c["norm_eps"], "a value in (0, 1e-5] (we use DiT's 1e-6)", cls)
    in_ch = c["in_channels"]
    out_ch = in_ch if c["out_channels"] is None else c["out_channels"]
    if out_ch not in (in_ch, 2 * in_ch):
        raise _bad("out_channels", out_ch, f"None, in_channels={in_ch} or twice that (learned sigma)", cls)
    if c["num_embeds_ada_norm"] is None:
        raise _bad("num_embeds_ada_norm", None, "the number of classes (adaLN-Zero DiT is class-conditional)", cls)
    try:
        return DiTConfig(
            sample_size=_square(c["sample_size"], "sample_size", cls), in_channels=in_ch, patch_size=c["patch_size"],
            hidden_size=c["num_attention_heads"] * c["attention_head_dim"], depth=c["num_layers"],
            num_heads=c["num_attention_heads"], mlp_ratio=4.0, num_classes=c["num_embeds_ada_norm"],
            class_dropout_prob=0.1, learn_sigma=out_ch == 2 * in_ch, context_dim=None, freq_dim=256,
            time_freq_shift=1.0,  # diffusers' CombinedTimestepLabelEmbeddings: Timesteps(256, True, 1)
        )
    except ValueError as e:
        raise ValueError(f"diffusers {cls} config cannot be built as a visionformers DiT: {e}") from None


def dit_config_to_diffusers(config: DiTConfig) -> dict:
    """The diffusers ``DiTTransformer2DModel`` config.json of our DiT config (a ValueError for what it lacks)."""
    need = dict(context_dim=None, freq_dim=256, time_freq_shift=1.0, mlp_ratio=4.0)
    for name, ok in need.items():
        if getattr(config, name) != ok:
            raise ValueError(f"DiT config field {name}={getattr(config, name)!r} has no DiTTransformer2DModel "
                             f"counterpart; accepted for export: {ok!r}")
    if config.num_classes is None:
        raise ValueError("DiT config field num_classes=None has no DiTTransformer2DModel counterpart (its adaLN-Zero "
                         "blocks always embed a class); accepted for export: an int")
    return {
        "_class_name": "DiTTransformer2DModel", "_diffusers_version": DIFFUSERS_VERSION,
        "num_attention_heads": config.num_heads, "attention_head_dim": config.hidden_size // config.num_heads,
        "in_channels": config.in_channels, "out_channels": config.out_channels, "num_layers": config.depth,
        "dropout": 0.0, "norm_num_groups": 32, "attention_bias": True, "sample_size": config.sample_size,
        "patch_size": config.patch_size, "activation_fn": "gelu-approximate", "num_embeds_ada_norm": config.num_classes,
        "upcast_attention": False, "norm_type": "ada_norm_zero", "norm_elementwise_affine": False, "norm_eps": 1e-6,
    }


def _dit_from_diffusers(state: dict, config: dict, cls: str):
    cfg = dit_config_from_diffusers(config, cls)
    state = {k: v for k, v in state.items() if k != "pos_embed.pos_embed"}  # fixed sin-cos table: we recompute it
    shared = {}
    for key in list(state):
        if m := _pattern(_EMB).match(key):
            leaf = key[m.end():]
            value = state.pop(key)
            if leaf not in shared:
                shared[leaf] = (key, value)
            elif not torch.equal(shared[leaf][1], value):
                raise ValueError(f"state_dict key {key!r} differs from {shared[leaf][0]!r}: our DiT has one timestep and "
                                 "label embedder (as DiT itself); diffusers copies it into every block, and every "
                                 "published checkpoint holds equal copies")
    out = _convert_keys(state, _DIT_PREFIXES, _DIT_LEAVES, cls, "qkv")
    names = {"timestep_embedder.linear_1.weight": "t_embed.linear_1.weight",
             "timestep_embedder.linear_1.bias": "t_embed.linear_1.bias",
             "timestep_embedder.linear_2.weight": "t_embed.linear_2.weight",
             "timestep_embedder.linear_2.bias": "t_embed.linear_2.bias",
             "class_embedder.embedding_table.weight": "class_embed.weight"}
    for leaf, (key, value) in shared.items():
        if leaf not in names:
            raise ValueError(f"state_dict key {key!r} is not part of a diffusers DiT; the weights do not match config.json")
        out[names[leaf]] = value
    return cfg, out


def _dit_to_diffusers(model: DiT):
    config = dit_config_to_diffusers(model.config)
    state = dict(model.state_dict())
    embedders = {"timestep_embedder.linear_1.weight": state.pop("t_embed.linear_1.weight"),
                 "timestep_embedder.linear_1.bias": state.pop("t_embed.linear_1.bias"),
                 "timestep_embedder.linear_2.weight": state.pop("t_embed.linear_2.weight"),
                 "timestep_embedder.linear_2.bias": state.pop("t_embed.linear_2.bias"),
                 "class_embedder.embedding_table.weight": state.pop("class_embed.weight")}
    out = _export_keys(state, _DIT_PREFIXES, _DIT_LEAVES, "qkv")
    for i in range(model.config.depth):
        for leaf, value in embedders.items():
            out[_EMB.format(i) + leaf] = value.clone()
    return config, out


# --------------------------------------------------------------------------------------------------------------
# Entry points


def _vae_module():
    try:
        from visionformers.convert import diffusers_vae
    except ImportError:
        raise ValueError("diffusers _class_name='AutoencoderKL' needs visionformers.convert.diffusers_vae, which this "
                         "installation lacks") from None
    return diffusers_vae


def _class_name(config) -> str:
    if not isinstance(config, dict):
        raise ValueError(f"config={type(config).__name__} is not accepted; expected the dict of a diffusers config.json")
    name = config.get("_class_name")
    if name not in DIFFUSERS_CLASSES:
        raise ValueError(f"diffusers _class_name={name!r} is not supported; accepted: {list(DIFFUSERS_CLASSES)}")
    return name


def from_diffusers(state_dict: dict[str, torch.Tensor], config: dict):
    """A diffusers model's weights + config.json dict -> ``(our config, our state dict)``.

    ``UNet2DModel`` -> ``UNetConfig``, ``DiTTransformer2DModel`` / DiT-layout ``Transformer2DModel`` -> ``DiTConfig``
    (``vf.convert.build_model(*from_diffusers(sd, cfg))`` builds the model). ``AutoencoderKL`` goes to
    ``convert.diffusers_vae.vae_from_diffusers`` and returns its (config overrides, state dict).
    """
    name = _class_name(config)
    if not isinstance(state_dict, dict) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise ValueError(f"state_dict={type(state_dict).__name__} is not accepted; expected a dict of name -> tensor")
    if name == "UNet2DModel":
        return _unet_from_diffusers(state_dict, config)
    if name == "AutoencoderKL":
        return _vae_module().vae_from_diffusers(state_dict, config)
    return _dit_from_diffusers(state_dict, config, name)


def to_diffusers(model: nn.Module):
    """Our UNet / DiT (or AutoencoderKL) -> ``(diffusers config.json dict, diffusers state dict)``."""
    from visionformers.hub import unwrap_model

    model = unwrap_model(model)
    if isinstance(model, UNet):
        return _unet_to_diffusers(model)
    if isinstance(model, DiT):
        return _dit_to_diffusers(model)
    if type(model).__name__ == "AutoencoderKL":
        return _vae_module().vae_to_diffusers(model)
    raise ValueError(f"model={type(model).__name__} has no diffusers format; accepted: UNet, DiT, AutoencoderKL")


def read_diffusers_config(path: str | os.PathLike) -> dict:
    """A diffusers JSON file (config.json, scheduler_config.json, model_index.json) as a dict; errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{str(path)!r} is missing")
    if path.stat().st_size > MAX_CONFIG_BYTES:
        raise ValueError(f"{str(path)!r} is {path.stat().st_size} bytes; a diffusers config is at most "
                         f"{MAX_CONFIG_BYTES} bytes")
    from visionformers.hub import read_json

    data = read_json(path, "diffusers config")
    if not isinstance(data, dict):
        raise ValueError(f"{str(path)!r} holds a {type(data).__name__}; expected a JSON object")
    return data


def load_diffusers_model(directory: str | os.PathLike, device: str | torch.device = "cpu") -> nn.Module:
    """A diffusers model directory (config.json with ``_class_name`` + ``diffusion_pytorch_model.safetensors`` or
    ``.bin``) as our model, in eval mode. A ``.bin`` is read with ``torch.load(weights_only=True)``: no pickle code
    runs, and a file that needs it is a ValueError."""
    from visionformers.convert._common import build_model
    from visionformers.hub import load_weights_file

    directory = Path(directory)
    config = read_diffusers_config(directory / "config.json")
    name = _class_name(config)
    weights = next((directory / w for w in WEIGHTS_NAMES if (directory / w).is_file()), None)
    if weights is None:
        raise FileNotFoundError(f"diffusers model directory {str(directory)!r} has a config.json but no weights; "
                                f"expected one of {list(WEIGHTS_NAMES)}")
    state = load_weights_file(weights, name="weights file")
    if name == "AutoencoderKL":
        from visionformers.registry import create_model

        overrides, state = from_diffusers(state, config)
        model = create_model("vae_sd", **overrides)
        from visionformers.hub import load_into

        load_into(model, state, source=str(weights))
    else:
        cfg, state = from_diffusers(state, config)
        try:
            model = build_model(cfg, state)
        except ValueError as e:
            raise ValueError(f"{str(weights)!r} does not match {str(directory / 'config.json')!r}: {e}") from None
    return model.to(device).eval()


def save_diffusers_model(model: nn.Module, directory: str | os.PathLike) -> Path:
    """Write ``config.json`` + ``diffusion_pytorch_model.safetensors`` that diffusers' ``from_pretrained`` loads."""
    from visionformers._io import atomic_write_bytes
    from visionformers.hub import save_state_dict

    config, state = to_diffusers(model)
    out = Path(directory)
    if out.exists() and not out.is_dir():
        raise ValueError(f"save_directory={str(out)!r} is an existing file; expected a directory (new or existing)")
    out.mkdir(parents=True, exist_ok=True)
    save_state_dict(state, out / WEIGHTS_NAMES[0], metadata={"format": "pt"})
    atomic_write_bytes(out / "config.json", json.dumps(config, indent=2).encode())
    return out


def is_diffusers_model_dir(directory: str | os.PathLike) -> bool:
    """True when ``directory/config.json`` names a diffusers class (``_class_name``)."""
    path = Path(directory) / "config.json"
    if not path.is_file() or path.stat().st_size > MAX_CONFIG_BYTES:
        return False
    from visionformers.hub import read_json

    try:
        return isinstance(data := read_json(path), dict) and "_class_name" in data
    except ValueError:  # not JSON, or absurdly nested: from_pretrained's own reading names the problem
        return False

