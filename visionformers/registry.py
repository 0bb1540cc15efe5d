"""Model name -> (class, config preset): the one place presets live.

Each preset is one line: a model class and a frozen config (usually ``dataclasses.replace`` of a base).
``create_model(name, **overrides)`` replaces any config field; an unknown name suggests the closest ones.
"""
from __future__ import annotations

import dataclasses
import difflib
import fnmatch

from torch import nn

PRESETS: dict[str, tuple[type[nn.Module], object]] = {}


def register(name: str, cls: type[nn.Module], config) -> None:
    if name in PRESETS:
        raise KeyError(f"model {name!r} is registered twice")
    PRESETS[name] = (cls, config)


def list_models(pattern: str = "*") -> list[str]:
    """Registered names matching a shell-style pattern, e.g. ``list_models("swin*")``."""
    if not isinstance(pattern, str):
        raise ValueError(f"pattern={pattern!r} is not accepted; expected a shell-style str such as 'vit*'")
    return sorted(n for n in PRESETS if fnmatch.fnmatchcase(n, pattern))


def get_preset(name: str) -> tuple[type[nn.Module], object]:
    if not isinstance(name, str) or name not in PRESETS:
        close = difflib.get_close_matches(str(name), PRESETS, n=5, cutoff=0.4)
        hint = f"; closest: {close}" if close else f"; see vf.list_models() ({len(PRESETS)} models)"
        raise ValueError(f"model name={name!r} is not registered{hint}")
    return PRESETS[name]


def replace_config(config, overrides: dict, source: str = "overrides"):
    """``dataclasses.replace`` that names unknown fields instead of raising a TypeError."""
    fields = {f.name for f in dataclasses.fields(config)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ValueError(
            f"{source} has unknown field(s) {unknown} for {type(config).__name__}; accepted: {sorted(fields)}"
        )
    return dataclasses.replace(config, **overrides)


def create_model(name: str, **overrides) -> nn.Module:
    """Build a registered model; keyword arguments override config fields (``num_classes=10, img_size=32``)."""
    cls, config = get_preset(name)
    return cls(replace_config(config, overrides))


def model_classes() -> dict[str, tuple[type[nn.Module], type]]:
    """Class name -> (model class, config class), for rebuilding a saved model from its config.json."""
    return {cls.__name__: (cls, type(cfg)) for cls, cfg in PRESETS.values()}


# ---------------------------------------------------------------------------------------------
# Presets by family. Each family edits only its own section.
# ---------------------------------------------------------------------------------------------

# ---- vision: ViT (vision/vit.py) ----
from visionformers.vision.vit import VisionTransformer, ViTConfig  # noqa: E402

_VIT_B16 = ViTConfig()  # Dosovitskiy et al. 2021, table 1 (ViT-Base)
register("vit_tiny_patch16_224", VisionTransformer, dataclasses.replace(_VIT_B16, embed_dim=192, num_heads=3))  # DeiT-Ti: 5.7M
register("vit_small_patch16_224", VisionTransformer, dataclasses.replace(_VIT_B16, embed_dim=384, num_heads=6))  # DeiT-S: 22M
register("vit_base_patch16_224", VisionTransformer, _VIT_B16)  # 86M
register("vit_base_patch32_224", VisionTransformer, dataclasses.replace(_VIT_B16, patch_size=32))  # 88M
register("vit_large_patch16_224", VisionTransformer, dataclasses.replace(_VIT_B16, embed_dim=1024, depth=24, num_heads=16))  # 304M
register("vit_huge_patch14_224", VisionTransformer, dataclasses.replace(_VIT_B16, patch_size=14, embed_dim=1280, depth=32, num_heads=16))  # 632M
register("vit_tiny_patch4_32", VisionTransformer, dataclasses.replace(_VIT_B16, img_size=32, patch_size=4, embed_dim=192, num_heads=3, num_classes=10))  # CIFAR-sized, 64 patches
register("vit_small_patch4_32", VisionTransformer, dataclasses.replace(_VIT_B16, img_size=32, patch_size=4, embed_dim=384, num_heads=6, num_classes=10))

# ---- vision: Swin (vision/swin.py) ----
from visionformers.vision.swin import SwinConfig, SwinTransformer  # noqa: E402

_SWIN_T = SwinConfig()  # Liu et al. 2021, sec. 3.3 (Swin-T, C=96, depths 2-2-6-2)
register("swin_tiny_patch4_window7_224", SwinTransformer, _SWIN_T)  # 28M
register("swin_small_patch4_window7_224", SwinTransformer, dataclasses.replace(_SWIN_T, depths=(2, 2, 18, 2), drop_path_rate=0.3))  # 50M
register("swin_base_patch4_window7_224", SwinTransformer, dataclasses.replace(_SWIN_T, embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32), drop_path_rate=0.5))  # 88M
register("swin_large_patch4_window7_224", SwinTransformer, dataclasses.replace(_SWIN_T, embed_dim=192, depths=(2, 2, 18, 2), num_heads=(6, 12, 24, 48)))  # 197M
register("swin_tiny_patch2_window4_32", SwinTransformer, dataclasses.replace(_SWIN_T, img_size=32, patch_size=2, window_size=4, num_classes=10, drop_path_rate=0.1))  # CIFAR-sized: grids 16, 8, 4, 2

