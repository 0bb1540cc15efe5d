"""FID, KID, IS, sFID, precision/recall and FD-DINOv2 of generated images against a reference set.

    python sample_scripts/evaluate.py --real data/train --model_path outputs/train_unet/model --num_samples 50000 \\
        --feature_extractor inception:pt_inception-2015-12-05-6726825d.pth --metrics fid is sfid pr --cache outputs/ref
    python sample_scripts/evaluate.py --real digits --fake outputs/samples/images \\
        --feature_extractor visionformers:outputs/train_classifier/best --metrics fid kid

Generated images come from a folder (--fake) or are sampled here from a model directory (--model_path, no PNGs;
--save_npz keeps them as an ADM-style .npz). Runs under `accelerate launch`: images are split over the processes
and the features gathered, with the same figures as one process. See the README's Evaluation section.
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np
import torch

from visionformers import diffusion
from visionformers._validate import HelpFormatter, check_args, check_device, script_errors
from visionformers.data import DigitsDataset, ImageFolderDataset
from visionformers.data.image_folder import folder_fingerprint
from visionformers.metrics import build_feature_extractor, dinov2_features, protocol, reference, samples
from visionformers.training import pipeline


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    a = p.add_argument
    a("--real", required=True, help='reference images: a folder (class subfolders or flat) or "digits"')
    a("--digits_split", default="train", choices=["train", "test", "all"], help="with --real digits")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--fake", help="a folder of generated images")
    src.add_argument("--model_path", help="a model directory to sample --num_samples images from (no PNGs written)")
    a("--num_samples", type=int, default=50_000, help="with --model_path (the standard protocol: 50000)")
    a("--sampler", default="ddim", choices=list(diffusion.SAMPLERS), help="with --model_path")
    a("--num_inference_steps", type=int, default=50, help="with --model_path")
    a("--guidance_scale", type=float, default=1.0, help="with --model_path: classifier-free guidance (1: none)")
    a("--eta", type=float, default=0.0, help="with --model_path: ddim noise")
    a("--seed", type=int, default=0, help="with --model_path: image i uses seed + i")
    a("--no_ema", action="store_true", help="with --model_path and a checkpoint: the raw weights, not the EMA")
    a("--save_npz", default=None, help="with --model_path: write the samples here (arr_0: N x H x W x C uint8)")
    a("--feature_extractor", required=True,
      help="inception:PATH (pytorch-fid's or torchvision's weights) | visionformers:DIR | random_conv[:SEED] (tests)")
    a("--dinov2", default=None, help="a local timm DINOv2 weights file or visionformers ViT dir (for fd_dinov2)")
    a("--metrics", nargs="+", default=["fid", "kid"], choices=list(protocol.METRICS), help="metrics to compute")
    a("--resize", default="pytorch_fid", choices=["pytorch_fid", "clean"],
      help="to the extractor's input size: pytorch-fid's bilinear (no antialias) or clean-fid's PIL bicubic")
    a("--real_baseline", action="store_true", help="also print each figure between two halves of the reference set")
    a("--cache", default=None, help="reference features: a directory (one file per setting) or a .npz file")
    a("--resolution", type=int, default=32, help="reference (and --fake) images are loaded at this size (center crop)")
    a("--channels", type=int, default=3, choices=[1, 3], help="channels the images are loaded with")
    a("--kid_subsets", type=int, default=100, help="random subsets KID averages over")
    a("--kid_subset_size", type=int, default=1000, help="images per KID subset (capped by the set sizes)")
    a("--is_splits", type=int, default=10, help="splits the Inception Score averages over")
    a("--batch_size", type=int, default=64, help="images per chunk (chunks are spread over the processes)")
    a("--device", default=None, help="default: the accelerator's device")
    args = p.parse_args(argv)
    check_args(args, [(n, lambda v: v >= 1, "an int >= 1") for n in
                      ("resolution", "kid_subsets", "batch_size", "num_samples", "num_inference_steps", "is_splits")]
               + [("kid_subset_size", lambda v: v >= 2, "an int >= 2"),
                  ("guidance_scale", lambda v: v >= 0, "a number >= 0 (1: no guidance)"),
                  ("save_npz", lambda v: v is None or args.model_path is not None, "only with --model_path")])
    if "fd_dinov2" in args.metrics and not args.dinov2:
        p.error("--metrics fd_dinov2 needs --dinov2 PATH")
    if args.device is not None:
        check_device("--device", args.device)
    return args


def check_sources(args: argparse.Namespace) -> None:
    """The image folders and the cache path, checked before any model is built or image read."""
    for flag, path in (("--real", args.real), ("--fake", args.fake)):
        if path is not None and path != "digits" and not os.path.isdir(path):
            raise FileNotFoundError(f"{flag} {path!r} is neither a folder of images nor 'digits'")
    if args.cache and os.path.isfile(args.cache) and not args.cache.endswith(".npz"):
        raise ValueError(f"--cache {args.cache!r} is a file but not a .npz statistics file; expected a directory "
                         "(one statistics file per setting) or a .npz file")


def image_source(path: str, args: argparse.Namespace, flag: str):
    if path == "digits":
        return DigitsDataset(args.digits_split, image_size=args.resolution, channels=args.channels, captions=False)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{flag} {path!r} is neither a folder of images nor 'digits'")
    return ImageFolderDataset(path, args.resolution, center_crop=True, channels=args.channels)


def chunk_loader(dataset):
    return lambda idx: torch.stack([dataset[i]["pixel_values"] for i in idx])


def split_outputs(out: dict, extractors) -> list[dict]:
    return [{k.split(".", 1)[1]: v for k, v in out.items() if k.startswith(f"{i}.")} for i in range(len(extractors))]


def reference_features(args, extractors, accelerator, device) -> list[dict]:
    """Each extractor's reference features: from the cache when its key matches, else computed (and cached)."""
    ds = image_source(args.real, args, "--real")
    source = (f"digits:{args.digits_split}" if args.real == "digits" else
              f"folder:{os.path.abspath(args.real)}:{folder_fingerprint(ds.paths, ds.root)}")
    keys = [reference.reference_key(e, source, resolution=args.resolution, channels=args.channels,
                                    resize=args.resize, num_images=len(ds)) for e in extractors]
    files = [reference.cache_file(args.cache, k) if args.cache else None for k in keys]
    feats = [reference.load_reference(f, k) if f and os.path.isfile(f) else None for f, k in zip(files, keys)]
    todo = [i for i, f in enumerate(feats) if f is None]
    if todo:
        out = protocol.extract_distributed(len(ds), chunk_loader(ds), [extractors[i] for i in todo], args.batch_size,
                                           accelerator=accelerator, device=device, progress=True)
        for i, computed in zip(todo, split_outputs(out, todo)):
            feats[i] = computed
            if files[i] and accelerator.is_main_process:
                reference.save_reference(files[i], keys[i], feats[i])
    for f, k, new in zip(files, keys, [i in todo for i in range(len(extractors))]):
        how = "computed" + (f", cached in {f}" if f else "") if new else f"read from {f}"
        accelerator.print(f"reference: {len(ds)} images of {source.rsplit(':', 1)[0]} ({k['extractor']}: {how})")
    return feats


