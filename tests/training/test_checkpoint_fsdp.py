"""Checkpoints of an FSDP2-sharded model (2 CPU processes, gloo): full safetensors out, exact continuation in."""
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed as dist

HERE = Path(__file__).resolve().parent


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed + gloo")
def test_fsdp2_checkpoint_round_trip(tmp_path):
    if not hasattr(pytest.importorskip("torch.distributed.fsdp"), "fully_shard"):
        pytest.skip("needs FSDP2 (torch.distributed.fsdp.fully_shard)")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", PYTHONPATH=str(HERE.parents[1]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
           str(HERE / "_fsdp_checkpoint_worker.py"), str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0 and "FSDP2 CHECKPOINT OK" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert {p.name for p in (tmp_path / "checkpoint-2").iterdir()} >= {"rng-0.pt", "rng-1.pt", "optimizer.safetensors"}
