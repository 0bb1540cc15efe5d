"""Samplers: Gaussian-data moments through every sampler and parametrisation, seeded determinism, bad input."""
import functools

import pytest
import torch

import visionformers.diffusion as D

MU = torch.tensor([0.5, -1.0, 0.0])
S = torch.tensor([0.3, 1.5, 1.0])
# Steps at which each sampler's discretisation error on this Gaussian stays well inside the tolerance: first-order
# solvers shrink the variance by a few % at 50 steps. Worst std error measured over linear / cosine / sigmoid:
# ddim 250 -> 1.9%, euler 500 -> 1.5%, heun 100 -> 1.1%, dpmpp_2m 100 -> 1.5%, ddpm 1000 -> 1.0% (with sampling error).
STEPS = {"ddpm": 1000, "ddim": 250, "dpmpp_2m": 100, "euler": 500, "heun": 100}
VP_SAMPLERS = [name for name in D.SAMPLERS if name not in D.FLOW_ONLY]


def gaussian_model(sched, prediction_type):
    """Exact denoiser for x0 ~ N(MU, S^2) per dimension: E[x0 | x_t] = mu + a s^2 / (a^2 s^2 + sig^2) (x_t - a mu)."""

    def model(x, t):
        assert t.shape == x.shape[:1] and t.dtype == torch.float32 and 0 <= t[0] <= sched.num_train_steps - 1
        assert torch.equal(t, t[:1].expand_as(t))  # samplers move the whole batch together ...
        a, sig = (v[:, None] for v in sched.alpha_sigma(t[:1]))  # (1, 1): ... so one lookup serves every sample
        denom = a**2 * S**2 + sig**2
        x0 = MU + a * S**2 / denom * (x - a * MU)
        eps = sig / denom * (x - a * MU)  # (x - a x0) / sig, written without the cancellation
        return {"eps": eps, "x0": x0, "v": a * eps - sig * x0, "flow": eps - x0}[prediction_type]

    return model


