"""train_vae.py on CPU: a tiny run with reconstruction grids and a scaled export, bit-exact resume, the perceptual
loss through a feature extractor, bad input."""
from __future__ import annotations

import pytest
from _unet_script_helpers import REPO, assert_same_files, load_script

import visionformers as vf
from visionformers.training import checkpoint as ckpt

TINY = ["--model_overrides", '{"block_out_channels": [8, 8], "norm_num_groups": 4, "sample_size": 8}',
        "--resolution", "8", "--train_batch_size", "8", "--num_samples", "4", "--lr_warmup_steps", "1",
        "--logging_steps", "2"]


@pytest.fixture(scope="module")
def train():
    return load_script(REPO / "train_scripts" / "train_vae.py").main


def test_tiny_run_resumes_bit_exact_and_exports_a_scaled_vae(tmp_path, train):
    common = [*TINY, "--max_train_steps", "4", "--checkpointing_steps", "2", "--use_ema"]
    train([*common, "--output_dir", str(tmp_path / "a")])
    train([*common, "--output_dir", str(tmp_path / "b"), "--stop_after_steps", "2"])
    assert not (tmp_path / "b" / "model").exists()
    train([*common, "--output_dir", str(tmp_path / "b"), "--resume_from_checkpoint", "latest"])
    assert_same_files(tmp_path / "a" / "checkpoint-4", tmp_path / "b" / "checkpoint-4")
    assert ckpt.read_state(tmp_path / "b" / "checkpoint-4")["train_state"]["step"] == 4
    assert_same_files(tmp_path / "a" / "model", tmp_path / "b" / "model", names=("model.safetensors",))
    vae = vf.from_pretrained(tmp_path / "b" / "model")
    assert vae.config.in_channels == 1 and vae.config.scaling_factor != 1.0  # measured on the digits' latents
    assert (tmp_path / "b" / "samples.png").is_file()


def test_perceptual_loss_and_mse(tmp_path, train):
    train([*TINY, "--max_train_steps", "1", "--checkpointing_steps", "0", "--reconstruction_loss", "mse",
           "--perceptual_model", "random_conv:0", "--no-scale_latents", "--output_dir", str(tmp_path / "p")])
    assert vf.from_pretrained(tmp_path / "p" / "model").config.scaling_factor == 1.0  # vae_tiny's own


def test_bad_inputs(tmp_path, train):
    with pytest.raises(ValueError, match="--resolution=9.*factor 2"):
        train([*TINY, "--resolution", "9", "--output_dir", str(tmp_path / "o")])
    with pytest.raises(ValueError, match="--kl_weight"):
        train([*TINY, "--kl_weight", "-1", "--output_dir", str(tmp_path / "o")])
    with pytest.raises(ValueError, match="--random_flip"):
        train([*TINY, "--random_flip", "--output_dir", str(tmp_path / "o")])
    with pytest.raises(ValueError, match="feature_extractor"):
        train([*TINY, "--perceptual_model", "nonsense", "--output_dir", str(tmp_path / "o")])


def test_another_runs_directory_is_refused_and_a_signal_checkpoints(tmp_path, train, monkeypatch):
    """The output-dir lock, run identity and stop-on-signal machinery of train_unet.py, here too."""
    import os
    import signal

    from visionformers.training import stop

    out = tmp_path / "run"
    train([*TINY, "--max_train_steps", "2", "--checkpointing_steps", "2", "--output_dir", str(out)])
    with pytest.raises(ValueError, match=r"holds another run .*--max_train_steps 3 \(saved: 2\)"):
        train([*TINY, "--max_train_steps", "3", "--output_dir", str(out)])
    polls = []

    def requested(self):  # the signal arrives during step 2: the loop sees it at the next step boundary
        polls.append(1)
        if len(polls) == 2 and self.signum is None:
            os.kill(os.getpid(), signal.SIGTERM)
        return self.signum is not None

    monkeypatch.setattr(stop.StopOnSignal, "requested", requested)
    with pytest.raises(SystemExit) as info:
        train([*TINY, "--max_train_steps", "50", "--checkpointing_steps", "0", "--output_dir", str(tmp_path / "b")])
    assert info.value.code == 128 + signal.SIGTERM
    assert ckpt.read_state(ckpt.latest_checkpoint(tmp_path / "b"))["step"] == 2
    assert not (tmp_path / "b" / ".lock").exists()
