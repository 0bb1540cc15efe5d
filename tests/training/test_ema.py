"""EMA: warm-up decay formula, parity with diffusers' EMAModel, store / copy_to / restore, state_dict."""
import copy

import pytest
import torch

from visionformers.training.ema import EMA


def _net(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 2))


def _perturb(model, step):
    with torch.no_grad():
        for i, p in enumerate(model.parameters()):
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(100 * step + i)))


def test_warmup_decay_equals_formula():
    ema = EMA(_net(), decay=0.999, inv_gamma=2.0, power=0.75, min_decay=0.1, update_after_step=3)
    for step in range(1, 5000, 37):
        k = step - 3 - 1
        expected = 0.0 if k <= 0 else min(max(1 - (1 + k / 2.0) ** -0.75, 0.1), 0.999)
        assert ema.get_decay(step) == pytest.approx(expected, abs=1e-15)
    plain = EMA(_net(), decay=0.99, warmup=False)
    # (1 + k) / (10 + k), k = step - 1
    assert [plain.get_decay(s) for s in (1, 2, 11)] == pytest.approx([0.0, 2 / 11, 11 / 20])
    assert plain.get_decay(10**6) == 0.99


@pytest.mark.parametrize("warmup", [True, False])
def test_matches_diffusers_ema_model(warmup):
    import diffusers.training_utils as training_utils
    model = _net()
    model[0].bias.requires_grad_(False)  # frozen parameters are copied, not averaged, in both
    ours = EMA(model, decay=0.99, warmup=warmup, power=0.75, update_after_step=2)
    ref = training_utils.EMAModel(model.parameters(), decay=0.99, use_ema_warmup=warmup, power=0.75,
                                  update_after_step=2)
    for step in range(30):
        _perturb(model, step)
        ours.update(model)
        ref.step(model.parameters())
    for s, r in zip(ours.shadow, ref.shadow_params):
        torch.testing.assert_close(s, r, rtol=1e-6, atol=1e-6)
    assert ours.get_decay(ours.step) == pytest.approx(ref.cur_decay_value)


def test_update_is_the_ema_recursion():
    model = _net()
    ema = EMA(model, decay=0.9, warmup=False, min_decay=0.9)  # decay fixed at 0.9 from the 2nd update on
    ema.update(model)  # step 1: decay 0, a copy
    before = [s.clone() for s in ema.shadow]
    _perturb(model, 1)
    ema.update(model)
    for b, s, p in zip(before, ema.shadow, model.parameters()):
        torch.testing.assert_close(s, 0.9 * b + 0.1 * p.detach())


def test_store_copy_to_restore_round_trip():
    model = _net()
    ema = EMA(model, decay=0.5, warmup=False, min_decay=0.5)
    for step in range(3):
        _perturb(model, step)
        ema.update(model)
    trained = copy.deepcopy(model.state_dict())
    ema.store(model)
    ema.copy_to(model)
    for p, s in zip(model.parameters(), ema.shadow):
        assert torch.equal(p, s)
    assert not torch.equal(model[0].weight, trained["0.weight"])
    ema.restore(model)
    for k, v in model.state_dict().items():
        assert torch.equal(v, trained[k]), k
    with pytest.raises(RuntimeError, match="without a matching EMA.store"):
        ema.restore(model)


def test_state_dict_round_trip_resumes_identically(tmp_path):
    model = _net()
    ema = EMA(model, decay=0.999)
    for step in range(5):
        _perturb(model, step)
        ema.update(model)
    path = tmp_path / "ema.pt"
    torch.save(ema.state_dict(), path)
    resumed = EMA(_net(seed=1), decay=0.999)
    resumed.load_state_dict(torch.load(path, weights_only=True))
    assert resumed.step == 5
    assert set(resumed.state_dict()["shadow"]) == {n for n, _ in model.named_parameters()}
    for step in range(5, 8):
        _perturb(model, step)
        ema.update(model)
        resumed.update(model)
    for a, b in zip(ema.shadow, resumed.shadow):
        assert torch.equal(a, b)


def test_wrapped_models_are_unwrapped():
    model = _net()
    wrapped = torch.nn.DataParallel(model)  # exposes .module like DDP / accelerate's wrappers
    ema = EMA(wrapped)
    assert ema.names == [n for n, _ in model.named_parameters()]
    _perturb(model, 0)
    ema.update(wrapped)
    ema.copy_to(wrapped)
    for p, s in zip(model.parameters(), ema.shadow):
        assert torch.equal(p, s)


def test_bad_inputs():
    with pytest.raises(ValueError, match=r"decay=1.5"):
        EMA(_net(), decay=1.5)
    with pytest.raises(ValueError, match=r"min_decay=0.5"):
        EMA(_net(), decay=0.4, min_decay=0.5)
    with pytest.raises(ValueError, match=r"update_after_step=-1"):
        EMA(_net(), update_after_step=-1)
    with pytest.raises(ValueError, match=r"model="):
        EMA(_net()).update(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match=r"state\['shadow'\]="):
        EMA(_net()).load_state_dict({"step": 1, "shadow": {"nope": torch.zeros(1)}})
