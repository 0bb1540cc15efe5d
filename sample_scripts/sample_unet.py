"""Sample a trained denoiser: `python sample_scripts/sample_unet.py --model_path outputs/train_unet/model`.

Also runs under `accelerate launch` (images split over processes; image i always uses seed + i, so the output
is identical for any process count). Writes grid.png, images/<i>.png and settings.json to --output_dir.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
from accelerate import Accelerator

from visionformers import diffusion
from visionformers._validate import check_args, script_errors
from visionformers.training import pipeline, sampling

try:  # the optional CPU kernels (visionformers/native): without them sampling runs the plain models
    from visionformers.native import optimize
except ImportError:
    optimize = None


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = p.add_argument
    a("--model_path", "--pretrained_model_name_or_path", dest="model_path", required=True,
      help="an exported model dir (<output_dir>/model) or a checkpoint-<step> dir")
    a("--no_ema", action="store_true", help="with a checkpoint: use the raw weights, not the EMA")
    a("--sampler", default="ddim", choices=list(diffusion.SAMPLERS))
    a("--num_inference_steps", type=int, default=50)
    a("--eta", type=float, default=0.0, help="ddim noise (0: deterministic, 1: ddpm-like)")
    a("--guidance_scale", type=float, default=2.0, help="classifier-free guidance weight (1: none)")
    a("--class_labels", type=int, nargs="*", default=None, help="cycled over the images; default i %% num_classes")
    a("--prompts", nargs="*", default=None, help="cycled over the images (text-conditional models)")
    a("--negative_prompt", default="", help="the unconditional prompt of guidance")
    a("--num_images", type=int, default=40)
    a("--batch_size", type=int, default=40)
    a("--seed", type=int, default=0, help="image i uses seed + i")
    a("--output_dir", default=None, help="default: <model_path>/../samples")
    a("--grid_nrow", type=int, default=None)
    args = p.parse_args(argv)
    check_args(args, [(name, lambda v: v >= 1, "an int >= 1") for name in ("num_inference_steps", "num_images", "batch_size")]
               + [("guidance_scale", lambda v: v >= 0, "a number >= 0 (1: no guidance)"),
                  ("eta", lambda v: v >= 0, "a number >= 0 (0: deterministic ddim)"),
                  ("grid_nrow", lambda v: v is None or v >= 1, "an int >= 1"),
                  ("output_dir", lambda v: v is None or not os.path.isfile(v), "a directory (this path is an existing file)")])
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    accelerator = Accelerator(cpu=pipeline.force_cpu())
    device = accelerator.device
    model, settings, conditioner = pipeline.load_denoiser(args.model_path, device, use_ema=not args.no_ema)
    if device.type == "cpu" and optimize is not None:
        optimize(model)  # channels-last convolutions; values unchanged up to rounding
    kind, n = settings["conditioning"], args.num_images
    labels = prompts = None
    if args.prompts and kind != "text":
        raise ValueError(f"--prompts is given but the model at --model_path is conditioned on {kind!r}, not text")
    if args.class_labels and kind != "class":
        raise ValueError(f"--class_labels is given but the model at --model_path is conditioned on {kind!r}, not class")
    if kind == "class":
        given = args.class_labels or list(range(settings["num_classes"]))
        labels = torch.tensor([given[i % len(given)] for i in range(n)])
    elif kind == "text":
        if not args.prompts:
            raise SystemExit("--prompts is required for a text-conditional model")
        prompts = [args.prompts[i % len(args.prompts)] for i in range(n)]
    guidance = args.guidance_scale if kind != "none" else 1.0

    def inputs(idx):
        return pipeline.model_inputs(settings, conditioner, device,
                                     class_labels=labels[list(idx)] if labels is not None else None,
                                     prompts=[prompts[i] for i in idx] if prompts else None,
                                     negative_prompt=args.negative_prompt)

    out_dir = args.output_dir or os.path.join(os.path.dirname(os.path.abspath(args.model_path)), "samples")
    t0 = time.time()
    shape = (settings["channels"], settings["resolution"], settings["resolution"])
    images = sampling.sample_distributed(
        model, n, args.batch_size, inputs, accelerator=accelerator, progress=True,
        sched=pipeline.schedule_from(settings), shape=shape, seed=args.seed, sampler=args.sampler,
        steps=args.num_inference_steps, eta=args.eta, prediction_type=settings["prediction_type"],
        guidance_scale=guidance, device=device)
    if accelerator.is_main_process:
        nrow = args.grid_nrow or (settings["num_classes"] if kind == "class" and not args.class_labels else None)
        upscale = max(1, 64 // settings["resolution"])
        sampling.save_png(sampling.make_grid(images, nrow=nrow, upscale=upscale), os.path.join(out_dir, "grid.png"))
        for i, img in enumerate(images):
            sampling.save_png(sampling.make_grid(img[None], padding=0), os.path.join(out_dir, "images", f"{i:06d}.png"))
        record = {**vars(args), "output_dir": out_dir, "diffusion": settings, "num_processes": accelerator.num_processes,
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
