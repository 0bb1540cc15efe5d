"""DiT training steps and DiT sampling: visionformers vs diffusers' DiTTransformer2DModel of the same config, in
one process, on 32x32x4 latents (256 px images through the SD VAE).

    python bench/bench_diffusion_train.py --device cuda --dtype bf16 --compile                  # DiT-XL/2, DiT-B/2
    python bench/bench_diffusion_train.py --device cuda --dtype bf16 --compile --grad_ckpt      # + checkpointing
    python bench/bench_diffusion_train.py --device cuda --dtype bf16 --compile --sample_steps 50  # + sampling

Training step: eps-MSE on the first 4 output channels (the learned-variance half unused), backward, AdamW
(fused on CUDA for both). Each model is built with its own random weights (speed does not depend on their
values). FLOPs are counted once per step by ``torch.utils.flop_counter.FlopCounterMode`` on the eager model;
MFU = counted FLOPs / step time / ``--peak_tflops``. ``--compile`` compiles each transformer block in place for
both models (regional compilation). ``--grad_ckpt`` adds our model with gradient checkpointing at
``--ckpt_batch_factor`` times the batch. Sampling: ``vf.diffusion.sample`` (DDIM, ``--sample_steps`` steps,
classifier-free guidance 4.0, so each step runs the model on 2x the batch) with each model.
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    add_gpu_arguments, autocast, count_flops, env_line, interleaved_times, peak_memory_mib, throughput_table,
)

import visionformers as vf  # noqa: E402
from visionformers.training import optim, performance  # noqa: E402

TINY = dict(hidden_size=64, depth=2, num_heads=2)  # --tiny: the code path in seconds on a CPU (tests)


def build_pair(name: str, device: str, tiny: bool):
    """(ours, diffusers) DiTs of the same configuration, random weights, in train mode, on ``device``."""
    from diffusers import DiTTransformer2DModel

    ours = vf.create_model(name, class_dropout_prob=0.0, **(TINY if tiny else {}))
    c = ours.config
    ref = DiTTransformer2DModel(
        num_attention_heads=c.num_heads, attention_head_dim=c.hidden_size // c.num_heads, in_channels=c.in_channels,
        out_channels=ours.config.in_channels * (2 if c.learn_sigma else 1), num_layers=c.depth,
        sample_size=c.sample_size, patch_size=c.patch_size, num_embeds_ada_norm=c.num_classes,
    )
    return ours.to(device).train(), ref.to(device).train()


def call(model, x, t, y):
    """The denoiser's prediction (B, C, H, W) for either implementation."""
    if isinstance(model, vf.vision.dit.DiT):
        return model(x, t, class_labels=y)
    return model(x, timestep=t, class_labels=y).sample


def compile_regions(model) -> None:
    """Each transformer block compiled in place, ours and diffusers' alike."""
    if isinstance(model, vf.vision.dit.DiT):
        performance.compile_blocks(model)
    else:
        for block in model.transformer_blocks:
            block.compile()


def make_step(model, batch: int, device: str, dtype: str):
    c_in = 4
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, c_in, 32, 32, generator=g).to(device)
    eps = torch.randn(batch, c_in, 32, 32, generator=g).to(device)
    t = torch.randint(0, 1000, (batch,), generator=g).to(device)
    y = torch.randint(0, 1000, (batch,), generator=g).to(device)
    opt = optim.adamw([p for p in model.parameters() if p.requires_grad], 1e-4)

    def step():
        with autocast(device, dtype):
            loss = F.mse_loss(call(model, x, t, y)[:, :c_in].float(), eps)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def bench_training(name: str, args) -> None:
    ours, ref = build_pair(name, args.device, args.tiny)
    candidates = {"visionformers": (ours, args.batch), "diffusers": (ref, args.batch)}
    if args.grad_ckpt:
        ckpt, _ = build_pair(name, args.device, args.tiny)
        del _
        ckpt.set_grad_checkpointing(True)
        candidates[f"visionformers+ckpt (batch x{args.ckpt_batch_factor})"] = (ckpt, args.batch * args.ckpt_batch_factor)
    steps, rows = {}, {}
    for key, (model, batch) in candidates.items():
        steps[key] = make_step(model, batch, args.device, args.dtype)
        rows[key] = {"items": batch, "flops": count_flops(steps[key])}  # eager, before any compilation
        if args.compile:
            compile_regions(model)
    times = interleaved_times(steps, runs=args.runs, warmup=args.warmup, device=args.device)
    for key in candidates:
        rows[key]["seconds"] = statistics.median(times[key])
        rows[key]["peak_mib"] = peak_memory_mib(steps[key], args.device)
    params = sum(p.numel() for p in ours.parameters())
    throughput_table(f"{name} training step ({params / 1e6:.0f}M parameters), batch {args.batch}, {args.dtype}, "
                     f"compile={args.compile}, median of {args.runs}", rows, args.peak_tflops)


