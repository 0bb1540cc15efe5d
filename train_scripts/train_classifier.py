"""Train or fine-tune an image classifier (ViT, Swin): `python train_scripts/train_classifier.py` or
`accelerate launch train_scripts/train_classifier.py`.

With no arguments: a small ViT from scratch on the embedded 8x8 digits (upscaled to --image_size). Top-1 / top-5
on the validation split after every epoch; the best weights are kept in <output_dir>/best (from_pretrained).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

from visionformers import data, training
from visionformers._validate import script_errors
from visionformers.training import args as train_args
from visionformers.training import callbacks as cb
from visionformers.training import classification as clf
from visionformers.training import logging as track
from visionformers.training import performance, pipeline, run_dir

# The from-scratch default on the digits (README "Fine-tune a classifier").
DIGITS_MODEL = "vit_tiny_patch4_32"
# From scratch on the digits without --model_overrides, these presets shrink to models sized for 1,433 images of
# 16x16 (README: ~99% top-1 in under 5 minutes on 2 CPU cores). 16 tokens of 4x4 pixels; the ViT gets RoPE and
# mean pooling: with learned positions and a class token it learns far more slowly from so few images (10 epochs
# without augmentation, d96x4: 61% vs 84% top-1). The Swin's 4x4 grid is one 4x4 window with a relative position
# bias (patch 2 makes an 8x8 grid of shifted windows: slower per epoch and slower to learn, ~80% after 20 epochs).
DIGITS_OVERRIDES = {
    "vit_tiny_patch4_32": '{"embed_dim": 64, "depth": 4, "num_heads": 2, "pos_embed": "rope", "global_pool": "avg", '
                          '"class_token": false}',
    "swin_tiny_patch2_window4_32": '{"patch_size": 4, "embed_dim": 64, "depths": [2, 2], "num_heads": [2, 4]}',
}
# Defaults that depend on the data (None on the command line): the digits are 8x8 strokes that RandAugment's
# posterize / solarize / shear at magnitude 9 and crops of a third of the image destroy (ViT d96x4, crop scale 0.35:
# 86% after 36 epochs with RandAugment, 96% after 50 without; the d64x4 default with crop scale 0.6 and no
# RandAugment: ~99% after 60). Image folders keep the DeiT-style recipe.
RECIPES = {
    "digits": {"randaugment_num_ops": 0, "crop_scale_min": 0.6, "learning_rate": 2e-3},
    "folder": {"randaugment_num_ops": 2, "crop_scale_min": 0.35, "learning_rate": 1e-3},
}
METRICS = {"top1": "max", "top5": "max"}  # what each epoch's evaluation reports (early stopping's choices)


CHECKS = [  # (argument, test, what is accepted): bad numbers stop the run before anything is built
    *[(n, lambda v: v >= 1, "an int >= 1") for n in ("image_size", "epochs", "train_batch_size", "eval_batch_size",
                                                       "gradient_accumulation_steps")],
    *[(n, lambda v: v >= 0, "a number >= 0") for n in ("weight_decay", "warmup_epochs", "mixup_alpha", "cutmix_alpha",
                                                         "max_grad_norm", "randaugment_num_ops",
                                                         "dataloader_num_workers")],
    *[(n, lambda v: 0 < v <= 1, "a number in (0, 1]") for n in ("crop_scale_min", "layer_decay")],
    *[(n, lambda v: 0 <= v <= 1, "a number in [0, 1]") for n in ("hflip", "min_lr_ratio")],
    ("label_smoothing", lambda v: 0 <= v < 1, "a number in [0, 1)"),
    ("learning_rate", lambda v: v > 0, "a number > 0"),
    ("max_steps_per_epoch", lambda v: v is None or v >= 1, "an int >= 1"),
    ("output_dir", lambda v: not os.path.isfile(v), "a directory (this path is an existing file)"),
]


def _recipe_help(name: str) -> str:
    return " for digits, ".join(str(RECIPES[k][name]) for k in ("digits", "folder")) + " for image folders"


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line instead of a page of usage
        raise SystemExit(f"error: {message} (see --help)")


def parse_args(argv=None) -> argparse.Namespace:
    p = _Parser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = p.add_argument
    a("--model", default=None, help=f"a ViT or Swin preset (vf.list_models('vit*'), 'swin*'); from scratch the "
      f"default is {DIGITS_MODEL}; with --init_checkpoint it only fills what the weights cannot tell (ViT heads)")
    a("--model_overrides", type=pipeline.json_config_fields, default=None, help="JSON of config fields, e.g. '{\"depth\": 4}'; "
      f"from scratch on the digits, {' / '.join(DIGITS_OVERRIDES)} default to {' / '.join(DIGITS_OVERRIDES.values())}")
    a("--pretrained", default=None, help="start from a visionformers model directory (save_pretrained)")
    a("--init_checkpoint", default=None, help="start from a timm / torchvision weights file (.pth, .safetensors)")
    a("--init_format", default=None, choices=clf.INIT_FORMATS, help="format of --init_checkpoint")
    a("--train_data_dir", default=None, help="ImageFolder layout (class subfolders); default: the embedded digits")
    a("--val_data_dir", default=None, help="ImageFolder layout with the same classes")
    a("--image_size", type=int, default=16, help="input height = width of the model")
    a("--channels", type=int, default=None, choices=[1, 3], help="default: 1 for digits, 3 for image folders")
    a("--crop_scale_min", type=float, default=None, help="RandomResizedCrop area fraction lower bound; default: "
      + _recipe_help("crop_scale_min"))
    a("--hflip", type=float, default=0.0, help="horizontal flip probability (mirrored digits are not digits)")
    a("--randaugment_num_ops", type=int, default=None, help="0 turns RandAugment off; default: "
      + _recipe_help("randaugment_num_ops"))
    a("--randaugment_magnitude", type=int, default=9, help="RandAugment strength (0..30)")
    a("--mixup_alpha", type=float, default=0.0, help="mixup Beta(alpha, alpha) (0: off)")
    a("--cutmix_alpha", type=float, default=0.0, help="CutMix Beta(alpha, alpha) (0: off)")
    a("--label_smoothing", type=float, default=0.1, help="cross-entropy label smoothing")
    a("--epochs", type=int, default=60, help="passes over the training set (sets the lr schedule)")
    a("--train_batch_size", type=int, default=32, help="per process")
    a("--eval_batch_size", type=int, default=256, help="per process")
    a("--learning_rate", type=float, default=None, help="peak lr of the top layer (the head); default: "
      + _recipe_help("learning_rate"))
    a("--weight_decay", type=float, default=0.05, help="AdamW; none on norms, biases, position tables, tokens")
    a("--layer_decay", type=float, default=1.0, help="layer-wise lr decay, e.g. 0.65 when fine-tuning")
    a("--warmup_epochs", type=float, default=3, help="linear lr warm-up, in epochs")
    a("--min_lr_ratio", type=float, default=0.01, help="cosine decays to learning_rate * this")
    a("--max_grad_norm", type=float, default=1.0, help="0 disables clipping")
    a("--gradient_accumulation_steps", type=int, default=1, help="micro-batches per optimizer step")
    a("--max_steps_per_epoch", type=int, default=None, help="cut epochs short (quick runs, tests)")
    a("--mixed_precision", default=None, choices=["no", "fp16", "bf16"], help="default: bf16 if supported")
    a("--dataloader_num_workers", type=int, default=1, help="data loading processes")
    a("--seed", type=int, default=0, help="seed of weights, data order and augmentation")
    a("--output_dir", default="outputs/train_classifier", help="metrics.jsonl and the best model (best/); locked while the run uses it")
    a("--overwrite_output_dir", action="store_true", help="start a new run in an --output_dir holding another run")
    a("--report_to", default="none", choices=track.REPORT_TO, help="experiment tracker")
    cb.add_early_stopping_arguments(p, METRICS, default="top1")
    performance.add_performance_arguments(p)
    args = p.parse_args(argv)
    recipe = RECIPES["digits" if args.train_data_dir is None else "folder"]
    for name, value in recipe.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    for name, ok, accepted in CHECKS:
        if not ok(getattr(args, name)):
            p.error(f"--{name}={getattr(args, name)} is not accepted; expected {accepted}")
    if (args.train_data_dir is None) != (args.val_data_dir is None):
        p.error("--train_data_dir and --val_data_dir go together (the digits have their own test split)")
    if args.init_checkpoint is not None and args.init_format is None:
        p.error("--init_checkpoint needs --init_format timm or torchvision")
    return args


def build_data(args):
    """(train dataset, eval dataset, class names, channels, mean, std)."""
    digits = args.train_data_dir is None
    channels = args.channels or (1 if digits else 3)
    gray = digits or channels == 1  # the digits are gray even when repeated to 3 channels
    mean, std = ((0.5,) * channels, (0.5,) * channels) if gray else (data.IMAGENET_MEAN, data.IMAGENET_STD)
    train_tf = data.classification_train_transform(
        args.image_size, scale=(args.crop_scale_min, 1.0), hflip=args.hflip, mean=mean, std=std,
        randaugment_num_ops=args.randaugment_num_ops, randaugment_magnitude=args.randaugment_magnitude)
    eval_tf = data.classification_eval_transform(args.image_size, crop_pct=1.0 if digits else 0.875, mean=mean, std=std)
    if digits:
        train, test = (data.DigitsDataset(split, args.image_size, channels, captions=False, transform=tf)
                       for split, tf in (("train", train_tf), ("test", eval_tf)))
        return train, test, list(data.DigitsDataset.classes), channels, mean, std
    train = data.ImageFolderDataset(args.train_data_dir, args.image_size, channels=channels, transform=train_tf)
    val = data.ImageFolderDataset(args.val_data_dir, args.image_size, channels=channels, transform=eval_tf)
    if not train.classes or train.classes != val.classes:
        raise ValueError(f"--train_data_dir classes {train.classes} and --val_data_dir classes {val.classes} must be "
                         "the same non-empty list of class subfolders")
    return train, val, train.classes, channels, mean, std


def setup(args, accelerator):
    """Data, model, optimizer, schedule: everything a bad argument can break, before any training."""
    train_ds, val_ds, classes, channels, mean, std = build_data(args)
    scratch = args.pretrained is None and args.init_checkpoint is None
    model_name = args.model or (DIGITS_MODEL if scratch else None)
    digits_sized = scratch and args.train_data_dir is None and model_name in DIGITS_OVERRIDES
    given = args.model_overrides if args.model_overrides is not None else (
        pipeline.json_config_fields(DIGITS_OVERRIDES[model_name]) if digits_sized else {})
    overrides = dict(given, num_classes=len(classes), img_size=args.image_size, in_chans=channels)
    model = clf.build_classifier(model_name, pretrained=args.pretrained,
                                 init_checkpoint=args.init_checkpoint, init_format=args.init_format, **overrides)
    optimizer = clf.build_optimizer(model, args.learning_rate, args.weight_decay, args.layer_decay)
    world, rank = accelerator.num_processes, accelerator.process_index
    sampler = training.EpochBatchSampler(len(train_ds), args.train_batch_size, args.seed, world, rank,
                                         batch_flag="--train_batch_size")
    train_loader = torch.utils.data.DataLoader(  # per-item seeded augmentation: same data for any process count
        training.SeededItems(train_ds, args.seed), batch_sampler=sampler, num_workers=args.dataloader_num_workers,
        persistent_workers=args.dataloader_num_workers > 0)
    steps_per_epoch = sampler.batches_per_epoch() // args.gradient_accumulation_steps
    if args.max_steps_per_epoch:
        steps_per_epoch = min(steps_per_epoch, args.max_steps_per_epoch)
    if steps_per_epoch < 1:
        raise ValueError(f"train_batch_size={args.train_batch_size} x gradient_accumulation_steps leaves no full "
                         "optimizer step per epoch; lower it")
    lr_scheduler = training.build_lr_scheduler(optimizer, "cosine", round(args.warmup_epochs * steps_per_epoch),
                                               args.epochs * steps_per_epoch, args.min_lr_ratio)
    val_loader = torch.utils.data.DataLoader(val_ds, batch_size=args.eval_batch_size)
    preprocess = {"image_size": args.image_size, "channels": channels, "mean": list(mean), "std": list(std),
                  "class_names": classes}
    return model, optimizer, lr_scheduler, sampler, train_loader, val_loader, preprocess


def main(argv=None) -> None:
    args = parse_args(argv)
    try:
        accelerator = train_args.accelerator_from_args(args)
        pipeline.check_distributed(accelerator)
        run = run_dir.open_run(args.output_dir, vars(args), overwrite=args.overwrite_output_dir, accelerator=accelerator)
        training.seed_everything(args.seed, accelerator.process_index)
        model, optimizer, lr_scheduler, sampler, train_loader, val_loader, preprocess = setup(args, accelerator)
        stopper = cb.early_stopping_from_args(args, METRICS)
        performance.configure_training(model, accelerator.device, gradient_checkpointing=args.gradient_checkpointing,
                                       compile=args.compile, compile_backend=args.compile_backend)
    except (ValueError, FileNotFoundError) as e:  # bad arguments: one line, no traceback
        raise SystemExit(f"error: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    accelerator.print(clf.describe_groups(optimizer))
    model, optimizer, val_loader = accelerator.prepare(model, optimizer, val_loader)
    mix_gen = training.make_generator(args.seed, accelerator.process_index, 1)  # mixup / cutmix draws
    best = clf.BestCheckpoint(os.path.join(args.output_dir, "best"), {"preprocess.json": preprocess})
    track.init_trackers(accelerator, "visionformers", vars(args), args.output_dir)
    callbacks = cb.CallbackList([best, stopper, cb.LrThroughputLogger(samples_per_step=sampler.global_batch
                                                                      * args.gradient_accumulation_steps)])
    state = cb.LoopState(model=model, accelerator=accelerator)
    log_path, t0, step = os.path.join(args.output_dir, "metrics.jsonl"), time.time(), 0
    if accelerator.is_main_process:
        os.makedirs(args.output_dir, exist_ok=True)
        open(log_path, "w").close()
    callbacks.on_train_begin(state)
    for epoch in range(args.epochs):
        sampler.set_position(epoch)
        state.epoch = epoch
        stats = clf.train_one_epoch(
            model, train_loader, optimizer, lr_scheduler, accelerator, num_classes=len(preprocess["class_names"]),
            mixup_alpha=args.mixup_alpha, cutmix_alpha=args.cutmix_alpha, label_smoothing=args.label_smoothing,
            max_grad_norm=args.max_grad_norm, generator=mix_gen, max_steps=args.max_steps_per_epoch,
            callbacks=callbacks, state=state)
        step += stats["steps"]
        result = clf.evaluate(model, val_loader, accelerator)
        callbacks.on_evaluate(state, {"top1": result.top1, "top5": result.top5, "num_samples": result.num_samples})
        saved = best.last_saved
        row = {"epoch": epoch, "step": step, "train_loss": round(stats["loss"], 5), "top1": result.top1,
               "top5": result.top5, "best_top1": best.best, "lr": lr_scheduler.get_last_lr()[-1],
               "seconds": round(time.time() - t0, 1)}
        accelerator.print(f"epoch {epoch}: loss {stats['loss']:.4f}, {result}{' (best, saved)' if saved else ''}, "
                          f"{row['seconds']:.0f} s")
        if accelerator.is_main_process:
            with open(log_path, "a") as f:
                f.write(json.dumps(row) + "\n")
        scalars = {f"val/{k}": row[k] for k in ("top1", "top5") if row[k] is not None}
        track.log_scalars(accelerator, {**scalars, "train/loss": stats["loss"]}, step)
        if state.should_stop:
            accelerator.print(state.stop_reason)
            break
    callbacks.on_train_end(state)
    accelerator.print(f"done: best top-1 {100 * best.best:.2f}% in {time.time() - t0:.0f} s; "
                      f"model in {args.output_dir}/best")
    accelerator.end_training()
    run.close()


if __name__ == "__main__":
    sys.exit(script_errors(main)())