def standard_noise(n, seed):
    """x_T with per-dimension sample mean exactly 0 and std exactly 1. With an affine denoiser every ODE step is an
    affine map of x, so the output moments then carry no sampling error: only the solver's discretisation error."""
    x = torch.randn(n, 3, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return ((x - x.mean(0)) / x.std(0)).float()


def _check_moments(x, tol_mean=0.02, tol_std=0.03):
    mean_err = ((x.mean(0) - MU) / S).abs().max().item()
    std_err = (x.std(0) / S - 1).abs().max().item()
    assert mean_err < tol_mean and std_err < tol_std, (mean_err, std_err)


def _run_gaussian(sampler, sched, prediction_type, seed):
    # ddpm adds fresh noise each step, so it needs many samples; the ODE solvers need only a few (see standard_noise).
    n = 10000 if sampler == "ddpm" else 1000
    fn = D.SAMPLERS[sampler]
    x = fn(gaussian_model(sched, prediction_type), standard_noise(n, seed), sched, STEPS[sampler],
           prediction_type=prediction_type, generator=torch.Generator().manual_seed(seed))
    if sampler == "ddpm":
        _check_moments(x, tol_mean=0.04, tol_std=0.04)  # 10k samples: ~1% sampling error on each moment
    else:
        _check_moments(x)


@pytest.mark.parametrize("prediction_type", ["eps", "x0", "v", "flow"])
@pytest.mark.parametrize("sampler", VP_SAMPLERS)
def test_gaussian_moments_linear(sampler, prediction_type):
    _run_gaussian(sampler, D.NoiseSchedule("linear", 1000), prediction_type, seed=0)


@pytest.mark.parametrize("kind", ["cosine", "sigmoid"])
@pytest.mark.parametrize("sampler", VP_SAMPLERS)
def test_gaussian_moments_other_schedules(sampler, kind):
    # v: at the cosine schedule's last step alpha ~ 1e-4, where x0 from an eps-prediction is float32 noise.
    _run_gaussian(sampler, D.NoiseSchedule(kind, 1000), "v", seed=1)


def test_gaussian_moments_zero_terminal_snr_v():
    sched = D.NoiseSchedule("linear", 1000, zero_terminal_snr=True)
    assert sched.alphas_cumprod[-1] == 0
    _run_gaussian("ddim", sched, "v", seed=2)


def test_gaussian_moments_through_sample():
    """The public entry point (its own noise draw, a non-default eta through functools.partial)."""
    sched = D.NoiseSchedule("linear", 1000)
    x = D.sample(gaussian_model(sched, "eps"), (10000, 3), sched, sampler=functools.partial(D.sample_ddim, eta=0.5),
                 steps=250, generator=torch.Generator().manual_seed(3))
    _check_moments(x, tol_mean=0.04, tol_std=0.04)  # 10k samples: ~1% sampling error on each moment


@pytest.mark.parametrize("sampler", [*VP_SAMPLERS, functools.partial(D.sample_ddim, eta=1.0)])
def test_seeded_sampling_is_bit_identical(sampler):
    sched = D.NoiseSchedule("cosine", 1000)
    weight = torch.randn(3, 3, generator=torch.Generator().manual_seed(0))
    model = lambda x, t: torch.tanh(x @ weight) + 1e-3 * t[:, None]  # noqa: E731
    runs = [D.sample(model, (64, 3), sched, sampler=sampler, steps=8, generator=torch.Generator().manual_seed(7))
            for _ in range(2)]
    assert torch.equal(runs[0], runs[1])
    other = D.sample(model, (64, 3), sched, sampler=sampler, steps=8, generator=torch.Generator().manual_seed(8))
    assert not torch.equal(runs[0], other)


@pytest.mark.parametrize("sampler", VP_SAMPLERS)
def test_callback_reports_every_step(sampler):
    sched = D.NoiseSchedule("linear", 100)
    seen = []
    out = D.sample(gaussian_model(sched, "eps"), (16, 3), sched, sampler=sampler, steps=5,
                   generator=torch.Generator().manual_seed(0), callback=seen.append)
    assert [c["step"] for c in seen] == list(range(5))
    assert all(c["x"].shape == c["denoised"].shape == (16, 3) and c["t"].shape == (16,) for c in seen)
    assert torch.equal(seen[-1]["x"], out)
    ts = [c["t"][0].item() for c in seen]
    assert ts == sorted(ts, reverse=True) and ts[0] == pytest.approx(99, abs=1e-3)


def test_model_call_counts():
    sched = D.NoiseSchedule("linear", 1000)
    for sampler, steps, calls in [("ddim", 7, 7), ("dpmpp_2m", 7, 7), ("euler", 7, 7), ("heun", 7, 13)]:
        count = []
        model = lambda x, t: count.append(1) or torch.zeros_like(x)  # noqa: E731
        D.sample(model, (2, 3), sched, sampler=sampler, steps=steps)
        assert len(count) == calls, sampler


def test_any_step_count():
    sched = D.NoiseSchedule("linear", 1000)
    assert D.discrete_timesteps(1000, 1000).tolist() == list(range(999, -1, -1))
    for steps in (1, 3, 7, 999):
        ts = D.discrete_timesteps(1000, steps)
        assert ts[0] == 999 and len(ts) == steps and (ts[:-1] > ts[1:]).all() and ts[-1] >= 0
    for sampler in VP_SAMPLERS:
        x = D.sample(gaussian_model(sched, "eps"), (4, 3), sched, sampler=sampler, steps=1)
        assert torch.isfinite(x).all()
    x = D.sample(gaussian_model(sched, "eps"), (4, 3), sched, sampler="euler", steps=1500)  # more than T: fine
    assert torch.isfinite(x).all()


def _raises(match, fn, *args, **kwargs):
    with pytest.raises(ValueError, match=match):
        fn(*args, **kwargs)


def test_bad_inputs_name_the_argument():
    sched = D.NoiseSchedule("linear", 100)
    model = lambda x, t, **c: torch.zeros_like(x)  # noqa: E731
    _raises(r"sampler='plms'.*'ddpm'", D.sample, model, (2, 3), sched, sampler="plms")
    _raises(r"steps=0", D.sample, model, (2, 3), sched, steps=0)
    _raises(r"steps=-3", D.sample, model, (2, 3), sched, steps=-3)
    _raises(r"steps=2.5", D.sample, model, (2, 3), sched, steps=2.5)
    _raises(r"steps=101.*num_train_steps=100", D.sample, model, (2, 3), sched, sampler="ddim", steps=101)
    _raises(r"guidance_scale=-1", D.sample, model, (2, 3), sched, guidance_scale=-1.0)
    _raises(r"uncond=None.*guidance_scale=3", D.sample, model, (2, 3), sched, guidance_scale=3.0)
    _raises(r"prediction_type='noise'.*'eps'", D.sample, model, (2, 3), sched, prediction_type="noise")
    _raises(r"shape=\(0, 3\)", D.sample, model, (0, 3), sched)
    _raises(r"shape=", D.sample, model, "2x3", sched)
    _raises(r"sched=", D.sample, model, (2, 3), "cosine")
    _raises(r"eta=-1", D.sample_ddim, model, torch.randn(2, 3), sched, 5, eta=-1)
