"""unet_ddpm_cifar10 vs diffusers' UNet2DModel with the same configuration, side by side in one process.

    python bench/bench_unet.py                      # CPU fp32, batch 16: training step, forward, memory, DDIM
    python bench/bench_unet.py --device cuda --dtype bf16 --compile --channels-last   # GPU: + MFU table

Both networks hold the same weights (diffusers' random init, converted), so they compute the same function
and the script checks that first. Timed: one training step (eps-MSE, backward, AdamW) and one forward
(inference mode), medians of --runs interleaved calls. Memory: bytes autograd saves for backward (exact,
layout-independent), and the peak of one training step (CUDA: max_memory_allocated; CPU: the peak RSS of a
fresh subprocess per model above its RSS before the step). Sampling: 50 DDIM steps with
``vf.diffusion.sample``; the model calls are timed inside a wrapper, the rest is sampler overhead.

GPU mode (``--device cuda``): ``--dtype bf16`` autocasts both models' steps (fp32 weights), ``--compile``
compiles each residual and attention block of both in place (regional compilation), and a table gives each
model's step time, img/s, peak memory and MFU, with the FLOPs of a step counted by ``FlopCounterMode``.

Layout: by default each model runs as a user gets it (NCHW). On CPU the forward also times a copy of ours after
``vf.native.optimize`` (channels-last convolution weights), which the DDIM sampling uses, as ``sample_unet.py``
does; ``--channels-last`` gives both models channels_last weights and inputs, which isolates what the layout
buys from everything else.
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    add_gpu_arguments, autocast, count_flops, env_line, interleaved_times, peak_memory_mib, report, sync,
    throughput_table,
)

from visionformers.diffusion import NoiseSchedule, sample  # noqa: E402
from visionformers.native import optimize  # noqa: E402
from visionformers.registry import create_model  # noqa: E402
from visionformers.training import performance  # noqa: E402

# --tiny: the code path in seconds on a CPU (tests)
TINY = dict(base_channels=32, channel_mults=(1, 2), num_res_blocks=1, attention_resolutions=(16,))


def compile_regions(models: dict) -> None:
    """Each residual and attention block of both models compiled in place (regional compilation)."""
    from diffusers.models.attention_processor import Attention as DiffusersAttention
    from diffusers.models.resnet import ResnetBlock2D

    performance.compile_blocks(models["visionformers"])
    for m in models["diffusers"].modules():
        if isinstance(m, (ResnetBlock2D, DiffusersAttention)):
            m.compile()


def build(device: str, channels_last: bool, tiny: bool = False):
    """(ours, diffusers) with identical weights, in train mode."""
    sys.path.insert(0, str(ROOT / "tests" / "vision"))
    from test_unet_parity import convert_diffusers_unet, diffusers_unet  # the one key mapping

    torch.manual_seed(0)
    ours = create_model("unet_ddpm_cifar10", **(TINY if tiny else {}))  # dropout 0.1, as the paper and the reference
    ref = diffusers_unet(ours.config)
    ours.load_state_dict(convert_diffusers_unet(ref.state_dict()))
    models = {"visionformers": ours.to(device), "diffusers": ref.to(device)}
    if channels_last:
        models = {k: m.to(memory_format=torch.channels_last) for k, m in models.items()}
    fns = {"visionformers": models["visionformers"], "diffusers": lambda x, t: models["diffusers"](x, t).sample}
    return models, fns


def make_batch(batch: int, device: str, channels_last: bool):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 3, 32, 32, generator=g).to(device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    t = torch.randint(0, 1000, (batch,), generator=g).to(device)
    eps = torch.randn(batch, 3, 32, 32, generator=g).to(device)
    return x, t, eps


def train_step_fn(model, fn, batch_data, device: str = "cpu", dtype: str = "fp32"):
    x, t, eps = batch_data
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=torch.device(device).type == "cuda" or None)

    def step():
        with autocast(device, dtype):
            loss = F.mse_loss(fn(x, t).float(), eps)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def saved_activation_bytes(fn, x, t) -> int:
    """Bytes of the distinct storages autograd keeps for backward during one forward."""
    storages = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        out = fn(x, t)
    del out
    return sum(storages.values())


def rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def memory_probe(which: str, args) -> None:
    """Subprocess body: peak RSS of one training step above the RSS just before it (CPU)."""
    models, fns = build("cpu", args.channels_last, args.tiny)
    step = train_step_fn(models[which], fns[which], make_batch(args.batch, "cpu", args.channels_last))
    before = rss_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS (Linux >= 4.0)
    step()
    print(json.dumps({"peak_delta_mib": (rss_kib("VmHWM") - before) / 1024}))


def cpu_peak_rss(which: str, args) -> float | None:
    cmd = [sys.executable, __file__, "--memory-probe", which, "--batch", str(args.batch)]
    cmd += ["--channels-last"] if args.channels_last else []
    cmd += ["--tiny"] if args.tiny else []
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        print(f"  (memory probe of {which} failed: {out.stderr.strip().splitlines()[-1:]})")
        return None
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_delta_mib"]


def bench_sampling(model, device: str, batch: int, channels_last: bool) -> None:
    """50 DDIM steps end to end; sampler overhead = wall time outside the model's forward calls."""
    model.eval()
    model_time = [0.0]

    def timed(x, t, **cond):
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        sync(device)
        start = time.perf_counter()
        out = model(x, t, **cond)
        sync(device)
        model_time[0] += time.perf_counter() - start
        return out

    sched = NoiseSchedule("linear", num_train_steps=1000)
    sample(timed, (batch, 3, 32, 32), sched, sampler="ddim", steps=2, device=device)  # warm-up
    model_time[0] = 0.0
    sync(device)
    start = time.perf_counter()
    sample(timed, (batch, 3, 32, 32), sched, sampler="ddim", steps=50, generator=torch.Generator().manual_seed(0),
           device=device)
    sync(device)
    total = time.perf_counter() - start
    overhead = total - model_time[0]
    print(f"\nDDIM, 50 steps, batch {batch} (visionformers.diffusion.sample + our UNet)")
    print(f"  total {total:.3f} s, model forward {model_time[0]:.3f} s, sampler overhead {overhead * 1e3:.1f} ms"
          f" = {100 * overhead / total:.2f}% of the wall time")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_gpu_arguments(p)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--runs", type=int, default=3, help="timed calls per candidate (median)")
    p.add_argument("--tiny", action="store_true", help="a small UNet of the same topology (the CPU test of this script)")
    p.add_argument("--channels-last", action="store_true", help="channels_last weights and inputs for both models")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (CPU)")
    p.add_argument("--skip-sampling", action="store_true")
    p.add_argument("--memory-probe", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_probe:
        return memory_probe(args.memory_probe, args)

    device, cl = args.device, args.channels_last
    if device.startswith("cuda"):
        performance.use_tf32()
    models, fns = build(device, cl, args.tiny)
    data = make_batch(args.batch, device, cl)
    print(f"{env_line(device)}; batch {args.batch}, 32x32, {args.dtype}, compile={args.compile}, channels_last={cl}")
    print(f"parameters: visionformers {sum(p.numel() for p in models['visionformers'].parameters()):,}, "
          f"diffusers {sum(p.numel() for p in models['diffusers'].parameters()):,}")
    with torch.no_grad():
        for m in models.values():
            m.eval()
        x, t, _ = data
        diff = (fns["visionformers"](x, t) - fns["diffusers"](x, t)).abs().max().item()
    print(f"same weights, eval forward: max |ours - diffusers| = {diff:.2e}")

    for m in models.values():
        m.train()
    steps = {k: train_step_fn(models[k], fns[k], data, device, args.dtype) for k in models}
    flops = {k: count_flops(step) for k, step in steps.items()}  # eager, before any compilation
    if args.compile:
        compile_regions(models)
    res = interleaved_times(steps, runs=args.runs, warmup=1, device=device)
    report(f"training step (eps MSE + backward + AdamW), median of {args.runs}", res, unit="s", scale=1)
    for k, v in res.items():
        print(f"  {k:<28} {args.batch / statistics.median(v):9.2f} img/s")
    rows = {k: {"items": args.batch, "flops": flops[k], "seconds": statistics.median(res[k]),
                "peak_mib": peak_memory_mib(steps[k], device)} for k in steps}
    throughput_table(f"training step, {args.dtype}, compile={args.compile}: throughput, peak memory, MFU", rows,
                     args.peak_tflops)

    for m in models.values():
        m.eval()

    def forward(k):
        def run():
            with torch.inference_mode():
                fns[k](x, t)
        return run

    candidates = {k: forward(k) for k in models}
    if device == "cpu" and not args.compile:
        fns["visionformers+optimize"] = optimize(copy.deepcopy(models["visionformers"]).eval())
        candidates["visionformers+optimize"] = forward("visionformers+optimize")
    res = interleaved_times(candidates, runs=args.runs, warmup=1, device=device)
    report(f"forward (inference mode), median of {args.runs}", res, unit="ms")

    print("\nmemory of one training step")
    for m in models.values():
        m.train()
    for k in models:
        saved = saved_activation_bytes(fns[k], x, t) / 2**20
        line = f"  {k:<28} saved for backward {saved:8.1f} MiB"
        if device.startswith("cuda"):
            step = steps[k]
            step()
            sync(device)
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            step()
            sync(device)
            line += f"   peak above the resting state {(torch.cuda.max_memory_allocated() - base) / 2**20:8.1f} MiB"
        elif not args.compile and not args.tiny:  # (--tiny: the test of the GPU code path skips these subprocesses)
            peak = cpu_peak_rss(k, args)
            line += f"   peak RSS of a fresh step above the RSS before it {peak:8.1f} MiB" if peak is not None else ""
        print(line)

    if not args.skip_sampling:
        bench_sampling(fns.get("visionformers+optimize", fns["visionformers"]), device, args.batch, cl)


if __name__ == "__main__":
    main()
