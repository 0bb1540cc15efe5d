"""Prompt following of text-conditional digit models: the share of samples the digit classifier reads as the digit
their prompt names.

Trains nothing: pass models exported by ``train_scripts/train_unet.py --conditioning text`` (``<output_dir>/model``),
e.g. the default recipe (the preset encoder trained with the denoiser, the pooled text embedding) and the one with a
frozen random encoder and cross-attention alone:

    python train_scripts/train_unet.py --conditioning text --output_dir outputs/text
    python train_scripts/train_unet.py --conditioning text --no-train_text_encoder \\
        --model_overrides '{"pooled_context": false}' --output_dir outputs/text_frozen
    python examples/prompt_following.py default=outputs/text/model frozen=outputs/text_frozen/model

Round r draws ``--num_images`` images through ``vf.load_pipeline(...).sample`` with the generator seeded r: image i
is prompted with digit i % 10 in caption template (i // 10 + r) of ``visionformers.data.CAPTION_TEMPLATES`` (names
and numerals, so every wording is asked for), and graded by the demo's digit classifier
(``visionformers.demo.grade_images``). Prints a Markdown table (prompts followed, of all prompts, and the share per
round) and writes it as JSON with ``--output``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

import visionformers as vf
from visionformers._validate import HelpFormatter
from visionformers.data import CAPTION_TEMPLATES, digit_caption
from visionformers.demo import digit_classifier, grade_images


def prompts_of(num_images: int, round_index: int) -> tuple[list[str], torch.Tensor]:
    """(prompts, digits) of one round: digit i % 10 in template (i // 10 + round_index)."""
    digits = torch.arange(num_images) % 10
    templates = [(i // 10 + round_index) % len(CAPTION_TEMPLATES) for i in range(num_images)]
    return [digit_caption(int(d), t) for d, t in zip(digits, templates)], digits


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("models", nargs="+", metavar="NAME=PATH", help="exported text-conditional digit models")
    p.add_argument("--num_images", type=int, default=30, help="prompts per round")
    p.add_argument("--rounds", type=int, default=3, help="rounds, the generator seeded 0, 1, ...")
    p.add_argument("--sampler", default=None, help="default: the model's")
    p.add_argument("--num_inference_steps", type=int, default=40, help="sampler steps per image")
    p.add_argument("--guidance_scale", type=float, default=2.0, help="classifier-free guidance weight (1: none)")
    p.add_argument("--output", default=None, help="a JSON file for the results")
    args = p.parse_args(argv)
    if any("=" not in m for m in args.models):
        raise SystemExit(f"models must be NAME=PATH, got {args.models}")
    if args.num_images < 1 or args.rounds < 1:
        raise SystemExit("--num_images and --rounds must be >= 1")
    classifier = digit_classifier()
    rows = []
    for spec in args.models:
        name, path = spec.split("=", 1)
        pipe = vf.load_pipeline(path)
        if pipe.conditioning != "text":
            raise SystemExit(f"{path}: a text-conditional digits model is needed (conditioning={pipe.conditioning})")
        shares = []
        for r in range(args.rounds):
            prompts, digits = prompts_of(args.num_images, r)
            images = pipe.sample(args.num_images, prompts=prompts, sampler=args.sampler,
                                 steps=args.num_inference_steps, guidance_scale=args.guidance_scale,
                                 generator=torch.Generator().manual_seed(r))
            shares.append(grade_images(images, digits, classifier)["sample_accuracy"])
        followed = round(sum(shares) * args.num_images)
        rows.append({"model": name, "path": path, "followed": followed, "prompts": args.rounds * args.num_images,
                     "per_round": shares})
        print(f"{name}: {followed} of {args.rounds * args.num_images}", file=sys.stderr, flush=True)
    print("| model | prompts followed | per round |\n|---|---|---|")
    for row in rows:
        per_round = ", ".join(f"{s:.1%}" for s in row["per_round"])
        print(f"| {row['model']} | {row['followed']} of {row['prompts']} | {per_round} |")
    if args.output:
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        with open(args.output, "w") as f:
            json.dump(rows, f, indent=2)
    return rows


if __name__ == "__main__":
    main()
