"""FID / KID between a real image set and generated images.

    python sample_scripts/evaluate.py --real digits --fake outputs/samples \\
        --feature_extractor inception:/path/to/inception_v3.pth --metrics fid kid --cache outputs/digits_stats.npz

--real: a folder of images (class subfolders or flat) or "digits" (the embedded set, --digits_split).
--feature_extractor: "inception:PATH" (torchvision Inception-v3 weights, a local file), "visionformers:DIR"
(a classifier saved with save_pretrained), or "random_conv[:SEED]" (a fixed random conv net: tests and smoke
runs only, its figures mean nothing elsewhere).
--cache: reference statistics of --real; loaded when the file exists (and was made with the same extractor),
else computed and written there.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

from visionformers._validate import check_args, check_device, script_errors
from visionformers.data import DigitsDataset, ImageFolderDataset
from visionformers.metrics import (
    build_feature_extractor,
    feature_statistics,
    fid,
    kid,
    load_statistics,
    save_statistics,
)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="FID/KID of generated images against a reference set.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--real", required=True, help='folder of reference images, or "digits"')
    p.add_argument("--fake", required=True, help="folder of generated images")
    p.add_argument("--feature_extractor", required=True, help="inception:PATH | visionformers:DIR | random_conv")
    p.add_argument("--metrics", nargs="+", default=["fid", "kid"], choices=["fid", "kid"], help="metrics to compute")
    p.add_argument("--cache", default=None, help=".npz of the reference statistics (read if present, else written)")
    p.add_argument("--resolution", type=int, default=32, help="images are loaded at this size (center crop)")
    p.add_argument("--channels", type=int, default=3, choices=[1, 3], help="channels the images are loaded with")
    p.add_argument("--digits_split", default="train", choices=["train", "test", "all"], help="split of --real digits")
    p.add_argument("--kid_subsets", type=int, default=100, help="random subsets KID averages over")
    p.add_argument("--kid_subset_size", type=int, default=1000, help="images per KID subset (capped by the set sizes)")
    p.add_argument("--batch_size", type=int, default=64, help="images per feature-extractor forward")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device to run on")
    args = p.parse_args(argv)
    check_args(args, [(name, lambda v: v >= 1, "an int >= 1") for name in ("resolution", "kid_subsets", "batch_size")]
               + [("kid_subset_size", lambda v: v >= 2, "an int >= 2")])
    check_device("--device", args.device)
    return args


def image_source(path: str, args: argparse.Namespace):
    if path == "digits":
        return DigitsDataset(args.digits_split, image_size=args.resolution, channels=args.channels, captions=False)
    return ImageFolderDataset(path, args.resolution, center_crop=True, channels=args.channels)


def reference_statistics(args, extractor, keep_features: bool):
    name = getattr(extractor, "name", "")
    if args.cache and os.path.isfile(args.cache):
        stats = load_statistics(args.cache)
        if stats.extractor != name:
            raise ValueError(f"--cache {args.cache!r} was made with {stats.extractor!r}, not {name!r}; delete it")
        if keep_features and stats.features is None:
            raise ValueError(f"--cache {args.cache!r} holds no features, which KID needs; delete it")
        print(f"real: {stats.num_samples} images, statistics from {args.cache}")
        return stats
    stats = feature_statistics(image_source(args.real, args), extractor, args.batch_size, args.device, keep_features)
    print(f"real: {stats.num_samples} images from {args.real}")
    if args.cache:
        save_statistics(args.cache, stats)
        print(f"wrote reference statistics to {args.cache}")
    return stats


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        if args.real != "digits" and not os.path.isdir(args.real):
            raise FileNotFoundError(f"--real {args.real!r} is neither a folder nor 'digits'")
        if not os.path.isdir(args.fake):
            raise FileNotFoundError(f"--fake {args.fake!r} is not a folder")
        extractor = build_feature_extractor(args.feature_extractor).to(args.device)
        need_features = "kid" in args.metrics
        real = reference_statistics(args, extractor, need_features)
        fake = feature_statistics(image_source(args.fake, args), extractor, args.batch_size, args.device, need_features)
        print(f"fake: {fake.num_samples} images from {args.fake}")
    except (FileNotFoundError, ValueError, OSError) as e:
        print(f"evaluate.py: error: {e}", file=sys.stderr)
        return 2
    print(f"feature extractor: {real.extractor}")
    if "fid" in args.metrics:
        print(fid(real, fake))
    if "kid" in args.metrics:
        print(kid(real, fake, args.kid_subsets, args.kid_subset_size))
    return 0


if __name__ == "__main__":
    sys.exit(script_errors(main)())
