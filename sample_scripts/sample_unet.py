"""Sample a trained denoiser: `python sample_scripts/sample_unet.py --model_path outputs/train_unet/model`.

--model_path also takes a diffusers pipeline directory (DDPMPipeline, DDIMPipeline, DiTPipeline with model_index.json),
sampled with its scheduler's settings; see `vf.load_pipeline`.

Also runs under `accelerate launch` (images split over processes; image i always uses seed + i, so the output
is identical for any process count). Writes grid.png, images/<i>.png and settings.json to --output_dir.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time

import torch
from accelerate import Accelerator

from visionformers import diffusion
from visionformers._validate import check_args, script_errors
from visionformers.pipeline import load_pipeline
from visionformers.training import pipeline, sampling

try:  # the optional CPU kernels (visionformers/native): without them sampling runs the plain models
    from visionformers.native import optimize
except ImportError:
    optimize = None


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = p.add_argument
    a("--model_path", "--pretrained_model_name_or_path", dest="model_path", required=True,
      help="an exported model dir (<output_dir>/model), a checkpoint-<step> dir or a diffusers pipeline dir")
    a("--no_ema", action="store_true", help="with a checkpoint: use the raw weights, not the EMA")
    a("--sampler", default=None, choices=list(diffusion.SAMPLERS),
      help="default: the saved scheduler's (ddpm for a DDPMPipeline); else ddim for a VP model, heun for a flow "
           "model (ddpm and ddim need a VP model)")
    a("--num_inference_steps", type=int, default=50, help="sampler steps")
    a("--eta", type=float, default=0.0, help="ddim noise (0: deterministic, 1: ddpm-like)")
    a("--guidance_scale", type=float, default=2.0, help="classifier-free guidance weight (1: none)")
    a("--guidance_rescale", type=float, default=0.0, help="CFG rescale phi in [0, 1] (Lin et al. 2024; 0: off)")
    a("--guidance_interval", type=float, nargs=2, default=None, metavar=("LO", "HI"),
      help="guide only at noise levels sigma/alpha in (LO, HI] (Kynkaenniemi et al. 2024; 'inf' allowed)")
    a("--class_labels", nargs="*", default=None,
      help="class ids or label names (e.g. 'golden retriever'), cycled over the images; default i %% num_classes")
    a("--prompts", nargs="*", default=None, help="cycled over the images (text-conditional models)")
    a("--negative_prompt", default="", help="the unconditional prompt of guidance")
    a("--num_images", type=int, default=40, help="images to generate")
    a("--batch_size", type=int, default=40, help="images per forward pass (per process)")
    a("--seed", type=int, default=0, help="image i uses seed + i")
    a("--output_dir", default=None, help="default: <model_path>/../samples")
    a("--grid_nrow", type=int, default=None, help="images per row of grid.png (default: one class per row, else ~square)")
    args = p.parse_args(argv)
    check_args(args, [(name, lambda v: v >= 1, "an int >= 1") for name in ("num_inference_steps", "num_images", "batch_size")]
               + [("guidance_scale", lambda v: v >= 0, "a number >= 0 (1: no guidance)"),
                  ("eta", lambda v: v >= 0, "a number >= 0 (0: deterministic ddim)"),
                  ("guidance_rescale", lambda v: 0 <= v <= 1, "a number in [0, 1] (0: off)"),
                  ("guidance_interval", lambda v: v is None or 0 <= v[0] <= v[1], "LO HI with 0 <= LO <= HI"),
                  ("grid_nrow", lambda v: v is None or v >= 1, "an int >= 1"),
                  ("output_dir", lambda v: v is None or not os.path.isfile(v), "a directory (this path is an existing file)")])
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    accelerator = Accelerator(cpu=pipeline.force_cpu())
    device = accelerator.device
    pipe = load_pipeline(args.model_path, device, use_ema=not args.no_ema)
    if device.type == "cpu" and optimize is not None:
        optimize(pipe.model)  # channels-last convolutions; values unchanged up to rounding
    kind, n = pipe.conditioning, args.num_images
    labels = prompts = None
    if args.prompts and kind != "text":
        raise ValueError(f"--prompts is given but the model at --model_path is conditioned on {kind!r}, not text")
    if args.class_labels and kind != "class":
        raise ValueError(f"--class_labels is given but the model at --model_path is conditioned on {kind!r}, not class")
    if kind == "class":
        given = pipe.class_ids(args.class_labels) if args.class_labels else torch.arange(pipe.num_classes)
        labels = given[torch.arange(n) % len(given)]
    elif kind == "text":
        if not args.prompts:
            raise SystemExit("--prompts is required for a text-conditional model")
        prompts = [args.prompts[i % len(args.prompts)] for i in range(n)]
    guidance = args.guidance_scale if kind != "none" else 1.0
    sched = pipe.schedule
    name = args.sampler or pipe.default_sampler
    diffusion.check_sampler(name, sched)  # e.g. ddim on a flow model: a ValueError naming both
    if args.eta and name != "ddim":
        raise ValueError(f"--eta={args.eta} applies to --sampler ddim only (got --sampler {name})")
    sampler = functools.partial(diffusion.sample_ddim, eta=args.eta) if args.eta else name

    def inputs(idx):
        return pipe.inputs(class_labels=labels[list(idx)].tolist() if labels is not None else None,
                           prompts=[prompts[i] for i in idx] if prompts else None,
                           negative_prompt=args.negative_prompt, device=device)

    out_dir = args.output_dir or os.path.join(os.path.dirname(os.path.abspath(args.model_path)), "samples")
    t0 = time.time()
    images = sampling.sample_distributed(
        pipe.denoiser, n, args.batch_size, inputs, accelerator=accelerator, progress=True,
        sched=sched, shape=pipe.sample_shape, seed=args.seed, sampler=sampler, steps=args.num_inference_steps,
        prediction_type=pipe.prediction_type, guidance_scale=guidance, guidance_rescale=args.guidance_rescale,
        guidance_interval=args.guidance_interval, device=device)
    if accelerator.is_main_process:
        images = torch.cat([pipe.decode(images[i:i + args.batch_size]).cpu() for i in range(0, n, args.batch_size)])
        nrow = args.grid_nrow or (min(pipe.num_classes, n) if kind == "class" and not args.class_labels else None)
        upscale = max(1, 64 // images.shape[-1])
        sampling.save_png(sampling.make_grid(images, nrow=nrow, upscale=upscale), os.path.join(out_dir, "grid.png"))
        for i, img in enumerate(images):
            sampling.save_png(sampling.make_grid(img[None], padding=0), os.path.join(out_dir, "images", f"{i:06d}.png"))
        record = {**vars(args), "sampler": name, "output_dir": out_dir, "diffusion": pipe.settings, "num_processes": accelerator.num_processes,
                  "seconds": round(time.time() - t0, 3),
                  "images": [{"file": f"images/{i:06d}.png", "seed": args.seed + i,
                              **({"class_label": int(labels[i])} if labels is not None else {}),
                              **({"prompt": prompts[i]} if prompts else {})} for i in range(n)]}
        with open(os.path.join(out_dir, "settings.json"), "w") as f:
            json.dump(record, f, indent=2)
        print(f"{n} images in {time.time() - t0:.1f} s: {os.path.join(out_dir, 'grid.png')}")
    accelerator.wait_for_everyone()


if __name__ == "__main__":
    sys.exit(script_errors(main)())
