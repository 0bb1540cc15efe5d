"""The ``visionformers::linear_rows`` op (native decoding kernel) vs F.linear (BLAS) on GPT-2 124M's weight
matrices, CPU fp32, same process.

For each number of rows, the 48 per-layer products of one GPT-2 forward step (12 x qkv 768->2304, attention
output 768->768, MLP 768->3072 and 3072->768) and the tied 50257 x 768 output layer, timed in interleaved
rounds; printed with the bandwidth at which the weights stream and, for scale, ``sum()`` over the same
matrices (a plain streaming read on all threads). Rows 1 is token-by-token decoding.

    python bench/bench_linear.py [--rows 1 2 4 8 16 32] [--runs 9] [--threads N]

Models use the op after ``vf.native.optimize(model)``, up to ``MAX_ROWS`` rows.
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import env_line, interleaved_times, ratio_text  # noqa: E402

from visionformers.native.ops import kernel_available, linear_rows  # noqa: E402
from visionformers.native.optimize import MAX_ROWS  # noqa: E402


def gpt2_matrices() -> list[torch.Tensor]:
    shapes = [(2304, 768), (768, 768), (3072, 768), (768, 3072)] * 12 + [(50257, 768)]
    return [torch.randn(out_features, in_features) for out_features, in_features in shapes]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64])
    parser.add_argument("--runs", type=int, default=9)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"{env_line('cpu')}, native kernel: {kernel_available()} (used up to {MAX_ROWS} rows)")
    torch.manual_seed(0)
    weights = gpt2_matrices()
    gb = sum(w.numel() for w in weights) * 4 / 1e9
    with torch.inference_mode():
        times = interleaved_times({"sum()": lambda: [w.sum() for w in weights]}, runs=args.runs)
        print(f"sum() over the same {gb * 1e3:.0f} MB: {gb / statistics.median(times['sum()']):.1f} GB/s")
        for rows in args.rows:
            xs = {k: torch.randn(rows, k) for k in (768, 3072)}
            times = interleaved_times({
                "F.linear": lambda: [F.linear(xs[w.shape[1]], w) for w in weights],
                "linear_rows": lambda: [linear_rows(xs[w.shape[1]], w, None) for w in weights],
            }, runs=args.runs)
            ms = {name: statistics.median(t) * 1e3 for name, t in times.items()}
            cells = [f"{name} {t:7.1f} ms ({gb / t * 1e3:5.1f} GB/s)" for name, t in ms.items()]
            print(f"rows {rows:3d}: " + "  ".join(cells) + f"  {ratio_text(times, 'F.linear', 'linear_rows')}")


if __name__ == "__main__":
    main()
