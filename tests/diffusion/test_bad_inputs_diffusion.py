"""Bad arguments to the diffusion API and the EMA: each is a ValueError naming the argument and the value given,
never a deep torch error or a silently wrong (NaN, broadcast, wrapped-index) result."""
import functools
import math
import re

import pytest
import torch

import visionformers.diffusion as D
from visionformers.training.ema import EMA


def _sched(kind="cosine", T=100):
    return D.NoiseSchedule(kind, T)


def _identity(x, t, **cond):
    return x


# ---- schedules ---------------------------------------------------------------------------------


@pytest.mark.parametrize("T", [2, 10, 19, 20])
def test_linear_schedule_too_few_steps(T):
    with pytest.raises(ValueError, match=rf"num_train_steps={T} .*>= 21.*'linear'"):
        D.NoiseSchedule("linear", num_train_steps=T)
    with pytest.raises(ValueError, match=rf"num_train_steps={T} "):
        D.NoiseSchedule("linear", num_train_steps=T, zero_terminal_snr=True)


@pytest.mark.parametrize("kind", ["linear", "cosine", "sigmoid"])
@pytest.mark.parametrize("zero_snr", [False, True])
def test_every_accepted_schedule_is_finite(kind, zero_snr):
    for T in (21, 50) if kind == "linear" else (2, 3, 10):
        sched = D.NoiseSchedule(kind, T, zero_terminal_snr=zero_snr)
        assert ((sched.betas > 0) & (sched.betas <= 1)).all()
        assert (sched.alphas_cumprod >= 0).all() and not sched.log_sigmas.isnan().any()
        a, s = sched.alpha_sigma(torch.arange(T))
        assert torch.isfinite(a).all() and torch.isfinite(s).all()


def test_schedule_zero_terminal_snr_flag():
    with pytest.raises(ValueError, match=r"zero_terminal_snr='yes'"):
        D.NoiseSchedule("cosine", 100, zero_terminal_snr="yes")


@pytest.mark.parametrize("t, shown", [([100], "100"), ([-1], "-1"), ([3, 250], "250"), ([100.0], "100.0"),
                                      ([-0.5], "-0.5"), ([math.nan], "nan")])
def test_alpha_sigma_t_out_of_range(t, shown):
    sched = _sched()
    with pytest.raises(ValueError, match=rf"t=.*{shown}.*\[0, num_train_steps=100\)"):
        sched.alpha_sigma(torch.tensor(t))
    with pytest.raises(ValueError, match=rf"t=.*{shown}"):
        sched.snr(torch.tensor(t))


def test_alpha_sigma_t_type():
    sched = _sched()
    for bad in ([1, 2], 5, None):
        with pytest.raises(ValueError, match=r"t=.*torch.Tensor"):
            sched.alpha_sigma(bad)
    with pytest.raises(ValueError, match=r"t=Tensor\(shape=\(2,\), dtype=torch.bool\).*integer"):
        sched.alpha_sigma(torch.tensor([True, False]))
    with pytest.raises(ValueError, match=r"t=.*torch.Tensor"):
        sched.t_to_sigma(3.0)
    with pytest.raises(ValueError, match=r"sigma=.*torch.Tensor"):
        sched.sigma_to_t(1.0)


def test_alpha_sigma_valid_t_unchanged():
    sched = _sched()
    a, s = sched.alpha_sigma(torch.tensor([0, 99]))
    torch.testing.assert_close(a, sched.alphas_cumprod[[0, 99]].sqrt().float())
    a, s = sched.alpha_sigma(torch.tensor([0.0, 98.5, 99.0]))  # floats in [0, T) interpolate (clamped at T - 1)
    assert torch.isfinite(a).all() and torch.isfinite(s).all()
    assert sched.alpha_sigma(torch.tensor([], dtype=torch.long))[0].shape == (0,)


