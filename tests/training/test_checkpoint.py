"""Checkpoints: exact round trip, atomicity, `latest` resolution, pruning, weights_only loading."""
import dataclasses
import json
import re
from pathlib import Path

import pytest
import torch
from torch import nn

import visionformers as vf
from visionformers.registry import PRESETS
from visionformers.training import checkpoint as ckpt
from visionformers.training.ema import EMA
from visionformers.training.loop import make_generator, seed_everything
from visionformers.training.optim import build_lr_scheduler, build_optimizer

REPO = Path(__file__).resolve().parents[2]


@dataclasses.dataclass(frozen=True)
class NetConfig:
    width: int = 6  # tiny: these tests check bookkeeping, not learning


class Net(nn.Module):
    """A two-layer stand-in with a config, as save_pretrained needs."""

    def __init__(self, config: NetConfig):
        super().__init__()
        self.config = config
        self.a = nn.Linear(3, config.width)
        self.b = nn.Linear(config.width, 3)
        self.drop = nn.Dropout(0.5)  # draws from the global RNG, so RNG restore matters

    def forward(self, x):
        return self.b(self.drop(torch.tanh(self.a(x))))


@pytest.fixture(autouse=True)
def _registered(monkeypatch):
    """Register Net for this module's tests only (from_pretrained rebuilds models by preset name)."""
    monkeypatch.setitem(PRESETS, "_test_checkpoint_net", (Net, NetConfig()))


def _setup(seed=0):
    seed_everything(seed)
    model = Net(NetConfig())
    opt = build_optimizer(model, learning_rate=1e-2, weight_decay=0.1)
    sched = build_lr_scheduler(opt, "cosine", 2, 20)
    ema = EMA(model, decay=0.9)
    gen = make_generator(seed, 1)
    return model, opt, sched, ema, gen


def _train(model, opt, sched, ema, gen, steps):
    losses = []
    for _ in range(steps):
        x = torch.randn(4, 3, generator=gen)
        loss = (model(x) - x).pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        sched.step()
        ema.update(model)
        losses.append(loss.item())
    return losses


def _save(tmp_path, step, model, opt, sched, ema, gen, **kw):
    return ckpt.save_checkpoint(tmp_path, step, model=model, optimizer=opt, lr_scheduler=sched, ema=ema,
                                generators={"noise": gen}, train_state={"step": step}, **kw)


def test_round_trip_continues_bit_identically(tmp_path):
    model, opt, sched, ema, gen = _setup()
    _train(model, opt, sched, ema, gen, 3)
    path = _save(tmp_path, 3, model, opt, sched, ema, gen)
    expected = _train(model, opt, sched, ema, gen, 3)

    model2, opt2, sched2, ema2, gen2 = _setup(seed=1)  # different weights and RNG streams before loading
    state = ckpt.load_checkpoint(path, model=model2, optimizer=opt2, lr_scheduler=sched2, ema=ema2,
                                 generators={"noise": gen2})
    assert state["step"] == 3 and state["train_state"] == {"step": 3}
    assert _train(model2, opt2, sched2, ema2, gen2, 3) == expected
    for p, q in zip(model.parameters(), model2.parameters()):
        assert torch.equal(p, q)
    for s, t in zip(ema.shadow, ema2.shadow):
        assert torch.equal(s, t)
    assert ema.step == ema2.step == 6
    a, b = opt.state_dict(), opt2.state_dict()
    assert a["param_groups"] == b["param_groups"]
    assert all(torch.equal(a["state"][i][k], b["state"][i][k]) for i in a["state"] for k in a["state"][i])


def test_files_are_safetensors_json_and_weights_only_torch(tmp_path):
    model, opt, sched, ema, gen = _setup()
    _train(model, opt, sched, ema, gen, 1)
    path = _save(tmp_path, 1, model, opt, sched, ema, gen)
    names = sorted(p.name for p in path.iterdir())
    assert names == ["ema.safetensors", "model.safetensors", "optimizer.safetensors", "rng-0.pt", "scheduler.json",
                     "state.json"]
    torch.load(path / "rng-0.pt", weights_only=True)  # no pickled classes inside
    assert set(json.loads((path / "state.json").read_text())["files"]) == set(names) - {"state.json"}


def test_every_torch_load_in_training_code_is_weights_only():
    files = [*REPO.glob("visionformers/training/*.py"), *REPO.glob("train_scripts/*.py"),
             *REPO.glob("sample_scripts/*.py")]
    calls = [(f.name, m.group(0)) for f in files for m in re.finditer(r"torch\.load\([^)]*\)", f.read_text())]
    assert calls, "expected the checkpoint loader to use torch.load"
    assert all("weights_only=True" in call for _, call in calls), calls
    assert not any("import pickle" in f.read_text() for f in files)


