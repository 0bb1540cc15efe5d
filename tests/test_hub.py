"""Registry and save/load: round trip, unknown names, untrusted or broken files."""
import dataclasses
import json
import os
import pickle

import pytest
import torch
from torch import nn

import visionformers as vf
from visionformers import hub, registry
from visionformers.hub import load_weights_file
from visionformers.vision.unet import UNetConfig


@dataclasses.dataclass(frozen=True)
class TinyConfig:
    dim: int = 8
    sizes: tuple[int, ...] = (2, 3)
    scale: float = 1.0
    act: str | None = None


class TinyModel(nn.Module):
    def __init__(self, config: TinyConfig):
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(10, config.dim)
        self.head = nn.Linear(config.dim, 10, bias=False)
        self.head.weight = self.embed.weight  # tied: saved once, re-tied on load

    def forward(self, ids):
        return self.head(self.embed(ids)) * self.config.scale


@pytest.fixture
def tiny_registered(monkeypatch):
    monkeypatch.setitem(registry.PRESETS, "tiny_test_model", (TinyModel, TinyConfig()))
    return "tiny_test_model"


def test_create_model_overrides_and_unknown_fields(tiny_registered):
    m = vf.create_model(tiny_registered, dim=4, sizes=(1,))
    assert m.config.dim == 4 and m.config.sizes == (1,)
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['depth'\]"):
        vf.create_model(tiny_registered, depth=3)
    assert tiny_registered in vf.list_models("tiny_*")


def test_unknown_name_suggests_close_ones(tiny_registered):
    with pytest.raises(ValueError, match="tiny_test_model"):
        vf.create_model("tiny_tst_model")


def test_round_trip_with_tied_weights(tmp_path, tiny_registered):
    m = vf.create_model(tiny_registered, scale=2.0)
    vf.save_pretrained(m, tmp_path / "m")
    assert sorted(os.listdir(tmp_path / "m")) == ["config.json", "model.safetensors"]
    m2 = vf.from_pretrained(tmp_path / "m")
    assert m2.config == m.config
    ids = torch.tensor([[1, 2, 3]])
    assert torch.equal(m(ids), m2(ids))
    assert m2.head.weight.data_ptr() == m2.embed.weight.data_ptr()


def test_save_strips_compile_and_ddp_style_wrappers(tmp_path, tiny_registered):
    m = vf.create_model(tiny_registered)

    class Wrapper(nn.Module):
        def __init__(self, module):
            super().__init__()
            self.module = module

    vf.save_pretrained(Wrapper(m), tmp_path / "w")
    assert json.loads((tmp_path / "w" / "config.json").read_text())["architecture"] == "TinyModel"


def _saved(tmp_path, name):
    m = vf.create_model(name)
    return vf.save_pretrained(m, tmp_path / "m")


