"""Training checkpoints that a kill at any moment cannot corrupt, and that load without unpickling code.

A checkpoint is a directory ``<output_dir>/checkpoint-<step>`` holding

    model.safetensors       full model weights (gathered from DDP / FSDP)
    ema.safetensors         EMA weights, when the run keeps an EMA
    optimizer.safetensors   optimizer state keyed by parameter name; the non-tensor part as JSON metadata
    scheduler.json          lr scheduler state (ints and floats)
    scaler.json             fp16 grad-scaler state, when there is one
    rng-<rank>.pt           every RNG state of process <rank>: tensors and ints, torch.load(weights_only=True)
    <name>/                 each extra model (a frozen VAE or text encoder), as save_pretrained writes it
    state.json              step, data position, counters, run config, and the size and SHA-256 of every file above

It is written under ``.tmp-checkpoint-<step>``; every file is fsynced, ``state.json`` goes last and the directory
is renamed into place only when every file is on disk, so a ``checkpoint-<step>`` directory is always complete.
:func:`is_complete` re-checks the recorded sizes anyway (a copy made with another tool may be partial), and resuming
verifies the checksums (a file altered in place keeps its size). Links inside a checkpoint are refused.
Re-saving an existing step (or re-exporting ``model/``) first renames the old copy to ``.prev-<name>``; a run killed
between the two renames gets it back from :func:`recover_interrupted`, so the last complete copy is never lost.
Pruning renames a directory to ``.trash-...`` before deleting it, so a half-deleted checkpoint is never
mistaken for a usable one.

An extra model whose weights have not changed since the newest checkpoint (a frozen VAE or text encoder: 335 MB for
SD's VAE, gigabytes for a T5 encoder) is not written again: its files are hard links to that checkpoint's, which
files are never modified in place, so every checkpoint stays complete on its own while the bytes exist once.
``state.json`` records a fingerprint of each extra model's config and weights to decide it; where links are not
possible (another filesystem), the files are written.

Finding, validating, pruning and cleaning checkpoints lives in :mod:`visionformers.training.checkpoint_dir`
(re-exported here).

Multi-process runs: every process calls :func:`save_checkpoint` / :func:`load_checkpoint` (gathering FSDP
shards is a collective); process 0 writes the shared files, each process its own RNG file. The output
directory must be on a filesystem every process sees (as for ``accelerate``'s own ``save_state``).
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import shutil
import time
from pathlib import Path

import torch
from torch import nn

from visionformers.hub import FORMAT_VERSION as HUB_FORMAT_VERSION
from visionformers.hub import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    atomic_write_bytes,
    config_to_dict,
    read_json,
    load_state_dict,
    read_config,
    save_pretrained,
    save_state_dict,
    unwrap_model,
)
from visionformers.training.checkpoint_dir import (  # noqa: F401  (re-exported: the checkpoint API in one place)
    FORMAT_VERSION,
    PREFIX,
    PREV_PREFIX,
    STATE_NAME,
    TMP_PREFIX,
    TRASH_PREFIX,
    _fsync_dir,
    candidates,
    checkpoint_problem,
    checkpoint_step,
    is_complete,
    latest_checkpoint,
    list_checkpoints,
    prune_checkpoints,
    read_state,
    recover_interrupted,
    remove_stale,
    resolve_checkpoint,
    sha256_file,
    validate_state,
)
from visionformers.training.loop import capture_rng_state, restore_rng_state
from visionformers.training.state_dicts import (
    ema_state_dict,
    full_model_state_dict,
    load_model_state,
    load_optimizer_state,
    optimizer_from_safetensors,
    optimizer_state_dict,
    optimizer_to_safetensors,
)

logger = logging.getLogger(__name__)

MODEL_FILE, EMA_FILE, OPTIMIZER_FILE = "model.safetensors", "ema.safetensors", "optimizer.safetensors"
SCHEDULER_FILE, SCALER_FILE = "scheduler.json", "scaler.json"
# Test hook: seconds to sleep after each file, so a kill can land in the middle of a checkpoint write.
WRITE_DELAY_ENV = "VF_CHECKPOINT_WRITE_DELAY"


def rng_file(rank: int) -> str:
    return f"rng-{rank}.pt"


# ---- save / load --------------------------------------------------------------------------------------


class _Dist:
    """Rank, world size and barrier of an ``accelerate.Accelerator`` (or a single process without one)."""

    def __init__(self, accelerator=None):
        self.acc = accelerator
        self.rank = accelerator.process_index if accelerator is not None else 0
        self.world = accelerator.num_processes if accelerator is not None else 1
        self.is_main = self.rank == 0

    def barrier(self) -> None:
        if self.acc is not None and self.world > 1:
            self.acc.wait_for_everyone()


def _pause() -> None:
    delay = float(os.environ.get(WRITE_DELAY_ENV, "0") or 0)
    if delay > 0:
        time.sleep(delay)


def _write_json(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)  # a name may sit in a sub-directory (text_encoder/tokenizer.json)
    atomic_write_bytes(path, json.dumps(data, indent=2, sort_keys=True).encode())


def _publish(tmp: Path, final: Path) -> None:
    """Rename the complete directory ``tmp`` to ``final``. An existing ``final`` is renamed to ``.prev-<name>``
    first and deleted only once the new one is in place (:func:`recover_interrupted` undoes a kill in between)."""
    for d in [tmp, *(p for p in tmp.rglob("*") if p.is_dir())]:
        _fsync_dir(d)
    if final.exists():
        prev = final.with_name(f"{PREV_PREFIX}{final.name}")
        shutil.rmtree(prev, ignore_errors=True)
        os.replace(final, prev)
        _fsync_dir(final.parent)
        os.replace(tmp, final)
        _fsync_dir(final.parent)
        shutil.rmtree(prev, ignore_errors=True)
    else:
        final.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, final)
    _fsync_dir(final.parent)


def model_fingerprint(module: nn.Module) -> str:
    """SHA-256 of a module's class, config and state dict (names, dtypes, shapes and bytes): equal fingerprints,
    equal ``save_pretrained`` directories."""
    if not isinstance(module, nn.Module):
        raise ValueError(f"module={type(module).__name__} is not accepted; expected a torch.nn.Module")
    h = hashlib.sha256(type(module).__name__.encode())
    config = getattr(module, "config", None)
    if config is not None:
        h.update(json.dumps(config_to_dict(config), sort_keys=True, default=str).encode())
    for name, tensor in module.state_dict().items():
        tensor = tensor.detach().cpu().contiguous()
        h.update(f"\n{name}|{tensor.dtype}|{tuple(tensor.shape)}\n".encode())
        h.update(tensor.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def _save_extra_model(module: nn.Module, name: str, tmp: Path, previous: Path | None,
                      previous_state: dict | None) -> tuple[dict, dict]:
    """Save an extra model in ``tmp/<name>``, or hard-link its files from ``previous`` (the newest checkpoint,
    whose state.json is ``previous_state``) when that one recorded the same fingerprint for it. Returns (its record
    for state.json: fingerprint and the files it wrote, {linked file: its size and SHA-256 entry of ``previous``})."""
    fingerprint = model_fingerprint(module)
    record = _previous_record(previous_state, name)
    if record is not None and record["fingerprint"] == fingerprint:
        entries, linked = previous_state["files"], []
        try:
            for rel in record["files"]:
                source, target = previous / rel, tmp / rel
                if rel not in entries or source.is_symlink() or source.stat().st_size != entries[rel]["size"]:
                    raise OSError(f"{source} is not the file recorded")
                target.parent.mkdir(parents=True, exist_ok=True)
                os.link(source, target)
                linked.append(rel)
            return record, {rel: entries[rel] for rel in linked}
        except OSError as e:
            logger.info("writing %s again instead of linking the copy in %s (%s)", name, previous, e)
            for rel in linked:  # only what was linked here: files of extra_files may share the directory
                (tmp / rel).unlink()
    before = {p for p in tmp.rglob("*") if p.is_file()}
    save_pretrained(module, tmp / name)
    written = sorted(p.relative_to(tmp).as_posix() for p in tmp.rglob("*") if p.is_file() and p not in before)
    return {"fingerprint": fingerprint, "files": written}, {}


def _previous_record(previous_state: dict | None, name: str) -> dict | None:
    """What the newest checkpoint's state.json recorded of its extra model ``name`` (fingerprint, files), or None."""
    if previous_state is None:
        return None
    record = (previous_state.get("extra_models") or {}).get(name)
    ok = (isinstance(record, dict) and isinstance(record.get("fingerprint"), str)
          and isinstance(record.get("files"), list) and record["files"]
          and all(isinstance(f, str) and f.startswith(name + "/") and ".." not in f.split("/") for f in record["files"]))
    return record if ok else None


