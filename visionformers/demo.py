"""`make demo`: train the default class-conditional digits model, sample it, and grade the samples.

    python -m visionformers.demo [--output_dir outputs/demo] [--max_train_steps N]

Runs ``train_scripts/train_unet.py`` with its defaults, then ``sample_scripts/sample_unet.py`` (4 images per
class), and checks the samples with a small digit classifier trained here on the real train split: the share of
samples it reads as the class they were drawn for, and FID / KID against the train digits on its hidden features
(printed with the sample counts and a note that 40 samples are below the standard protocol).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

REPO = Path(__file__).resolve().parents[1]


def _load_script(relpath: str):
    """Import a script (train_scripts/..., sample_scripts/...) as a module to call its ``main(argv)``."""
    path = REPO / relpath
    if not path.is_file():
        raise FileNotFoundError(f"{str(path)!r} is missing: the demo runs from a source checkout of visionformers")
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def digit_classifier(seed: int = 0, steps: int = 600) -> tuple[nn.Module, float]:
    """An MLP on 8x8 digits (the native resolution; larger inputs are area-downsampled), trained in seconds.
    Returns (classifier taking (B, 1, H, W) in [-1, 1], its accuracy on the 364 held-out test digits)."""
    from visionformers.data import DigitsDataset

    torch.manual_seed(seed)
    train, test = DigitsDataset("train", image_size=8, captions=False), DigitsDataset("test", image_size=8, captions=False)
    net = nn.Sequential(nn.Flatten(), nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 10))
    opt = torch.optim.AdamW(net.parameters(), lr=3e-3, weight_decay=1e-2)
    x, y = train.images, train.labels
    for _ in range(steps):
        idx = torch.randint(0, len(y), (128,))
        noisy = x[idx] + 0.1 * torch.randn_like(x[idx])  # a little noise: samples are never pixel-perfect
        loss = F.cross_entropy(net(noisy), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    net.eval()

    def classify(images: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if images.shape[-1] != 8:
            images = F.adaptive_avg_pool2d(images, 8)  # (B, 1, 8, 8)
        return net[:-1](images) if pre_logits else net(images)  # pre_logits: the 128-d features of FID / KID

    with torch.no_grad():
        acc = (classify(test.images).argmax(1) == test.labels).float().mean().item()
    return classify, acc


def _as_png(images: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] quantised to 8 bits, as a PNG stores them."""
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round() / 127.5 - 1


def grade_images(images: torch.Tensor, labels: torch.Tensor, classifier=None) -> dict:
    """Top-1 agreement of the digit classifier with ``labels``, on (N, 1, H, W) images in [-1, 1] quantised to 8 bits
    as a PNG stores them. ``classifier``: a (classify, test accuracy) pair of :func:`digit_classifier` to reuse."""
    classify, test_acc = classifier or digit_classifier()
    images = _as_png(images)
    with torch.no_grad():
        logits = classify(images)
    acc = (logits.argmax(1) == labels).float().mean().item()
    confidence = logits.softmax(1).gather(1, labels[:, None]).mean().item()  # mean probability of the drawn class
    return {"sample_accuracy": acc, "sample_confidence": confidence, "classifier_test_accuracy": test_acc,
            "num_samples": len(labels)}


def grade(samples_dir: Path) -> dict:
    """Top-1 agreement of the classifier with the class each sample (a PNG of sample_unet.py) was drawn for, and
    :func:`grade_distribution` of the samples."""
    import numpy as np
    from PIL import Image

    record = json.loads((samples_dir / "settings.json").read_text())
    images = torch.stack([
        torch.from_numpy(np.asarray(Image.open(samples_dir / item["file"]), dtype=np.float32)) / 127.5 - 1
        for item in record["images"]
    ]).unsqueeze(1)  # (N, 1, H, W)
    labels = torch.tensor([item["class_label"] for item in record["images"]])
    classifier = digit_classifier()
    return {**grade_images(images, labels, classifier), **grade_distribution(images, classifier)}


def grade_distribution(images: torch.Tensor, classifier=None) -> dict:
    """FID / KID of (N, 1, H, W) images in [-1, 1], quantised to 8 bits as a PNG stores them, against the train
    digits on the digit classifier's 128-d hidden features (not Inception's: a sanity figure). ``classifier``: a
    pair of :func:`digit_classifier` to reuse."""
    from visionformers.data import DigitsDataset
    from visionformers.metrics import feature_statistics, fid, kid, protocol_note

    classify = (classifier or digit_classifier())[0]
    features = lambda x: classify(x, pre_logits=True)  # noqa: E731
    features.name = "digits-classifier"
    real = feature_statistics(DigitsDataset("train", image_size=images.shape[-1], channels=1).images, features)
    fake = feature_statistics(_as_png(images), features)
    f, k = fid(real, fake), kid(real, fake)
    note = protocol_note("fid", real.num_samples, fake.num_samples)
    return {"fid": f.value, "kid": k.value, "kid_std": k.std, "num_real": real.num_samples,
            "fid_kid_line": f"{f}; {k} [{note}]"}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output_dir", default="outputs/demo")
    p.add_argument("--max_train_steps", type=int, default=None, help="default: train_unet.py's default")
    args = p.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    out = Path(args.output_dir)

    t0 = time.time()
    train_argv = ["--output_dir", str(out)]
    if args.max_train_steps is not None:
        train_argv += ["--max_train_steps", str(args.max_train_steps)]
    _load_script("train_scripts/train_unet.py").main(train_argv)
    t_train = time.time() - t0
    _load_script("sample_scripts/sample_unet.py").main(
        ["--model_path", str(out / "model"), "--num_images", "40", "--output_dir", str(out / "samples")])
    t_total = time.time() - t0
    result = {"train_seconds": round(t_train, 1), "total_seconds": round(t_total, 1), **grade(out / "samples"),
              "threads": torch.get_num_threads()}
    (out / "demo.json").write_text(json.dumps(result, indent=2))
    print(f"\ndemo done in {t_total:.0f} s (training {t_train:.0f} s, {torch.get_num_threads()} threads)")
    print(f"samples: {out / 'samples' / 'grid.png'} (one column per class 0-9)")
    print(f"a digit classifier ({100 * result['classifier_test_accuracy']:.1f}% on real test digits) reads "
          f"{100 * result['sample_accuracy']:.1f}% of the {result['num_samples']} samples as their class")
    print(f"against the train digits: {result['fid_kid_line']}")


if __name__ == "__main__":
    sys.exit(main())
