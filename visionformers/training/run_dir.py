"""Opening an output directory for a run: checks that protect what is already in it, before any training.

:func:`open_run` (every process calls it; process 0 does the work and shares the outcome):

1. the directory is created and written to (a read-only or full filesystem fails now, not at the first save);
2. it is locked for this run (:mod:`visionformers.training.lock`): a second run into it is refused;
3. leftovers of a killed run are cleaned up and an interrupted replacement is restored
   (:func:`~visionformers.training.checkpoint.remove_stale`);
4. ``--resume_from_checkpoint`` is resolved (damaged checkpoints are skipped or refused, never overwritten);
5. resuming: the stored arguments that decide what the weights mean (model, resolution, conditioning, VAE, noise
   process) must equal the current ones, and a changed ``--max_train_steps`` or process count is warned about;
   starting fresh: a directory holding another run (``run.json`` or a checkpoint's stored arguments differ) is
   refused unless ``overwrite`` (``--overwrite_output_dir``), which then removes that run's checkpoints;
6. ``run.json`` records the run's arguments for the next start.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

from visionformers._io import atomic_write_bytes
from visionformers.hub import read_json
from visionformers.training import checkpoint as ckpt
from visionformers.training.lock import OutputDirLock, check_writable

logger = logging.getLogger(__name__)

RUN_FILE = "run.json"
# Arguments whose change makes saved weights meaningless for the current run: resuming with another value is refused.
MUST_MATCH = ("model", "model_overrides", "resolution", "image_size", "channels", "conditioning", "text_encoder",
              "train_text_encoder", "vae", "noise_schedule", "prediction_type", "num_train_timesteps", "flow_shift",
              "tokenizer", "vocab_size", "block_size")
# Arguments newer than some saved runs, with the value they had before they existed (when a stored config lacks them).
SAVED_DEFAULTS = {"train_text_encoder": False}
# Arguments that do not change what a run computes (logging, sampling, bookkeeping): ignored when deciding whether
# a directory holds another run.
IGNORED = frozenset({
    "output_dir", "resume_from_checkpoint", "overwrite_output_dir", "stop_after_steps", "report_to",
    "tracker_project_name", "logging_steps", "dataloader_num_workers", "checkpointing_steps",
    "checkpoints_total_limit", "sample_every", "num_samples", "num_inference_steps", "sampler", "guidance_scale",
    "max_bad_steps", "debug_inject_nan_at", "mixed_precision", "eval_steps", "eval_batch_size", "sample_prompt",
    "sample_tokens", "gradient_checkpointing", "compile", "compile_backend", "early_stopping_patience",
    "early_stopping_metric", "early_stopping_min_delta"})


def _jsonable(config: dict) -> dict:
    """The arguments as they read back from JSON (tuples become lists), so stored and current values compare."""
    return json.loads(json.dumps(config, default=str))


def _flag_diffs(stored: dict, current: dict, keys) -> list[str]:
    stored = {**{k: v for k, v in SAVED_DEFAULTS.items() if k not in stored}, **stored}
    return [f"--{k} {json.dumps(current[k])} (saved: {json.dumps(stored[k])})"
            for k in keys if k in stored and k in current and stored[k] != current[k]]


def stored_run_config(output_dir: str | os.PathLike) -> tuple[dict | None, str]:
    """(arguments of the run that used ``output_dir``, where they were read) from ``run.json``, else the newest
    readable checkpoint's ``state.json``; (None, "") when the directory holds neither."""
    output_dir = Path(output_dir)
    if (output_dir / RUN_FILE).is_file():
        data = read_json(output_dir / RUN_FILE, "run record")
        if isinstance(data, dict) and isinstance(data.get("args"), dict):
            return data["args"], str(output_dir / RUN_FILE)
    for path in ckpt.candidates(output_dir):
        try:
            return ckpt.read_state(path).get("config", {}), str(path / ckpt.STATE_NAME)
        except (FileNotFoundError, ValueError, OSError):
            continue
    return None, ""


EXPORT_DIRS = ("model", "best")  # what the training scripts export into their --output_dir


