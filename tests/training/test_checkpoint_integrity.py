"""Checkpoints that defend themselves (issue items 1, 2, 4, 5, 8): damaged checkpoints are skipped or refused,
never overwritten; a re-saved step keeps its last complete copy; checksums, links, fsync, validated state.json,
resume checks, and file modes that follow the umask."""
import json
import logging
import os
import stat

import pytest
import torch
from test_checkpoint import _registered, _save, _setup, _train  # noqa: F401  (_registered: autouse fixture)

from visionformers.training import checkpoint as ckpt
from visionformers.training import run_dir


def _two_checkpoints(tmp_path):
    objs = _setup()
    _train(*objs, 2)
    first = _save(tmp_path, 2, *objs)
    _train(*objs, 2)
    return first, _save(tmp_path, 4, *objs), objs


def test_item1_latest_skips_malformed_with_a_warning_and_refuses_when_only_damaged(tmp_path, caplog):
    first, newest, _ = _two_checkpoints(tmp_path)
    state = json.loads((newest / "state.json").read_text())
    state["files"] = list(state["files"])  # malformed: a list, which used to crash `latest` for the whole directory
    (newest / "state.json").write_text(json.dumps(state))
    with caplog.at_level(logging.WARNING):
        assert ckpt.resolve_checkpoint(tmp_path, "latest") == first
    assert "checkpoint-4" in caplog.text and "skipped" in caplog.text
    # the only remaining checkpoint truncated: `latest` refuses, naming both, instead of starting over on top of them
    model = first / ckpt.MODEL_FILE
    model.write_bytes(model.read_bytes()[:-10])
    with pytest.raises(ValueError, match=r"no usable checkpoint.*checkpoint-4.*checkpoint-2"):
        ckpt.resolve_checkpoint(tmp_path, "latest")
    assert ckpt.resolve_checkpoint(tmp_path / "fresh", "latest") is None  # nothing at all: a new run