def test_q_sample_bad_inputs():
    sched = _sched()
    x0 = torch.randn(2, 3, 4, 4)
    noise = torch.randn_like(x0)
    with pytest.raises(ValueError, match=r"t=.*100.*num_train_steps=100"):
        sched.q_sample(x0, torch.tensor([100, 1]), noise)
    with pytest.raises(ValueError, match=r"t=.*-1"):
        sched.q_sample(x0, torch.tensor([-1, 1]), noise)
    with pytest.raises(ValueError, match=r"t='list'.*torch.Tensor"):
        sched.q_sample(x0, [1, 2], noise)
    with pytest.raises(ValueError, match=r"t='int'.*torch.Tensor"):
        sched.q_sample(x0, 100, noise)
    with pytest.raises(ValueError, match=r"noise='NoneType'.*torch.Tensor"):
        sched.q_sample(x0, torch.tensor([1, 2]), None)
    with pytest.raises(ValueError, match=r"noise=.*torch.int64.*floating"):
        sched.q_sample(x0, torch.tensor([1, 2]), torch.zeros(2, 3, 4, 4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"x0=.*at least 1"):
        sched.q_sample(torch.tensor(1.0), torch.tensor([1]), torch.tensor(1.0))
    with pytest.raises(ValueError, match=r"t=.*meta.*x0's device cpu"):
        sched.q_sample(x0, torch.tensor([1, 2], device="meta"), noise)
    with pytest.raises(ValueError, match=r"noise=.*meta.*x0's device cpu"):
        sched.q_sample(x0, torch.tensor([1, 2]), noise.to("meta"))


# ---- training_loss -------------------------------------------------------------------------------


def test_training_loss_bad_generator_and_options():
    sched, x0 = _sched(), torch.randn(2, 3, 4, 4)
    for bad in ("x", 0, torch.device("cpu")):
        with pytest.raises(ValueError, match=r"generator=.*torch.Generator"):
            D.training_loss(_identity, x0, sched, generator=bad)
    with pytest.raises(ValueError, match=r"model='str'.*callable"):
        D.training_loss("unet", x0, sched)
    with pytest.raises(ValueError, match=r"offset_noise=inf"):
        D.training_loss(_identity, x0, sched, offset_noise=math.inf)
    with pytest.raises(ValueError, match=r"offset_noise=nan"):
        D.training_loss(_identity, x0, sched, offset_noise=math.nan)
    with pytest.raises(ValueError, match=r"min_snr_gamma=True"):
        D.training_loss(_identity, x0, sched, min_snr_gamma=True)
    with pytest.raises(ValueError, match=r"model output='tuple'.*\(2, 3, 4, 4\)"):
        D.training_loss(lambda x, t: (x,), x0, sched)
    # valid input still works, with a seeded generator reproducibly
    a = D.training_loss(_identity, x0, sched, generator=torch.Generator().manual_seed(0))
    b = D.training_loss(_identity, x0, sched, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, b)


def test_min_snr_weight_bad_gamma():
    with pytest.raises(ValueError, match=r"gamma=0"):
        D.min_snr_weight(torch.ones(3), 0, "eps")
    with pytest.raises(ValueError, match=r"snr=.*torch.Tensor"):
        D.min_snr_weight([1.0], 5.0, "eps")


# ---- samplers -------------------------------------------------------------------------------------


@pytest.mark.parametrize("sampler", [s for s in D.SAMPLERS if s not in D.FLOW_ONLY])
def test_sample_model_output_shape(sampler):
    sched = _sched()
    with pytest.raises(ValueError, match=r"model output=Tensor\(shape=\(2, 1, 4, 4\).*\(2, 3, 4, 4\)"):
        D.sample(lambda x, t: x[:, :1], (2, 3, 4, 4), sched, sampler, steps=3)  # used to broadcast silently
    with pytest.raises(ValueError, match=r"model output=Tensor\(shape=\(2, 48\).*\(2, 3, 4, 4\)"):
        D.sample(lambda x, t: x.flatten(1), (2, 3, 4, 4), sched, sampler, steps=3)
    with pytest.raises(ValueError, match=r"model output='tuple'"):
        D.SAMPLERS[sampler](lambda x, t: (x,), torch.randn(2, 3), sched, 3)


def test_sample_guided_model_output_shape():
    sched, labels = _sched(), torch.tensor([1, 2])
    with pytest.raises(ValueError, match=r"model output=Tensor\(shape=\(2, 3\).*\(4, 3\)"):
        D.sample(lambda x, t, y: x[:2], (2, 3), sched, steps=2, guidance_scale=3.0, y=labels,
                 uncond={"y": torch.zeros_like(labels)})


def test_sample_bad_generator_device_and_model():
    sched = _sched()
    for bad in ("x", 1234):
        with pytest.raises(ValueError, match=r"generator=.*torch.Generator"):
            D.sample(_identity, (2, 3), sched, steps=2, generator=bad)
    for bad in ("gpu", "cuda:x", 1.5):
        with pytest.raises(ValueError, match=rf"device={bad!r}.*'cpu'"):
            D.sample(_identity, (2, 3), sched, steps=2, device=bad)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match=r"device='cuda'.*0 CUDA device"):
            D.sample(_identity, (2, 3), sched, steps=2, device="cuda")
    else:
        with pytest.raises(ValueError, match=r"device='cuda:99'.*CUDA device"):
            D.sample(_identity, (2, 3), sched, steps=2, device="cuda:99")
    with pytest.raises(ValueError, match=r"model='str'.*callable"):
        D.sample("unet", (2, 3), sched, steps=2)
    with pytest.raises(ValueError, match=r"sched='str'.*NoiseSchedule"):
        D.sample(_identity, (2, 3), "cosine", steps=2)
    with pytest.raises(ValueError, match=r"shape=\(True, 3\)"):
        D.sample(_identity, (True, 3), sched, steps=2)
    out = D.sample(_identity, (2, 3), sched, steps=2, device=torch.device("cpu"),
                   generator=torch.Generator().manual_seed(0))
    assert out.shape == (2, 3) and torch.isfinite(out).all()


