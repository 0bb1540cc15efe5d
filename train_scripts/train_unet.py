"""Train a diffusion UNet or DiT: `python train_scripts/train_unet.py` or `accelerate launch train_scripts/train_unet.py`.

With no arguments: a class-conditional unet_tiny on the embedded 8x8 digits (resized to --resolution), samples
in <output_dir>/samples.png and the EMA weights exported to <output_dir>/model for sample_scripts/sample_unet.py.
Resume with --resume_from_checkpoint latest; the continuation is bit-identical to an uninterrupted run.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch
from accelerate import DistributedType
from tqdm.auto import tqdm

from visionformers import data, diffusion, training
from visionformers._validate import check_args, script_errors
from visionformers.data import latent_cache
from visionformers.training import args as train_args
from visionformers.training import callbacks as cb
from visionformers.training import checkpoint as ckpt
from visionformers.training import latents
from visionformers.training import logging as track
from visionformers.training import performance, pipeline, run_dir, sampling
from visionformers.training.text_denoiser import JointTextDenoiser

METRICS = {"eval_loss": "min"}  # what each evaluation (--eval_steps) reports: early stopping's choices


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = p.add_argument
    a("--model", default="unet_tiny", help="any UNet or DiT preset (vf.list_models('unet*'), 'dit*')")
    a("--model_overrides", type=pipeline.json_config_fields, default={}, help='JSON of config fields, e.g. \'{"dropout": 0.1}\'')
    a("--conditioning", default="class", choices=pipeline.CONDITIONINGS,
      help="class: the labels of class subfolders (or the digits); text: captions; none: unconditional")
    a("--text_encoder", default="t5_tiny_encoder",
      help="for --conditioning text: a text preset (randomly initialised) or a transformers model dir (T5 / T5 "
           "encoder, BERT, GPT-2 written by save_pretrained, with its tokenizer.json)")
    a("--train_text_encoder", action=argparse.BooleanOptionalAction, default=None, help="train the text encoder "
      "jointly with the denoiser (one optimizer, gradient sync and EMA over both; the export carries the trained "
      "encoder). Default: trained for a text preset, whose weights are random; frozen for a pretrained directory")
    a("--text_encoder_learning_rate", type=float, default=None, help="peak learning rate of the text encoder with "
      "--train_text_encoder (default: --learning_rate; a pretrained encoder usually wants a smaller one)")
    a("--cond_drop_prob", type=float, default=0.1, help="label/caption dropout for classifier-free guidance")
    a("--prediction_type", default=None, choices=diffusion.PREDICTION_TYPES,
      help="default: v for a VP schedule (keeps the x0 estimate bounded at high noise), flow for --noise_schedule flow")
    a("--noise_schedule", default="cosine", choices=[*diffusion.SCHEDULES, "flow"],
      help="a VP schedule, or flow: rectified flow (x_t = (1 - sigma) x0 + sigma eps)")
    a("--num_train_timesteps", type=int, default=1000, help="steps of the training noise process")
    a("--snr_gamma", type=float, default=None, help="Min-SNR-gamma loss weighting (5.0 in the paper)")
    a("--timestep_sampling", default=None, choices=diffusion.TIMESTEP_DENSITIES,
      help="density of the training noise level (SD3 Sec. 3.1); default: uniform (VP), logit_normal (flow)")
    a("--logit_mean", type=float, default=0.0, help="mean of --timestep_sampling logit_normal")
    a("--logit_std", type=float, default=1.0, help="std of --timestep_sampling logit_normal")
    a("--mode_scale", type=float, default=1.29, help="scale of --timestep_sampling mode")
    a("--loss_weighting", default="none", choices=diffusion.LOSS_WEIGHTINGS,
      help="flow only: SD3's sigma_sqrt or cosmap loss weights")
    a("--flow_shift", type=float, default=1.0, help="flow only: SD3's time shift (3.0 in SD3); saved for sampling")
    a("--train_data_dir", default=None, help="an image folder; default: the embedded digits")
    a("--captions_file", default=None, help="JSON-lines captions for --train_data_dir")
    a("--vae", default=None, help="a VAE directory (vf.save_pretrained, e.g. train_vae.py's output): train on its "
      "scaled latents; the denoiser's in_channels and sample_size follow the VAE")
    a("--latent_cache_dir", default=None, help="with --vae: where the latents are cached (default "
      "<output_dir>/latent_cache; share it between runs)")
    a("--resolution", type=int, default=8, help="8: the digits' native size")
    a("--center_crop", action=argparse.BooleanOptionalAction, default=True, help="center crop (else a random crop)")
    a("--random_flip", action="store_true", help="horizontal flips with probability 1/2")
    train_args.add_training_arguments(p, output_dir="outputs/train_unet", output_dir_help="checkpoints, samples and the "
                                      "exported model/ (locked while the run uses it)", max_train_steps=600, use_ema=True)
    a("--ema_power", type=float, default=3 / 4, help="EMA warm-up: decay = 1 - (1 + step)^-power")
    a("--sample_every", type=int, default=0, help="write a sample grid every N steps (0: only at the end)")
    a("--num_samples", type=int, default=40, help="images in each sample grid")
    a("--sampler", default=None, choices=list(diffusion.SAMPLERS), help="default: ddim (VP), heun (flow)")
    a("--num_inference_steps", type=int, default=40, help="sampler steps of the sample grids")
    a("--guidance_scale", type=float, default=2.0, help="classifier-free guidance weight of the sample grids (1: none)")
    a("--eval_steps", type=int, default=0, help="every N steps, the loss of a fixed evaluation batch (the digits' "
      "test split, or the first images of --train_data_dir) under fixed noise (0: never)")
    cb.add_early_stopping_arguments(p, METRICS, default="eval_loss")
    performance.add_performance_arguments(p)
    a("--debug_inject_nan_at", type=int, nargs="*", default=[], help="(testing) make the loss NaN at these steps")
    args = p.parse_args(argv)
    check_args(args, [(name, lambda v: v >= 1, "an int >= 1") for name in (
        "num_inference_steps", "resolution", "num_samples")] + [
        ("num_train_timesteps", lambda v: v >= 2, "an int >= 2"),
        ("flow_shift", lambda v: v > 0, "a number > 0 (1: no shift)"),
        ("logit_std", lambda v: v > 0, "a number > 0"),
        ("guidance_scale", lambda v: v >= 0, "a number >= 0 (1: no guidance)"),
        ("cond_drop_prob", lambda v: 0 <= v < 1, "a probability in [0, 1)"),
        ("eval_steps", lambda v: v >= 0, "an int >= 0 (0: never)"),
        ("text_encoder_learning_rate", lambda v: v is None or v > 0, "a number > 0")])
    train_args.check_training_arguments(args)
    if args.train_data_dir is None:  # the embedded digits: these options only apply to an image folder
        given = [flag for flag, on in (("--captions_file", args.captions_file is not None),
                                       ("--random_flip", args.random_flip), ("--no-center_crop", not args.center_crop)) if on]
        if given:
            raise ValueError(f"{given[0]} applies to --train_data_dir, which is not given (the embedded digits are "
                             "used); pass --train_data_dir, or drop the option (text conditioning on the digits "
                             "uses their built-in captions)")
    if args.vae is not None and not args.center_crop:
        raise ValueError("--no-center_crop is not accepted with --vae: cached latents need a deterministic crop")
    if args.latent_cache_dir is not None and args.vae is None:
        raise ValueError("--latent_cache_dir applies to --vae, which is not given")
    if args.train_text_encoder is None:  # a random encoder is worth training; a pretrained one is kept (Imagen)
        from visionformers.text.pretrained import is_transformers_dir

        args.train_text_encoder = args.conditioning == "text" and not is_transformers_dir(args.text_encoder)
    if args.train_text_encoder and args.conditioning != "text":
        raise ValueError(f"--train_text_encoder needs --conditioning text (given: --conditioning {args.conditioning}); "
                         "class labels and unconditional models have no text encoder")
    if args.text_encoder_learning_rate is not None and not args.train_text_encoder:
        raise ValueError("--text_encoder_learning_rate applies to --train_text_encoder, which is not given")
    if args.early_stopping_patience is not None and not args.eval_steps:
        raise ValueError("--early_stopping_patience needs --eval_steps N (the evaluations it counts)")
    flow = args.noise_schedule == "flow"
    args.prediction_type = args.prediction_type or ("flow" if flow else "v")
    args.timestep_sampling = args.timestep_sampling or ("logit_normal" if flow else "uniform")
    return args


def evaluation_batch(args, dataset) -> dict:
    """The fixed batch of --eval_steps: the digits' test split, or the first images of the folder."""
    if args.train_data_dir is None:
        dataset = data.DigitsDataset("test", image_size=args.resolution, captions=args.conditioning == "text")
    return torch.utils.data.default_collate([dataset[i] for i in range(min(len(dataset), args.train_batch_size))])


