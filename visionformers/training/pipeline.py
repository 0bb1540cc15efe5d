"""What ties a trained denoiser to its noise process and conditioning, for both train and sample scripts.

An exported model directory (``save_pretrained``) or a training checkpoint holds, beside the weights,
``diffusion.json``: the schedule, prediction type and conditioning the network was trained with, so sampling
needs nothing but the directory. With text conditioning the text encoder (frozen, or trained with
``--train_text_encoder``) is saved in ``text_encoder/`` with its tokenizer.
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
from pathlib import Path

import torch
from torch import nn

from visionformers._validate import check_choice, fail
from visionformers.diffusion import NoiseSchedule, RectifiedFlow
from visionformers.hub import from_pretrained, load_into, load_state_dict, read_config, read_json

DIFFUSION_FILE = "diffusion.json"
TEXT_ENCODER_DIR = "text_encoder"
CONDITIONINGS = ("none", "class", "text")


def json_config_fields(text: str) -> dict:
    """argparse ``type`` for ``--model_overrides``: a JSON object of config fields (lists become tuples, as the
    config fields are, e.g. Swin's depths); anything else is an argparse error naming the flag."""
    value = json.loads(text)  # a JSONDecodeError is a ValueError: argparse reports it against the flag
    if not isinstance(value, dict):
        raise ValueError("not a JSON object")
    return {k: tuple(v) if isinstance(v, list) else v for k, v in value.items()}


def default_mixed_precision() -> str:
    """bf16 where the accelerator has it (Ampere+ GPUs), else no: fp16 needs a grad scaler and can overflow."""
    if os.environ.get("ACCELERATE_MIXED_PRECISION"):
        return os.environ["ACCELERATE_MIXED_PRECISION"]  # `accelerate launch --mixed_precision` / config file
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16"
    return "no"


def check_distributed(accelerator) -> None:
    """Say what runs when the accelerate config asks for FSDP on a machine without CUDA: accelerate then runs
    plain data parallelism over gloo (every process holds the whole model), without a word."""
    from accelerate import DistributedType

    asked = os.environ.get("ACCELERATE_USE_FSDP", "").lower() in ("1", "true")
    kind = accelerator.distributed_type
    if asked and kind != DistributedType.FSDP and accelerator.is_main_process:
        what = ("one process" if kind == DistributedType.NO else
                f"{kind.value} data parallelism (each process holds the whole model)")
        print(f"note: the accelerate config asks for FSDP, which needs CUDA; running {what} on {accelerator.device} "
              "instead", file=sys.stderr)


def force_cpu() -> bool:
    """True for a multi-process launch on a machine without CUDA: accelerate then needs ``cpu=True`` to use
    gloo (``accelerate launch --multi_gpu --num_processes 2`` on CPUs), else every process would act as rank 0."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()


def diffusion_settings(args, num_classes: int | None, class_names, channels: int, context_dim: int | None) -> dict:
    """The JSON record of how a denoiser was trained (read back by :func:`load_denoiser`)."""
    return {
        "noise_schedule": args.noise_schedule,
        **({"flow_shift": args.flow_shift} if args.noise_schedule == "flow" else {}),
        "num_train_timesteps": args.num_train_timesteps,
        "prediction_type": args.prediction_type,
        "conditioning": args.conditioning,
        "num_classes": num_classes,
        "class_names": list(class_names) if class_names is not None else None,
        "text_encoder": args.text_encoder if args.conditioning == "text" else None,
        "train_text_encoder": bool(getattr(args, "train_text_encoder", False)),
        "context_dim": context_dim,
        "channels": channels,
        "resolution": args.resolution,
    }


def build_denoiser(name: str, in_channels: int, sample_size: int, num_classes: int | None = None,
                   context_dim: int | None = None, overrides: dict | None = None) -> nn.Module:
    """A UNet / DiT preset sized for the data. Our objective is L_simple with label dropout done by the caller,
    so a preset's learned variance (``learn_sigma``) and in-model label dropout are turned off unless overridden.
    A text-conditional denoiser (``context_dim``) also gets the pooled text embedding (``pooled_context``, Imagen's)
    unless overridden: on the digits it lifts prompt following from about half to over four fifths.
    JSON lists in ``overrides`` become the tuples configs expect."""
    from visionformers import registry

    cls, preset = registry.get_preset(name)
    if not hasattr(preset, "sample_size"):
        denoisers = [n for n in registry.list_models() if hasattr(registry.get_preset(n)[1], "sample_size")]
        raise ValueError(f"model {name!r} is a {cls.__name__}, not a denoiser (it does not map a noisy image and a "
                         f"timestep to an image); choose a UNet or DiT preset: {denoisers}")
    fields = {f.name for f in dataclasses.fields(preset)}
    config = {k: v for k, v in {"learn_sigma": False, "class_dropout_prob": 0.0}.items() if k in fields}
    config.update({k: tuple(v) if isinstance(v, list) else v for k, v in (overrides or {}).items()})
    config.update(in_channels=in_channels, sample_size=sample_size, num_classes=num_classes)
    if context_dim is not None:
        config["context_dim"] = context_dim
        if "pooled_context" in fields:
            config.setdefault("pooled_context", True)
    try:
        return registry.create_model(name, **config)
    except ValueError as e:
        if str(e).startswith("attention_resolutions="):  # the preset's sizes were chosen for its own sample_size
            raise ValueError(f"{e}: attention_resolutions must be among the feature-map sizes that sample_size="
                             f"{sample_size} halves down to; use the sample size the preset was made for "
                             f"({preset.sample_size}) or set attention_resolutions to sizes of that list") from None
        raise


def training_inputs(batch: dict, settings: dict, conditioner, drop_prob: float, generator: torch.Generator,
                    device) -> dict:
    """The denoiser's conditioning keywords for a training batch, with classifier-free-guidance dropout. Text is
    encoded by the frozen ``conditioner``; with ``conditioner=None`` the captions themselves are passed, for a model
    that encodes them with its own trained encoder (``JointTextDenoiser``)."""
    kind = settings["conditioning"]
    if kind == "class":
        labels = batch["label"].to(device)
        return {"class_labels": unconditional_dropout(labels, kind, drop_prob, settings["num_classes"], generator)}
    if kind == "text":
        captions = unconditional_dropout(batch["caption"], kind, drop_prob, None, generator)
        if conditioner is None:
            return {"captions": captions}
        with torch.no_grad():
            context, mask = conditioner(captions)
        return {"context": context, "context_mask": mask}
    return {}


@torch.no_grad()
def evaluation_loss(model: nn.Module, batch: dict, settings: dict, conditioner, sched, prediction_type: str,
                    seed: int, device, **loss_options) -> float:
    """The diffusion loss of one fixed batch under timesteps and noise drawn from ``seed`` alone, without
    condition dropout, in eval mode: a deterministic function of the weights, so evaluations at different steps
    (and of a resumed run) compare like for like. Every process computes the same value. ``loss_options`` go to
    ``training_loss`` (timestep_sampling, loss_weighting, ...)."""
    from visionformers.diffusion import training_loss
    from visionformers.training.loop import make_generator

    generator = make_generator(seed, 0xE7A1, device=device)
    cond = training_inputs(batch, settings, conditioner, 0.0, generator, device)
    was_training = model.training
    model.eval()
    loss = training_loss(model, batch["pixel_values"].to(device), sched, prediction_type, generator=generator,
                         **loss_options, **cond)
    model.train(was_training)
    return float(loss)


def schedule_from(settings: dict) -> NoiseSchedule | RectifiedFlow:
    """The noise process recorded in ``diffusion.json``: a VP schedule, or ``"flow"`` with its ``flow_shift``."""
    if settings["noise_schedule"] == "flow":
        return RectifiedFlow(settings.get("flow_shift", 1.0), settings["num_train_timesteps"])
    return NoiseSchedule(settings["noise_schedule"], settings["num_train_timesteps"])


def build_text_conditioner(preset: str, device: torch.device | str = "cpu", seed: int = 0, encoder: nn.Module | None = None,
                           tokenizer=None, train: bool = False):
    """A text encoder (``visionformers.text.conditioning.TextConditioner``), frozen in eval mode unless ``train``.

    ``preset`` is a text preset name (a new encoder initialised from ``seed`` alone, not the per-process RNG, so
    every process of a run, and a resumed run, gets the same weights) or a transformers model directory (T5 / T5
    encoder, BERT, GPT-2 with its ``tokenizer.json``: pretrained weights and their tokenizer). Pass ``encoder`` (and
    its ``tokenizer``) to wrap saved weights instead.
    """
    from visionformers.text.conditioning import TextConditioner
    from visionformers.text.pretrained import is_transformers_dir, load_text_encoder
    from visionformers.training.loop import mix_seed

    if encoder is None and is_transformers_dir(preset):
        encoder, tokenizer = load_text_encoder(preset)
    elif encoder is None:
        from visionformers.registry import list_models

        if preset not in list_models():
            fail("text_encoder", preset, "a text preset (t5_tiny_encoder, t5_base_encoder, bert_base, gpt2, ...: "
                 "vf.list_models()) or a transformers model directory (config.json with model_type, tokenizer.json)")
    if encoder is None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(mix_seed(seed, 0x7E47))
            cond = TextConditioner(preset, freeze=not train)
    else:
        cond = TextConditioner(encoder, tokenizer, freeze=not train)
    cond = cond.to(device)
    return cond if train else cond.eval()


def text_encoder_files(conditioner, config: bool = False) -> dict:
    """{relative file name: JSON} that a model directory carries for its text encoder: the tokenizer, and with
    ``config`` the encoder's ``config.json`` (a checkpoint of ``--train_text_encoder`` keeps the encoder's weights
    in its own state dict, beside the denoiser's)."""
    if conditioner is None:
        return {}
    files = {f"{TEXT_ENCODER_DIR}/tokenizer.json": conditioner.tokenizer.to_dict()}
    if config:
        from visionformers.training.checkpoint import CONFIG_NAME, model_config_json

        files[f"{TEXT_ENCODER_DIR}/{CONFIG_NAME}"] = model_config_json(conditioner.encoder)
    return files


def load_denoiser(path: str | os.PathLike, device: torch.device | str = "cpu", use_ema: bool = True):
    """(model in eval mode, diffusion settings, text conditioner or None) from an exported model directory
    (``<output_dir>/model``) or a training checkpoint (``checkpoint-<step>``: the EMA weights when saved and
    ``use_ema``, else the raw ones)."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"model path {str(path)!r} is not a directory; pass <output_dir>/model or a "
                                "checkpoint-<step> directory")
    settings_file = path / DIFFUSION_FILE
    if not settings_file.is_file() and (path / "model" / DIFFUSION_FILE).is_file():
        raise FileNotFoundError(f"model path {str(path)!r} is a training output directory; pass its exported model, "
                                f"{str(path / 'model')!r}, or one of its checkpoint-<step> directories")
    if not settings_file.is_file():
        raise FileNotFoundError(f"{str(settings_file)!r} is missing: {str(path)!r} was not written by "
                                "train_unet.py (it needs the schedule and conditioning the model was trained with)")
    settings = read_json(settings_file, "diffusion settings")
    if not isinstance(settings, dict):
        raise ValueError(f"{str(settings_file)!r} is not a JSON object of diffusion settings")
    check_choice("conditioning", settings.get("conditioning"), CONDITIONINGS)
    from visionformers.training.checkpoint import EMA_FILE, MODEL_FILE, checkpoint_problem

    encoder_state = None  # the text encoder's weights when a checkpoint holds them beside the denoiser's
    if (path / MODEL_FILE).is_file() and (path / "state.json").is_file():  # a training checkpoint
        problem = checkpoint_problem(path, verify=True)
        if problem is not None:
            raise ValueError(f"model path {str(path)!r} is a damaged checkpoint: {problem}")
        cls, config = read_config(path)
        model = cls(config)
        weights = path / (EMA_FILE if use_ema and (path / EMA_FILE).is_file() else MODEL_FILE)
        state = load_state_dict(weights)
        if settings.get("train_text_encoder"):  # one state dict of the denoiser and the encoder trained with it
            from visionformers.training.checkpoint import split_state_dict
            from visionformers.training.text_denoiser import JointTextDenoiser

            try:
                parts = split_state_dict(state, JointTextDenoiser.exported_parts)
            except ValueError as e:
                raise ValueError(f"{str(weights)!r}: {e}") from None
            state, encoder_state = parts[""], parts[TEXT_ENCODER_DIR]
        load_into(model, state, source=str(weights))
    else:
        model = from_pretrained(path)  # loads on the CPU (safetensors rejects names like "cpu:0"), moved below
    model = model.to(device)
    conditioner = None
    if settings["conditioning"] == "text":
        enc_dir = path / TEXT_ENCODER_DIR
        if not enc_dir.is_dir():
            raise FileNotFoundError(f"{str(enc_dir)!r} is missing: a text-conditional model needs its text encoder")
        tokenizer = None
        if (enc_dir / "tokenizer.json").is_file():
            from visionformers.text.pretrained import load_saved_tokenizer

            tokenizer = load_saved_tokenizer(enc_dir)
        if encoder_state is None:
            encoder = from_pretrained(enc_dir)
        else:
            cls, config = read_config(enc_dir)
            encoder = cls(config)
            load_into(encoder, encoder_state, source=f"{weights} (text encoder)")
        conditioner = build_text_conditioner(settings["text_encoder"], device, encoder=encoder, tokenizer=tokenizer)
    return model.eval(), settings, conditioner


def model_inputs(settings: dict, conditioner, device, *, class_labels=None, prompts=None,
                 negative_prompt: str = "") -> tuple[dict, dict | None]:
    """(cond, uncond) keyword inputs of the denoiser for one batch; uncond is the null class or empty prompt."""
    kind = settings["conditioning"]
    if kind == "class":
        if class_labels is None:
            fail("class_labels", class_labels, f"class ids in [0, {settings['num_classes']}) for a class-conditional model")
        labels = torch.as_tensor(class_labels, dtype=torch.long, device=device)
        if labels.numel() and (labels.min() < 0 or labels.max() >= settings["num_classes"]):
            fail("class_labels", labels.tolist(), f"class ids in [0, {settings['num_classes']})")
        null = torch.full_like(labels, settings["num_classes"])  # the learned null class of classifier-free guidance
        return {"class_labels": labels}, {"class_labels": null}
    if kind == "text":
        if prompts is None:
            fail("prompts", prompts, "a list of strings for a text-conditional model")
        n = len(prompts)
        # one batch, so both halves are padded to the same length (guidance concatenates them)
        context, mask = conditioner(list(prompts) + [negative_prompt] * n)
        context, mask = context.to(device), mask.to(device)
        return ({"context": context[:n], "context_mask": mask[:n]}, {"context": context[n:], "context_mask": mask[n:]})
    return {}, None


def unconditional_dropout(labels_or_captions, kind: str, prob: float, num_classes: int | None,
                          generator: torch.Generator):
    """Classifier-free guidance training (Ho & Salimans 2022, Alg. 1): replace the condition by the null class
    (class) or the empty prompt (text) with probability ``prob``, drawn from ``generator``."""
    n = len(labels_or_captions)
    drop = torch.rand(n, generator=generator, device=generator.device).cpu() < prob  # always drawn: RNG use is fixed
    if kind == "class":
        return torch.where(drop.to(labels_or_captions.device), torch.full_like(labels_or_captions, num_classes),
                           labels_or_captions)
    if kind == "text":
        return ["" if d else c for d, c in zip(drop.tolist(), labels_or_captions)]
    return labels_or_captions