@pytest.mark.parametrize("sampler", [s for s in D.SAMPLERS if s not in D.FLOW_ONLY])
def test_direct_sampler_bad_arguments(sampler):
    fn, sched, x = D.SAMPLERS[sampler], _sched(), torch.randn(2, 3)
    with pytest.raises(ValueError, match=r"generator='x'"):
        fn(_identity, x, sched, 2, generator="x")
    with pytest.raises(ValueError, match=r"callback='x'.*callable"):
        fn(_identity, x, sched, 2, callback="x")
    with pytest.raises(ValueError, match=r"model=.*callable"):
        fn(None, x, sched, 2)


@pytest.mark.parametrize("sampler", ["euler", "heun"])
@pytest.mark.parametrize("rho", [0, -1.0, math.nan, "7"])
def test_karras_rho(sampler, rho):
    with pytest.raises(ValueError, match=r"rho="):
        D.SAMPLERS[sampler](_identity, torch.randn(2, 3), _sched(), 3, rho=rho)


def test_karras_sigmas_bad_arguments():
    with pytest.raises(ValueError, match=r"rho=0"):
        D.karras_sigmas(_sched(), 5, rho=0)
    with pytest.raises(ValueError, match=r"steps=0"):
        D.karras_sigmas(_sched(), 0)
    with pytest.raises(ValueError, match=r"sched="):
        D.karras_sigmas("cosine", 5)


def test_ddim_eta_not_finite():
    for bad in (math.nan, math.inf, True, "0.5"):
        with pytest.raises(ValueError, match=r"eta="):
            D.sample(_identity, (2, 3), _sched(), functools.partial(D.sample_ddim, eta=bad), steps=2)


@pytest.mark.parametrize("T, steps", [(100, 0), (100, -1), (100, 101), (100, 2.0), (0, 1)])
def test_discrete_timesteps_bad(T, steps):
    name = "num_train_steps" if T == 0 else "steps"
    with pytest.raises(ValueError, match=rf"{name}="):
        D.discrete_timesteps(T, steps)


def test_discrete_timesteps_valid_unchanged():
    assert D.discrete_timesteps(10, 10).tolist() == list(range(9, -1, -1))
    assert D.discrete_timesteps(1000, 1).tolist() == [999]


# ---- guidance ---------------------------------------------------------------------------------------


def test_guidance_bad_scale_and_uncond():
    sched, labels = _sched(), torch.tensor([1, 2])
    for bad in (math.nan, math.inf):
        with pytest.raises(ValueError, match=r"guidance_scale="):
            D.sample(_identity, (2, 3), sched, steps=2, guidance_scale=bad, y=labels, uncond={"y": labels})
    with pytest.raises(ValueError, match=r"uncond=\[.*dict"):
        D.sample(_identity, (2, 3), sched, steps=2, guidance_scale=3.0, y=labels, uncond=[labels])
    with pytest.raises(ValueError, match=r"uncond=.*dict"):
        D.batch_cond_uncond({"y": labels}, labels)
    with pytest.raises(ValueError, match=r"cond='list'"):
        D.guided_model(_identity, [labels], None, 1.0)


# ---- EMA ----------------------------------------------------------------------------------------------


def _net():
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))


def test_ema_model_with_other_shapes():
    ema = EMA(_net())
    other = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 3))  # same count, one shape differs
    for method in (ema.update, ema.copy_to, ema.store):
        with pytest.raises(ValueError, match=r"model=.*'1.weight' has shape \(3, 8\).*\(2, 8\)"):
            method(other)
    assert ema.step == 0  # the rejected update did not count


