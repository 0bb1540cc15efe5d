"""native.optimize: the models' values and state dicts are kept, layouts and module swaps are as documented, and
nothing a run computes depends on the switch except where optimize is called."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import visionformers as vf
from visionformers.native import RowsLinear, kernel_available, kernels_pay, optimize

ROOT = Path(__file__).resolve().parents[2]


def _gpt():
    torch.manual_seed(0)
    return vf.create_model("gpt_tiny").eval()


def test_gpt_generation_keeps_its_tokens_and_state_dict():
    model = _gpt()
    ids = torch.randint(0, model.config.vocab_size, (2, 5))
    expected = model.generate(ids, 8)
    logits = model(ids).logits
    keys = {k: v.clone() for k, v in model.state_dict().items()}
    assert optimize(model, kernels=True) is model
    assert torch.equal(model.generate(ids, 8), expected)  # greedy tokens: rounding does not flip an argmax here
    torch.testing.assert_close(model(ids).logits, logits, rtol=1e-5, atol=1e-5)
    assert model.state_dict().keys() == keys.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in keys.items())
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert linears and all(isinstance(m, RowsLinear) == kernel_available() for m in linears)
    assert model.token_embed.weight.stride()[0] == 1  # (vocab, dim) stored column-major for BLAS


def test_kernels_false_keeps_nn_linear_and_the_default_follows_the_cpu():
    model = optimize(_gpt(), kernels=False)
    assert all(type(m) is nn.Linear for m in model.modules() if isinstance(m, nn.Linear))
    assert all(m.weight.stride()[0] == 1 for m in model.modules() if isinstance(m, nn.Linear) and m.out_features > m.in_features)
    default = optimize(_gpt())
    rows = any(isinstance(m, RowsLinear) for m in default.modules())
    assert rows == (kernels_pay() and kernel_available())
    with pytest.raises(ValueError, match="kernels"):
        optimize(_gpt(), kernels="yes")


def test_optimize_is_idempotent_and_training_still_works():
    model = optimize(optimize(_gpt())).train()
    ids = torch.randint(0, model.config.vocab_size, (2, 7))
    model(ids, labels=ids).loss.backward()  # autograd takes F.linear, whatever the strides
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_unet_convolutions_go_channels_last_with_the_same_output():
    torch.manual_seed(0)
    model = vf.create_model("unet_tiny").eval()
    for p in model.parameters():
        p.data.add_(0.02 * torch.randn_like(p))
    x, t = torch.randn(2, model.config.in_channels, 16, 16), torch.tensor([3, 500])
    with torch.no_grad():
        expected = model(x, t)
        optimize(model)
        out = model(x, t)
    assert all(p.is_contiguous(memory_format=torch.channels_last) for p in model.parameters() if p.ndim == 4)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)


def test_bad_model_is_a_value_error():
    with pytest.raises(ValueError, match="model"):
        optimize("gpt_tiny")


_RUN = r"""
import sys, torch
import visionformers as vf
torch.manual_seed(0)
torch.set_num_threads(1)
model = vf.create_model("gpt_tiny")
opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
ids = torch.randint(0, model.config.vocab_size, (4, 12))
start, stop, path = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
if start:
    state = torch.load(path, weights_only=True)
    model.load_state_dict(state["model"]); opt.load_state_dict(state["opt"]); torch.set_rng_state(state["rng"])
for step in range(start, stop):
    g = torch.Generator().manual_seed(step)
    batch = ids[torch.randperm(4, generator=g)]
    loss = model(batch, labels=batch).loss
    opt.zero_grad(); loss.backward(); opt.step()
torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "rng": torch.get_rng_state()}, path)
model.eval()
vf.native.optimize(model, kernels=True)  # sampling after training may attach the kernel
torch.save(model.generate(ids[:1, :4], 6), path + ".tokens")
"""


def _run(tmp_path, name, start, stop, native):
    env = dict(os.environ, VISIONFORMERS_NATIVE=native, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    path = tmp_path / name
    subprocess.run([sys.executable, "-c", _RUN, str(start), str(stop), str(path)], check=True, env=env, cwd=tmp_path)
    return torch.load(path, weights_only=True)["model"], torch.load(str(path) + ".tokens", weights_only=True)


def test_training_and_resume_are_bit_identical_whatever_the_switch(tmp_path):
    """Training never changes with the kernels: a run with them on, one with them off, and one resumed halfway with
    the switch flipped end with the same bits; decoding after optimize gives the same tokens."""
    on, tokens_on = _run(tmp_path, "on.pt", 0, 4, "1")
    off, tokens_off = _run(tmp_path, "off.pt", 0, 4, "0")
    _run(tmp_path, "resumed.pt", 0, 2, "1")
    resumed, _ = _run(tmp_path, "resumed.pt", 2, 4, "0")
    for k in on:
        assert torch.equal(on[k], off[k]) and torch.equal(on[k], resumed[k]), k
    assert torch.equal(tokens_on, tokens_off)
