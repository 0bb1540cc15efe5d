"""ViT-B/16 and Swin-T: visionformers vs timm vs torchvision, in one process, same weights, same inputs.

Inference: images/s of ``model(x)`` under ``torch.inference_mode()`` (median of ``--runs`` after warm-up).
Training: one step = forward + cross-entropy + backward + AdamW, median images/s. The models of a family
run interleaved round by round; the ratio is the median of the per-round ratios, with its quartiles. Each line
also gives the median minor page faults per call; ``--keep-freed-memory`` has malloc keep freed memory for every
model alike (see ``common.keep_freed_memory``), so that no model is timed with faults another one escapes.

    python bench/bench_vision.py --model all --batch 8 --runs 5
    python bench/bench_vision.py --model swin --no-train --runs 15 --keep-freed-memory
    python bench/bench_vision.py --model swin --compile          # adds torch.compile(ours) and (timm) beside eager
    python bench/bench_vision.py --model vit --device cuda --dtype bf16 --compile --batch 64   # GPU: + MFU table

GPU mode: ``--dtype bf16`` autocasts the steps (fp32 weights), ``--compile`` compiles each transformer block of
ours and of timm in place (regional compilation) beside the eager models, and a table gives each training
step's time, img/s, peak memory and MFU with the FLOPs counted by ``FlopCounterMode`` (ViT-B/16 fine-tuning
at 224 against timm).
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    add_gpu_arguments, autocast, count_flops, fastest, interleaved_times, keep_freed_memory, peak_memory_mib,
    ratio_text, throughput_table,
)

import visionformers as vf  # noqa: E402
from visionformers.training import performance  # noqa: E402

# --tiny (ViT only): the code path in seconds on a CPU (tests); torchvision's and timm's constructors take these
TINY_VIT = dict(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=64, mlp_dim=128)


def compile_regions(name: str, model: torch.nn.Module) -> torch.nn.Module:
    """Each transformer block compiled in place: ours through ``performance.compile_blocks``, timm's blocks alike."""
    if name.startswith("ours"):
        performance.compile_blocks(model)
    else:
        for m in model.modules():
            if type(m).__name__ in ("Block", "SwinTransformerBlock"):
                m.compile()
    return model

FAMILIES = {
    # family: (our preset, timm name, torchvision constructor); ours is built from torchvision's weights
    "vit": ("vit_base_patch16_224", "vit_base_patch16_224", "vit_b_16"),
    "swin": ("swin_tiny_patch4_window7_224", "swin_tiny_patch4_window7_224", "swin_t"),
}


def build(family: str, device: str, compile_ours: bool, tiny: bool = False) -> dict[str, torch.nn.Module]:
    """The reference models with random weights, and ours loaded with torchvision's weights (parity)."""
    import timm
    import torchvision

    _, timm_name, tv_name = FAMILIES[family]
    timm_kw = {}
    if tiny:
        t = TINY_VIT
        tv = torchvision.models.VisionTransformer(**t)
        timm_kw = dict(img_size=t["image_size"], patch_size=t["patch_size"], depth=t["num_layers"],
                       num_heads=t["num_heads"], embed_dim=t["hidden_dim"], mlp_ratio=t["mlp_dim"] / t["hidden_dim"])
    else:
        tv = getattr(torchvision.models, tv_name)(weights=None)
    head = tv.heads.head if family == "vit" else tv.head
    torch.nn.init.normal_(head.weight, std=0.02)  # torchvision zero-inits the ViT head: make the parity check bite
    config = None
    if tiny:  # the head count is not in the weights
        config = vf.registry.replace_config(vf.registry.get_preset(FAMILIES[family][0])[1], {"num_heads": TINY_VIT["num_heads"], "img_size": TINY_VIT["image_size"]})
    models = {
        "torchvision": tv,
        "timm": timm.create_model(timm_name, pretrained=False, **timm_kw),
        "ours": vf.convert.build_model(*vf.convert.from_torchvision(tv.state_dict(), config, return_config=True)),
    }
    if compile_ours:  # compiled copies of ours and of timm, so that compiled is also compared with compiled
        models["timm+compile"] = compile_regions("timm", timm.create_model(timm_name, pretrained=False, **timm_kw))
        models["ours+compile"] = compile_regions(
            "ours", vf.convert.build_model(*vf.convert.from_torchvision(tv.state_dict(), config, return_config=True)))
    return {k: m.to(device) for k, m in models.items()}


def time_inference(models, x, runs: int, device: str, faults: dict) -> dict[str, list[float]]:
    for m in models.values():
        m.eval()

    def forward(m):
        def run():
            with torch.inference_mode():
                m(x)
        return run

    # warm-up: allocator, plans, kernels, compilation
    return interleaved_times({k: forward(m) for k, m in models.items()}, runs=runs, warmup=2, device=device,
                             faults=faults)


