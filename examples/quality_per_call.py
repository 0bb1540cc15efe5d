"""Sample quality per model call: digit-classifier accuracy and FID of class-conditional samples at fixed budgets.

Trains nothing: pass models exported by ``train_scripts/train_unet.py`` (``<output_dir>/model``), e.g. the default
VP recipe and the same recipe with ``--noise_schedule flow``:

    python train_scripts/train_unet.py --output_dir outputs/vp
    python train_scripts/train_unet.py --noise_schedule flow --output_dir outputs/flow
    python examples/quality_per_call.py vp=outputs/vp/model flow=outputs/flow/model

For each model, sampler and budget (5, 10, 20, 50 calls) it draws ``--num_images`` images (class i % 10, image i
from seed + i, guidance 2 as in the demo) through ``visionformers.diffusion.sample`` and grades them with the
demo's digit classifier: accuracy (the share read as the class drawn for) and confidence (its mean probability of
that class) from ``visionformers.demo.grade_images``, and FID / KID against the train digits on its 128-d hidden
features from ``visionformers.demo.grade_distribution``, as the demo reports them; the real test digits get the
same FID as a floor. A call is one sampler step's forward (the classifier-free-guidance pair runs as one doubled
batch); heun takes 2 steps - 1 calls, so it gets the largest step count within the budget. Prints a Markdown table
(each cell: accuracy / FID) and writes it as JSON with ``--output``. ``--flow_shift`` samples flow models on another
time shift than they were trained with (the model sees the true noise level, so any shift is consistent).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

from visionformers._validate import HelpFormatter
from visionformers.data import DigitsDataset
from visionformers.demo import digit_classifier, grade_distribution, grade_images
from visionformers.training import pipeline, sampling

BUDGETS = (5, 10, 20, 50)


def steps_for(sampler: str, calls: int) -> int:
    """The most sampler steps within ``calls`` model calls (heun: 2 steps - 1 calls)."""
    return (calls + 1) // 2 if sampler == "heun" else calls


def calls_of(sampler: str, steps: int) -> int:
    return 2 * steps - 1 if sampler == "heun" else steps


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("models", nargs="+", metavar="NAME=PATH", help="exported class-conditional digit models")
    p.add_argument("--samplers", nargs="*", default=None,
                   help="default: ddim and dpmpp_2m for VP models; euler, heun and dpmpp_2m for flow models")
    p.add_argument("--budgets", type=int, nargs="*", default=list(BUDGETS), help="model calls per image to compare")
    p.add_argument("--num_images", type=int, default=500, help="images per model, sampler and budget")
    p.add_argument("--guidance_scale", type=float, default=2.0, help="classifier-free guidance weight (1: none)")
    p.add_argument("--flow_shift", type=float, default=None,
                   help="sample flow models on this time shift instead of their trained one (SD3 samples at 3)")
    p.add_argument("--seed", type=int, default=1000, help="image i uses seed + i")
    p.add_argument("--output", default=None, help="a JSON file for the results")
    args = p.parse_args(argv)
    if any("=" not in m for m in args.models):
        raise SystemExit(f"models must be NAME=PATH, got {args.models}")
    classifier = digit_classifier()
    real_test = DigitsDataset("test", image_size=8, captions=False).images
    floor = {**grade_distribution(real_test, classifier), "num_samples": len(real_test)}
    print(f"real test digits: {floor['fid_kid_line']}", file=sys.stderr, flush=True)
    rows = []
    for spec in args.models:
        name, path = spec.split("=", 1)
        model, settings, _ = pipeline.load_denoiser(path)
        if settings["conditioning"] != "class":
            raise SystemExit(f"{path}: a class-conditional digits model is needed (conditioning={settings['conditioning']})")
        flow = settings["noise_schedule"] == "flow"
        if flow and args.flow_shift is not None:
            settings = {**settings, "flow_shift": args.flow_shift}
        sched = pipeline.schedule_from(settings)
        samplers = args.samplers or (["euler", "heun", "dpmpp_2m"] if flow else ["ddim", "dpmpp_2m"])
        labels = torch.arange(args.num_images) % settings["num_classes"]
        cond, uncond = pipeline.model_inputs(settings, None, "cpu", class_labels=labels)
        shape = (settings["channels"], settings["resolution"], settings["resolution"])
        for sampler in samplers:
            row = {"model": name, "process": repr(sched), "sampler": sampler, "grades": {}}
            for budget in args.budgets:
                steps = steps_for(sampler, budget)
                images = sampling.sample_chunk(
                    model, range(args.seed, args.seed + args.num_images), sched, shape, seed=0, cond=cond,
                    uncond=uncond, sampler=sampler, steps=steps, prediction_type=settings["prediction_type"],
                    guidance_scale=args.guidance_scale)
                graded = grade_images(images, labels, classifier)
                dist = grade_distribution(images, classifier)
                acc, conf = graded["sample_accuracy"], graded["sample_confidence"]
                row["grades"][budget] = {"calls": calls_of(sampler, steps), "steps": steps, "accuracy": acc,
                                         "confidence": conf, "fid": dist["fid"], "kid": dist["kid"],
                                         "kid_std": dist["kid_std"], "num_real": dist["num_real"]}
                print(f"{name} {sampler} {calls_of(sampler, steps)} calls: {100 * acc:.1f}% "
                      f"(confidence {100 * conf:.1f}%), {dist['fid_kid_line']}", file=sys.stderr, flush=True)
            rows.append(row)
    print(f"real test digits (n={floor['num_samples']}) against the train digits: FID {floor['fid']:.2f}\n")
    head = "| model | sampler | " + " | ".join(f"{b} calls" for b in args.budgets) + " |"
    print(head + "\n|" + "---|" * (2 + len(args.budgets)))
    for r in rows:
        cells = [f"{100 * g['accuracy']:.1f}% / {g['fid']:.2f}"
                 + ("" if g["calls"] == b else f" ({g['calls']} calls)") for b, g in r["grades"].items()]
        print(f"| {r['model']} | {r['sampler']} | " + " | ".join(cells) + " |")
    if args.output:
        tmp = args.output + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"settings": vars(args), "real_test_digits": floor, "rows": rows}, f, indent=2)
        os.replace(tmp, args.output)


if __name__ == "__main__":
    sys.exit(main())