def bench_sampling(name: str, args) -> None:
    ours, ref = build_pair(name, args.device, args.tiny)
    sched = vf.diffusion.NoiseSchedule("linear", num_train_steps=1000)
    labels = torch.arange(args.sample_batch, device=args.device) % 1000
    null = torch.full_like(labels, 1000)
    rows, runs = {}, {}
    for key, model in (("visionformers", ours), ("diffusers", ref)):
        model.eval()
        if args.compile:
            compile_regions(model)

        def denoiser(x, t, class_labels, model=model):
            with autocast(args.device, args.dtype):
                return call(model, x, t.expand(x.shape[0]) if t.ndim == 0 else t, class_labels)[:, :4].float()

        def run(steps, denoiser=denoiser):
            with torch.inference_mode():
                return vf.diffusion.sample(denoiser, (args.sample_batch, 4, 32, 32), sched, "ddim", steps=steps,
                                           guidance_scale=4.0, class_labels=labels, uncond={"class_labels": null},
                                           generator=torch.Generator().manual_seed(0), device=args.device)

        per_step = count_flops(lambda run=run: run(1))  # one guided step: the model on 2x the batch
        runs[key] = lambda run=run: run(args.sample_steps)
        rows[key] = {"items": args.sample_batch, "flops": per_step * args.sample_steps}
    times = interleaved_times(runs, runs=max(1, args.runs // 2), warmup=1, device=args.device)
    for key in runs:
        rows[key]["seconds"] = statistics.median(times[key])
        rows[key]["peak_mib"] = peak_memory_mib(runs[key], args.device)
    throughput_table(f"{name} sampling: DDIM {args.sample_steps} steps, CFG 4.0, batch {args.sample_batch}, "
                     f"{args.dtype}, compile={args.compile}", rows, args.peak_tflops, unit="images/s")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_gpu_arguments(p)
    p.add_argument("--models", nargs="*", default=["dit_xl_2", "dit_b_2"], help="DiT presets to time training steps of")
    p.add_argument("--batch", type=int, default=32, help="training batch per step")
    p.add_argument("--runs", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3, help="untimed calls per candidate (compilation happens here)")
    p.add_argument("--grad_ckpt", action="store_true", help="add ours with gradient checkpointing")
    p.add_argument("--ckpt_batch_factor", type=int, default=2)
    p.add_argument("--sample_steps", type=int, default=0, help="DDIM steps of the sampling benchmark (0: skip)")
    p.add_argument("--sample_model", default="dit_xl_2")
    p.add_argument("--sample_batch", type=int, default=32)
    p.add_argument("--tiny", action="store_true", help="tiny models (the CPU test of this script)")
    args = p.parse_args(argv)
    if args.device.startswith("cuda"):
        performance.use_tf32()
    print(f"{env_line(args.device)}; peak {args.peak_tflops:g} TFLOP/s for the MFU")
    for name in args.models:
        bench_training(name, args)
    if args.sample_steps:
        bench_sampling(args.sample_model, args)


if __name__ == "__main__":
    main()
