"""Timing helpers shared by the side-by-side benchmarks (scripts, never tests)."""
from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


def sync(device: str | torch.device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def median_time(fn: Callable[[], object], runs: int = 5, warmup: int = 2, device: str = "cpu") -> float:
    """Median wall time in seconds of ``fn()`` over ``runs`` calls after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def interleaved_median(fns: dict[str, Callable[[], object]], runs: int = 5, warmup: int = 2, device: str = "cpu") -> dict[str, float]:
    """Median times of several candidates measured round-robin, so drift on a shared machine hits all alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    sync(device)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(runs):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def report(title: str, results: dict[str, float], ours: str = "visionformers", unit: str = "ms", scale: float = 1e3) -> None:
    """Print each candidate's median and the ratio (reference time / our time: > 1 means we are faster)."""
    print(f"\n{title}")
    for name, t in results.items():
        ratio = "" if name == ours else f"   ours is {t / results[ours]:.2f}x faster" if t >= results[ours] else f"   ours is {results[ours] / t:.2f}x slower"
        print(f"  {name:<28} {t * scale:9.2f} {unit}{ratio}")
    refs = [t for n, t in results.items() if n != ours]
    if refs:
        print(f"  ratio vs the fastest reference: {min(refs) / results[ours]:.3f}x")


def env_line(device: str) -> str:
    name = torch.cuda.get_device_name() if torch.device(device).type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    return f"torch {torch.__version__}, {name}"
