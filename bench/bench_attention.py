"""Our Attention vs torch.nn.MultiheadAttention and timm's Attention, forward + backward, same process.

    python bench/bench_attention.py [--device cuda] [--dtype bf16] [--runs 7]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import env_line, interleaved_times, report  # noqa: E402

from visionformers.nn import Attention  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--tokens", type=int, default=197)
    p.add_argument("--dim", type=int, default=768)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--runs", type=int, default=7)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    args = p.parse_args()
    from timm.models.vision_transformer import Attention as TimmAttention

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    dev = args.device
    models = {
        "visionformers": Attention(args.dim, args.heads, qkv_bias=True),
        "torch.nn.MultiheadAttention": torch.nn.MultiheadAttention(args.dim, args.heads, batch_first=True),
        "timm Attention": TimmAttention(args.dim, args.heads, qkv_bias=True),
    }
    calls = {
        "visionformers": lambda m, x: m(x),
        "torch.nn.MultiheadAttention": lambda m, x: m(x, x, x, need_weights=False)[0],
        "timm Attention": lambda m, x: m(x),
    }
    x = torch.randn(args.batch, args.tokens, args.dim, device=dev, dtype=dtype, requires_grad=True)
    for m in models.values():
        m.to(dev, dtype).train()

    def step(name):
        def run():
            out = calls[name](models[name], x)
            out.float().square().mean().backward()
        return run

    results = interleaved_times({n: step(n) for n in models}, runs=args.runs, device=dev)
    print(env_line(dev))
    report(f"attention forward+backward, B={args.batch} N={args.tokens} dim={args.dim} heads={args.heads} {args.dtype}", results)

    def fwd(name):
        def run():
            with torch.inference_mode():
                calls[name](models[name], x.detach())
        return run

    for m in models.values():
        m.eval()
    report("attention forward (inference mode)", interleaved_times({n: fwd(n) for n in models}, runs=args.runs, device=dev))


if __name__ == "__main__":
    main()
