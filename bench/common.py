"""Timing helpers shared by the side-by-side benchmarks (scripts, never tests)."""
from __future__ import annotations

import ctypes
import statistics
import time
from collections.abc import Callable

import torch

try:
    import resource
except ImportError:  # not a Unix: no page-fault counts
    resource = None


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


def _minor_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt if resource is not None else 0


def interleaved_times(
    fns: dict[str, Callable[[], object]], runs: int = 5, warmup: int = 2, device: str = "cpu",
    faults: dict[str, list[int]] | None = None,
) -> dict[str, list[float]]:
    """Wall times in seconds of several candidates, one call each per round, ``runs`` rounds after ``warmup``
    calls each: load on a shared machine drifts slowly, so candidates of one round see about the same load.
    ``faults``, when given, is filled with each call's minor page faults (memory the allocator had given back to
    the system and takes again: see ``keep_freed_memory``)."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    sync(device)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(runs):
        for name, fn in fns.items():
            before = _minor_faults()
            start = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - start)
            if faults is not None:
                faults.setdefault(name, []).append(_minor_faults() - before)
    return times


def keep_freed_memory() -> bool:
    """Have glibc's malloc keep freed memory for reuse (mmap only above 64 MB, no trimming below 1 GB), for every
    model in the process alike; False where that cannot be set (not glibc).

    By default glibc maps large blocks fresh from the system and unmaps them on free, and trims the freed top of
    its heap: a model's next forward then takes a page fault per 4 KB of those activations. Which models pay
    depends on what the process allocated before (glibc raises its thresholds after freeing large blocks), so a
    side-by-side timing can charge one model faults that another in the same process escapes: Swin-T at batch 8
    here, torchvision 0-50k faults per forward, timm 9-75k, ours 0-9k, each ~3 us on this VM.
    ``MALLOC_MMAP_THRESHOLD_=67108864 MALLOC_TRIM_THRESHOLD_=1073741824`` does the same from the environment."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3  # malloc.h
        return bool(libc.mallopt(m_mmap_threshold, 64 << 20)) and bool(libc.mallopt(m_trim_threshold, 1 << 30))
    except (OSError, AttributeError):
        return False


def paired_ratio(reference: list[float], ours: list[float]) -> tuple[float, float, float]:
    """(median, lower quartile, upper quartile) over rounds of reference time / our time (> 1: ours is faster).

    Pairing the two calls of one round cancels most of the load that a shared machine adds to both, so the
    spread says how far the ratio itself can be trusted."""
    ratios = sorted(r / o for r, o in zip(reference, ours))
    if len(ratios) < 2:
        return ratios[0], ratios[0], ratios[0]
    q1, _, q3 = statistics.quantiles(ratios, n=4, method="inclusive")
    return statistics.median(ratios), q1, q3


def fastest(times: dict[str, list[float]], names) -> str:
    """The candidate among ``names`` with the smallest median time."""
    return min(names, key=lambda n: statistics.median(times[n]))


def ratio_text(times: dict[str, list[float]], reference: str, ours: str) -> str:
    median, q1, q3 = paired_ratio(times[reference], times[ours])
    return f"{median:.2f}x {reference} (per-round quartiles {q1:.2f}-{q3:.2f})"


def report(title: str, times: dict[str, list[float]], ours: str = "visionformers", unit: str = "ms", scale: float = 1e3) -> None:
    """Print each candidate's median time and our ratio to the fastest reference (> 1 means we are faster),
    as the median of per-round ratios with its quartiles."""
    print(f"\n{title}")
    for name, t in times.items():
        print(f"  {name:<28} {statistics.median(t) * scale:9.2f} {unit}")
    refs = [n for n in times if not n.startswith(ours)]  # "ours+optimize" and the like are ours too
    if refs:
        for name in (n for n in times if n.startswith(ours)):
            print(f"  {name} vs the fastest reference: {ratio_text(times, fastest(times, refs), name)}")


def env_line(device: str) -> str:
    name = torch.cuda.get_device_name() if torch.device(device).type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    return f"torch {torch.__version__}, {name}"


# ---- GPU mode: throughput, peak memory and MFU with counted FLOPs -------------------------------------

H100_BF16_PEAK_TFLOPS = 989.0  # H100 SXM dense bf16 tensor-core peak (NVIDIA datasheet); the MFU denominator


def add_gpu_arguments(p) -> None:
    """``--device``, ``--dtype``, ``--compile`` and ``--peak_tflops`` of a benchmark's GPU mode."""
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"], help="bf16: autocast, fp32 master weights")
    p.add_argument("--compile", action="store_true", help="regional torch.compile: each repeated block, both models")
    p.add_argument("--peak_tflops", type=float, default=H100_BF16_PEAK_TFLOPS,
                   help="the accelerator's peak for the MFU (default: H100 SXM dense bf16)")


def autocast(device: str, dtype: str):
    """bf16 autocast on ``device`` (weights stay fp32), or nothing for fp32."""
    import contextlib

    if dtype == "bf16":
        return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs of one call of ``fn`` (forward and, if it runs one, backward), counted by
    ``torch.utils.flop_counter.FlopCounterMode`` op by op (matmuls, convolutions, attention), not estimated.
    ``fn`` runs once before the counted call, so that one-time work (lazy initialisation, a native kernel's
    first-use check) stays out of the count."""
    from torch.utils.flop_counter import FlopCounterMode

    fn()
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def peak_memory_mib(fn: Callable[[], object], device: str) -> float | None:
    """Peak CUDA memory allocated during one call of ``fn`` (MiB, weights and optimizer state included); None
    off CUDA."""
    if torch.device(device).type != "cuda":
        fn()
        return None
    sync(device)
    torch.cuda.reset_peak_memory_stats()
    fn()
    sync(device)
    return torch.cuda.max_memory_allocated() / 2**20


def throughput_table(title: str, rows: dict[str, dict], peak_tflops: float, unit: str = "img/s") -> None:
    """One line per candidate: ms per call, items/s, peak memory, achieved TFLOP/s and MFU; ours against
    each other candidate. ``rows[name]`` = {"seconds", "items", "flops", "peak_mib"}."""
    print(f"\n{title}")
    for name, r in rows.items():
        tflops = r["flops"] / r["seconds"] / 1e12
        mem = f"{r['peak_mib']:9.0f} MiB" if r.get("peak_mib") is not None else "        - MiB"
        print(f"  {name:<36} {r['seconds'] * 1e3:9.2f} ms  {r['items'] / r['seconds']:10.1f} {unit}  {mem}  "
              f"{r['flops'] / r['items'] / 1e9:9.2f} GFLOP/item  {tflops:8.2f} TFLOP/s  MFU {100 * tflops / peak_tflops:6.2f}%")
    rate = {n: r["items"] / r["seconds"] for n, r in rows.items()}
    for o in (n for n in rows if n.startswith("visionformers")):
        for ref in (n for n in rows if not n.startswith("visionformers")):
            print(f"  {o} vs {ref}: {rate[o] / rate[ref]:.2f}x the throughput")
