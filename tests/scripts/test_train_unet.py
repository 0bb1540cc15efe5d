"""train_unet.py end to end on CPU: multi-process launch + resume + sampling, exact resume, NaN guard, trackers."""
import json
import time

import pytest
from _unet_script_helpers import (
    SAMPLE,
    TINY,
    TRAIN,
    assert_same_files,
    load_script,
    run,
)

from visionformers.training import checkpoint as ckpt


def test_two_processes_train_resume_then_sample(tmp_path):
    split, straight = tmp_path / "split", tmp_path / "straight"
    common = [*TINY, "--max_train_steps", "6", "--checkpointing_steps", "3"]
    run(TRAIN, [*common, "--output_dir", str(split), "--stop_after_steps", "3"], nproc=2)
    first = ckpt.latest_checkpoint(split)
    assert first.name == "checkpoint-3" and {"rng-0.pt", "rng-1.pt"} <= {p.name for p in first.iterdir()}
    assert not (split / "model").exists()  # stopped early: no export yet
    out = run(TRAIN, [*common, "--output_dir", str(split), "--resume_from_checkpoint", "latest"], nproc=2)
    assert "at step 3" in out.stdout + out.stderr
    state = ckpt.read_state(split / "checkpoint-6")
    assert state["train_state"]["step"] == 6 and state["world_size"] == 2
    assert (split / "model" / "model.safetensors").is_file() and (split / "samples.png").is_file()
    # the same 6 steps without a break: equal up to fp32 round-off (gloo all-reduce order)
    run(TRAIN, [*common, "--output_dir", str(straight)], nproc=2)
    assert_same_files(split / "checkpoint-6", straight / "checkpoint-6", atol=1e-6)

    # sampling: 2 processes and 1 process give the same images for the same seed
    args = ["--model_path", str(split / "model"), "--num_images", "5", "--batch_size", "2",
            "--num_inference_steps", "3", "--sampler", "ddpm"]
    run(SAMPLE, [*args, "--output_dir", str(tmp_path / "s2")], nproc=2)
    run(SAMPLE, [*args, "--output_dir", str(tmp_path / "s1")])
    for name in ["grid.png", *[f"images/{i:06d}.png" for i in range(5)]]:
        assert (tmp_path / "s1" / name).read_bytes() == (tmp_path / "s2" / name).read_bytes(), name
    record = json.loads((tmp_path / "s2" / "settings.json").read_text())
    assert record["num_processes"] == 2 and [im["seed"] for im in record["images"]] == [0, 1, 2, 3, 4]
    assert [im["class_label"] for im in record["images"]] == [0, 1, 2, 3, 4]


def test_resume_is_bit_identical_with_gradient_accumulation(tmp_path):
    common = [*TINY, "--max_train_steps", "6", "--checkpointing_steps", "3", "--gradient_accumulation_steps", "2",
              "--dataloader_num_workers", "0"]
    run(TRAIN, [*common, "--output_dir", str(tmp_path / "a")])
    run(TRAIN, [*common, "--output_dir", str(tmp_path / "b"), "--stop_after_steps", "3"])
    run(TRAIN, [*common, "--output_dir", str(tmp_path / "b"), "--resume_from_checkpoint", "latest"])
    a, b = tmp_path / "a" / "checkpoint-6", tmp_path / "b" / "checkpoint-6"
    assert_same_files(a, b)
    assert (a / "scheduler.json").read_text() == (b / "scheduler.json").read_text()
    sa, sb = ckpt.read_state(a)["train_state"], ckpt.read_state(b)["train_state"]
    assert sa == sb and sa["accumulation_step"] == 12
    assert_same_files(tmp_path / "a" / "model", tmp_path / "b" / "model", names=("model.safetensors",))


