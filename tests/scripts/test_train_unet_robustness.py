"""train_unet.py and friends when things go wrong (issue items 3, 6, 13, 14): another run's directory, SIGTERM and
Ctrl-C, small folders, and a one-line answer that names the fix for each listed mistake."""
import math
import multiprocessing as mp
import os
import signal
import sys
import time

import pytest
import torch
from _unet_script_helpers import REPO, SAMPLE, TINY, TRAIN, load_script
from test_train_unet_kill import _own_tqdm_lock
from PIL import Image
from safetensors.torch import load_file, save_file

import visionformers as vf
from visionformers.training import checkpoint as ckpt
from visionformers.training import sampling


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A finished 2-step run (checkpoint, model/): the directory several tests start from."""
    out = tmp_path_factory.mktemp("trained") / "run"
    load_script(TRAIN).main([*TINY, "--max_train_steps", "2", "--checkpointing_steps", "2", "--output_dir", str(out)])
    return out


def test_item3_a_new_run_into_another_runs_directory_is_refused(trained):
    train = load_script(TRAIN)
    with pytest.raises(ValueError, match=r"holds another run .*--max_train_steps 3 \(saved: 2\).*resume it"):
        train.main([*TINY, "--max_train_steps", "3", "--output_dir", str(trained)])
    with pytest.raises(ValueError, match=r"cannot resume .*--resolution 16 \(saved: 8\)"):
        train.main([*TINY, "--resolution", "16", "--max_train_steps", "3", "--output_dir", str(trained),
                    "--resume_from_checkpoint", "latest"])
    assert ckpt.is_complete(trained / "checkpoint-2", verify=True)


def _child(argv, log):
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(fd, 1), os.dup2(fd, 2)
    sys.stdout = sys.stderr = open(fd, "w", buffering=1, closefd=False)
    _own_tqdm_lock()
    torch.set_num_threads(1)
    try:
        load_script(TRAIN).main(argv)
    except SystemExit as e:
        code = e.code
        if isinstance(code, str):
            print(code)
        os._exit(code if isinstance(code, int) else 1)
    os._exit(0)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_item6_a_signal_saves_a_checkpoint_at_the_next_step_and_exits_with_one_line(tmp_path, sig):
    out, log = tmp_path / "run", tmp_path / "log"
    argv = [*TINY, "--max_train_steps", "100000", "--checkpointing_steps", "0", "--output_dir", str(out)]
    p = mp.get_context("fork").Process(target=_child, args=(argv, str(log)))
    p.start()
    end = time.time() + 120
    while time.time() < end and not (log.exists() and "training steps" in log.read_text()):
        time.sleep(0.01)
    time.sleep(0.5)
    os.kill(p.pid, sig)
    p.join(timeout=120)
    text = log.read_text()
    assert p.exitcode == 128 + sig, text
    assert "Traceback" not in text and "KeyboardInterrupt" not in text
    latest = ckpt.latest_checkpoint(out)
    step = ckpt.read_state(latest)["step"]
    assert step >= 1 and f"stopped at step {step} of 100000 ({sig.name}); checkpoint-{step}" in text
    assert not (out / ".lock").exists()


def test_item13_a_small_folder_names_the_flag_to_change(tmp_path):
    for i in range(6):
        Image.new("RGB", (8, 8), (i * 30, 0, 0)).save(tmp_path / f"{i}.png")
    with pytest.raises(ValueError, match=r"--train_batch_size=64 is not accepted; expected at most 6 .*lower "
                                         r"--train_batch_size"):
        load_script(TRAIN).main(["--train_data_dir", str(tmp_path), "--conditioning", "none", "--output_dir",
                                 str(tmp_path / "out")])


# ---- item 14: one line that names the fix ----


@pytest.mark.parametrize("argv, message", [
    (["--resolution", "12"], r"attention_resolutions must be among the feature-map sizes"),
    (["--model", "vit_tiny_patch4_32"], r"^--model=vit_tiny_patch4_32 at --resolution=8: model 'vit_tiny_patch4_32' "
                                        r"is a VisionTransformer, not a denoiser"),
])
def test_item14_train_unet_model_mistakes(tmp_path, argv, message):
    with pytest.raises(ValueError, match=message):
        load_script(TRAIN).main([*argv, "--max_train_steps", "1", "--output_dir", str(tmp_path)])


def test_item14_flat_folder_with_class_conditioning(tmp_path, capsys):
    from visionformers._validate import script_errors

    for i in range(2):
        Image.new("RGB", (8, 8)).save(tmp_path / f"{i}.png")
    with pytest.raises(SystemExit, match=r"^error: --conditioning class needs class subfolders .*--conditioning none"):
        script_errors(load_script(TRAIN).main)(["--train_data_dir", str(tmp_path), "--output_dir",
                                                str(tmp_path / "out")])


def test_item14_sampling_an_output_dir_and_a_diverged_sampler(trained, tmp_path):
    sample = load_script(SAMPLE)
    with pytest.raises(FileNotFoundError, match=rf"training output directory; pass its exported model, "
                                                rf"'{trained}/model'"):
        sample.main(["--model_path", str(trained)])
    bad = tmp_path / "model"
    bad.mkdir()
    for f in (trained / "model").iterdir():
        if f.is_file():
            (bad / f.name).write_bytes(f.read_bytes())
    weights = load_file(str(bad / "model.safetensors"))
    save_file({k: torch.full_like(v, math.nan) for k, v in weights.items()}, str(bad / "model.safetensors"))
    with pytest.raises(ValueError, match=r"non-finite value\(s\) \(NaN or inf\).*no image is written"):
        sample.main(["--model_path", str(bad), "--num_images", "2", "--num_inference_steps", "2",
                     "--output_dir", str(tmp_path / "samples")])
    assert not (tmp_path / "samples" / "grid.png").exists()
    with pytest.raises(ValueError, match="non-finite"):
        sampling.make_grid(torch.full((1, 1, 2, 2), math.inf))


def test_item14_stop_after_steps_and_fsdp_on_cpu_say_so(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    load_script(TRAIN).main([*TINY, "--max_train_steps", "4", "--stop_after_steps", "2", "--checkpointing_steps",
                             "2", "--output_dir", str(tmp_path)])
    captured = capsys.readouterr()
    assert "stopped at step 2 of 4 (--stop_after_steps); checkpoint-2" in captured.out
    assert "asks for FSDP, which needs CUDA; running one process" in captured.err


def test_item14_generate_with_nan_temperature():
    model = vf.create_model("gpt_tiny", vocab_size=64, max_len=16, dim=16, depth=1, num_heads=2, eos_token_id=None)
    with pytest.raises(ValueError, match=r"temperature=nan is not accepted"):
        model.generate(torch.zeros(1, 2, dtype=torch.long), 2, do_sample=True, temperature=float("nan"))


def test_item14_torchvision_weights_on_one_channel_data(tmp_path):
    from torchvision.models import VisionTransformer

    ref = VisionTransformer(image_size=8, patch_size=4, num_layers=1, num_heads=2, hidden_dim=16, mlp_dim=32,
                            num_classes=10)
    torch.save(ref.state_dict(), tmp_path / "tv.pth")
    script = load_script(REPO / "train_scripts" / "train_classifier.py")
    with pytest.raises(SystemExit, match=r"^error: .*takes 3-channel images, the data gives 1: pass --channels 3"):
        script.main(["--init_checkpoint", str(tmp_path / "tv.pth"), "--init_format", "torchvision",
                     "--image_size", "8", "--epochs", "1", "--output_dir", str(tmp_path / "out")])
