"""Rectified flow: the exact Gaussian map and the solvers' orders, parity with diffusers' FlowMatch schedulers,
the SD3 training densities and loss weights, and bad input."""
import math

import diffusers
import pytest
import torch
from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3

import visionformers.diffusion as D

MU = torch.tensor([0.5, -1.0, 0.0], dtype=torch.float64)
S = torch.tensor([0.3, 1.5, 1.0], dtype=torch.float64)


def gaussian_flow_model(flow, prediction_type="flow"):
    """Closed-form denoiser for x0 ~ N(MU, S^2) on the flow x = (1 - sigma) x0 + sigma eps:
    E[x0 | x] = mu + a s^2 / (a^2 s^2 + sigma^2) (x - a mu), a = 1 - sigma; the velocity is E[eps] - E[x0]."""

    def model(x, t):
        a, sig = (v[:1, None].double() for v in flow.alpha_sigma(t))
        denom = a**2 * S**2 + sig**2
        x0 = MU + a * S**2 / denom * (x - a * MU)
        eps = sig / denom * (x - a * MU)  # (x - a x0) / sig, written without the cancellation
        return {"flow": eps - x0, "x0": x0}[prediction_type]

    return model


def _noise(n=256):
    return torch.randn(n, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


def _error(sampler, flow, steps):
    eps = _noise()
    out = D.SAMPLERS[sampler](gaussian_flow_model(flow), eps, flow, steps, prediction_type="flow")
    return (out - (MU + S * eps)).abs().max().item()


@pytest.mark.parametrize("shift", [1.0, 3.0])
@pytest.mark.parametrize("sampler,order", [("euler", 1), ("heun", 2)])
def test_ode_solvers_converge_to_the_exact_map_at_their_order(sampler, order, shift):
    """The flow ODE maps eps to mu + s eps exactly; halving the step size divides the error by 2^order."""
    flow = D.RectifiedFlow(shift)
    errors = [_error(sampler, flow, n) for n in (16, 32, 64)]
    rates = [math.log2(errors[i] / errors[i + 1]) for i in range(2)]
    assert all(abs(r - order) < 0.25 for r in rates), (errors, rates)
    assert _error(sampler, flow, 400) < (2e-2 if order == 1 else 1e-4)


def test_dpmpp_2m_on_the_flow_reaches_the_exact_map():
    """Second order once past the first two (first-order) steps out of pure noise."""
    flow = D.RectifiedFlow(1.0)
    errors = [_error("dpmpp_2m", flow, n) for n in (32, 128)]
    assert errors[1] < errors[0] / 12 and errors[1] < 5e-3, errors


def test_x0_prediction_gives_the_same_map():
    flow = D.RectifiedFlow(1.0)
    eps = _noise()
    a = D.sample_heun(gaussian_flow_model(flow, "x0"), eps, flow, 20, prediction_type="x0")
    b = D.sample_heun(gaussian_flow_model(flow, "flow"), eps, flow, 20, prediction_type="flow")
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_euler_maruyama_keeps_the_gaussian_marginals():
    flow = D.RectifiedFlow(1.0)
    model = gaussian_flow_model(flow)
    x = D.sample(lambda x, t: model(x.double(), t).float(), (10000, 3), flow, sampler="euler_maruyama", steps=100,
                 prediction_type="flow", generator=torch.Generator().manual_seed(1)).double()
    assert ((x.mean(0) - MU) / S).abs().max() < 0.04 and (x.std(0) / S - 1).abs().max() < 0.04
    det = D.sample(lambda x, t: model(x.double(), t).float(), (10000, 3), flow, sampler="euler", steps=100,
                   prediction_type="flow", generator=torch.Generator().manual_seed(1)).double()
    assert not torch.allclose(x, det, atol=1e-2)  # the per-step noise really changes the path


def make_model():
    """A deterministic, nonlinear, t-dependent model (B, C, H, W), (B,) -> (B, C, H, W)."""
    w = torch.randn(4, 4, generator=torch.Generator().manual_seed(0)) * 0.5

    def model(x, t):
        return torch.tanh(torch.einsum("oc,bchw->bohw", w, x)) + 0.3 * torch.cos(t / 300)[:, None, None, None]

    return model


def _diffusers_run(scheduler, model, x):
    for t in scheduler.timesteps:
        x = scheduler.step(model(x, t.float().expand(x.shape[0])), t, x).prev_sample
    return x


def _x1():
    return torch.randn(2, 4, 6, 6, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("steps", [1, 7, 28])
def test_euler_matches_diffusers_flow_match_euler(steps):
    ref = diffusers.FlowMatchEulerDiscreteScheduler()
    ref.set_timesteps(steps)
    expected = _diffusers_run(ref, make_model(), _x1())
    ours = D.sample(make_model(), _x1().shape, D.RectifiedFlow(1.0), sampler="euler", steps=steps,
                    prediction_type="flow", noise=_x1())
    torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("steps", [2, 7, 28])
def test_heun_matches_diffusers_flow_match_heun(steps):
    ref = diffusers.FlowMatchHeunDiscreteScheduler()
    ref.set_timesteps(steps)
    expected = _diffusers_run(ref, make_model(), _x1())
    ours = D.sample_heun(make_model(), _x1(), D.RectifiedFlow(1.0), steps, prediction_type="flow")
    torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-4)


def test_shifted_levels_match_diffusers_given_the_same_unshifted_sigmas():
    """diffusers shifts its sigma_min twice in ``set_timesteps`` when shift != 1; handed our unshifted levels it
    applies the shift once, as we do, and the Euler runs agree."""
    flow, steps = D.RectifiedFlow(3.0), 9
    ref = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)
    ref.set_timesteps(sigmas=torch.linspace(1, 1e-3, steps, dtype=torch.float64).numpy())
    torch.testing.assert_close(flow.sampling_levels(steps).sigma.float(), ref.sigmas)
    expected = _diffusers_run(ref, make_model(), _x1())
    ours = D.sample_euler(make_model(), _x1(), flow, steps, prediction_type="flow")
    torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-4)