def test_nan_loss_is_skipped_counted_and_stops_after_k(tmp_path, capsys):
    train = load_script(TRAIN)
    out = tmp_path / "nan"
    train.main([*TINY, "--max_train_steps", "4", "--checkpointing_steps", "4", "--output_dir", str(out),
                "--debug_inject_nan_at", "2", "--max_bad_steps", "2"])
    state = ckpt.read_state(out / "checkpoint-4")["train_state"]
    assert state["bad_steps"] == {"total": 1, "consecutive": 0}
    with pytest.raises(SystemExit, match=r"2 consecutive steps.*lower --learning_rate"):
        train.main([*TINY, "--max_train_steps", "6", "--output_dir", str(tmp_path / "stop"),
                    "--debug_inject_nan_at", "2", "3", "--max_bad_steps", "2"])


def test_wandb_offline_run_has_loss_and_images(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb_root"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    train = load_script(TRAIN)
    train.main([*TINY, "--max_train_steps", "4", "--checkpointing_steps", "0", "--sample_every", "2",
                "--output_dir", str(tmp_path / "out"), "--report_to", "wandb"])
    runs = list((tmp_path / "wandb_root" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    run_dir = runs[0]

    def logged() -> bool:
        history = b"".join(p.read_bytes() for p in run_dir.glob("*.wandb"))
        return b"train/loss" in history and b"samples" in history

    # wandb's service process writes the run file on its own schedule; on a loaded machine the last records
    # can land shortly after finish() returns, so poll (bounded) instead of reading once.
    deadline = time.monotonic() + 120
    while not logged() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert logged(), sorted(p.name for p in run_dir.rglob("*"))
    assert list((run_dir / "files" / "media" / "images").glob("samples_*.png"))


def test_tensorboard_events_have_loss_and_images(tmp_path):
    train = load_script(TRAIN)
    train.main([*TINY, "--max_train_steps", "4", "--checkpointing_steps", "0", "--sample_every", "2",
                "--output_dir", str(tmp_path), "--report_to", "tensorboard"])
    events = list((tmp_path / "logs").rglob("events.out.tfevents.*"))
    data = b"".join(p.read_bytes() for p in events)
    assert b"train/loss" in data and b"samples" in data


def test_early_stopping_ends_at_the_same_step_after_a_resume(tmp_path, capsys):
    # min_delta 100: only the first evaluation (step 2) improves; patience 2 stops at the third (step 6 of 20)
    common = [*TINY, "--max_train_steps", "20", "--checkpointing_steps", "10", "--eval_steps", "2",
              "--early_stopping_patience", "2", "--early_stopping_min_delta", "100", "--num_samples", "2"]
    train = load_script(TRAIN)
    train.main([*common, "--output_dir", str(tmp_path / "a")])
    assert "early stopping at step 6: eval_loss has not improved" in capsys.readouterr().out
    train.main([*common, "--output_dir", str(tmp_path / "b"), "--stop_after_steps", "3"])
    assert "early stopping" not in capsys.readouterr().out
    train.main([*common, "--output_dir", str(tmp_path / "b"), "--resume_from_checkpoint", "latest"])
    assert "early stopping at step 6" in capsys.readouterr().out
    for run_dir in ("a", "b"):
        assert [p.name for p in ckpt.list_checkpoints(tmp_path / run_dir)][-1] == "checkpoint-6"
        assert (tmp_path / run_dir / "model" / "model.safetensors").is_file()
    sa, sb = (ckpt.read_state(tmp_path / d / "checkpoint-6")["train_state"] for d in ("a", "b"))
    assert sa == sb and sa["callbacks"]["EarlyStopping"]["bad_evaluations"] == 2
    assert_same_files(tmp_path / "a" / "checkpoint-6", tmp_path / "b" / "checkpoint-6")


@pytest.mark.parametrize("flags, message", [
    (["--early_stopping_patience", "-1", "--eval_steps", "2"], "early_stopping_patience"),
    (["--early_stopping_patience", "2", "--eval_steps", "2", "--early_stopping_metric", "fid"], "early_stopping_metric"),
    (["--early_stopping_patience", "2"], "--eval_steps"),
])
def test_early_stopping_bad_flags(tmp_path, flags, message):
    with pytest.raises(ValueError, match=message):
        load_script(TRAIN).main([*TINY, "--max_train_steps", "2", "--output_dir", str(tmp_path), *flags])
