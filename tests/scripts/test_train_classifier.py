"""train_classifier.py end to end on CPU: two processes under `accelerate launch` (metrics gathered exactly), a
one-process run from a timm checkpoint file, an image folder, and one-line errors for bad arguments."""
import json
import subprocess
import sys

import pytest
import torch
from _unet_script_helpers import REPO, _env, load_script, run

import visionformers as vf
from visionformers import data
from visionformers.metrics import classifier_accuracy
from visionformers.training import pipeline

SCRIPT = REPO / "train_scripts" / "train_classifier.py"
# A few-thousand-parameter ViT on 8x8 digits: these tests check bookkeeping, not accuracy.
TINY = ["--model", "vit_tiny_patch4_32", "--model_overrides", '{"depth": 1, "embed_dim": 16, "num_heads": 2}',
        "--image_size", "8", "--train_batch_size", "8", "--eval_batch_size", "50", "--dataloader_num_workers", "0",
        "--warmup_epochs", "0.5"]


def _reevaluate(best_dir) -> tuple[int, int]:
    """(correct, total) of the saved best model on the digits test split, in this process."""
    model = vf.from_pretrained(best_dir).eval()
    pre = json.loads((best_dir / "preprocess.json").read_text())
    tf = data.classification_eval_transform(pre["image_size"], crop_pct=1.0, mean=pre["mean"], std=pre["std"])
    test = data.DigitsDataset("test", pre["image_size"], pre["channels"], captions=False, transform=tf)
    result = classifier_accuracy(model, test, topk=(1,))
    return round(result.top1 * result.num_samples), result.num_samples


def test_two_processes_gather_every_test_image_once(tmp_path):
    out = tmp_path / "run"
    proc = run(SCRIPT, [*TINY, "--epochs", "2", "--max_steps_per_epoch", "3", "--output_dir", str(out)], nproc=2)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [0, 1] and [r["step"] for r in rows] == [3, 6]
    assert "(n=364)" in proc.stdout  # 364 test images over 2 processes, 50 per batch: padding dropped
    saved = json.loads((out / "best" / "metrics.json").read_text())
    assert saved["top1"] == max(r["top1"] for r in rows) and saved["num_samples"] == 364
    correct, total = _reevaluate(out / "best")
    assert total == 364 and correct == round(saved["top1"] * 364)  # gathered top-1 == one-process top-1


def test_one_process_from_a_timm_checkpoint(tmp_path):
    import timm
    ref = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=8, patch_size=4, embed_dim=16,
                            depth=1, num_heads=2, num_classes=10).eval()
    with torch.no_grad():
        ref.head.weight.normal_(0, 0.5)  # a trained-looking head: logits that differ between classes
    torch.save(ref.state_dict(), tmp_path / "timm.pth")
    out = tmp_path / "run"
    # a learning rate of 1e-12 leaves the weights as loaded: the best checkpoint must reproduce timm's logits
    load_script(SCRIPT).main([*TINY, "--init_checkpoint", str(tmp_path / "timm.pth"), "--init_format", "timm",
                              "--channels", "3", "--learning_rate", "1e-12", "--weight_decay", "0", "--epochs", "1",
                              "--max_steps_per_epoch", "1", "--output_dir", str(out)])
    model = vf.from_pretrained(out / "best").eval()
    x = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x), rtol=1e-4, atol=1e-5)


def test_image_folder_classes(tmp_path):
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    for split in ("train", "val"):
        for c, name in enumerate(["cat", "dog"]):
            (tmp_path / split / name).mkdir(parents=True)
            for i in range(4):
                pixels = (torch.rand(12, 12, 3, generator=g) * 255 * (c + 1) / 2).to(torch.uint8).numpy()
                Image.fromarray(pixels).save(tmp_path / split / name / f"{i}.png")
    out = tmp_path / "run"
    load_script(SCRIPT).main([*TINY, "--train_data_dir", str(tmp_path / "train"), "--val_data_dir",
                              str(tmp_path / "val"), "--train_batch_size", "4", "--epochs", "1", "--hflip", "0.5",
                              "--mixup_alpha", "0.2", "--cutmix_alpha", "1.0", "--output_dir", str(out)])
    pre = json.loads((out / "best" / "preprocess.json").read_text())
    assert pre["class_names"] == ["cat", "dog"] and pre["channels"] == 3
    assert vf.from_pretrained(out / "best").config.num_classes == 2


