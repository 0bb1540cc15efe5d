"""Each GPU-mode benchmark's code path, one round with tiny models on the CPU (the figures come from bench/gpu_checks.sh)."""
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
pytest.importorskip("diffusers")
pytest.importorskip("timm")


def run(script: str, *args: str) -> str:
    env = {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "CUDA_VISIBLE_DEVICES": "", "PATH": "/usr/bin:/bin"}
    proc = subprocess.run([sys.executable, str(REPO / "bench" / script), *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_diffusion_train_and_sampling():
    out = run("bench_diffusion_train.py", "--tiny", "--models", "dit_b_2", "--batch", "2", "--runs", "1", "--warmup", "0",
              "--grad_ckpt", "--sample_steps", "2", "--sample_model", "dit_b_2", "--sample_batch", "2", "--dtype", "bf16")
    assert "dit_b_2 training step" in out and "visionformers vs diffusers" in out and "MFU" in out
    assert "visionformers+ckpt (batch x2)" in out and "sampling: DDIM 2 steps, CFG 4.0" in out
    flops = [line.split("GFLOP/item")[0].split()[-1] for line in out.splitlines() if "GFLOP/item" in line]
    assert flops[0] == flops[1] and flops[-1] == flops[-2]  # same architecture, same counted FLOPs: training, sampling


def test_unet():
    out = run("bench_unet.py", "--tiny", "--batch", "2", "--runs", "1", "--dtype", "bf16", "--skip-sampling")
    assert "max |ours - diffusers|" in out and "throughput, peak memory, MFU" in out and "MFU" in out


def test_vision():
    out = run("bench_vision.py", "--tiny", "--batch", "2", "--runs", "1", "--dtype", "bf16")
    assert "vit fine-tuning step at 32 px" in out and "visionformers vs timm" in out