def training_steps(models, x, device: str, dtype: str = "fp32") -> dict:
    """One fine-tuning step per model: forward + cross-entropy + backward + AdamW (fused on CUDA)."""
    y = torch.randint(0, 1000, (x.shape[0],), device=device)
    fused = torch.device(device).type == "cuda" or None
    opts = {k: torch.optim.AdamW(m.parameters(), lr=1e-5, fused=fused) for k, m in models.items()}

    def step(name, m):
        def run():
            with autocast(device, dtype):
                loss = torch.nn.functional.cross_entropy(m(x).float(), y)
            loss.backward()
            opts[name].step()
            opts[name].zero_grad(set_to_none=True)
        return run

    for m in models.values():
        m.train()
    return {k: step(k, m) for k, m in models.items()}


def time_training(steps: dict, runs: int, device: str, faults: dict) -> dict[str, list[float]]:
    return interleaved_times(steps, runs=runs, warmup=1, device=device, faults=faults)


def mfu_table(family: str, steps: dict, times: dict, batch: int, args) -> None:
    """Throughput, peak memory and MFU of each training step; FLOPs counted on the eager models (a compiled
    model computes the same products)."""
    flops = {k: count_flops(steps[k]) for k in steps if "compile" not in k}
    rows = {k: {"items": batch, "flops": flops[k.replace("+compile", "")], "seconds": statistics.median(times[k]),
                "peak_mib": peak_memory_mib(steps[k], args.device)} for k in steps}
    rows = {("visionformers" + k[4:] if k.startswith("ours") else k): r for k, r in rows.items()}
    throughput_table(f"{family} fine-tuning step at {args.img_size} px, batch {batch}, {args.dtype}", rows,
                     args.peak_tflops)


def report(title: str, times: dict[str, list[float]], batch: int, faults: dict[str, list[int]]) -> None:
    """img/s and page faults per call of every model; ours against the faster eager reference (and compiled
    against compiled) as the median of per-round ratios with its quartiles."""
    best_ref = fastest(times, ("timm", "torchvision"))
    print(f"  {title}")
    for name, t in times.items():
        ratio = f"  {ratio_text(times, best_ref, name)}" if name.startswith("ours") else ""
        if name == "ours+compile":
            ratio += f", {ratio_text(times, 'timm+compile', name)}"
        print(f"    {name:14s} {batch / statistics.median(t):8.2f} img/s  (median of {len(t)}, "
              f"{statistics.median(faults[name]):.0f} page faults){ratio}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=["vit", "swin", "all"], default="all")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--img-size", type=int, default=224)
    add_gpu_arguments(p)
    p.add_argument("--tiny", action="store_true", help="a 2-layer ViT at 32 px (the CPU test of this script)")
    p.add_argument("--no-train", action="store_true", help="skip the training-step timing")
    p.add_argument("--keep-freed-memory", action="store_true",
                   help="have malloc keep freed memory, for every model alike (no page faults in the timings)")
    args = p.parse_args()
    torch.manual_seed(0)
    malloc = "default malloc"
    if args.keep_freed_memory:
        malloc = "malloc keeps freed memory" if keep_freed_memory() else "default malloc (could not change it)"
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, device {args.device}, batch {args.batch}, {args.dtype}, "
          f"{malloc}")
    if args.device.startswith("cuda"):
        performance.use_tf32()
    if args.tiny:
        args.model, args.img_size = "vit", TINY_VIT["image_size"]
    for family in (["vit", "swin"] if args.model == "all" else [args.model]):
        models = build(family, args.device, args.compile, args.tiny)
        x = torch.randn(args.batch, 3, args.img_size, args.img_size, device=args.device)
        with torch.inference_mode():
            ref = models["torchvision"].eval()(x)
            diff = (models["ours"].eval()(x) - ref).abs().max().item()
            if args.compile:
                diff_c = (models["ours+compile"].eval()(x) - ref).abs().max().item()
        compiled = f", compiled {diff_c:.1e}" if args.compile else ""
        print(f"{family}: {FAMILIES[family][0]} (max |ours - torchvision| logits {diff:.1e}{compiled})")
        faults: dict[str, list[int]] = {}
        inference = dict(models)
        if args.device == "cpu":  # the CPU inference speed-ups, attached from outside (vf.native.optimize)
            inference["ours+optimize"] = vf.native.optimize(copy.deepcopy(models["ours"]).eval())
        report("inference", time_inference(inference, x, args.runs, args.device, faults), args.batch, faults)
        if not args.no_train:
            faults = {}
            steps = training_steps(models, x, args.device, args.dtype)
            times = time_training(steps, args.runs, args.device, faults)
            report("training step (fwd + bwd + AdamW)", times, args.batch, faults)
            mfu_table(family, steps, times, args.batch, args)


if __name__ == "__main__":
    main()
