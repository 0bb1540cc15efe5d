"""Helpers to run the train / sample scripts as fresh processes, alone or under `accelerate launch`."""
import importlib.util
import os
import socket
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[2]
TRAIN = REPO / "train_scripts" / "train_unet.py"
SAMPLE = REPO / "sample_scripts" / "sample_unet.py"
# A few-thousand-parameter UNet on 8x8 digits: these tests check bookkeeping, not image quality.
TINY = ["--model", "unet_tiny", "--model_overrides", '{"base_channels": 8, "channel_mults": [1, 2], '
        '"num_res_blocks": 1, "attention_resolutions": [4], "attention_head_dim": 8, "norm_groups": 4}',
        "--resolution", "8", "--train_batch_size", "8", "--num_samples", "4", "--num_inference_steps", "2",
        "--lr_warmup_steps", "2", "--logging_steps", "2"]


def _env() -> dict:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", PYTHONPATH=str(REPO), WANDB_MODE="disabled",
               TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    return env


def _free_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def run(script: Path, args: list[str], nproc: int = 1, expect_ok: bool = True, timeout: int = 180):
    """Run ``script`` in fresh processes (``nproc`` > 1: accelerate's multi-process launcher on CPUs, gloo)."""
    if nproc == 1:
        cmd = [sys.executable, str(script), *args]
    else:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(nproc),
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", _free_port(), str(script), *args]
    proc = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=timeout)
    if expect_ok and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def load_script(path: Path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def tensors(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def assert_same_files(a: Path, b: Path, names=("model.safetensors", "ema.safetensors", "optimizer.safetensors"),
                      atol: float = 0.0):
    for name in names:
        x, y = tensors(a / name), tensors(b / name)
        assert x.keys() == y.keys(), name
        for k in x:
            if atol == 0:
                assert torch.equal(x[k], y[k]), f"{name}:{k} differs"
            else:
                torch.testing.assert_close(x[k], y[k], rtol=1e-5, atol=atol, msg=f"{name}:{k}")