# ---- diffusion networks: UNet (vision/unet.py), DiT (vision/dit.py) ----
from visionformers.vision.dit import DiT, DiTConfig  # noqa: E402
from visionformers.vision.unet import UNet, UNetConfig  # noqa: E402

_DDPM_CIFAR10 = UNetConfig(sample_size=32, in_channels=3, base_channels=128, channel_mults=(1, 2, 2, 2), num_res_blocks=2, attention_resolutions=(16,), dropout=0.1)
register("unet_ddpm_cifar10", UNet, _DDPM_CIFAR10)  # Ho et al. 2020, appendix B: 35.7M parameters
register("unet_tiny", UNet, dataclasses.replace(_DDPM_CIFAR10, in_channels=1, base_channels=32, channel_mults=(1, 2, 2), attention_resolutions=(8,), attention_head_dim=32, norm_groups=8, dropout=0.0, use_scale_shift_norm=True))  # digits 32x32, 1.7M
_DIT_XL_2 = DiTConfig(sample_size=32, in_channels=4, patch_size=2, hidden_size=1152, depth=28, num_heads=16)
register("dit_xl_2", DiT, _DIT_XL_2)  # Peebles & Xie 2023, table 1: 675M
register("dit_l_2", DiT, dataclasses.replace(_DIT_XL_2, hidden_size=1024, depth=24, num_heads=16))  # 458M
register("dit_b_2", DiT, dataclasses.replace(_DIT_XL_2, hidden_size=768, depth=12, num_heads=12))  # 130M
register("dit_s_2", DiT, dataclasses.replace(_DIT_XL_2, hidden_size=384, depth=12, num_heads=6))  # 33M
register("dit_tiny", DiT, DiTConfig(sample_size=32, in_channels=1, patch_size=4, hidden_size=128, depth=6, num_heads=4, num_classes=None, class_dropout_prob=0.0, learn_sigma=False))  # digits 32x32

# ---- latent diffusion: AutoencoderKL (vision/autoencoder_kl.py) ----
from visionformers.vision.autoencoder_kl import AutoencoderKL, AutoencoderKLConfig  # noqa: E402

_VAE_SD = AutoencoderKLConfig()  # Rombach et al. 2022: SD 1.x/2.x, sd-vae-ft-ema / -mse; 4 channels, factor 8, 83.7M
register("vae_sd", AutoencoderKL, _VAE_SD)
register("vae_sd3", AutoencoderKL, dataclasses.replace(_VAE_SD, latent_channels=16, use_quant_conv=False, use_post_quant_conv=False, sample_size=1024, scaling_factor=1.5305, shift_factor=0.0609))  # SD3: 16 channels, 83.7M
register("vae_tiny", AutoencoderKL, dataclasses.replace(_VAE_SD, block_out_channels=(32, 64, 64), layers_per_block=1, norm_num_groups=8, sample_size=64, scaling_factor=1.0))  # tests and the CPU: factor 4

# ---- text: GPT, BERT, T5, encoder-decoder (text/) ----
from visionformers.text.bert import Bert, BertConfig, BertForMaskedLM, BertForSequenceClassification  # noqa: E402
from visionformers.text.gpt import GPT, GPTConfig  # noqa: E402
from visionformers.text.seq2seq import EncoderClassifier, EncoderConfig, Seq2SeqConfig, Seq2SeqTransformer  # noqa: E402
from visionformers.text.t5 import T5, T5Config, T5Encoder  # noqa: E402

