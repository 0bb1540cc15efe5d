"""One sampling-ready loader for every denoiser directory: ``pipe = vf.load_pipeline(dir)``; ``pipe.sample(...)``.

A directory is one of
- our exported model (``<output_dir>/model`` of train_unet.py) or a training checkpoint: weights + ``diffusion.json``;
- a diffusers pipeline (``model_index.json``): ``DDPMPipeline`` / ``DDIMPipeline`` (unet + scheduler) or
  ``DiTPipeline`` (transformer + vae + scheduler + ``id2label``); weights in safetensors or a ``.bin`` read with
  ``weights_only=True``, the scheduler's settings honoured (``convert/diffusers_scheduler.py``).
The :class:`Pipeline` knows the model, its noise process, prediction type, the VAE, the text encoder and the class
names, so sampling needs no other argument than what to draw.
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from visionformers._validate import check_int, check_number, fail
from visionformers.diffusion import NoiseSchedule, sample, sample_ddim

__all__ = ["Pipeline", "load_pipeline", "PIPELINE_CLASSES"]

PIPELINE_CLASSES = {"DDPMPipeline": "unet", "DDIMPipeline": "unet", "DiTPipeline": "transformer"}


class MeanPrediction(nn.Module):
    """A learned-variance denoiser (2C output channels: prediction, then variance) seen as its first C channels."""

    def __init__(self, model: nn.Module, channels: int):
        super().__init__()
        self.model, self.channels = model, channels

    def forward(self, x: torch.Tensor, t: torch.Tensor, **cond) -> torch.Tensor:
        return self.model(x, t, **cond)[:, : self.channels]  # (B, C, H, W)


@dataclass
class Pipeline:
    """A denoiser with everything sampling needs; ``sample(...)`` draws images in [-1, 1]."""

    model: nn.Module  # the network as saved (a UNet or DiT, in eval mode)
    schedule: NoiseSchedule  # the noise process, with the scheduler's timestep spacing and x0 limits
    prediction_type: str  # "eps", "x0" or "v"
    sample_shape: tuple[int, int, int]  # (C, H, W) the model denoises: latents when there is a VAE
    conditioning: str = "none"  # "none", "class" or "text"
    num_classes: int | None = None
    label_names: list[str] | None = None  # class id -> name (diffusers' id2label, our --class_names)
    text_encoder: nn.Module | None = None  # a TextConditioner for text-conditional models
    vae: nn.Module | None = None  # decodes latents to images (DiT pipelines, latent diffusion)
    default_sampler: str = "ddim"  # the sampler of the saved scheduler (ddpm for a DDPMPipeline)
    settings: dict = field(default_factory=dict)  # the diffusion.json record (ours) or the scheduler config

    @property
    def denoiser(self) -> nn.Module:
        """The model as samplers call it: ``(x_t, t, **cond) -> prediction`` shaped like x_t."""
        channels = self.sample_shape[0]
        if getattr(getattr(self.model, "config", None), "learn_sigma", False):
            return MeanPrediction(self.model, channels)
        return self.model

    def class_ids(self, labels) -> torch.Tensor:
        """Class ids from ids or names (a name is any comma-separated entry of ``label_names``, as diffusers' DiT)."""
        if self.conditioning != "class":
            fail("class_labels", labels, f"None: this model is conditioned on {self.conditioning!r}, not classes")
        names = {}
        for i, entry in enumerate(self.label_names or []):
            for name in [entry, *entry.split(",")]:
                names.setdefault(name.strip(), i)
        ids = []
        for label in labels:
            if isinstance(label, str) and label.strip().lstrip("-").isdigit():
                label = int(label)
            if isinstance(label, str):
                if label.strip() not in names:
                    close = sorted(n for n in names if label.strip().lower() in n.lower())[:5]
                    fail("class_labels", label, f"a class id in [0, {self.num_classes}) or a label name"
                         + (f" (close: {close})" if close else "" if names else " (this model has no label names)"))
                label = names[label.strip()]
            if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < self.num_classes:
                fail("class_labels", label, f"a class id in [0, {self.num_classes}) or a label name")
            ids.append(label)
        return torch.tensor(ids, dtype=torch.long)

    def inputs(self, *, class_labels=None, prompts=None, negative_prompt: str = "", device=None) -> tuple[dict, dict | None]:
        """(cond, uncond) model inputs for one batch (see ``training.pipeline.model_inputs``)."""
        from visionformers.training.pipeline import model_inputs

        if class_labels is not None:
            class_labels = self.class_ids(class_labels)
        settings = {"conditioning": self.conditioning, "num_classes": self.num_classes}
        return model_inputs(settings, self.text_encoder, device or self.device, class_labels=class_labels,
                            prompts=prompts, negative_prompt=negative_prompt)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """Samples of the model's space -> images in ~[-1, 1] (the VAE's decoder on unscaled latents)."""
        if self.vae is None:
            return x
        return self.vae.decode_latents(x.to(self.device, self.vae.conv_dtype)).float()

    @torch.no_grad()
    def sample(self, num_images: int = 1, *, sampler: str | None = None, steps: int = 50, guidance_scale: float = 1.0,
               class_labels=None, prompts=None, negative_prompt: str = "", eta: float = 0.0,
               generator: torch.Generator | None = None, callback=None) -> torch.Tensor:
        """``num_images`` images (N, C, H, W) in [-1, 1], through ``vf.diffusion.sample`` with this pipeline's
        schedule and prediction type (then the VAE's decoder, if any). ``class_labels`` (ids or names) and
        ``prompts`` are cycled over the images; ``guidance_scale`` != 1 guides with the null class / ``negative_prompt``.
        """
        check_int("num_images", num_images)
        check_number("eta", eta, at_least=0)
        sampler = sampler or self.default_sampler
        fn = functools.partial(sample_ddim, eta=eta) if sampler == "ddim" and eta > 0 else sampler
        cond, uncond = {}, None
        if self.conditioning == "class":
            given = list(class_labels) if class_labels is not None else list(range(self.num_classes))
            cond, uncond = self.inputs(class_labels=[given[i % len(given)] for i in range(num_images)])
        elif self.conditioning == "text":
            if not prompts:
                fail("prompts", prompts, "a list of strings for a text-conditional model")
            cond, uncond = self.inputs(prompts=[prompts[i % len(prompts)] for i in range(num_images)],
                                       negative_prompt=negative_prompt)
        elif class_labels is not None or prompts is not None:
            fail("class_labels" if class_labels is not None else "prompts", class_labels or prompts,
                 "None: this model is unconditional")
        if self.conditioning == "none" or guidance_scale == 1.0:
            uncond = None
        x = sample(self.denoiser, (num_images, *self.sample_shape), self.schedule, fn, steps, self.prediction_type,
                   guidance_scale if uncond is not None else 1.0, generator, callback, uncond=uncond, device=self.device,
                   **cond)
        return self.decode(x)


def _ours(path: Path, device, use_ema: bool) -> Pipeline:
    from visionformers.training import latents
    from visionformers.training.pipeline import load_denoiser, schedule_from

    model, settings, conditioner = load_denoiser(path, device, use_ema=use_ema)
    schedule = schedule_from(settings)
    return Pipeline(model=model, schedule=schedule, prediction_type=settings["prediction_type"],
                    default_sampler=schedule.default_sampler, sample_shape=latents.sample_shape(settings),
                    vae=latents.load_latent_decoder(path, settings, device),
                    conditioning=settings["conditioning"], num_classes=settings.get("num_classes"),
                    label_names=settings.get("class_names"), text_encoder=conditioner, settings=settings)


def _diffusers(path: Path, device) -> Pipeline:
    from visionformers.convert.diffusers_scheduler import schedule_from_diffusers
    from visionformers.convert.from_diffusers import read_diffusers_config
    from visionformers.hub import from_pretrained

    index = read_diffusers_config(path / "model_index.json")
    cls = index.get("_class_name")
    if cls not in PIPELINE_CLASSES:
        raise ValueError(f"diffusers pipeline _class_name={cls!r} in {str(path / 'model_index.json')!r} is not "
                         f"supported; accepted: {list(PIPELINE_CLASSES)}")
    part = PIPELINE_CLASSES[cls]
    for name in (part, "scheduler", *(("vae",) if cls == "DiTPipeline" else ())):
        if not (path / name).is_dir():
            raise FileNotFoundError(f"diffusers {cls} directory {str(path)!r} lacks its {name!r} folder")
    model = from_pretrained(path / part, device)
    sched_config = read_diffusers_config(path / "scheduler" / "scheduler_config.json")
    schedule, prediction_type, sampler = schedule_from_diffusers(sched_config)
    if cls == "DDIMPipeline" and sampler == "ddpm":
        sampler = "ddim"  # DDIMPipeline turns any scheduler into a DDIMScheduler of the same config
    c = model.config
    shape = (c.in_channels, c.sample_size, c.sample_size)
    label_names = None
    vae = None
    if cls == "DiTPipeline":
        vae = from_pretrained(path / "vae", device)
        id2label = index.get("id2label") or {}
        if id2label:
            if not isinstance(id2label, dict) or not all(str(k).isdigit() and isinstance(v, str) for k, v in id2label.items()):
                raise ValueError(f"{str(path / 'model_index.json')!r}: id2label is not a mapping of class id -> name")
            label_names = [id2label.get(str(i), str(i)) for i in range(c.num_classes)]
    num_classes = getattr(c, "num_classes", None)
    return Pipeline(model=model, schedule=schedule, prediction_type=prediction_type, sample_shape=shape,
                    conditioning="class" if num_classes is not None else "none", num_classes=num_classes,
                    label_names=label_names, vae=vae, default_sampler=sampler, settings=sched_config)


def load_pipeline(path: str | os.PathLike, device: str | torch.device = "cpu", *, use_ema: bool = True) -> Pipeline:
    """A sampling-ready :class:`Pipeline` from our model directory / checkpoint or a diffusers pipeline directory.

    ``use_ema`` picks a training checkpoint's EMA weights when it has them.
    """
    from visionformers._validate import check_path

    check_path("path", path)
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"model path {str(path)!r} is not a directory; pass an exported model dir, a "
                                "checkpoint-<step> dir or a diffusers pipeline dir (with model_index.json)")
    if (path / "model_index.json").is_file():
        return _diffusers(path, device)
    return _ours(path, device, use_ema)