def save_checkpoint(
    output_dir: str | os.PathLike,
    step: int,
    *,
    model: nn.Module,
    optimizer=None,
    lr_scheduler=None,
    ema=None,
    scaler=None,
    generators: dict[str, torch.Generator] | None = None,
    train_state: dict | None = None,
    config: dict | None = None,
    accelerator=None,
    total_limit: int | None = None,
    keep: tuple[str | os.PathLike | None, ...] = (),
    extra_files: dict[str, dict] | None = None,
    extra_models: dict[str, nn.Module] | None = None,
) -> Path:
    """Write ``<output_dir>/checkpoint-<step>`` atomically (see the module docstring); every process calls it.

    :param train_state: JSON-able loop state (data position, counters, accumulation step) returned by
        :func:`load_checkpoint` on resume.
    :param config: the run's arguments, stored for the record and for ``sample_unet.py``.
    :param total_limit: keep at most this many checkpoints (never the newest, nor those in ``keep``).
    :param extra_files: {file name: JSON-able dict} stored beside the state (e.g. the model's config.json).
    :param extra_models: {sub-directory: model} saved with ``save_pretrained`` (e.g. a frozen text encoder); one
        unchanged since the newest checkpoint is hard-linked to its files there (see the module docstring).
    """
    dist = _Dist(accelerator)
    output_dir = Path(output_dir)
    final = output_dir / f"{PREFIX}{step}"
    tmp = output_dir / f"{TMP_PREFIX}{final.name}"
    # Collectives first, on every process: FSDP gathers shards here.
    model_sd = full_model_state_dict(model)
    ema_sd = ema_state_dict(model, ema) if ema is not None else None
    optim_sd = optimizer_state_dict(model, optimizer) if optimizer is not None else None
    if dist.is_main:
        output_dir.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    dist.barrier()
    buffer = io.BytesIO()
    torch.save(capture_rng_state(generators), buffer)
    atomic_write_bytes(tmp / rng_file(dist.rank), buffer.getvalue())
    _pause()
    if dist.is_main:
        save_state_dict(model_sd, tmp / MODEL_FILE, metadata={"format": "pt"})
        _pause()
        if ema_sd is not None:
            meta = {k: v for k, v in ema.state_dict().items() if k != "shadow"}
            save_state_dict(ema_sd, tmp / EMA_FILE, metadata={"format": "pt", "ema": json.dumps(meta)})
            _pause()
        if optim_sd is not None:
            tensors, skeleton = optimizer_to_safetensors(optim_sd)
            save_state_dict(tensors, tmp / OPTIMIZER_FILE, metadata={"skeleton": skeleton})
            _pause()
        if lr_scheduler is not None:
            _write_json(tmp / SCHEDULER_FILE, lr_scheduler.state_dict())
        if scaler is not None:
            _write_json(tmp / SCALER_FILE, scaler.state_dict())
        for name, content in (extra_files or {}).items():
            _write_json(tmp / name, content)
        previous, previous_state, records, linked = latest_checkpoint(output_dir), None, {}, {}
        if previous is not None and extra_models:
            try:
                previous_state = read_state(previous)
            except (FileNotFoundError, ValueError, OSError):
                pass  # unreadable now: the extra models are written
        for name, module in (extra_models or {}).items():
            records[name], entries = _save_extra_model(module, name, tmp, previous, previous_state)
            linked.update(entries)  # the same bytes: their recorded size and SHA-256 carry over
    dist.barrier()  # every rank's RNG file is on disk
    if dist.is_main:
        files = {rel: linked.get(rel) or {"size": p.stat().st_size, "sha256": sha256_file(p)}
                 for p in sorted(tmp.rglob("*")) if p.is_file() for rel in [p.relative_to(tmp).as_posix()]}
        state = {"format_version": FORMAT_VERSION, "step": int(step), "world_size": dist.world,
                 "train_state": train_state or {}, "config": config or {}, "files": files,
                 "extra_models": records, "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
        _pause()
        _write_json(tmp / STATE_NAME, state)
        _publish(tmp, final)  # an existing step (a resumed run reaching it again) is replaced keeping a copy
        prune_checkpoints(output_dir, total_limit, keep=(*keep, final))
    dist.barrier()
    return final


def load_checkpoint(
    path: str | os.PathLike,
    *,
    model: nn.Module,
    optimizer=None,
    lr_scheduler=None,
    ema=None,
    scaler=None,
    generators: dict[str, torch.Generator] | None = None,
    accelerator=None,
    train_state_keys: tuple[str, ...] = (),
) -> dict:
    """Restore everything :func:`save_checkpoint` wrote, into already prepared objects; returns state.json.

    Call it after ``accelerator.prepare`` and after everything that draws random numbers at start-up, since it
    restores the RNG states last. A run on another number of processes loads weights and optimizer exactly;
    processes without an RNG file keep their fresh seeds (the run is then valid but not bit-identical).
    Every file is checked against its recorded SHA-256 first; ``train_state_keys`` are the keys the caller's
    ``train_state`` must hold.
    """
    path = Path(path)
    problem = checkpoint_problem(path, verify=True)
    if problem is not None:
        raise ValueError(f"checkpoint {str(path)!r} is not usable: {problem}")
    dist = _Dist(accelerator)
    state = read_state(path)
    check_model_config(path, model)
    missing = [k for k in train_state_keys if k not in state["train_state"]]
    if missing:
        raise ValueError(f"checkpoint {str(path / STATE_NAME)!r}: train_state lacks {missing}; it was written by "
                         "another script or version")
    if ema is not None:
        if not (path / EMA_FILE).is_file():
            raise FileNotFoundError(f"{str(path / EMA_FILE)!r} is missing: the checkpoint was saved without EMA")
        from safetensors import safe_open

        with safe_open(str(path / EMA_FILE), "pt") as f:
            meta = json.loads(f.metadata()["ema"])
        # Load the average into the model, read it back as a fresh EMA would (local shards under FSDP).
        load_model_state(model, load_state_dict(path / EMA_FILE))
        fresh = type(ema)(model)
        ema.load_state_dict({**meta, "shadow": dict(zip(fresh.names, fresh.shadow))})
    load_model_state(model, load_state_dict(path / MODEL_FILE))
    if optimizer is not None:
        from safetensors import safe_open

        with safe_open(str(path / OPTIMIZER_FILE), "pt") as f:
            skeleton = f.metadata()["skeleton"]
        load_optimizer_state(model, optimizer, optimizer_from_safetensors(load_state_dict(path / OPTIMIZER_FILE),
                                                                           skeleton))
    if lr_scheduler is not None:
        # The schedule's shape (warm-up, total steps) comes from the current run's arguments, so a run can be
        # extended; its position (last_epoch) and base lrs come from the checkpoint.
        sched_state = read_json(path / SCHEDULER_FILE, "scheduler state")
        if "lr_lambdas" in sched_state:
            sched_state["lr_lambdas"] = [None] * len(sched_state["lr_lambdas"])
        lr_scheduler.load_state_dict(sched_state)
    if scaler is not None:
        if (path / SCALER_FILE).is_file():
            scaler.load_state_dict(read_json(path / SCALER_FILE, "grad-scaler state"))
        else:
            logger.warning("%s has no grad-scaler state (saved without fp16); the scaler starts fresh", path)
    rng = path / rng_file(dist.rank)
    if rng.is_file():
        restore_rng_state(torch.load(rng, weights_only=True), generators)
    else:
        logger.warning("%s has no RNG state for process %d (saved with %d processes); this process keeps its "
                       "fresh seed, so the run is not bit-identical to an uninterrupted one",
                       path, dist.rank, state.get("world_size", 1))
    return state


def _model_class(model: nn.Module) -> type[nn.Module]:
    """The registered class of ``model``: FSDP2 swaps in a subclass (``FSDPUNet``) whose name is not registered."""
    from visionformers.registry import model_classes

    known = model_classes()
    return next((c for c in type(model).__mro__ if c.__name__ in known), type(model))


def exported_parts(model: nn.Module) -> dict[str, str]:
    """{sub-directory: sub-module name} of what exporting ``model`` writes: the model itself in the directory
    (``{"": ""}``), or, for a module that trains several models as one and says so in ``exported_parts`` (e.g.
    ``JointTextDenoiser``: the denoiser, and its text encoder in ``text_encoder/``), each model in its own."""
    return getattr(unwrap_model(model), "exported_parts", {"": ""})


def split_state_dict(state: dict[str, torch.Tensor], parts: dict[str, str]) -> dict[str, dict[str, torch.Tensor]]:
    """A state dict of a module with :func:`exported_parts` -> {sub-directory: the state dict of that part}; a
    tensor that belongs to no part is a ValueError."""
    out = {sub: {} for sub in parts}
    for key, value in state.items():
        sub = next((sub for sub, name in parts.items() if not name or key.startswith(name + ".")), None)
        if sub is None:
            raise ValueError(f"state dict entry {key!r} belongs to none of the parts {sorted(parts.values())}")
        name = parts[sub]
        out[sub][key[len(name) + 1:] if name else key] = value
    return out


def _main_part(model: nn.Module) -> nn.Module:
    """The unwrapped model, or for a module of :func:`exported_parts` the part exported in the directory itself."""
    base = unwrap_model(model)
    return base.get_submodule(exported_parts(base)[""])


def check_model_config(path: str | os.PathLike, model: nn.Module) -> None:
    """A ValueError naming the fields when the checkpoint's ``config.json`` (where it has one) describes another
    network than ``model``: a preset whose defaults changed, or other ``--model_overrides``, would otherwise fail
    deep in ``load_state_dict`` or, worse, load into a network of the same shapes that computes something else."""
    path = Path(path)
    if not (path / CONFIG_NAME).is_file():
        return
    cls, saved = read_config(path)  # fields added since the checkpoint was written read as their defaults
    base = _main_part(model)
    if cls is not _model_class(base):
        raise ValueError(f"checkpoint {str(path)!r} holds a {cls.__name__}; this run builds a "
                         f"{_model_class(base).__name__}: pass the checkpoint's --model")
    saved, built = config_to_dict(saved), config_to_dict(base.config)
    diffs = [f"{k}={saved[k]!r} (this run: {built[k]!r})" for k in saved if saved[k] != built.get(k)]
    if diffs:
        raise ValueError(f"checkpoint {str(path)!r} holds a {cls.__name__} with {', '.join(diffs)}; pass these "
                         "fields in --model_overrides to resume it")


def model_config_json(model: nn.Module) -> dict:
    """The ``config.json`` content of ``save_pretrained`` for ``model`` (for a module of :func:`exported_parts`, its
    main part, the one exported in the directory itself), so a checkpoint rebuilds its model."""
    base = _main_part(model)
    return {"architecture": _model_class(base).__name__, "format_version": HUB_FORMAT_VERSION,
            "config": config_to_dict(base.config)}


# ---- the exported model -------------------------------------------------------------------------------


def export_pretrained(model: nn.Module, save_directory: str | os.PathLike, ema=None, extra_files: dict | None = None,
                      accelerator=None, extra_models: dict[str, nn.Module] | None = None) -> Path:
    """Write a ``from_pretrained`` directory (the EMA weights when given) atomically; every process calls it.

    A module that trains several models as one (:func:`exported_parts`) writes each part in its sub-directory.
    ``extra_files``: {name: JSON-able dict} written beside config.json (e.g. the diffusion settings);
    ``extra_models``: {sub-directory: model} saved with ``save_pretrained`` (e.g. a frozen text encoder). The
    directory appears under its final name only when complete; an older export is replaced.
    """
    dist = _Dist(accelerator)
    state = ema_state_dict(model, ema) if ema is not None else full_model_state_dict(model)
    out = Path(save_directory)
    if dist.is_main:
        tmp = out.with_name(f"{TMP_PREFIX}{out.name}")
        shutil.rmtree(tmp, ignore_errors=True)
        base = unwrap_model(model)
        parts = exported_parts(base)
        for sub, part_state in split_state_dict(state, parts).items():
            part = base.get_submodule(parts[sub])
            with torch.device("meta"):  # an empty shell of the same class and config, filled with the full weights
                shell = _model_class(part)(part.config)
            shell.load_state_dict(part_state, strict=True, assign=True)
            save_pretrained(shell, tmp / sub)
        for name, data in (extra_files or {}).items():
            _write_json(tmp / name, data)
        for name, module in (extra_models or {}).items():
            save_pretrained(module, tmp / name)
        _publish(tmp, out)
    dist.barrier()
    return out


__all__ = [
    "PREFIX", "STATE_NAME", "CONFIG_NAME", "WEIGHTS_NAME", "checkpoint_step", "read_state", "validate_state", "is_complete",
    "checkpoint_problem", "sha256_file", "recover_interrupted",
    "list_checkpoints", "latest_checkpoint", "resolve_checkpoint", "prune_checkpoints", "remove_stale",
    "full_model_state_dict", "load_model_state", "ema_state_dict", "optimizer_to_safetensors",
    "optimizer_from_safetensors", "exported_parts", "split_state_dict", "check_model_config", "model_config_json",
    "model_fingerprint",
    "save_checkpoint",
    "load_checkpoint", "export_pretrained",
]