def test_digits_and_folders_get_their_own_recipe(tmp_path):
    script = load_script(SCRIPT)
    digits = script.parse_args([])
    folder = script.parse_args(["--train_data_dir", str(tmp_path), "--val_data_dir", str(tmp_path)])
    for args, recipe in ((digits, script.RECIPES["digits"]), (folder, script.RECIPES["folder"])):
        assert {k: getattr(args, k) for k in recipe} == recipe
    assert digits.randaugment_num_ops == 0 and folder.randaugment_num_ops > 0  # RandAugment stays for photos
    given = script.parse_args(["--randaugment_num_ops", "2", "--crop_scale_min", "0.35", "--learning_rate", "1e-3"])
    assert (given.randaugment_num_ops, given.crop_scale_min, given.learning_rate) == (2, 0.35, 1e-3)


@pytest.mark.parametrize("model", [None, "vit_tiny_patch4_32", "swin_tiny_patch2_window4_32"])
def test_from_scratch_on_digits_the_presets_shrink_unless_overridden(model, tmp_path):
    from accelerate import Accelerator

    script = load_script(SCRIPT)
    name = model or script.DIGITS_MODEL
    base = vf.create_model(name, num_classes=10, img_size=16, in_chans=1).config
    expected = vf.registry.replace_config(base, pipeline.json_config_fields(script.DIGITS_OVERRIDES[name]))
    args = script.parse_args([] if model is None else ["--model", model])
    built = script.setup(args, Accelerator(cpu=True))[0].config
    assert built == expected and built != base
    own = script.parse_args([*([] if model is None else ["--model", model]), "--model_overrides", "{}"])
    assert script.setup(own, Accelerator(cpu=True))[0].config == base  # explicit overrides (even none) win


@pytest.mark.parametrize("args, names", [
    (["--model", "vit_nope"], "vit_nope"),
    (["--model_overrides", '{"depth": -1}'], "depth"),
    (["--model_overrides", "{bad json"], "--model_overrides"),
    (["--image_size", "10"], "img_size"),
    (["--epochs", "0"], "--epochs"),
    (["--learning_rate", "-1"], "--learning_rate"),
    (["--layer_decay", "1.5"], "--layer_decay"),
    (["--pretrained", "/no/such/dir"], "/no/such/dir"),
    (["--init_checkpoint", "/no/such.pth", "--init_format", "timm"], "/no/such.pth"),
    (["--init_checkpoint", "/no/such.pth"], "--init_format"),
    (["--train_data_dir", "/no/train", "--val_data_dir", "/no/val"], "/no/train"),
    (["--train_data_dir", "/no/train"], "--val_data_dir"),
])
def test_bad_arguments_give_one_line(args, names, tmp_path):
    with pytest.raises(SystemExit) as e:
        load_script(SCRIPT).main([*args, "--output_dir", str(tmp_path)])
    message = str(e.value.code)
    assert message.startswith("error:") and "\n" not in message and names in message


def test_bad_argument_exits_without_traceback(tmp_path):
    proc = subprocess.run([sys.executable, str(SCRIPT), "--model", "vit_nope", "--output_dir", str(tmp_path)],
                          cwd=REPO, env=_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: model name='vit_nope' is not registered")


def test_early_stopping_on_top1(tmp_path, capsys):
    # a learning rate of 1e-12 keeps top-1 where it starts: the first epoch is the best, patience 2 ends epoch 2
    out = tmp_path / "run"
    load_script(SCRIPT).main([*TINY, "--learning_rate", "1e-12", "--epochs", "10", "--max_steps_per_epoch", "1",
                              "--early_stopping_patience", "2", "--output_dir", str(out)])
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [0, 1, 2]
    assert "early stopping at step 3: top1 has not improved" in capsys.readouterr().out
    assert json.loads((out / "best" / "metrics.json").read_text())["epoch"] == 0


def test_compiled_and_checkpointed_run_saves_plain_weights(tmp_path):
    out = tmp_path / "run"
    load_script(SCRIPT).main([*TINY, "--epochs", "1", "--max_steps_per_epoch", "2", "--compile", "--compile_backend",
                              "eager", "--gradient_checkpointing", "--output_dir", str(out)])
    model = vf.from_pretrained(out / "best")  # strict load: no _orig_mod. names in the saved weights
    assert not any("_orig_mod" in k for k in model.state_dict())