def test_ema_model_not_a_module():
    ema = EMA(_net())
    for method in (ema.update, ema.copy_to, ema.store, ema.restore):
        with pytest.raises(ValueError, match=r"model='str'.*torch.nn.Module"):
            method("x")


def test_ema_update_dtype_mismatch():
    model = _net()
    ema = EMA(model)
    with pytest.raises(ValueError, match=r"model=.*torch.bfloat16.*torch.float32"):
        ema.update(_net().bfloat16())
    ema.to(dtype=torch.float64)
    with pytest.raises(ValueError, match=r"model=.*torch.float32.*torch.float64"):
        ema.update(model)
    ema.to(dtype=torch.float32)
    ema.update(model)
    assert ema.step == 1
    ema.copy_to(_net().double())  # copies convert dtype: still accepted


@pytest.mark.parametrize("kwargs, name", [
    (dict(decay="0.9"), "decay='0.9'"), (dict(decay=None), "decay=None"), (dict(decay=math.nan), "decay=nan"),
    (dict(decay=True), "decay=True"), (dict(min_decay="0"), "min_decay='0'"), (dict(min_decay=-0.1), "min_decay=-0.1"),
    (dict(inv_gamma=None), "inv_gamma=None"), (dict(inv_gamma=0), "inv_gamma=0"), (dict(power="2/3"), "power='2/3'"),
    (dict(power=math.inf), "power=inf"), (dict(update_after_step=1.5), "update_after_step=1.5"),
    (dict(update_after_step=True), "update_after_step=True"), (dict(warmup="yes"), "warmup='yes'"),
])
def test_ema_bad_hyper_parameters(kwargs, name):
    with pytest.raises(ValueError, match=re.escape(name) + " is not accepted"):
        EMA(_net(), **kwargs)


def test_ema_get_decay_bad_step():
    for bad in ("3", -1, 2.5, None):
        with pytest.raises(ValueError, match=r"step="):
            EMA(_net()).get_decay(bad)


def test_ema_to_bad_arguments():
    with pytest.raises(ValueError, match=r"device='gpu'"):
        EMA(_net()).to("gpu")
    with pytest.raises(ValueError, match=r"dtype='float16'"):
        EMA(_net()).to(dtype="float16")


@pytest.mark.parametrize("key, value", [
    ("step", "x"), ("step", -1), ("step", 1.5), ("step", None), ("decay", "0.9"), ("decay", 2.0),
    ("warmup", "no"), ("inv_gamma", -1.0), ("power", None), ("min_decay", 0.99999), ("update_after_step", "3"),
])
def test_ema_load_state_dict_bad_fields(key, value):
    model = _net()
    ema = EMA(model, decay=0.999)
    ema.update(model)
    before = ema.state_dict()
    before_shadow = [s.clone() for s in ema.shadow]
    state = {**EMA(_net(), decay=0.999).state_dict(), key: value}
    with pytest.raises(ValueError, match=rf"state\['{key}'\]={value!r}"):
        ema.load_state_dict(state)
    # nothing was loaded from the rejected state
    assert {k: v for k, v in ema.state_dict().items() if k != "shadow"} == {
        k: v for k, v in before.items() if k != "shadow"}
    assert all(torch.equal(a, b) for a, b in zip(ema.shadow, before_shadow))


def test_ema_load_state_dict_bad_shadow():
    ema = EMA(_net())
    state = ema.state_dict()
    with pytest.raises(ValueError, match=r"state\['shadow'\]\['0.weight'\]='list'|state\['shadow'\]\['0.weight'\]=\["):
        ema.load_state_dict({**state, "shadow": {**state["shadow"], "0.weight": [[0.0] * 4] * 8}})
    with pytest.raises(ValueError, match=r"state\['shadow'\]=.*unexpected=\['0'\]"):
        ema.load_state_dict({**state, "shadow": {**state["shadow"], 0: torch.zeros(1)}})


def test_ema_load_state_dict_keeps_float_decay():
    """A state saved with decay 0.999 loads as 0.999 even into an EMA built with an int decay (was int(0.999) = 0)."""
    ema = EMA(_net(), decay=1, min_decay=0)
    ema.load_state_dict(EMA(_net(), decay=0.999).state_dict())
    assert ema.decay == 0.999 and ema.min_decay == 0.0