def check_same_run(output_dir: str | os.PathLike, config: dict, overwrite: bool = False) -> None:
    """Refuse to start a new run in a directory that holds another run (its stored arguments differ), unless
    ``overwrite``: that run's checkpoints are then removed so they cannot be resumed by mistake."""
    held = ckpt.candidates(Path(output_dir)) or [d for d in EXPORT_DIRS if (Path(output_dir) / d).is_dir()]
    if not held:  # nothing to lose (e.g. a run that stopped on a bad argument): the new run takes the directory
        return
    stored, source = stored_run_config(output_dir)
    if stored is None:
        return
    current = _jsonable(config)
    diffs = _flag_diffs(stored, current, sorted((set(stored) & set(current)) - IGNORED))
    if not diffs:
        return
    if not overwrite:
        raise ValueError(f"--output_dir={str(output_dir)!r} holds another run ({source}) with other arguments: "
                         f"{'; '.join(diffs[:6])}; resume it with --resume_from_checkpoint latest, choose another "
                         "--output_dir, or pass --overwrite_output_dir to replace it")
    old = ckpt.candidates(Path(output_dir))
    for path in old:
        trash = path.with_name(f"{ckpt.TRASH_PREFIX}{path.name}")
        os.replace(path, trash)
        shutil.rmtree(trash, ignore_errors=True)
    logger.warning("--overwrite_output_dir: replacing the run in %s (%s); removed %d of its checkpoints",
                   output_dir, "; ".join(diffs[:6]), len(old))


def check_resume(path: str | os.PathLike, config: dict, world_size: int = 1) -> dict:
    """Compare a checkpoint's stored arguments with the current ones: a different model, data shape, conditioning,
    VAE or noise process is a ValueError naming the flags; a changed ``--max_train_steps`` or process count is a
    warning saying what it changes. Returns the checkpoint's state."""
    state = ckpt.read_state(path)
    stored, current = state.get("config", {}), _jsonable(config)
    diffs = _flag_diffs(stored, current, MUST_MATCH)
    if diffs:
        raise ValueError(f"cannot resume from {str(path)!r}: {'; '.join(diffs)}; pass the saved values, or start a "
                         "new run in another --output_dir")
    step, total = state["step"], current.get("max_train_steps")
    if isinstance(total, int) and step > total:
        raise ValueError(f"cannot resume from {str(path)!r}: it is at step {step}, past --max_train_steps {total}; "
                         f"pass --max_train_steps {stored.get('max_train_steps', step)} or more")
    if _flag_diffs(stored, current, ("max_train_steps",)):
        logger.warning("resuming with --max_train_steps %s (saved: %s): the lr schedule is recomputed for the new "
                       "length, so the learning rate from step %d on differs from the saved run's",
                       total, stored["max_train_steps"], step)
    saved_world = state.get("world_size", 1)
    if saved_world != world_size:
        logger.warning("resuming a checkpoint of %d process(es) on %d: the global batch changes from %d to %d times "
                       "the per-process batch and the data order and random streams differ, so the run is not "
                       "bit-identical to an uninterrupted one", saved_world, world_size, saved_world, world_size)
    return state


class Run:
    """An opened output directory: ``resume_from`` (a checkpoint or None); :meth:`close` releases the lock."""

    def __init__(self, output_dir: Path, resume_from: Path | None, lock: OutputDirLock | None):
        self.output_dir, self.resume_from, self.lock = output_dir, resume_from, lock

    def close(self) -> None:
        if self.lock is not None:
            self.lock.release()


def _share(accelerator, value):
    """Process 0's ``value`` on every process."""
    if accelerator is None or accelerator.num_processes == 1:
        return value
    from accelerate.utils import broadcast_object_list

    box = [value]
    broadcast_object_list(box, from_process=0)
    return box[0]


def open_run(output_dir: str | os.PathLike, config: dict, *, resume: str | None = None, overwrite: bool = False,
             accelerator=None) -> Run:
    """Check, lock and prepare ``output_dir`` for a run with arguments ``config`` (see the module docstring);
    every process calls it. ``resume`` is ``--resume_from_checkpoint``. Errors are ValueErrors on every process."""
    output_dir = Path(output_dir)
    is_main = accelerator is None or accelerator.is_main_process
    world = accelerator.num_processes if accelerator is not None else 1
    lock, outcome = None, None
    if is_main:
        try:
            check_writable(output_dir)
            lock = OutputDirLock(output_dir).acquire()
            ckpt.remove_stale(output_dir)
            resume_from = ckpt.resolve_checkpoint(output_dir, resume)
            if resume_from is None:
                check_same_run(output_dir, config, overwrite)
            else:
                check_resume(resume_from, config, world)
            atomic_write_bytes(output_dir / RUN_FILE, json.dumps({"args": _jsonable(config)}, indent=2).encode())
            outcome = ("ok", None if resume_from is None else str(resume_from))
        except (ValueError, FileNotFoundError) as e:
            if lock is not None:
                lock.release()
            outcome = ("error", str(e))
    outcome = _share(accelerator, outcome)
    if outcome[0] == "error":
        raise ValueError(outcome[1])
    return Run(output_dir, Path(outcome[1]) if outcome[1] else None, lock)


__all__ = ["RUN_FILE", "MUST_MATCH", "IGNORED", "Run", "open_run", "check_same_run", "check_resume",
           "stored_run_config"]