def build_dataset(args):
    if args.train_data_dir is None:
        ds = data.DigitsDataset("train", image_size=args.resolution, captions=args.conditioning == "text",
                                random_captions=True)
        return ds, len(ds.classes), ds.classes, 1
    if not os.path.isdir(args.train_data_dir):
        raise FileNotFoundError(f"--train_data_dir={args.train_data_dir!r} is not a folder; expected a folder of images")
    if args.captions_file is not None and not os.path.isfile(args.captions_file):
        raise FileNotFoundError(f"--captions_file={args.captions_file!r} does not exist; expected a JSON-lines file")
    ds = data.ImageFolderDataset(args.train_data_dir, args.resolution, center_crop=args.center_crop,
                                 random_flip=args.random_flip and args.vae is None, captions_file=args.captions_file)
    if args.conditioning == "class" and not ds.classes:
        raise ValueError(f"--conditioning class needs class subfolders in --train_data_dir={args.train_data_dir!r}, "
                         "which is a flat folder; pass --conditioning none to train unconditionally")
    return ds, len(ds.classes) or None, ds.classes or None, ds.channels


def sample_prompts(dataset, n: int) -> list[str]:
    """Prompts of the periodic sample grids: the training set's own captions (the digits' for the embedded data),
    taken at n evenly spread indices so that the grid shows the variety of the captions."""
    dataset = getattr(dataset, "base", dataset)  # a latent cache reads its captions from the image dataset
    if isinstance(dataset, data.DigitsDataset):
        return [data.digit_caption(i % 10) for i in range(n)]
    return [dataset.caption(i * len(dataset) // n) for i in range(n)]


def main(argv=None) -> None:
    args = parse_args(argv)
    accelerator = train_args.accelerator_from_args(args)
    pipeline.check_distributed(accelerator)
    run = run_dir.open_run(args.output_dir, vars(args), resume=args.resume_from_checkpoint,
                           overwrite=args.overwrite_output_dir, accelerator=accelerator)
    rank, world, device = accelerator.process_index, accelerator.num_processes, accelerator.device
    training.seed_everything(args.seed)  # the same initial weights on every process, whatever the launcher

    vae = latents.load_vae(args.vae, device) if args.vae is not None else None
    dataset, num_classes, class_names, channels = build_dataset(args)
    # the denoiser's input: the VAE's latents (resolution / factor) or the pixels themselves
    in_channels, size = (latents.denoiser_shape(vae, args.resolution, args.model_overrides, channels) if vae is not None
                         else (channels, args.resolution))
    conditioner = (pipeline.build_text_conditioner(args.text_encoder, device, args.seed, train=args.train_text_encoder)
                   if args.conditioning == "text" else None)
    num_classes = num_classes if args.conditioning == "class" else None
    context_dim = conditioner.context_dim if conditioner is not None else None
    try:
        model = pipeline.build_denoiser(args.model, in_channels, size, num_classes, context_dim,
                                        args.model_overrides)
    except ValueError as e:  # the config names its field (sample_size, ...); say which flags set it
        given = " with --model_overrides" if args.model_overrides else ""
        raise ValueError(f"--model={args.model} at --resolution={args.resolution}{given}: {e}") from None
    if args.train_text_encoder:  # one module: one DDP wrapper, optimizer, EMA and checkpoint for both
        if accelerator.distributed_type == DistributedType.FSDP:
            raise ValueError("--train_text_encoder runs on one process or under DDP; the accelerate config asks for "
                             "FSDP: use a config without FSDP, or drop --train_text_encoder")
        model = JointTextDenoiser(model, conditioner)
    # the frozen encoder encodes the captions outside the model; a trained one inside it (None here)
    frozen_conditioner = None if args.train_text_encoder else conditioner
    settings = pipeline.diffusion_settings(args, num_classes, class_names, channels, context_dim)
    if vae is not None:  # encoded once, reused by later runs and resumes; flips cached as latents of their own
        settings["latent"] = latents.latent_settings(vae, args.resolution)
        dataset = latent_cache.build_latent_cache(
            args.latent_cache_dir or os.path.join(args.output_dir, "latent_cache"), vae, dataset,
            latents.latent_cache_key(args, dataset), flips=args.random_flip, rank=rank, world=world,
            barrier=accelerator.wait_for_everyone, device=device)
    try:
        sched = pipeline.schedule_from(settings)
    except ValueError as e:  # the schedule names its own arguments; say which flags set them
        raise ValueError(f"--noise_schedule={args.noise_schedule} --num_train_timesteps={args.num_train_timesteps} "
                         f"--flow_shift={args.flow_shift}: {e}") from None
    loss_options = dict(timestep_sampling=args.timestep_sampling, logit_mean=args.logit_mean, logit_std=args.logit_std,
                        mode_scale=args.mode_scale, loss_weighting=args.loss_weighting)
    args.sampler = args.sampler or sched.default_sampler
    try:  # a flag combination the process does not take (e.g. --prediction_type eps with a flow) fails before training
        diffusion.check_sampler(args.sampler, sched)
        diffusion.check_loss_options(sched, args.prediction_type, args.snr_gamma, **loss_options)
    except ValueError as e:
        raise ValueError(f"--noise_schedule={args.noise_schedule}: {e}") from None
    memory_format = performance.configure_training(model, device, gradient_checkpointing=args.gradient_checkpointing,
                                                   compile=args.compile, compile_backend=args.compile_backend)
    lrs = {"text_encoder": args.text_encoder_learning_rate} if args.text_encoder_learning_rate else None
    optimizer = training.build_optimizer(model, "adamw", args.learning_rate, args.adam_weight_decay,
                                         (args.adam_beta1, args.adam_beta2), lrs=lrs)
    lr_scheduler = training.build_lr_scheduler(optimizer, args.lr_scheduler, args.lr_warmup_steps, args.max_train_steps)
    model, optimizer = accelerator.prepare(model, optimizer)  # the lr schedule steps once per update, by us
    training.seed_everything(args.seed, rank + 1)  # from here on each process has its own streams (dropout)
    ema = training.EMA(model, decay=args.ema_max_decay, power=args.ema_power) if args.use_ema else None
    noise_gen = training.make_generator(args.seed, rank, 1, device=device)  # timesteps, noise, cfg dropout
    stream = training.DataStream(dataset, args.train_batch_size, args.seed, world, rank, args.dataloader_num_workers,
                                 batch_flag="--train_batch_size")
    guard = training.BadStepGuard(args.max_bad_steps, accelerator.mixed_precision, args.learning_rate)
    text_encoder = {pipeline.TEXT_ENCODER_DIR: conditioner.encoder} if frozen_conditioner is not None else None
    extra_models = {**(text_encoder or {}), **({latents.VAE_DIR: vae} if vae is not None else {})} or None
    stopper = cb.early_stopping_from_args(args, METRICS)
    callbacks, state = cb.CallbackList([stopper]), cb.LoopState(model=model, accelerator=accelerator)
    eval_batch = evaluation_batch(args, dataset) if args.eval_steps else None
    if eval_batch is not None and vae is not None:
        eval_batch = latents.latent_eval_batch(vae, eval_batch, device)
    state_objs = dict(model=model, optimizer=optimizer, lr_scheduler=lr_scheduler, ema=ema, scaler=accelerator.scaler,
                      generators={"noise": noise_gen}, accelerator=accelerator)

    step, resumed_from = 0, run.resume_from
    if resumed_from is not None:
        saved = ckpt.load_checkpoint(resumed_from, **state_objs,
                                     train_state_keys=("accumulation_step", "data", "bad_steps"))["train_state"]
        step, accelerator.step = saved["step"], saved["accumulation_step"]
        stream.load_state_dict(saved["data"])
        guard.load_state_dict(saved["bad_steps"])
        callbacks.load_state_dict(saved.get("callbacks", {}))
        accelerator.print(f"resumed from {resumed_from} at step {step}")
    track.init_trackers(accelerator, args.tracker_project_name, vars(args), args.output_dir)

    def save(at_step: int) -> None:
        train_state = {"step": at_step, "accumulation_step": accelerator.step, "data": stream.state_dict(),
                       "bad_steps": guard.state_dict(), "callbacks": callbacks.state_dict()}
        extra = {pipeline.DIFFUSION_FILE: settings, ckpt.CONFIG_NAME: ckpt.model_config_json(model),
                 **pipeline.text_encoder_files(conditioner, config=args.train_text_encoder)}
        ckpt.save_checkpoint(args.output_dir, at_step, train_state=train_state, config=vars(args),
                             total_limit=args.checkpoints_total_limit, keep=(resumed_from,), extra_files=extra,
                             extra_models=extra_models, **state_objs)
        callbacks.on_checkpoint_saved(state, os.path.join(args.output_dir, f"checkpoint-{at_step}"))

    def write_samples(name: str, at_step: int) -> None:
        labels = torch.arange(args.num_samples) % num_classes if num_classes else None
        prompts = sample_prompts(dataset, args.num_samples) if conditioner else None

        def inputs(idx):
            return pipeline.model_inputs(settings, conditioner, device,
                                         class_labels=labels[list(idx)] if labels is not None else None,
                                         prompts=[prompts[i] for i in idx] if prompts else None)

        # FSDP: every process runs the sharded model (a forward is a collective); else the plain module
        fsdp = accelerator.distributed_type == DistributedType.FSDP
        net = model if fsdp else accelerator.unwrap_model(model)
        if ema is not None:
            ema.store(net)
            ema.copy_to(net)
        net.eval()
        images = sampling.sample_distributed(
            net, args.num_samples, 64, inputs, accelerator=accelerator, collective_model=fsdp, sched=sched,
            shape=latents.sample_shape(settings), seed=args.seed, sampler=args.sampler,
            steps=args.num_inference_steps, prediction_type=args.prediction_type, device=device,
            guidance_scale=args.guidance_scale if args.conditioning != "none" else 1.0)
        net.train()
        if ema is not None:
            ema.restore(net)
        if accelerator.is_main_process:
            if vae is not None:
                images = latents.decode_latents(vae, images, device)
            grid = sampling.make_grid(images, nrow=num_classes, upscale=max(1, 64 // args.resolution))
            path = sampling.save_png(grid, os.path.join(args.output_dir, name))
            track.log_image(accelerator, "samples", grid, at_step)
            accelerator.print(f"step {at_step}: samples in {path}")

    accelerator.print(f"training steps {step}..{args.max_train_steps} on {world} process(es) "
                      f"({accelerator.distributed_type.value}, {device}), mixed precision {accelerator.mixed_precision}")
    progress = tqdm(total=args.max_train_steps, initial=step, desc="train", disable=not accelerator.is_main_process)
    started, stop_at = step, min(args.max_train_steps, step + (args.stop_after_steps or args.max_train_steps))
    loss_sum, loss_count, t0 = torch.zeros((), device=device), 0, time.time()
    model.train()
    stop = training.StopOnSignal(accelerator)  # SIGTERM / Ctrl-C: checkpoint at the next step boundary, then exit
    state.step = step
    callbacks.on_train_begin(state)
    try:
        while step < stop_at and not state.should_stop:
            bad = torch.zeros((), device=device)
            for _ in range(args.gradient_accumulation_steps):
                batch = next(stream)
                with accelerator.accumulate(model):
                    x0 = (latent_cache.posterior_sample(batch, noise_gen, device).contiguous(memory_format=memory_format)
                          if vae is not None else
                          batch["pixel_values"].to(device, non_blocking=True, memory_format=memory_format))
                    cond = pipeline.training_inputs(batch, settings, frozen_conditioner, args.cond_drop_prob,
                                                    noise_gen, device)
                    loss = diffusion.training_loss(model, x0, sched, args.prediction_type, args.snr_gamma,
                                                   generator=noise_gen, **loss_options, **cond)
                    if step + 1 in args.debug_inject_nan_at:
                        loss = loss * float("nan")
                    bad = torch.maximum(bad, (~torch.isfinite(loss.detach())).float())
                    accelerator.backward(loss)
                    loss_sum, loss_count = loss_sum + loss.detach().nan_to_num(0.0), loss_count + 1
            # One optimizer update per `gradient_accumulation_steps` micro-batches (accelerate's sync point).
            is_bad, grad_norm = training.optimizer_update(accelerator, model, optimizer, lr_scheduler, ema, bad,
                                                          args.max_grad_norm)
            step += 1
            progress.update(1)
            guard.update(is_bad, step)
            state.step = step
            callbacks.on_step_end(state, {"loss": loss.detach(), "lr": lr_scheduler.get_last_lr()[0]})
            if step % args.logging_steps == 0 or step == stop_at:
                mean_loss = (accelerator.reduce(loss_sum, "mean") / max(1, loss_count)).item()
                lr = lr_scheduler.get_last_lr()[0]
                rate = (step - started) / max(1e-9, time.time() - t0)
                progress.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{lr:.2e}", skipped=guard.total)
                track.log_scalars(accelerator, {"train/loss": mean_loss, "train/lr": lr, "train/steps_per_s": rate,
                                                "train/grad_norm": float(grad_norm), "train/skipped": guard.total},
                                  step)
                loss_sum, loss_count = torch.zeros((), device=device), 0
            if args.eval_steps and step % args.eval_steps == 0:
                value = pipeline.evaluation_loss(model, eval_batch, settings, frozen_conditioner, sched,
                                                 args.prediction_type, args.seed, device, **loss_options)
                track.log_scalars(accelerator, {"eval/loss": value}, step)
                callbacks.on_evaluate(state, {"eval_loss": value})
            stopping = stop.requested()
            if stopping or args.checkpointing_steps and (step % args.checkpointing_steps == 0 or step == stop_at
                                                         or state.should_stop):
                save(step)
            if stopping:
                break
            if args.sample_every and step % args.sample_every == 0 and step < args.max_train_steps:
                write_samples(f"samples/step-{step:06d}.png", step)
    except training.TrainingDiverged as e:
        accelerator.end_training()
        raise SystemExit(f"error: {e}") from None
    finally:
        stop.close()
    progress.close()
    callbacks.on_train_end(state)
    stop.leave_if_stopped(step, args.max_train_steps, args.output_dir, accelerator, run)
    if state.should_stop:
        accelerator.print(state.stop_reason)
    if step >= args.max_train_steps or state.should_stop:
        ckpt.export_pretrained(model, os.path.join(args.output_dir, "model"), ema=ema, accelerator=accelerator,
                               extra_files={pipeline.DIFFUSION_FILE: settings, **pipeline.text_encoder_files(conditioner)},
                               extra_models=extra_models)
        write_samples("samples.png", step)
        accelerator.print(f"done: {step} steps in {time.time() - t0:.0f} s; model in {args.output_dir}/model")
    else:
        accelerator.print(training.stopped_message(step, args.max_train_steps, args.output_dir, "--stop_after_steps",
                                                   saved=bool(args.checkpointing_steps)))
    accelerator.end_training()
    run.close()


if __name__ == "__main__":
    sys.exit(script_errors(main)())
