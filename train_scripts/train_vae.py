"""Train a KL autoencoder for latent diffusion: `python train_scripts/train_vae.py` or under `accelerate launch`.

With no arguments: a vae_tiny (factor 4) on the embedded digits at 16 px, L1 + KL. The weights are exported to
<output_dir>/model with a scaling_factor measured on the data (1 / std of the latents), ready for
`train_unet.py --vae <output_dir>/model`. Reconstruction grids (input beside reconstruction) go to
<output_dir>/samples*.png. Resume with --resume_from_checkpoint latest; the continuation is bit-identical.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

from visionformers import data, registry, training
from visionformers._validate import check_args, script_errors
from visionformers.training import args as train_args
from visionformers.training import checkpoint as ckpt
from visionformers.training import logging as track
from visionformers.training import pipeline, run_dir, sampling
from visionformers.training import vae as vae_lib


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = p.add_argument
    a("--model", default="vae_tiny", help="an AutoencoderKL preset (vf.list_models('vae*'))")
    a("--model_overrides", type=pipeline.json_config_fields, default={}, help='JSON of config fields, e.g. \'{"latent_channels": 8}\'')
    a("--train_data_dir", default=None, help="an image folder; default: the embedded digits")
    a("--resolution", type=int, default=16, help="training image size (a multiple of the VAE's factor)")
    a("--center_crop", action=argparse.BooleanOptionalAction, default=True, help="center crop (else a random crop)")
    a("--random_flip", action="store_true", help="horizontal flips with probability 1/2")
    a("--reconstruction_loss", default="l1", choices=vae_lib.RECONSTRUCTION_LOSSES, help="pixel loss of the reconstruction")
    a("--kl_weight", type=float, default=1e-6, help="weight of the per-element KL term (LDM: 1e-6)")
    a("--perceptual_model", default=None, help="feature extractor of a perceptual loss: 'visionformers:DIR' (a "
      "classifier from train_classifier.py; distance on forward_features) or 'inception:PATH'")
    a("--perceptual_weight", type=float, default=1.0, help="weight of the perceptual loss")
    a("--scale_latents", action=argparse.BooleanOptionalAction, default=True,
      help="export with scaling_factor = 1 / std of the data's latents (else the preset's)")
    train_args.add_training_arguments(p, output_dir="outputs/train_vae", output_dir_help="checkpoints and the exported VAE",
                                      max_train_steps=1000, use_ema=False)
    a("--sample_every", type=int, default=0, help="write a reconstruction grid every N steps (0: only at the end)")
    a("--num_samples", type=int, default=16, help="images in each reconstruction grid")
    args = p.parse_args(argv)
    check_args(args, [(name, lambda v: v >= 1, "an int >= 1") for name in ("resolution", "num_samples")] + [
        ("kl_weight", lambda v: v >= 0, "a number >= 0"),
        ("perceptual_weight", lambda v: v >= 0, "a number >= 0")])
    train_args.check_training_arguments(args)
    if args.train_data_dir is None and (args.random_flip or not args.center_crop):
        raise ValueError("--random_flip / --no-center_crop apply to --train_data_dir, which is not given")
    return args


def build_dataset(args):
    if args.train_data_dir is None:
        ds = data.DigitsDataset("train", image_size=args.resolution, captions=False)
        return ds, 1
    if not os.path.isdir(args.train_data_dir):
        raise FileNotFoundError(f"--train_data_dir={args.train_data_dir!r} is not a folder; expected a folder of images")
    ds = data.ImageFolderDataset(args.train_data_dir, args.resolution, center_crop=args.center_crop,
                                 random_flip=args.random_flip)
    return ds, ds.channels


def main(argv=None) -> None:
    args = parse_args(argv)
    accelerator = train_args.accelerator_from_args(args)
    run = run_dir.open_run(args.output_dir, vars(args), resume=args.resume_from_checkpoint,
                           overwrite=args.overwrite_output_dir, accelerator=accelerator)
    rank, world, device = accelerator.process_index, accelerator.num_processes, accelerator.device
    training.seed_everything(args.seed)  # the same initial weights on every process

    dataset, channels = build_dataset(args)
    config = {"in_channels": channels, "out_channels": channels, **args.model_overrides}
    model = registry.create_model(args.model, **config)
    if args.resolution % model.factor:
        raise ValueError(f"--resolution={args.resolution} is not accepted; expected a multiple of the VAE's "
                         f"factor {model.factor} (--model {args.model})")
    perceptual = None
    if args.perceptual_model is not None:
        from visionformers.metrics.features import build_feature_extractor

        perceptual = vae_lib.PerceptualLoss(build_feature_extractor(args.perceptual_model)).to(device)
    optimizer = training.build_optimizer(model, "adamw", args.learning_rate, args.adam_weight_decay,
                                         (args.adam_beta1, args.adam_beta2))
    lr_scheduler = training.build_lr_scheduler(optimizer, args.lr_scheduler, args.lr_warmup_steps, args.max_train_steps)
    model, optimizer = accelerator.prepare(model, optimizer)
    training.seed_everything(args.seed, rank + 1)
    ema = training.EMA(model, decay=args.ema_max_decay) if args.use_ema else None
    gen = training.make_generator(args.seed, rank, 1, device=device)  # posterior samples
    stream = training.DataStream(dataset, args.train_batch_size, args.seed, world, rank, args.dataloader_num_workers)
    guard = training.BadStepGuard(args.max_bad_steps, accelerator.mixed_precision, args.learning_rate)
    state_objs = dict(model=model, optimizer=optimizer, lr_scheduler=lr_scheduler, ema=ema, scaler=accelerator.scaler,
                      generators={"posterior": gen}, accelerator=accelerator)

    step, resumed_from = 0, run.resume_from
    if resumed_from is not None:
        saved = ckpt.load_checkpoint(resumed_from, **state_objs)["train_state"]
        step, accelerator.step = saved["step"], saved["accumulation_step"]
        stream.load_state_dict(saved["data"])
        guard.load_state_dict(saved["bad_steps"])
        accelerator.print(f"resumed from {resumed_from} at step {step}")
    track.init_trackers(accelerator, args.tracker_project_name, vars(args), args.output_dir)
    with torch.random.fork_rng(devices=[]):  # a random flip here must not move the training RNG
        fixed = torch.stack([dataset[i]["pixel_values"] for i in range(min(args.num_samples, len(dataset)))])

    def save(at_step: int) -> None:
        train_state = {"step": at_step, "accumulation_step": accelerator.step, "data": stream.state_dict(),
                       "bad_steps": guard.state_dict()}
        ckpt.save_checkpoint(args.output_dir, at_step, train_state=train_state, config=vars(args),
                             total_limit=args.checkpoints_total_limit, keep=(resumed_from,),
                             extra_files={ckpt.CONFIG_NAME: ckpt.model_config_json(model)}, **state_objs)

    def write_grid(net, name: str, at_step: int) -> None:
        if accelerator.is_main_process:
            pairs = vae_lib.side_by_side(net, fixed.to(device, net.conv_dtype)).cpu()
            grid = sampling.make_grid(pairs, nrow=8, upscale=max(1, 64 // args.resolution))
            accelerator.print(f"step {at_step}: reconstructions in {sampling.save_png(grid, os.path.join(args.output_dir, name))}")
            track.log_image(accelerator, "reconstructions", grid, at_step)

    t0, logged = time.time(), 0
    stop_at = min(args.max_train_steps, step + (args.stop_after_steps or args.max_train_steps))
    sums = {}
    model.train()
    stop = training.StopOnSignal(accelerator)  # SIGTERM / Ctrl-C: checkpoint at the next step boundary, then exit
    try:
        while step < stop_at:
            bad = torch.zeros((), device=device)
            for _ in range(args.gradient_accumulation_steps):
                batch = next(stream)
                with accelerator.accumulate(model):
                    x = batch["pixel_values"].to(device, non_blocking=True)
                    loss, parts = vae_lib.vae_loss(model, x, gen, reconstruction=args.reconstruction_loss,
                                                   kl_weight=args.kl_weight, perceptual=perceptual,
                                                   perceptual_weight=args.perceptual_weight)
                    bad = torch.maximum(bad, (~torch.isfinite(loss.detach())).float())
                    accelerator.backward(loss)
                    for k, v in {"loss": loss.detach(), **parts}.items():
                        sums[k] = sums.get(k, 0.0) + v.nan_to_num(0.0) / args.gradient_accumulation_steps
            is_bad, _ = training.optimizer_update(accelerator, model, optimizer, lr_scheduler, ema, bad, args.max_grad_norm)
            step += 1
            guard.update(is_bad, step)
            logged += 1
            if step % args.logging_steps == 0 or step == stop_at:
                means = {f"train/{k}": (accelerator.reduce(v, "mean") / logged).item() for k, v in sums.items()}
                accelerator.print(f"step {step}: " + ", ".join(f"{k[6:]} {v:.5f}" for k, v in means.items()))
                track.log_scalars(accelerator, {**means, "train/lr": lr_scheduler.get_last_lr()[0]}, step)
                sums, logged = {}, 0
            stopping = stop.requested()
            if stopping or args.checkpointing_steps and (step % args.checkpointing_steps == 0 or step == stop_at):
                save(step)
            if stopping:
                break
            if args.sample_every and step % args.sample_every == 0 and step < args.max_train_steps:
                write_grid(accelerator.unwrap_model(model), f"samples/step-{step:06d}.png", step)
    finally:
        stop.close()
    stop.leave_if_stopped(step, args.max_train_steps, args.output_dir, accelerator, run)
    if step >= args.max_train_steps:
        weights = (ckpt.ema_state_dict(model, ema) if ema is not None else ckpt.full_model_state_dict(model))
        final = type(accelerator.unwrap_model(model))(accelerator.unwrap_model(model).config)
        final.load_state_dict(weights)
        final.to(device)
        if args.scale_latents:  # LDM sec. 4.3.2: unit-variance latents for the denoiser
            batches = [torch.stack([dataset[i]["pixel_values"] for i in range(s, min(len(dataset), s + 64))]).to(device)
                       for s in range(0, min(len(dataset), 512), 64)]
            scale = vae_lib.latent_scaling(final, batches, training.make_generator(args.seed, 0x5CA1E, device=device))
            final = vae_lib.with_scaling(final, scale).to(device)
            accelerator.print(f"latent scaling_factor {scale:.5f} (1 / std of {sum(len(b) for b in batches)} images' latents)")
        ckpt.export_pretrained(final, os.path.join(args.output_dir, "model"), accelerator=accelerator)
        write_grid(final, "samples.png", step)
        accelerator.print(f"done: {step} steps in {time.time() - t0:.0f} s; VAE in {args.output_dir}/model")
    else:
        accelerator.print(training.stopped_message(step, args.max_train_steps, args.output_dir, "--stop_after_steps",
                                                   saved=bool(args.checkpointing_steps)))
    accelerator.end_training()
    run.close()


if __name__ == "__main__":
    sys.exit(script_errors(main)())