def test_item2_a_kill_while_a_step_is_resaved_keeps_its_last_complete_copy(tmp_path, monkeypatch):
    objs = _setup()
    _train(*objs, 2)
    _save(tmp_path, 2, *objs)
    real_replace, calls = os.replace, []

    def replace(src, dst):  # the kill: after the old copy moved aside, before the new one is renamed into place
        calls.append((str(src), str(dst)))
        if str(src).endswith(".tmp-checkpoint-2"):
            raise KeyboardInterrupt("killed")
        return real_replace(src, dst)

    monkeypatch.setattr(ckpt.os, "replace", replace)
    with pytest.raises(KeyboardInterrupt):
        _save(tmp_path, 2, *objs)
    monkeypatch.setattr(ckpt.os, "replace", real_replace)
    assert not (tmp_path / "checkpoint-2").exists() and (tmp_path / ".prev-checkpoint-2").is_dir()
    ckpt.remove_stale(tmp_path)  # the next start: the old copy is put back, the temporary removed
    assert ckpt.is_complete(tmp_path / "checkpoint-2", verify=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-2"]
    _save(tmp_path, 2, *objs)  # a completed re-save leaves one copy
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-2"]


def test_item4_checksums_links_and_fsync(tmp_path, monkeypatch):
    synced, real_fsync = [], os.fsync

    def fsync(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}") if os.path.exists("/proc/self/fd") else str(fd))
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    first, newest, objs = _two_checkpoints(tmp_path)
    monkeypatch.setattr(os, "fsync", real_fsync)
    if os.path.exists("/proc/self/fd"):  # every data file was fsynced under its temporary name, before publishing
        for name in (ckpt.MODEL_FILE, ckpt.EMA_FILE, ckpt.OPTIMIZER_FILE, ckpt.rng_file(0), "scheduler.json"):
            assert any(f"/.tmp-checkpoint-4/.{name}." in p for p in synced), name
    state = json.loads((newest / "state.json").read_text())
    assert all(len(e["sha256"]) == 64 for e in state["files"].values())
    # 1000 bytes overwritten in place, same size: resume refuses, naming the file
    f = newest / ckpt.OPTIMIZER_FILE
    data = bytearray(f.read_bytes())
    data[-1000:] = b"\xff" * 1000
    f.write_bytes(bytes(data))
    assert ckpt.is_complete(newest) and not ckpt.is_complete(newest, verify=True)
    model, opt, sched, ema, gen = objs
    with pytest.raises(ValueError, match="optimizer.safetensors.*SHA-256"):
        ckpt.load_checkpoint(newest, model=model, optimizer=opt)
    assert ckpt.resolve_checkpoint(tmp_path, "latest") == first
    # a link inside a checkpoint is refused
    (first / "scaler.json").symlink_to("/etc/hostname")
    assert "symbolic link" in ckpt.checkpoint_problem(first)
    with pytest.raises(ValueError, match="symbolic link"):
        ckpt.load_checkpoint(first, model=model)


@pytest.mark.parametrize("edit, message", [
    (lambda s: s.update(step=-100), "step=-100"),
    (lambda s: s.update(step="10"), "step='10'"),
    (lambda s: s.pop("files"), "required key"),
    (lambda s: s.update(step=3), "says step 3"),
    (lambda s: s["files"].update({"../escape": {"size": 1, "sha256": "0" * 64}}), "leaves the checkpoint"),
])
def test_item5_state_json_values_are_validated(tmp_path, edit, message):
    objs = _setup()
    path = _save(tmp_path, 2, *objs)
    state = json.loads((path / "state.json").read_text())
    state["train_state"].pop("step", None)
    edit(state)
    (path / "state.json").write_text(json.dumps(state))
    with pytest.raises(ValueError, match=message):
        ckpt.load_checkpoint(path, model=objs[0])
    missing = _save(tmp_path, 4, *objs)
    with pytest.raises(ValueError, match=r"train_state lacks \['data'\]"):
        ckpt.load_checkpoint(missing, model=objs[0], train_state_keys=("data",))


def test_item5_resume_checks_name_differing_arguments_and_warn_on_schedule_changes(tmp_path, caplog):
    objs = _setup()
    args = {"model": "unet_tiny", "resolution": 8, "conditioning": "class", "noise_schedule": "cosine",
            "max_train_steps": 20, "learning_rate": 1e-3}
    path = _save(tmp_path, 4, *objs, config=args)
    with pytest.raises(ValueError, match=r"--model \"dit_tiny\" \(saved: \"unet_tiny\"\); --resolution 16"):
        run_dir.check_resume(path, {**args, "model": "dit_tiny", "resolution": 16})
    with pytest.raises(ValueError, match="--noise_schedule"):
        run_dir.check_resume(path, {**args, "noise_schedule": "linear"})
    with pytest.raises(ValueError, match="past --max_train_steps 2"):
        run_dir.check_resume(path, {**args, "max_train_steps": 2})
    with caplog.at_level(logging.WARNING):
        run_dir.check_resume(path, {**args, "max_train_steps": 40, "learning_rate": 5e-4}, world_size=2)
    assert "--max_train_steps 40 (saved: 20): the lr schedule" in caplog.text
    assert "checkpoint of 1 process(es) on 2" in caplog.text


def test_item8_files_follow_the_umask(tmp_path):
    objs = _setup()
    old = os.umask(0o027)
    try:
        path = _save(tmp_path, 2, *objs)
        out = ckpt.export_pretrained(objs[0], tmp_path / "model", ema=objs[3], extra_files={"extra.json": {}})
    finally:
        os.umask(old)
    files = [p for d in (path, out) for p in d.rglob("*") if p.is_file()]
    assert len(files) > 8
    for p in files:
        assert stat.S_IMODE(p.stat().st_mode) == 0o640, p
    torch.load(path / ckpt.rng_file(0), weights_only=True)  # still a torch file after the atomic write