def test_config_with_unknown_key_or_wrong_type(tmp_path, tiny_registered):
    d = _saved(tmp_path, tiny_registered)
    meta = json.loads((d / "config.json").read_text())
    meta["config"]["depth"] = 3
    (d / "config.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"config.json.*unknown key\(s\) \['depth'\]"):
        vf.from_pretrained(d)
    del meta["config"]["depth"]
    meta["config"]["dim"] = "eight"
    (d / "config.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="field 'dim'='eight' has the wrong type"):
        vf.from_pretrained(d)
    (d / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        vf.from_pretrained(d)


def test_missing_directory_config_or_weights(tmp_path, tiny_registered):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        vf.from_pretrained(tmp_path / "nowhere")
    d = _saved(tmp_path, tiny_registered)
    os.unlink(d / "model.safetensors")
    with pytest.raises(FileNotFoundError, match="no weights"):
        vf.from_pretrained(d)
    os.unlink(d / "config.json")
    with pytest.raises(FileNotFoundError, match="config.json"):
        vf.from_pretrained(d)


@pytest.mark.parametrize("corruption", ["empty", "truncated", "foreign"])
def test_broken_weights_file_is_a_clear_error(tmp_path, tiny_registered, corruption):
    d = _saved(tmp_path, tiny_registered)
    w = d / "model.safetensors"
    data = w.read_bytes()
    w.write_bytes({"empty": b"", "truncated": data[: len(data) // 2], "foreign": b"PK\x03\x04 a zip file"}[corruption])
    with pytest.raises(ValueError, match="model.safetensors"):
        vf.from_pretrained(d)


class _Exploit:
    def __reduce__(self):
        return (os.system, ("touch PWNED_BY_PICKLE",))


def test_pickle_payload_is_never_executed(tmp_path, tiny_registered, monkeypatch):
    monkeypatch.chdir(tmp_path)
    d = _saved(tmp_path, tiny_registered)
    (d / "model.safetensors").write_bytes(pickle.dumps({"weight": _Exploit()}))
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        vf.from_pretrained(d)
    assert not (tmp_path / "PWNED_BY_PICKLE").exists()


def test_atomic_write_leaves_no_partial_file(tmp_path, monkeypatch):
    target = tmp_path / "f.bin"
    target.write_bytes(b"old")

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(hub.os, "replace", boom)
    with pytest.raises(OSError):
        hub.atomic_write_bytes(target, b"new contents")
    assert target.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["f.bin"]


def test_load_into_names_mismatches(tiny_registered):
    m = vf.create_model(tiny_registered)
    with pytest.raises(ValueError, match="unexpected"):
        hub.load_into(m, {"embed.weight": torch.zeros(10, 8), "bogus": torch.zeros(1)})
    with pytest.raises(ValueError, match="shape mismatch"):
        hub.load_into(m, {"embed.weight": torch.zeros(11, 8)})


def test_weights_files_are_read_without_running_code(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    bad = tmp_path / "evil.pth"
    torch.save({"w": Evil()}, bad)
    with pytest.raises(ValueError, match="not a loadable weights file"):
        load_weights_file(bad, "init_checkpoint")
    with pytest.raises(FileNotFoundError, match="init_checkpoint"):
        load_weights_file(tmp_path / "missing.pth", "init_checkpoint")
    torch.save({"step": torch.tensor(3), "config": {"a": 1}}, tmp_path / "nodict.pth")
    with pytest.raises(ValueError, match="a state dict"):
        load_weights_file(tmp_path / "nodict.pth")
    torch.save({"model": {"module.a": torch.ones(2)}}, tmp_path / "ok.pth")
    assert list(load_weights_file(tmp_path / "ok.pth")) == ["a"]


def test_state_dict_files_safetensors_wrapped_and_ddp_prefixed(tmp_path):
    from safetensors.torch import save_file

    sd = {"a.weight": torch.randn(3, 2), "b": torch.arange(4)}
    save_file(sd, tmp_path / "w.safetensors")
    torch.save({"state_dict": {"module." + k: v for k, v in sd.items()}, "epoch": 3}, tmp_path / "ckpt.pt")
    for name in ("w.safetensors", "ckpt.pt"):
        back = load_weights_file(tmp_path / name)
        assert back.keys() == sd.keys() and all(torch.equal(back[k], sd[k]) for k in sd)


# ---- a config.json and its weights checked against each other before anything is built (issue items 9-11) ----


@pytest.fixture
def gpt_dir(tmp_path):
    model = vf.create_model("gpt_tiny", vocab_size=260, max_len=32, dim=32, depth=1, num_heads=2)
    return vf.save_pretrained(model, tmp_path / "gpt")


def _edit_config(directory, **fields):
    path = directory / hub.CONFIG_NAME
    meta = json.loads(path.read_text())
    meta["config"].update(fields)
    path.write_text(json.dumps(meta))


@pytest.mark.parametrize("fields, message", [
    ({"vocab_size": 8_000_000}, r"field 'vocab_size'=8000000 exceeds every dimension"),
    ({"max_len": 10**9}, r"field 'max_len'=1000000000 exceeds every dimension"),
    ({"max_len": 64}, r"'pos_embed.weight' is \(64, 32\) by the config but \(32, 32\) in the file \(field max_len=64\)"),
    ({"depth": 2}, r"has no tensor 'blocks.1"),
])
def test_item9_config_and_weights_are_compared_before_building(gpt_dir, fields, message, monkeypatch):
    import time

    _edit_config(gpt_dir, **fields)
    built = []
    monkeypatch.setattr(hub, "load_state_dict", lambda *a, **k: built.append(a) or {})
    t0 = time.perf_counter()
    with pytest.raises(ValueError, match=message):
        vf.from_pretrained(gpt_dir)
    assert not built and time.perf_counter() - t0 < 5  # refused from the header, no weights read


def test_item10_integer_tensors_for_float_parameters_are_refused(gpt_dir):
    from safetensors.torch import load_file, save_file

    weights = gpt_dir / hub.WEIGHTS_NAME
    state = load_file(str(weights))
    state["norm.weight"] = torch.ones_like(state["norm.weight"], dtype=torch.int32)
    save_file(state, str(weights))
    with pytest.raises(ValueError, match=r"'norm.weight' is I32, but the model's parameter is floating"):
        vf.from_pretrained(gpt_dir)
    model = vf.create_model("gpt_tiny", vocab_size=260, max_len=32, dim=32, depth=1, num_heads=2)
    with pytest.raises(ValueError, match="integer or bool tensors are refused"):
        hub.load_into(model, state)


def test_item11_deep_json_bad_init_std_and_a_disguised_pt_are_clear_errors(gpt_dir, tmp_path):
    (gpt_dir / hub.CONFIG_NAME).write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(ValueError, match=r"config\.json' is nested too deeply"):
        vf.from_pretrained(gpt_dir)
    model = vf.create_model("gpt_tiny", vocab_size=260, max_len=32, dim=32, depth=1, num_heads=2)
    for bad in (-1, float("nan")):
        vf.save_pretrained(model, gpt_dir)
        _edit_config(gpt_dir, init_std=bad)
        with pytest.raises(ValueError, match=r"config\.json.*init_std=.* is not accepted"):
            vf.from_pretrained(gpt_dir)
    disguised = tmp_path / "weights.pt"
    disguised.write_bytes((gpt_dir / hub.WEIGHTS_NAME).read_bytes())
    with pytest.raises(ValueError, match=r"weights\.pt' is a safetensors file .*rename it"):
        load_weights_file(disguised)


def test_a_unet_saved_before_its_added_fields_loads_as_the_same_network(tmp_path):
    """UNetConfig.added_fields may be absent from an older config.json; any other missing field is still refused."""
    torch.manual_seed(0)
    model = vf.create_model("unet_tiny").eval()
    directory = vf.save_pretrained(model, tmp_path / "unet")
    path = directory / hub.CONFIG_NAME
    saved = json.loads(path.read_text())
    for name in UNetConfig.added_fields:
        del saved["config"][name]
    path.write_text(json.dumps(saved))
    loaded = vf.from_pretrained(directory).eval()
    x, t = torch.randn(2, model.config.in_channels, 8, 8), torch.tensor([3, 700])
    with torch.no_grad():
        assert torch.equal(loaded(x, t), model(x, t))
    del saved["config"]["num_res_blocks"]
    path.write_text(json.dumps(saved))
    with pytest.raises(ValueError, match=r"num_res_blocks.* missing"):
        vf.from_pretrained(directory)