def test_resolution_shift_is_flux_time_shift():
    mu = math.log(D.resolution_shift(1024))
    assert mu == pytest.approx(0.5 + (1.15 - 0.5) / (4096 - 256) * (1024 - 256))
    ref = diffusers.FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True)
    sigma = torch.linspace(0.01, 1, 50, dtype=torch.float64)
    torch.testing.assert_close(D.time_shift(sigma, math.exp(mu)), ref.time_shift(mu, 1.0, sigma))
    assert D.RectifiedFlow.for_resolution(1024).shift == pytest.approx(math.exp(mu))


@pytest.mark.parametrize("density", D.TIMESTEP_DENSITIES)
def test_densities_match_diffusers(density):
    ours = D.sample_density(64, density, generator=torch.Generator().manual_seed(3), logit_mean=0.3, logit_std=0.7,
                            mode_scale=1.29)
    ref = compute_density_for_timestep_sampling("none" if density == "uniform" else density, 64, logit_mean=0.3,
                                                logit_std=0.7, mode_scale=1.29, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(ours, ref)


def test_logit_normal_moments():
    u = D.sample_density(200_000, "logit_normal", generator=torch.Generator().manual_seed(0), logit_mean=0.5,
                         logit_std=0.8)
    logit = (u / (1 - u)).log()
    assert logit.mean().item() == pytest.approx(0.5, abs=0.01) and logit.std().item() == pytest.approx(0.8, abs=0.01)
    assert 0 < u.min() and u.max() < 1


@pytest.mark.parametrize("weighting", ["sigma_sqrt", "cosmap", "none"])
def test_loss_weights_match_diffusers(weighting):
    sigma = torch.linspace(0.05, 1, 20)
    torch.testing.assert_close(D.loss_weight(sigma, weighting), compute_loss_weighting_for_sd3(weighting, sigma))


@pytest.mark.parametrize("weighting", ["none", "cosmap"])
def test_flow_training_loss_matches_formula(weighting):
    flow = D.RectifiedFlow(3.0)
    x0 = torch.randn(16, 3, 4, 4, generator=torch.Generator().manual_seed(2))
    w = torch.randn(3, 3, generator=torch.Generator().manual_seed(3))
    model = lambda x, t: torch.einsum("oc,bchw->bohw", w, x) * torch.cos(t / 700)[:, None, None, None]  # noqa: E731
    loss = D.training_loss(model, x0, flow, "flow", generator=torch.Generator().manual_seed(4),
                           timestep_sampling="logit_normal", loss_weighting=weighting)
    g = torch.Generator().manual_seed(4)
    u = torch.normal(0.0, 1.0, (16,), generator=g).sigmoid()
    sigma = 3 * u / (1 + 2 * u)
    noise = torch.randn(x0.shape, generator=g)
    s = sigma[:, None, None, None]
    err = (model((1 - s) * x0 + s * noise, sigma * 1000) - (noise - x0)).pow(2).mean((1, 2, 3))
    weight = compute_loss_weighting_for_sd3(weighting, sigma)
    torch.testing.assert_close(loss, (weight * err).mean(), rtol=1e-5, atol=1e-7)


def test_bad_flow_inputs_name_the_value():
    flow = D.RectifiedFlow(1.0)
    model = lambda x, t, **c: torch.zeros_like(x)  # noqa: E731
    x0 = torch.randn(2, 3)
    for bad in (0, -1.0, math.nan, "3"):
        with pytest.raises(ValueError, match=r"shift="):
            D.RectifiedFlow(bad)
    with pytest.raises(ValueError, match=r"timestep_sampling='beta'"):
        D.training_loss(model, x0, flow, "flow", timestep_sampling="beta")
    with pytest.raises(ValueError, match=r"logit_std=0"):
        D.training_loss(model, x0, flow, "flow", timestep_sampling="logit_normal", logit_std=0)
    with pytest.raises(ValueError, match=r"logit_std=-1"):
        D.sample_density(4, "logit_normal", logit_std=-1)
    with pytest.raises(ValueError, match=r"prediction_type='eps'.*RectifiedFlow"):
        D.training_loss(model, x0, flow, "eps")
    with pytest.raises(ValueError, match=r"prediction_type='v'.*RectifiedFlow"):
        D.sample(model, (2, 3), flow, sampler="euler", prediction_type="v")
    for sampler in ("ddim", "ddpm"):
        with pytest.raises(ValueError, match=rf"sampler='{sampler}'.*RectifiedFlow"):
            D.sample(model, (2, 3), flow, sampler=sampler, prediction_type="flow")
        with pytest.raises(ValueError, match=rf"sampler='{sampler}'"):
            D.SAMPLERS[sampler](model, torch.randn(2, 3), flow, 2, prediction_type="flow")
    with pytest.raises(ValueError, match=r"loss_weighting='cosmap'.*NoiseSchedule"):
        D.training_loss(model, x0, D.NoiseSchedule("linear", 100), "eps", loss_weighting="cosmap")
    with pytest.raises(ValueError, match=r"t=.a tensor containing 1001"):
        flow.alpha_sigma(torch.tensor([1001.0]))
    with pytest.raises(ValueError, match=r"sched='str'"):
        D.sample(model, (2, 3), "flow")
    with pytest.raises(ValueError, match=r"seq_len=0"):
        D.resolution_shift(0)


def test_euler_maruyama_bad_arguments():
    flow, x = D.RectifiedFlow(1.0), torch.randn(2, 3)
    model = lambda x, t: torch.zeros_like(x)  # noqa: E731
    kw = dict(prediction_type="flow")
    with pytest.raises(ValueError, match=r"diffusion=-1"):
        D.sample_euler_maruyama(model, x, flow, 2, diffusion=-1, **kw)
    with pytest.raises(ValueError, match=r"generator=.*one per image \(2\)"):
        D.sample_euler_maruyama(model, x, flow, 2, generator=[torch.Generator()], **kw)
    with pytest.raises(ValueError, match=r"sampler='euler_maruyama'.*NoiseSchedule"):
        D.sample(model, (2, 3), D.NoiseSchedule("linear", 100), sampler="euler_maruyama")
    with pytest.raises(ValueError, match=r"noise=.*shape \(2, 3\)"):
        D.sample(model, (2, 3), flow, sampler="euler", noise=torch.randn(3, 3), **kw)


def test_default_sampler_follows_the_process():
    calls = []
    model = lambda x, t: calls.append(1) or torch.zeros_like(x)  # noqa: E731
    D.sample(model, (2, 3), D.RectifiedFlow(), steps=4, prediction_type="flow")
    assert len(calls) == 7  # heun: 2 steps - 1
    calls.clear()
    D.sample(model, (2, 3), D.NoiseSchedule("linear", 100), steps=4)
    assert len(calls) == 4  # ddim