def main(argv=None) -> int:
    from accelerate import Accelerator

    args = parse_args(argv)
    accelerator = Accelerator(cpu=args.device == "cpu" or pipeline.force_cpu())
    try:
        return evaluate(args, accelerator)
    finally:
        accelerator.end_training()  # every process leaves the process group before exit (no gloo teardown abort)


def evaluate(args: argparse.Namespace, accelerator) -> int:
    device = torch.device(args.device) if args.device else accelerator.device
    try:
        check_sources(args)
        extractors = [build_feature_extractor(args.feature_extractor, resize=args.resize).to(device)]
        inception_only = [m for m in args.metrics if m in ("is", "sfid")]
        if inception_only and not hasattr(extractors[0], "outputs"):  # checked before any feature is computed
            raise ValueError(f"--metrics {' '.join(inception_only)}: IS and sFID need an inception:PATH extractor "
                             f"(logits, spatial features); {args.feature_extractor!r} gives pooled features only")
        if args.dinov2:
            extractors.append(dinov2_features(args.dinov2).to(device))
        if args.model_path:
            load_chunk, settings = samples.model_dir_sampler(
                args.model_path, device, sampler=args.sampler, steps=args.num_inference_steps,
                guidance_scale=args.guidance_scale, eta=args.eta, seed=args.seed, use_ema=not args.no_ema)
            n, what = args.num_samples, (f"{args.num_samples} samples of {args.model_path} ({args.sampler}, "
                                         f"{args.num_inference_steps} steps, guidance {args.guidance_scale})")
        else:
            fake_ds = image_source(args.fake, args, "--fake")
            load_chunk, n, what = chunk_loader(fake_ds), len(fake_ds), f"{len(fake_ds)} images of {args.fake}"
        real = reference_features(args, extractors, accelerator, device)
        out = protocol.extract_distributed(n, load_chunk, extractors, args.batch_size, accelerator=accelerator,
                                           device=device, keep_uint8=args.save_npz is not None, progress=True)
        images, fake = out.pop("images", None), split_outputs(out, extractors)
    except (FileNotFoundError, ValueError, OSError) as e:
        print(f"evaluate.py: error: {e}", file=sys.stderr)
        return 2
    if not accelerator.is_main_process:
        return 0
    if args.save_npz:
        labels = np.arange(n) % settings["num_classes"] if settings["conditioning"] == "class" else None
        samples.save_npz(args.save_npz, images, labels)
        print(f"wrote {n} samples to {args.save_npz}")
    print(f"generated: {what}; resize: {args.resize}; processes: {accelerator.num_processes}")
    real_sets = {**real[0], **({"dinov2": real[1]["pool"]} if args.dinov2 else {})}
    fake_sets = {**fake[0], **({"dinov2": fake[1]["pool"]} if args.dinov2 else {})}
    kw = dict(kid_subsets=args.kid_subsets, kid_subset_size=args.kid_subset_size, is_splits=args.is_splits,
              device=device)
    try:
        for metric in args.metrics:
            name = "dinov2" if metric == "fd_dinov2" else extractors[0].name
            for result in protocol.compute_metric(metric, real_sets, fake_sets, name, **kw):
                print(result)
            if args.real_baseline:
                half_a, half_b = protocol.split_in_two(real_sets)
                for result in protocol.compute_metric(metric, half_a, half_b if metric != "is" else real_sets, name, **kw):
                    print(f"  real-vs-real baseline: {result}")
    except ValueError as e:
        print(f"evaluate.py: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(script_errors(main)())
