"""The bad-input sweep: one table of wrong calls across the public API and the scripts' command lines.

Every case must fail with ``ValueError`` / ``FileNotFoundError`` (scripts: a non-zero exit with one error line on
stderr and no traceback) whose message names the argument and the value given, never with an error from deep
inside torch. A case is ``Case(id, call, exception, names)``: ``call(tmp)`` makes the bad call (``tmp`` is a fresh
directory) and every string in ``names`` must appear in the message.
"""
from __future__ import annotations

import contextlib
import functools
import importlib
import io
import json
import os
import runpy
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

import visionformers as vf
from visionformers import diffusion
from visionformers.data import DigitsDataset, ImageFolderDataset, load_captions
from visionformers.hub import load_into, load_state_dict
from visionformers.training.checkpoint import resolve_checkpoint

REPO = Path(__file__).resolve().parents[1]
TINY_UNET = json.dumps({"base_channels": 8, "channel_mults": [1, 2], "num_res_blocks": 1,
                        "attention_resolutions": [4], "attention_head_dim": 8, "norm_groups": 4})


class ScriptError(Exception):
    """A script exited non-zero; the message is its one stderr error line."""


@dataclass(frozen=True)
class Case:
    id: str
    call: Callable[[Path], object]
    exception: type[BaseException]
    names: tuple[str, ...]  # the argument and the offending value, as the message must spell them


# ---- tiny models (built once) -------------------------------------------------------------------


@functools.cache
def vit():
    return vf.create_model("vit_tiny_patch4_32", embed_dim=32, depth=1, num_heads=2, num_classes=3).eval()


@functools.cache
def vit_dynamic():
    return vf.create_model("vit_tiny_patch4_32", embed_dim=32, depth=1, num_heads=2, dynamic_img_size=True).eval()


@functools.cache
def swin():
    return vf.create_model("swin_tiny_patch2_window4_32", embed_dim=16, depths=(1, 1), num_heads=(1, 2),
                           num_classes=3).eval()


@functools.cache
def unet(num_classes=None):
    return vf.create_model("unet_tiny", sample_size=8, base_channels=8, channel_mults=(1, 2), num_res_blocks=1,
                           attention_resolutions=(4,), attention_head_dim=8, norm_groups=4,
                           num_classes=num_classes).eval()


@functools.cache
def dit():
    return vf.create_model("dit_tiny", sample_size=8, hidden_size=32, depth=1, num_heads=2).eval()


@functools.cache
def gpt():
    return vf.create_model("gpt_tiny", dim=32, depth=1, num_heads=2, max_len=16).eval()


@functools.cache
def bert():
    return vf.create_model("bert_tiny", dim=32, depth=1, num_heads=2, max_len=16, mlp_hidden_dim=64).eval()


@functools.cache
def bert_cls():
    return vf.create_model("bert_tiny_cls", dim=32, depth=1, num_heads=2, max_len=16, mlp_hidden_dim=64).eval()


@functools.cache
def bert_mlm():
    return vf.create_model("bert_tiny_mlm", dim=32, depth=1, num_heads=2, max_len=16, mlp_hidden_dim=64).eval()


@functools.cache
def t5():
    return vf.create_model("t5_tiny", dim=32, head_dim=8, num_heads=4, depth=1, decoder_depth=1,
                           mlp_hidden_dim=64).eval()


def img(*shape, dtype=torch.float32):
    return torch.zeros(shape, dtype=dtype)


def ids(*values):
    return torch.tensor([list(values)])


def sched():
    return diffusion.NoiseSchedule("cosine", num_train_steps=100)


def zero_model(x, t, **cond):
    return torch.zeros_like(x)


def hf_after_submodule_import():
    """``vf.convert.from_hf`` once its module has been imported by name (that used to rebind it to the module)."""
    importlib.import_module("visionformers.convert.from_hf")
    return vf.convert.from_hf


# ---- files ---------------------------------------------------------------------------------------


def timm_vit_state() -> dict:
    import timm

    return timm.create_model("vit_tiny_patch16_224", img_size=32, depth=2, pretrained=False).state_dict()


def without(state: dict, key: str) -> dict:
    return {k: v for k, v in state.items() if k != key}


def saved_vit(tmp: Path) -> Path:
    return vf.save_pretrained(vit(), tmp / "model")


def edit_config(tmp: Path, edit: Callable[[dict], None]) -> Path:
    d = saved_vit(tmp)
    meta = json.loads((d / "config.json").read_text())
    edit(meta)
    (d / "config.json").write_text(json.dumps(meta))
    return d


def with_weights(tmp: Path, data: bytes | None) -> Path:
    d = saved_vit(tmp)
    w = d / "model.safetensors"
    if data is None:
        w.unlink()
    else:
        w.write_bytes(data(w.read_bytes()) if callable(data) else data)
    return d


def torch_pickle(tmp: Path) -> bytes:
    torch.save({"w": torch.zeros(2)}, tmp / "x.pt")
    return (tmp / "x.pt").read_bytes()


def folder_of(tmp: Path, files: dict[str, bytes]) -> Path:
    root = tmp / "images"
    root.mkdir()
    for name, data in files.items():
        (root / name).write_bytes(data)
    return root


