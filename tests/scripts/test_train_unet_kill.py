"""SIGKILL a training run at 20 moments (some in the middle of writing a checkpoint); after each kill
`--resume_from_checkpoint latest` must find a complete checkpoint, and the run that finally completes must
equal an uninterrupted one bit for bit.

The children are forked from this process (imports already done), so each start costs ~0.1 s instead of a
fresh interpreter's few seconds; the kill is still a real SIGKILL of a process in the middle of its work.
"""
import multiprocessing as mp
import os
import random
import signal
import sys
import time

import pytest
from _unet_script_helpers import TINY, TRAIN, assert_same_files, load_script

from visionformers.training import checkpoint as ckpt

KILLS = 20
ARGS = [*TINY, "--max_train_steps", "16", "--checkpointing_steps", "2", "--checkpoints_total_limit", "2",
        "--num_samples", "2"]


def _child(argv: list[str], delay: str, log: str) -> None:
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(fd, 1), os.dup2(fd, 2)
    # pytest's capture replaces sys.stdout / sys.stderr with its own files: point them at the log too
    sys.stdout = sys.stderr = open(fd, "w", buffering=1, closefd=False)
    os.environ[ckpt.WRITE_DELAY_ENV] = delay  # sleep between checkpoint files so kills land mid-write
    _own_tqdm_lock()
    import torch

    torch.set_num_threads(1)
    load_script(TRAIN).main(argv)


def _own_tqdm_lock() -> None:
    """Give a forked child its own tqdm write lock: tqdm's default one is a multiprocessing semaphore shared with
    the parent, and a child SIGKILLed while holding it would leave the parent and every later child blocked."""
    import threading

    from tqdm.auto import tqdm

    tqdm.set_lock(threading.RLock())


def _writing(out) -> bool:
    """A checkpoint is being written: its temporary directory exists."""
    return out.is_dir() and any(d.name.startswith(".tmp-") for d in out.iterdir())


def _wait_for(predicate, timeout: float = 60.0) -> bool:
    end = time.time() + timeout
    while time.time() < end:
        if predicate():
            return True
        time.sleep(0.005)
    return False


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_sigkill_anywhere_then_resume_latest(tmp_path):
    ctx = mp.get_context("fork")
    rng = random.Random(0)
    out = tmp_path / "killed"
    argv = [*ARGS, "--output_dir", str(out), "--resume_from_checkpoint", "latest"]
    survived, mid_write, last_step, t0 = 0, 0, -1, time.time()
    for i in range(KILLS):
        log = tmp_path / f"kill-{i}.log"
        p = ctx.Process(target=_child, args=(argv, "0.03", str(log)))
        p.start()
        # wait for the training loop, then kill: even kills as soon as a checkpoint is being written,
        # odd kills at a random moment of the next 1.2 s (steps, saves, pruning, sampling; long enough that some
        # land after a save completes even when a loaded machine makes the two steps before it slow)
        assert _wait_for(lambda: log.exists() and "training steps" in log.read_text()), log.read_text()
        if i % 2 == 0:
            _wait_for(lambda: _writing(out), timeout=20)
            time.sleep(rng.uniform(0.0, 0.2))
        else:
            time.sleep(rng.uniform(0.0, 1.2))
        caught_mid_write = _writing(out)
        if p.is_alive():
            os.kill(p.pid, signal.SIGKILL)
        p.join()
        mid_write += caught_mid_write
        latest = ckpt.latest_checkpoint(out)
        step = -1 if latest is None else ckpt.read_state(latest)["step"]
        assert latest is None or ckpt.is_complete(latest)
        assert step >= last_step, f"kill {i}: latest went back from {last_step} to {step}"
        survived += 1
        last_step = step
    t_kills = time.time() - t0
    print(f"\nkills survived/tried: {survived}/{KILLS}; {mid_write} landed while a checkpoint was being written; "
          f"latest step after the kills: {last_step}; {t_kills:.0f} s")
    assert mid_write >= 1 and last_step > 0

    # finish the killed run, and compare with a run that was never interrupted
    for target in (out, tmp_path / "straight"):
        p = ctx.Process(target=_child, args=([*ARGS, "--output_dir", str(target), "--resume_from_checkpoint",
                                              "latest"], "0", str(target) + ".log"))
        p.start()
        p.join(timeout=300)
        assert p.exitcode == 0
    assert_same_files(out / "checkpoint-16", tmp_path / "straight" / "checkpoint-16")
    assert_same_files(out / "model", tmp_path / "straight" / "model", names=("model.safetensors",))