_BYTES = dict(vocab_size=261)  # tiny presets read ByteTokenizer ids (bytes + 5 specials), no files needed
_GPT2 = GPTConfig()
register("gpt2", GPT, _GPT2)  # Radford et al. 2019: 124M (HF gpt2: 124,439,808)
register("gpt2_medium", GPT, dataclasses.replace(_GPT2, dim=1024, depth=24, num_heads=16))  # 355M
register("gpt2_large", GPT, dataclasses.replace(_GPT2, dim=1280, depth=36, num_heads=20))  # 774M
register("gpt2_xl", GPT, dataclasses.replace(_GPT2, dim=1600, depth=48, num_heads=25))  # 1.56B ("1.5B")
register("gpt_small", GPT, dataclasses.replace(_GPT2, vocab_size=40478, max_len=512, pre_norm=False, eos_token_id=None))  # GPT-1 (Radford et al. 2018): 117M, post-norm
register("gpt_tiny", GPT, dataclasses.replace(_GPT2, **_BYTES, max_len=256, dim=64, depth=2, num_heads=4, eos_token_id=258))
_BERT_BASE = BertConfig()
register("bert_base", Bert, _BERT_BASE)  # Devlin et al. 2019: 110M
register("bert_large", Bert, dataclasses.replace(_BERT_BASE, dim=1024, depth=24, num_heads=16, mlp_hidden_dim=4096))  # "340M" (HF: 335M)
register("bert_tiny", Bert, dataclasses.replace(_BERT_BASE, **_BYTES, max_len=256, dim=64, depth=2, num_heads=4, mlp_hidden_dim=256))
register("bert_base_mlm", BertForMaskedLM, _BERT_BASE)
register("bert_large_mlm", BertForMaskedLM, PRESETS["bert_large"][1])
register("bert_tiny_mlm", BertForMaskedLM, PRESETS["bert_tiny"][1])
register("bert_base_cls", BertForSequenceClassification, _BERT_BASE)
register("bert_large_cls", BertForSequenceClassification, PRESETS["bert_large"][1])
register("bert_tiny_cls", BertForSequenceClassification, PRESETS["bert_tiny"][1])
_T5_SMALL = T5Config()
register("t5_small", T5, _T5_SMALL)  # Raffel et al. 2020: 60M
register("t5_base", T5, dataclasses.replace(_T5_SMALL, dim=768, mlp_hidden_dim=3072, depth=12, decoder_depth=12, num_heads=12))  # 220M
register("t5_large", T5, dataclasses.replace(_T5_SMALL, dim=1024, mlp_hidden_dim=4096, depth=24, decoder_depth=24, num_heads=16))  # "770M" (HF: 738M)
register("t5_xl", T5, dataclasses.replace(_T5_SMALL, dim=1024, head_dim=128, mlp_hidden_dim=16384, depth=24, decoder_depth=24, num_heads=32))  # T5-3B: "3B" (HF: 2.85B)
register("t5_tiny", T5, dataclasses.replace(_T5_SMALL, **_BYTES, dim=64, head_dim=16, mlp_hidden_dim=128, depth=2, decoder_depth=2, num_heads=4, pad_token_id=256, eos_token_id=258, decoder_start_token_id=257))
register("t5_tiny_encoder", T5Encoder, PRESETS["t5_tiny"][1])  # the encoder alone, for text conditioning
register("t5_small_encoder", T5Encoder, PRESETS["t5_small"][1])
register("t5_base_encoder", T5Encoder, PRESETS["t5_base"][1])
register("t5_large_encoder", T5Encoder, PRESETS["t5_large"][1])
register("t5_xl_encoder", T5Encoder, PRESETS["t5_xl"][1])
_VASWANI_BASE = Seq2SeqConfig()
register("transformer_base", Seq2SeqTransformer, _VASWANI_BASE)  # Vaswani et al. 2017, table 3 "base": 65M
register("transformer_tiny", Seq2SeqTransformer, dataclasses.replace(_VASWANI_BASE, **_BYTES, dim=64, num_heads=4, encoder_depth=2, decoder_depth=2, mlp_hidden_dim=256, max_len=256))
register("encoder_tiny", EncoderClassifier, EncoderConfig(dim=64, num_heads=4, depth=2, mlp_hidden_dim=256, max_len=256))