PNG_HEAD = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x00\x08"  # a PNG cut after 20 bytes


# ---- scripts, in-process as ``__main__`` (the command-line path; ``main`` itself raises for Python callers) ----


def run_script(rel: str, *argv: str):
    """Run ``python <rel> argv`` in this process; a clean non-zero exit becomes ScriptError(its one error line)."""
    path = str(REPO / rel)
    err = io.StringIO()
    code: object = 0
    old_argv = sys.argv
    sys.argv = [path, *argv]
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            runpy.run_path(path, run_name="__main__")
    except SystemExit as e:
        code = e.code
    finally:
        sys.argv = old_argv
    text = err.getvalue() + (f"\n{code}" if isinstance(code, str) else "")
    assert code not in (0, None), f"{rel} {argv} accepted bad arguments"
    assert "Traceback" not in text, text
    lines = [ln for ln in text.splitlines() if "error" in ln.lower()]
    assert len(lines) == 1, f"expected one error line on stderr, got:\n{text}"
    raise ScriptError(lines[0])


def train_unet(tmp, *argv):
    return run_script("train_scripts/train_unet.py", "--model_overrides", TINY_UNET, "--max_train_steps", "1",
                      "--train_batch_size", "4", "--num_samples", "2", "--output_dir", str(tmp / "out"), *argv)


def sample_unet(tmp, *argv):
    return run_script("sample_scripts/sample_unet.py", "--output_dir", str(tmp / "out"), *argv)


def train_classifier(tmp, *argv):
    return run_script("train_scripts/train_classifier.py", "--epochs", "1", "--max_steps_per_epoch", "1",
                      "--dataloader_num_workers", "0", "--output_dir", str(tmp / "out"), *argv)


def text_file(tmp: Path, text: str = "hello world. " * 40) -> str:
    (tmp / "a.txt").write_text(text)
    return str(tmp / "a.txt")


def train_lm(tmp, *argv):
    return run_script("train_scripts/train_lm.py", "--max_train_steps", "1", "--train_batch_size", "2",
                      "--output_dir", str(tmp / "out"), *argv)


def generate_text(tmp, *argv):
    return run_script("sample_scripts/generate_text.py", *argv)


def evaluate(tmp, *argv):
    return run_script("sample_scripts/evaluate.py", "--feature_extractor", "random_conv", *argv)


VE, FE, SE = ValueError, FileNotFoundError, ScriptError