def test_optimizer_safetensors_round_trip_keeps_tuples():
    model, opt, *_ = _setup()
    model(torch.randn(2, 3)).sum().backward()
    opt.step()
    state = {"state": {"a.weight": {"step": torch.tensor(1.0), "exp_avg": torch.ones(2), "note": 3}},
             "param_groups": [{"lr": 0.1, "betas": (0.9, 0.99), "params": ["a.weight"]}]}
    back = ckpt.optimizer_from_safetensors(*ckpt.optimizer_to_safetensors(state))
    assert back["param_groups"] == state["param_groups"] and isinstance(back["param_groups"][0]["betas"], tuple)
    assert back["state"]["a.weight"]["note"] == 3 and torch.equal(back["state"]["a.weight"]["exp_avg"], torch.ones(2))


def _fake_checkpoint(root: Path, step: int, complete: bool = True) -> Path:
    d = root / f"checkpoint-{step}"
    d.mkdir(parents=True)
    (d / "model.safetensors").write_bytes(b"x" * 10)
    if complete:
        (d / "state.json").write_text(json.dumps({"step": step, "files": {"model.safetensors": 10}}))
    return d


def test_latest_skips_temporary_incomplete_and_truncated(tmp_path):
    _fake_checkpoint(tmp_path, 10)
    _fake_checkpoint(tmp_path, 30, complete=False)  # killed before state.json
    truncated = _fake_checkpoint(tmp_path, 40)
    (truncated / "model.safetensors").write_bytes(b"x" * 4)
    tmp = tmp_path / ".tmp-checkpoint-50"
    tmp.mkdir()
    (tmp / "state.json").write_text(json.dumps({"step": 50, "files": {}}))
    (tmp_path / "checkpoint-notanumber").mkdir()
    assert ckpt.latest_checkpoint(tmp_path) == tmp_path / "checkpoint-10"
    assert ckpt.resolve_checkpoint(tmp_path, "latest") == tmp_path / "checkpoint-10"
    assert ckpt.resolve_checkpoint(tmp_path, "checkpoint-10") == tmp_path / "checkpoint-10"
    assert ckpt.resolve_checkpoint(tmp_path, None) is None
    assert ckpt.resolve_checkpoint(tmp_path / "empty", "latest") is None
    with pytest.raises(ValueError, match="not a complete checkpoint"):
        ckpt.resolve_checkpoint(tmp_path, str(tmp_path / "checkpoint-30"))
    with pytest.raises(FileNotFoundError, match="resume_from_checkpoint"):
        ckpt.resolve_checkpoint(tmp_path, "checkpoint-99")
    ckpt.remove_stale(tmp_path)
    assert not tmp.exists()


def test_prune_keeps_the_resume_source_and_the_newest(tmp_path):
    for s in (10, 20, 30, 40):
        _fake_checkpoint(tmp_path, s)
    removed = ckpt.prune_checkpoints(tmp_path, 1, keep=(tmp_path / "checkpoint-10",))
    assert sorted(p.name for p in removed) == ["checkpoint-20", "checkpoint-30"]
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["checkpoint-10", "checkpoint-40"]
    assert ckpt.prune_checkpoints(tmp_path, 1, keep=(tmp_path / "checkpoint-10",)) == []
    assert ckpt.prune_checkpoints(tmp_path, None) == []
    with pytest.raises(ValueError, match="total_limit"):
        ckpt.prune_checkpoints(tmp_path, 0)


def test_total_limit_during_save(tmp_path):
    model, opt, sched, ema, gen = _setup()
    for step in (1, 2, 3):
        _save(tmp_path, step, model, opt, sched, ema, gen, total_limit=2, keep=(None,))
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["checkpoint-2", "checkpoint-3"]


def test_a_failed_write_leaves_no_checkpoint_and_the_next_save_recovers(tmp_path, monkeypatch):
    model, opt, sched, ema, gen = _setup()
    _save(tmp_path, 1, model, opt, sched, ema, gen)
    real = ckpt.optimizer_to_safetensors

    def crash(*a, **k):
        raise KeyboardInterrupt("killed mid-write")

    monkeypatch.setattr(ckpt, "optimizer_to_safetensors", crash)
    with pytest.raises(KeyboardInterrupt):
        _save(tmp_path, 2, model, opt, sched, ema, gen)
    assert (tmp_path / ".tmp-checkpoint-2").is_dir() and not (tmp_path / "checkpoint-2").exists()
    assert ckpt.latest_checkpoint(tmp_path).name == "checkpoint-1"
    monkeypatch.setattr(ckpt, "optimizer_to_safetensors", real)
    _save(tmp_path, 2, model, opt, sched, ema, gen)
    assert ckpt.latest_checkpoint(tmp_path).name == "checkpoint-2"
    _save(tmp_path, 2, model, opt, sched, ema, gen)  # saving the same step again replaces it
    assert ckpt.is_complete(tmp_path / "checkpoint-2")