CASES = [
    # ---- ViT ----
    Case("vit-3d-image", lambda tmp: vit()(img(3, 32, 32)), VE, ("images", "shape=(3, 32, 32)")),
    Case("vit-int-dtype", lambda tmp: vit()(img(1, 3, 32, 32, dtype=torch.uint8)), VE, ("images", "torch.uint8")),
    Case("vit-wrong-channels", lambda tmp: vit()(img(1, 1, 32, 32)), VE, ("images", "(1, 1, 32, 32)", "3 channels")),
    Case("vit-wrong-size", lambda tmp: vit()(img(1, 3, 64, 64)), VE, ("images", "(1, 3, 64, 64)", "(32, 32)")),
    Case("vit-size-not-divisible", lambda tmp: vit_dynamic()(img(1, 3, 30, 30)), VE,
         ("images", "(1, 3, 30, 30)", "patch_size=4")),
    Case("vit-not-a-tensor", lambda tmp: vit()([[0.0]]), VE, ("images", "list")),
    Case("vit-cfg-img-not-divisible", lambda tmp: vf.create_model("vit_tiny_patch4_32", img_size=30), VE,
         ("img_size", "30", "patch_size=4")),
    Case("vit-cfg-dim-heads", lambda tmp: vf.create_model("vit_tiny_patch4_32", embed_dim=100, num_heads=3), VE,
         ("embed_dim", "100", "num_heads=3")),
    Case("vit-cfg-zero-heads", lambda tmp: vf.create_model("vit_tiny_patch4_32", num_heads=0), VE, ("num_heads", "0")),
    Case("vit-cfg-negative-depth", lambda tmp: vf.create_model("vit_tiny_patch4_32", depth=-1), VE, ("depth", "-1")),
    Case("vit-cfg-pos-embed", lambda tmp: vf.create_model("vit_tiny_patch4_32", pos_embed="rotary"), VE,
         ("pos_embed", "'rotary'")),
    Case("vit-cfg-pool", lambda tmp: vf.create_model("vit_tiny_patch4_32", global_pool="max"), VE,
         ("global_pool", "'max'")),
    Case("vit-cfg-drop-path", lambda tmp: vf.create_model("vit_tiny_patch4_32", drop_path_rate=1.5), VE,
         ("drop_path_rate", "1.5")),
    Case("vit-cfg-rope-head-dim", lambda tmp: vf.create_model("vit_tiny_patch4_32", embed_dim=36, num_heads=6,
                                                              pos_embed="rope"), VE, ("pos_embed", "'rope'", "head_dim=6")),
    Case("vit-attention-block-idx", lambda tmp: vit().get_attention_maps(img(1, 3, 32, 32), block_idx=5), VE,
         ("block_idx", "5")),
    # ---- registry ----
    Case("registry-unknown-name", lambda tmp: vf.create_model("vit_tiniest"), VE, ("name", "'vit_tiniest'")),
    Case("registry-unknown-field", lambda tmp: vf.create_model("vit_tiny_patch4_32", embed_dims=64), VE,
         ("embed_dims",)),
    # ---- Swin ----
    Case("swin-3d-image", lambda tmp: swin()(img(3, 32, 32)), VE, ("images", "shape=(3, 32, 32)")),
    Case("swin-int-dtype", lambda tmp: swin()(img(1, 3, 32, 32, dtype=torch.int64)), VE, ("images", "torch.int64")),
    Case("swin-wrong-channels", lambda tmp: swin()(img(1, 4, 32, 32)), VE, ("images", "(1, 4, 32, 32)", "3 channels")),
    Case("swin-cfg-heads-per-stage", lambda tmp: vf.create_model("swin_tiny_patch2_window4_32", depths=(2, 2),
                                                                 num_heads=(1, 2, 4)), VE, ("num_heads", "(1, 2, 4)")),
    Case("swin-cfg-heads-divide-width", lambda tmp: vf.create_model("swin_tiny_patch2_window4_32", embed_dim=10,
                                                                    depths=(1, 1), num_heads=(3, 6)), VE,
         ("num_heads", "(3, 6)")),
    Case("swin-cfg-zero-window", lambda tmp: vf.create_model("swin_tiny_patch2_window4_32", window_size=0), VE,
         ("window_size", "0")),
    Case("swin-cfg-empty-depths", lambda tmp: vf.create_model("swin_tiny_patch2_window4_32", depths=()), VE,
         ("depths", "()")),
    # ---- UNet ----
    Case("unet-3d-x", lambda tmp: unet()(img(1, 8, 8), 0), VE, ("x", "shape=(1, 8, 8)")),
    Case("unet-int-x", lambda tmp: unet()(img(1, 1, 8, 8, dtype=torch.int32), 0), VE, ("x", "torch.int32")),
    Case("unet-wrong-channels", lambda tmp: unet()(img(1, 3, 8, 8), 0), VE, ("x", "(1, 3, 8, 8)", "1 channels")),
    Case("unet-size-not-divisible", lambda tmp: unet()(img(1, 1, 7, 7), 0), VE, ("x", "(1, 1, 7, 7)", "multiples of 2")),
    Case("unet-timesteps-shape", lambda tmp: unet()(img(2, 1, 8, 8), torch.zeros(3)), VE, ("t", "shape=(3,)")),
    Case("unet-labels-unconditional", lambda tmp: unet()(img(1, 1, 8, 8), 0, class_labels=torch.tensor([1])), VE,
         ("class_labels", "shape=(1,)")),
    Case("unet-label-too-large", lambda tmp: unet(10)(img(1, 1, 8, 8), 0, class_labels=torch.tensor([11])), VE,
         ("class_labels", "11")),
    Case("unet-context-unexpected", lambda tmp: unet()(img(1, 1, 8, 8), 0, context=img(1, 4, 8)), VE,
         ("context", "shape=(1, 4, 8)")),
    Case("unet-cfg-norm-groups", lambda tmp: vf.create_model("unet_tiny", norm_groups=3), VE, ("norm_groups", "3")),
    Case("unet-cfg-norm-groups-stem", lambda tmp: vf.create_model("unet_tiny", base_channels=4, channel_mults=(3, 6, 6),
                                                                  norm_groups=3), VE, ("norm_groups", "3", "base_channels=4")),
    Case("unet-cfg-sample-size", lambda tmp: vf.create_model("unet_tiny", sample_size=30), VE, ("sample_size", "30")),
    Case("unet-cfg-attention-res", lambda tmp: vf.create_model("unet_tiny", attention_resolutions=(5,)), VE,
         ("attention_resolutions", "(5,)")),
    Case("unet-cfg-empty-mults", lambda tmp: vf.create_model("unet_tiny", channel_mults=()), VE, ("channel_mults", "()")),
    Case("unet-cfg-head-dim", lambda tmp: vf.create_model("unet_tiny", attention_head_dim=24), VE,
         ("attention_head_dim", "24")),
    # ---- DiT ----
    Case("dit-wrong-size", lambda tmp: dit()(img(1, 1, 12, 12), 0), VE, ("x", "(1, 1, 12, 12)", "(8, 8)")),
    Case("dit-int-x", lambda tmp: dit()(img(1, 1, 8, 8, dtype=torch.int64), 0), VE, ("x", "torch.int64")),
    Case("dit-cfg-sample-size", lambda tmp: vf.create_model("dit_tiny", sample_size=30), VE, ("sample_size", "30")),
    Case("dit-cfg-hidden-heads", lambda tmp: vf.create_model("dit_tiny", hidden_size=30, num_heads=4), VE,
         ("hidden_size", "30")),
    Case("dit-cfg-zero-depth", lambda tmp: vf.create_model("dit_tiny", depth=0), VE, ("depth", "0")),
    # ---- GPT ----
    Case("gpt-id-too-large", lambda tmp: gpt()(ids(1, 261)), VE, ("input_ids", "261", "vocab_size=261")),
    Case("gpt-negative-id", lambda tmp: gpt()(ids(1, -1)), VE, ("input_ids", "-1")),
    Case("gpt-too-long", lambda tmp: gpt()(torch.zeros(1, 17, dtype=torch.long)), VE,
         ("input_ids", "(1, 17)", "max_len=16")),
    Case("gpt-float-ids", lambda tmp: gpt()(img(1, 4)), VE, ("input_ids", "torch.float32")),
    Case("gpt-1d-ids", lambda tmp: gpt()(torch.zeros(5, dtype=torch.long)), VE, ("input_ids", "shape=(5,)")),
    Case("gpt-labels-shape", lambda tmp: gpt()(ids(1, 2, 3), labels=ids(1, 2)), VE, ("labels", "(1, 2)")),
    Case("gpt-label-too-large", lambda tmp: gpt()(ids(1, 2, 3), labels=ids(1, 2, 999)), VE, ("labels", "999", "261")),
    Case("gpt-float-labels", lambda tmp: gpt()(ids(1, 2, 3), labels=img(1, 3)), VE, ("labels", "torch.float32")),
    Case("bert-cls-label-too-large", lambda tmp: bert_cls()(ids(1, 2), labels=torch.tensor([7])), VE,
         ("labels", "7", "[0, 2)")),
    Case("bert-mlm-negative-label", lambda tmp: bert_mlm()(ids(1, 2), labels=ids(-5, -100)), VE, ("labels", "-5")),
    Case("gpt-top-p-above-1", lambda tmp: gpt().generate(ids(1), 2, do_sample=True, top_p=1.5), VE, ("top_p", "1.5")),
    Case("gpt-top-p-zero", lambda tmp: gpt().generate(ids(1), 2, do_sample=True, top_p=0.0), VE, ("top_p", "0.0")),
    Case("gpt-temperature-zero", lambda tmp: gpt().generate(ids(1), 2, do_sample=True, temperature=0.0), VE,
         ("temperature", "0.0")),
    Case("gpt-temperature-negative", lambda tmp: gpt().generate(ids(1), 2, do_sample=True, temperature=-1.0), VE,
         ("temperature", "-1.0")),
    Case("gpt-top-k-zero", lambda tmp: gpt().generate(ids(1), 2, do_sample=True, top_k=0), VE, ("top_k", "0")),
    Case("gpt-eos-id-past-vocab", lambda tmp: gpt().generate(ids(1), 2, eos_token_id=261), VE,
         ("eos_token_id", "261", "[0, 261)")),
    Case("gpt-pad-id-negative", lambda tmp: gpt().generate(ids(1), 2, eos_token_id=3, pad_token_id=-1), VE,
         ("pad_token_id", "-1")),
    Case("t5-eos-id-past-vocab", lambda tmp: t5().generate(ids(1, 2), 2, eos_token_id=10**6), VE,
         ("eos_token_id", "1000000")),
    Case("gpt-max-new-negative", lambda tmp: gpt().generate(ids(1), -1), VE, ("max_new_tokens", "-1")),
    Case("gpt-max-new-past-context", lambda tmp: gpt().generate(ids(1, 2), 20), VE, ("max_new_tokens", "20", "16")),
    Case("gpt-cfg-dim-heads", lambda tmp: vf.create_model("gpt_tiny", dim=30, num_heads=4), VE, ("dim", "30")),
    Case("gpt-cfg-act", lambda tmp: vf.create_model("gpt_tiny", mlp_act="swish"), VE, ("mlp_act", "'swish'")),
    Case("gpt-cfg-dropout", lambda tmp: vf.create_model("gpt_tiny", dropout=1.0), VE, ("dropout", "1.0")),
    # ---- BERT ----
    Case("bert-id-too-large", lambda tmp: bert()(ids(1, 300)), VE, ("input_ids", "300")),
    Case("bert-negative-id", lambda tmp: bert()(ids(-5, 1)), VE, ("input_ids", "-5")),
    Case("bert-too-long", lambda tmp: bert()(torch.zeros(1, 20, dtype=torch.long)), VE, ("input_ids", "(1, 20)")),
    Case("bert-mask-shape", lambda tmp: bert()(ids(1, 2, 3), attention_mask=torch.ones(1, 2, dtype=torch.bool)), VE,
         ("attention_mask", "shape=(1, 2)", "(1, 3)")),
    Case("bert-mask-float", lambda tmp: bert()(ids(1, 2), attention_mask=torch.ones(1, 2)), VE,
         ("attention_mask", "torch.float32")),
    Case("bert-token-type", lambda tmp: bert()(ids(1, 2), token_type_ids=ids(0, 2)), VE, ("token_type_ids", "2")),
    Case("bert-cfg-heads", lambda tmp: vf.create_model("bert_tiny", num_heads=0), VE, ("num_heads", "0")),
    # ---- T5 ----
    Case("t5-decoder-id-too-large", lambda tmp: t5()(ids(1, 2), ids(0, 999)), VE, ("decoder_input_ids", "999")),
    Case("t5-negative-id", lambda tmp: t5()(ids(-2, 1), ids(0)), VE, ("input_ids", "-2")),
    Case("t5-mask-shape", lambda tmp: t5()(ids(1, 2), ids(0), attention_mask=torch.ones(2, 2, dtype=torch.long)), VE,
         ("attention_mask", "shape=(2, 2)")),
    Case("t5-top-p", lambda tmp: t5().generate(ids(1, 2), 2, do_sample=True, top_p=2.0), VE, ("top_p", "2.0")),
    Case("t5-cfg-pad-id", lambda tmp: vf.create_model("t5_tiny", pad_token_id=261), VE, ("pad_token_id", "261")),
    # ---- attention block ----
    Case("attention-dim-heads", lambda tmp: vf.nn.Attention(30, 4), VE, ("dim", "30", "num_heads=4")),
    Case("attention-kv-heads", lambda tmp: vf.nn.Attention(32, 4, num_kv_heads=3), VE,
         ("num_kv_heads", "3", "num_heads=4")),
    Case("attention-zero-kv-heads", lambda tmp: vf.nn.Attention(32, 4, num_kv_heads=0), VE, ("num_kv_heads", "0")),
    # ---- diffusion ----
    Case("schedule-unknown", lambda tmp: diffusion.NoiseSchedule("quadratic"), VE, ("kind", "'quadratic'")),
    Case("schedule-one-step", lambda tmp: diffusion.NoiseSchedule("cosine", num_train_steps=1), VE,
         ("num_train_steps", "1")),
    Case("sample-unknown-sampler", lambda tmp: diffusion.sample(zero_model, (1, 2), sched(), sampler="foo"), VE,
         ("sampler", "'foo'")),
    Case("sample-zero-steps", lambda tmp: diffusion.sample(zero_model, (1, 2), sched(), steps=0), VE, ("steps", "0")),
    Case("sample-negative-steps", lambda tmp: diffusion.sample(zero_model, (1, 2), sched(), steps=-3), VE,
         ("steps", "-3")),
    Case("sample-too-many-steps", lambda tmp: diffusion.sample(zero_model, (1, 2), sched(), "ddim", steps=500), VE,
         ("steps", "500", "num_train_steps=100")),
    Case("sample-negative-guidance", lambda tmp: diffusion.sample(zero_model, (1, 2), sched(), steps=2,
                                                                  guidance_scale=-1.0, uncond={}), VE,
         ("guidance_scale", "-1.0")),
    Case("sample-prediction-type", lambda tmp: diffusion.sample(zero_model, (1, 2), sched(), steps=2,
                                                                prediction_type="x1"), VE, ("prediction_type", "'x1'")),
    Case("sample-bad-shape", lambda tmp: diffusion.sample(zero_model, (0, 2), sched(), steps=2), VE,
         ("shape", "(0, 2)")),
    Case("ddim-negative-eta", lambda tmp: diffusion.sample_ddim(zero_model, img(1, 2), sched(), 2, eta=-1.0), VE,
         ("eta", "-1.0")),
    Case("loss-prediction-type", lambda tmp: diffusion.training_loss(zero_model, img(2, 1, 4, 4), sched(),
                                                                      prediction_type="noise"), VE,
         ("prediction_type", "'noise'")),
    Case("loss-min-snr-zero", lambda tmp: diffusion.training_loss(zero_model, img(2, 1, 4, 4), sched(),
                                                                   min_snr_gamma=0.0), VE, ("min_snr_gamma", "0.0")),
    Case("loss-int-x0", lambda tmp: diffusion.training_loss(zero_model, img(2, 1, 4, 4, dtype=torch.long), sched()),
         VE, ("x0", "torch.int64")),
    # ---- data ----
    Case("folder-missing", lambda tmp: ImageFolderDataset(tmp / "nope", 8), FE, ("root", "nope")),
    Case("folder-empty", lambda tmp: ImageFolderDataset(folder_of(tmp, {}), 8), VE, ("root", "images", "no images")),
    Case("folder-truncated-images", lambda tmp: ImageFolderDataset(folder_of(tmp, {"a.png": PNG_HEAD, "b.png": b""}),
                                                                    8, check="load"), VE, ("root", "images", "2 images")),
    Case("folder-resolution", lambda tmp: ImageFolderDataset(folder_of(tmp, {}), 0), VE, ("resolution", "0")),
    Case("folder-channels", lambda tmp: ImageFolderDataset(folder_of(tmp, {}), 8, channels=2), VE, ("channels", "2")),
    Case("folder-check", lambda tmp: ImageFolderDataset(folder_of(tmp, {}), 8, check="deep"), VE, ("check", "'deep'")),
    Case("captions-missing", lambda tmp: load_captions(tmp / "caps.jsonl"), FE, ("captions_file", "caps.jsonl")),
    Case("digits-split", lambda tmp: DigitsDataset("val"), VE, ("split", "'val'")),
    # ---- hub: model directories and weight files ----
    Case("pretrained-missing-dir", lambda tmp: vf.from_pretrained(tmp / "nope"), FE, ("nope", "does not exist")),
    Case("pretrained-no-config", lambda tmp: vf.from_pretrained(folder_of(tmp, {})), FE, ("config.json",)),
    Case("pretrained-no-weights", lambda tmp: vf.from_pretrained(with_weights(tmp, None)), FE, ("model.safetensors",)),
    Case("pretrained-empty-weights", lambda tmp: vf.from_pretrained(with_weights(tmp, b"")), VE,
         ("model.safetensors", "empty")),
    Case("pretrained-truncated-weights", lambda tmp: vf.from_pretrained(with_weights(tmp, lambda b: b[: len(b) // 2])),
         VE, ("model.safetensors", "safetensors")),
    Case("pretrained-foreign-weights", lambda tmp: vf.from_pretrained(with_weights(tmp, torch_pickle(tmp))), VE,
         ("model.safetensors", "safetensors")),
    Case("pretrained-unknown-key", lambda tmp: vf.from_pretrained(edit_config(tmp, lambda m: m["config"].update(bogus=1))),
         VE, ("config.json", "'bogus'")),
    Case("pretrained-wrong-type", lambda tmp: vf.from_pretrained(edit_config(tmp, lambda m: m["config"].update(depth="two"))),
         VE, ("'depth'", "'two'")),
    Case("pretrained-invalid-value", lambda tmp: vf.from_pretrained(edit_config(tmp, lambda m: m["config"].update(depth=-2))),
         VE, ("depth", "-2")),
    Case("pretrained-unknown-architecture",
         lambda tmp: vf.from_pretrained(edit_config(tmp, lambda m: m.update(architecture="ResNet"))), VE,
         ("architecture", "'ResNet'")),
    Case("pretrained-not-json", lambda tmp: vf.from_pretrained(folder_of(tmp, {"config.json": b"{oops"})), VE,
         ("config.json", "JSON")),
    Case("pretrained-bad-override", lambda tmp: vf.from_pretrained(saved_vit(tmp), depthh=2), VE, ("depthh",)),
    Case("weights-missing-file", lambda tmp: load_state_dict(tmp / "w.safetensors"), FE, ("w.safetensors",)),
    Case("weights-wrong-model", lambda tmp: load_into(vit(), gpt().state_dict(), source="gpt.safetensors"), VE,
         ("gpt.safetensors",)),
    # ---- convert ----
    Case("timm-unknown-arch", lambda tmp: vf.convert.from_timm({"foo.weight": torch.zeros(1)}), VE,
         ("state_dict", "'foo.weight'")),
    Case("torchvision-unknown-arch", lambda tmp: vf.convert.from_torchvision({"layer1.0.conv1.weight": torch.zeros(1)}),
         VE, ("state_dict", "'layer1.0.conv1.weight'")),
    Case("hf-unknown-arch", lambda tmp: vf.convert.from_hf({"model.layers.0.mlp.gate_proj.weight": torch.zeros(1)}), VE,
         ("state_dict", "'model.layers.0.mlp.gate_proj.weight'")),
    Case("timm-partial-vit", lambda tmp: vf.convert.from_timm({"blocks.0.attn.qkv.weight": torch.zeros(96, 32),
                                                               "patch_embed.proj.weight": torch.zeros(32, 3, 4, 4)}),
         VE, ("state_dict", "incomplete", "'blocks.0.mlp.fc1.weight'")),
    Case("torchvision-partial-vit", lambda tmp: vf.convert.from_torchvision({"conv_proj.weight": torch.zeros(32, 3, 4, 4),
                                                                            "encoder.pos_embedding": torch.zeros(1, 5, 32)}),
         VE, ("state_dict", "incomplete", "'encoder.layers.encoder_layer_0.mlp.linear_1.weight'")),
    Case("hf-partial-t5", lambda tmp: hf_after_submodule_import()(
        {"encoder.block.0.layer.0.SelfAttention.q.weight": torch.zeros(8, 8)}, return_config=True), VE,
         ("state_dict", "incomplete", "t5")),
    Case("pretrained-missing-field", lambda tmp: vf.from_pretrained(edit_config(tmp, lambda m: m["config"].pop("depth"))),
         VE, ("config.json", "'depth'", "missing")),
    Case("pretrained-future-format", lambda tmp: vf.from_pretrained(edit_config(tmp, lambda m: m.update(format_version=99))),
         VE, ("format_version=99",)),
    Case("pretrained-architecture-list",
         lambda tmp: vf.from_pretrained(edit_config(tmp, lambda m: m.update(architecture=["x"]))), VE, ("architecture",)),
    Case("pretrained-none", lambda tmp: vf.from_pretrained(None), VE, ("directory=None",)),
    Case("save-into-a-file", lambda tmp: vf.save_pretrained(vit(), text_file(tmp)), VE, ("save_directory", "a.txt")),
    Case("load-into-non-tensor", lambda tmp: load_into(vit(), {"head.weight": 1}), VE, ("'head.weight'", "int")),
    Case("timm-config-type", lambda tmp: vf.convert.from_timm({"a": torch.zeros(1)}, config=42), VE, ("config=42",)),
    Case("timm-3d-patch-weight", lambda tmp: vf.convert.from_timm(
        {"blocks.0.attn.qkv.weight": torch.zeros(96, 32), "patch_embed.proj.weight": torch.zeros(32, 3, 16)}), VE,
         ("patch_embed.proj.weight", "(32, 3, 16)")),
    Case("timm-cut-short-block", lambda tmp: vf.convert.from_timm(without(timm_vit_state(), "blocks.1.mlp.fc2.weight")),
         VE, ("incomplete", "blocks.1", "mlp.fc2.weight")),
    Case("hf-partial-gpt2-no-config", lambda tmp: hf_after_submodule_import()(
        {"h.0.attn.c_attn.weight": torch.zeros(8, 24), "h.0.attn.c_attn.bias": torch.zeros(24)}), VE, ("incomplete",)),
    Case("list-models-not-a-str", lambda tmp: vf.list_models(5), VE, ("pattern=5",)),
    Case("optimizer-betas", lambda tmp: vf.training.build_optimizer(vit(), "adamw", 1e-3, 0.0, (1.5, 0.9)), VE,
         ("betas", "1.5")),
    Case("generator-seed-str", lambda tmp: vf.training.make_generator("x", 0), VE, ("seed='x'",)),
    Case("timm-not-a-dict", lambda tmp: vf.convert.from_timm([torch.zeros(1)]), VE, ("state_dict", "list")),
    # ---- training checkpoints ----
    Case("resume-missing", lambda tmp: resolve_checkpoint(tmp, str(tmp / "nope")), FE,
         ("resume_from_checkpoint", "nope")),
    # ---- scripts (in-process main(argv)) ----
    Case("train_unet-zero-steps", lambda tmp: train_unet(tmp, "--num_inference_steps", "0"), SE,
         ("--num_inference_steps", "0")),
    Case("train_unet-negative-guidance", lambda tmp: train_unet(tmp, "--guidance_scale", "-1"), SE,
         ("--guidance_scale", "-1")),
    Case("train_unet-unknown-sampler", lambda tmp: train_unet(tmp, "--sampler", "foo"), SE, ("--sampler", "'foo'")),
    Case("train_unet-unknown-schedule", lambda tmp: train_unet(tmp, "--noise_schedule", "quad"), SE,
         ("--noise_schedule", "'quad'")),
    Case("train_unet-prediction-type", lambda tmp: train_unet(tmp, "--prediction_type", "x1"), SE,
         ("--prediction_type", "'x1'")),
    Case("train_unet-resolution-7", lambda tmp: train_unet(tmp, "--resolution", "7"), SE, ("--resolution=7", "sample_size=7")),
    Case("train_unet-unknown-model", lambda tmp: train_unet(tmp, "--model", "unet_huge"), SE, ("'unet_huge'",)),
    Case("train_unet-missing-data", lambda tmp: train_unet(tmp, "--train_data_dir", str(tmp / "nope")), SE,
         ("--train_data_dir", "nope")),
    Case("train_unet-missing-captions", lambda tmp: train_unet(tmp, "--train_data_dir", str(tmp), "--captions_file",
                                                               str(tmp / "caps.jsonl")), SE, ("--captions_file", "caps.jsonl")),
    Case("train_unet-captions-without-folder", lambda tmp: train_unet(tmp, "--captions_file", str(tmp / "caps.jsonl")),
         SE, ("--captions_file", "--train_data_dir")),
    Case("train_unet-flip-without-folder", lambda tmp: train_unet(tmp, "--random_flip"), SE,
         ("--random_flip", "--train_data_dir")),
    Case("train_unet-overrides-not-object", lambda tmp: train_unet(tmp, "--model_overrides", "[1]"), SE,
         ("--model_overrides",)),
    Case("train_unet-negative-clip", lambda tmp: train_unet(tmp, "--max_grad_norm", "-1"), SE, ("--max_grad_norm", "-1")),
    Case("train_unet-output-is-a-file", lambda tmp: train_unet(tmp, "--output_dir", text_file(tmp)), SE,
         ("--output_dir", "a.txt")),
    Case("train_unet-short-linear-schedule", lambda tmp: train_unet(tmp, "--noise_schedule", "linear",
                                                                    "--num_train_timesteps", "10"), SE,
         ("--num_train_timesteps=10", "num_train_steps")),
    Case("train_unet-zero-batch", lambda tmp: train_unet(tmp, "--train_batch_size", "0"), SE,
         ("--train_batch_size", "0")),
    Case("sample_unet-missing-model", lambda tmp: sample_unet(tmp, "--model_path", "/nope"), SE, ("'/nope'",)),
    Case("sample_unet-zero-steps", lambda tmp: sample_unet(tmp, "--model_path", "/nope", "--num_inference_steps", "0"),
         SE, ("--num_inference_steps", "0")),
    Case("sample_unet-negative-guidance", lambda tmp: sample_unet(tmp, "--model_path", "/nope", "--guidance_scale", "-1"),
         SE, ("--guidance_scale", "-1")),
    Case("sample_unet-unknown-sampler", lambda tmp: sample_unet(tmp, "--model_path", "/nope", "--sampler", "foo"), SE,
         ("--sampler", "'foo'")),
    Case("sample_unet-zero-grid-rows", lambda tmp: sample_unet(tmp, "--model_path", "/nope", "--grid_nrow", "0"), SE,
         ("--grid_nrow", "0")),
    Case("sample_unet-zero-images", lambda tmp: sample_unet(tmp, "--model_path", "/nope", "--num_images", "0"), SE,
         ("--num_images", "0")),
    Case("train_classifier-unknown-model", lambda tmp: train_classifier(tmp, "--model", "vit_tiniest"), SE,
         ("'vit_tiniest'",)),
    Case("train_classifier-missing-pretrained", lambda tmp: train_classifier(tmp, "--pretrained", str(tmp / "nope")),
         SE, ("nope",)),
    Case("train_classifier-not-a-classifier", lambda tmp: train_classifier(tmp, "--model", "unet_tiny"), SE,
         ("'unet_tiny'", "ViT or Swin")),
    Case("train_classifier-zero-lr", lambda tmp: train_classifier(tmp, "--learning_rate", "0"), SE,
         ("--learning_rate", "0")),
    Case("train_classifier-image-size", lambda tmp: train_classifier(tmp, "--model", "vit_tiny_patch4_32",
                                                                     "--image_size", "30"), SE, ("img_size", "30")),
    Case("train_lm-missing-text", lambda tmp: train_lm(tmp, str(tmp / "nope.txt")), SE, ("text_file", "nope.txt")),
    Case("train_lm-zero-block", lambda tmp: train_lm(tmp, text_file(tmp), "--block_size", "0"), SE,
         ("--block_size", "0")),
    Case("train_lm-block-past-context", lambda tmp: train_lm(tmp, text_file(tmp), "--block_size", "300"), SE,
         ("--block_size", "300", "max_len=256")),
    Case("train_lm-unknown-model", lambda tmp: train_lm(tmp, text_file(tmp), "--model", "gpt_tiniest"), SE,
         ("'gpt_tiniest'",)),
    Case("train_lm-not-a-gpt", lambda tmp: train_lm(tmp, text_file(tmp), "--model", "bert_tiny"), SE,
         ("--model", "'bert_tiny'", "GPT")),
    Case("train_lm-bad-override", lambda tmp: train_lm(tmp, text_file(tmp), "--model_overrides", '{"dim": 30}'), SE,
         ("dim", "30")),
    Case("generate_text-missing-model", lambda tmp: generate_text(tmp, str(tmp / "nope")), SE, ("nope",)),
    Case("generate_text-top-p", lambda tmp: generate_text(tmp, str(tmp / "nope"), "--top_p", "1.5"), SE,
         ("--top_p", "1.5")),
    Case("generate_text-temperature", lambda tmp: generate_text(tmp, str(tmp / "nope"), "--temperature", "0"), SE,
         ("--temperature", "0")),
    Case("generate_text-num-samples", lambda tmp: generate_text(tmp, str(tmp / "nope"), "--num_samples", "0"), SE,
         ("--num_samples", "0")),
    Case("evaluate-missing-real", lambda tmp: evaluate(tmp, "--real", str(tmp / "nope"), "--fake", str(tmp)), SE,
         ("--real", "nope")),
    Case("evaluate-missing-fake", lambda tmp: evaluate(tmp, "--real", "digits", "--fake", str(tmp / "nope")), SE,
         ("--fake", "nope")),
    Case("evaluate-bad-extractor", lambda tmp: evaluate(tmp, "--real", "digits", "--fake", str(tmp),
                                                        "--feature_extractor", "vgg"), SE, ("feature_extractor", "'vgg'")),
    Case("evaluate-unknown-device", lambda tmp: evaluate(tmp, "--real", "digits", "--fake", str(tmp), "--device", "gpu"),
         SE, ("--device", "'gpu'")),
    Case("generate_text-cuda-without-gpu", lambda tmp: generate_text(tmp, str(tmp), "--device", "cuda:7"), SE,
         ("--device", "'cuda:7'", "CUDA device")),
    Case("evaluate-zero-kid-subsets", lambda tmp: evaluate(tmp, "--real", "digits", "--fake", str(tmp), "--kid_subsets", "0"),
         SE, ("--kid_subsets", "0")),
    Case("evaluate-cache-not-npz", lambda tmp: evaluate(tmp, "--real", "digits", "--fake", str(tmp), "--cache",
                                                        text_file(tmp)), SE, ("statistics file", "a.txt", ".npz")),
]


@pytest.mark.filterwarnings("ignore:ImageFolderDataset")  # the truncated-images case warns before it raises
@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case: Case, tmp_path):
    with pytest.raises(BaseException) as info:
        case.call(tmp_path)
    err = info.value
    assert type(err) is case.exception, f"{case.id}: expected {case.exception.__name__}, got {type(err).__name__}: {err}"
    message = str(err)
    for name in case.names:
        assert name in message, f"{case.id}: {name!r} missing from the message: {message}"


def test_table_size():
    assert len(CASES) >= 50
    assert len({c.id for c in CASES}) == len(CASES), "case ids must be unique"


def _subprocess(rel: str, *argv: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", WANDB_MODE="disabled", PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, str(REPO / rel), *argv], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=120)


@pytest.mark.parametrize("rel, argv, names", [
    ("sample_scripts/sample_unet.py", ["--model_path", "/nope"], ["/nope"]),
    ("sample_scripts/generate_text.py", ["/nope", "--top_p", "1.5"], ["--top_p", "1.5"]),
], ids=["sample_unet-missing-model", "generate_text-top-p"])
def test_script_error_is_one_line(rel, argv, names):
    """As a real process: exit code != 0 and stderr is one error line, no traceback."""
    proc = _subprocess(rel, *argv)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if "error" in ln.lower()]
    assert len(lines) == 1, proc.stderr
    for name in names:
        assert name in lines[0], proc.stderr