def test_export_is_loadable_and_replaces_atomically(tmp_path):
    model, opt, sched, ema, gen = _setup()
    _train(model, opt, sched, ema, gen, 2)
    out = ckpt.export_pretrained(model, tmp_path / "model", ema=ema, extra_files={"extra.json": {"a": 1}})
    loaded = vf.from_pretrained(out)
    for p, s in zip(loaded.parameters(), ema.shadow):
        assert torch.equal(p, s)
    assert json.loads((out / "extra.json").read_text()) == {"a": 1}
    ckpt.export_pretrained(model, out)  # raw weights now, over the old export
    for p, q in zip(vf.from_pretrained(out).parameters(), model.parameters()):
        assert torch.equal(p, q)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_load_rejects_incomplete(tmp_path):
    d = _fake_checkpoint(tmp_path, 5, complete=False)
    with pytest.raises(ValueError, match="incomplete"):
        ckpt.load_checkpoint(d, model=Net(NetConfig()))


def test_an_unchanged_extra_model_is_hard_linked_not_written_again(tmp_path, monkeypatch):
    model, opt, sched, ema, gen = _setup()
    frozen = Net(NetConfig(width=5))  # a frozen VAE / text encoder stand-in
    tokenizer = {"vae/tokenizer.json": {"vocab": 1}}  # a file of extra_files in the same directory, written each time
    first = _save(tmp_path, 1, model, opt, sched, ema, gen, extra_models={"vae": frozen}, extra_files=tokenizer)
    second = _save(tmp_path, 2, model, opt, sched, ema, gen, extra_models={"vae": frozen}, extra_files=tokenizer)
    for name in ("vae/model.safetensors", "vae/config.json"):
        a, b = (first / name).stat(), (second / name).stat()
        assert (a.st_ino, a.st_dev) == (b.st_ino, b.st_dev) and a.st_nlink == 2, name
    assert (second / "vae/tokenizer.json").stat().st_nlink == 1 and ckpt.checkpoint_problem(second) is None
    assert ckpt.read_state(second)["extra_models"]["vae"]["files"] == ["vae/config.json", "vae/model.safetensors"]
    records = [ckpt.read_state(c)["files"]["vae/model.safetensors"] for c in (first, second)]
    assert records[0] == records[1]  # size and SHA-256 carried over
    ckpt.prune_checkpoints(tmp_path, 1)  # the first goes; the second keeps its bytes
    assert not first.exists() and ckpt.checkpoint_problem(second, verify=True) is None
    assert torch.equal(vf.from_pretrained(second / "vae").a.weight, frozen.a.weight)

    with torch.no_grad():  # changed weights: written anew, never linked to the old ones
        frozen.a.weight.add_(1.0)
    third = _save(tmp_path, 3, model, opt, sched, ema, gen, extra_models={"vae": frozen})
    assert (third / "vae/model.safetensors").stat().st_nlink == 1
    assert torch.equal(vf.from_pretrained(third / "vae").a.weight, frozen.a.weight)

    def no_links(src, dst):  # a filesystem without hard links: the files are written
        raise OSError("links not supported")

    monkeypatch.setattr(ckpt.os, "link", no_links)
    fourth = _save(tmp_path, 4, model, opt, sched, ema, gen, extra_models={"vae": frozen}, extra_files=tokenizer)
    assert (fourth / "vae/model.safetensors").stat().st_nlink == 1 and (fourth / "vae/tokenizer.json").is_file()
    assert ckpt.checkpoint_problem(fourth, verify=True) is None


def test_model_fingerprint():
    a, b = Net(NetConfig()), Net(NetConfig())
    assert ckpt.model_fingerprint(a) != ckpt.model_fingerprint(b)  # other random weights
    b.load_state_dict(a.state_dict())
    assert ckpt.model_fingerprint(a) == ckpt.model_fingerprint(b)
    assert ckpt.model_fingerprint(a) != ckpt.model_fingerprint(b.to(torch.bfloat16))
    with pytest.raises(ValueError, match="module="):
        ckpt.model_fingerprint({"a": torch.zeros(1)})


def test_resuming_into_another_network_names_the_fields(tmp_path):
    model, opt, sched, ema, gen = _setup()
    path = _save(tmp_path, 1, model, opt, sched, ema, gen, extra_files={ckpt.CONFIG_NAME: ckpt.model_config_json(model)})
    ckpt.load_checkpoint(path, model=model, generators={"noise": gen})  # the same network: fine
    other = Net(NetConfig(width=7))
    with pytest.raises(ValueError, match=r"width=6 \(this run: 7\).*--model_overrides"):
        ckpt.load_checkpoint(path, model=other, optimizer=build_optimizer(other))
