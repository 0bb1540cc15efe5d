"""Parity of every sampler against diffusers' schedulers (test oracle only) driven by the same model callable.

Conventions (ours <-> diffusers):
- ddpm / ddim / dpmpp_2m visit the "trailing" timesteps (Lin et al. 2024); diffusers' defaults are "leading"
  (DDPM, DDIM) and "linspace" (DPMSolverMultistep), so the oracle is built with timestep_spacing="trailing".
  DDIMScheduler steps to ``t - T // steps`` rather than to the next listed timestep, which differs from the
  trailing list when steps does not divide T; we always step to the next listed timestep (as DDPMScheduler
  and DPMSolverMultistepScheduler do), so the parity runs use steps that divide T.
- clip_sample is off in the oracle (diffusers' DDPM / DDIM default clamps x0 to [-1, 1]; we never clamp).
- euler / heun: diffusers' defaults (linspace spacing, use_karras_sigmas=True): same sigmas, same fractional t,
  given the same alphas_cumprod table (diffusers' is a float32 cumprod, ours float64).
  We start from x_T (VP) * sqrt(1 + sigma_max^2); diffusers' init_noise_sigma is sigma_max (1e-9 relative apart).
"""
import diffusers
import pytest
import torch

import visionformers.diffusion as D  # noqa: E402

DIFFUSERS_TYPE = {"eps": "epsilon", "x0": "sample", "v": "v_prediction"}
DIFFUSERS_SCHEDULE = {"linear": "linear", "cosine": "squaredcos_cap_v2"}
SHAPE = (2, 4, 6, 6)


def make_model():
    """A deterministic, nonlinear, t-dependent model (B, C, H, W), (B,) -> (B, C, H, W)."""
    w = torch.randn(4, 4, generator=torch.Generator().manual_seed(0)) * 0.5

    def model(x, t):
        assert t.shape == (x.shape[0],) and t.dtype == torch.float32
        return torch.tanh(torch.einsum("oc,bchw->bohw", w, x)) + 0.1 * torch.cos(t / 300)[:, None, None, None]

    return model


def x_T():
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))


def run_diffusers(scheduler, model, x, **step_kwargs):
    for t in scheduler.timesteps:
        inp = scheduler.scale_model_input(x, t)
        out = model(inp, t.float().expand(x.shape[0]))
        x = scheduler.step(out, t, x, **step_kwargs).prev_sample
    return x


def assert_close(ours, ref):
    scale = ref.abs().max().item()
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5 * max(1.0, scale))


CASES = [("linear", p) for p in DIFFUSERS_TYPE] + [("cosine", "v")]


@pytest.mark.parametrize("kind,prediction_type", CASES)
@pytest.mark.parametrize("eta", [0.0, 0.7])
def test_ddim_matches_diffusers(kind, prediction_type, eta):
    ref = diffusers.DDIMScheduler(beta_schedule=DIFFUSERS_SCHEDULE[kind], clip_sample=False, set_alpha_to_one=True,
                                  timestep_spacing="trailing", prediction_type=DIFFUSERS_TYPE[prediction_type])
    ref.set_timesteps(10)
    sched, model = D.NoiseSchedule(kind, 1000), make_model()
    assert D.discrete_timesteps(1000, 10).tolist() == ref.timesteps.tolist()
    expected = run_diffusers(ref, model, x_T(), generator=torch.Generator().manual_seed(5), eta=eta)
    ours = D.sample_ddim(model, x_T(), sched, 10, prediction_type=prediction_type, eta=eta,
                         generator=torch.Generator().manual_seed(5))
    assert_close(ours, expected)


@pytest.mark.parametrize("kind,prediction_type", CASES)
def test_ddpm_matches_diffusers(kind, prediction_type):
    ref = diffusers.DDPMScheduler(beta_schedule=DIFFUSERS_SCHEDULE[kind], clip_sample=False,
                                  variance_type="fixed_small", timestep_spacing="trailing",
                                  prediction_type=DIFFUSERS_TYPE[prediction_type])
    ref.set_timesteps(20)
    sched, model = D.NoiseSchedule(kind, 1000), make_model()
    assert D.discrete_timesteps(1000, 20).tolist() == ref.timesteps.tolist()
    # same generator, same draw order (one randn per step); diffusers' extra draw at the last step is scaled by 1e-10
    expected = run_diffusers(ref, model, x_T(), generator=torch.Generator().manual_seed(5))
    ours = D.sample_ddpm(model, x_T(), sched, 20, prediction_type=prediction_type,
                         generator=torch.Generator().manual_seed(5))
    assert_close(ours, expected)


@pytest.mark.parametrize("kind,prediction_type", CASES)
@pytest.mark.parametrize("steps", [10, 20])  # < 15 and >= 15 take different lower-order branches in diffusers
def test_dpmpp_2m_matches_diffusers(kind, prediction_type, steps):
    ref = diffusers.DPMSolverMultistepScheduler(
        beta_schedule=DIFFUSERS_SCHEDULE[kind], algorithm_type="dpmsolver++", solver_order=2,
        timestep_spacing="trailing", final_sigmas_type="zero", prediction_type=DIFFUSERS_TYPE[prediction_type])
    ref.set_timesteps(steps)
    sched, model = D.NoiseSchedule(kind, 1000), make_model()
    assert D.discrete_timesteps(1000, steps).tolist() == ref.timesteps.tolist()
    expected = run_diffusers(ref, model, x_T())
    ours = D.sample_dpmpp_2m(model, x_T(), sched, steps, prediction_type=prediction_type)
    assert_close(ours, expected)


@pytest.mark.parametrize("kind,prediction_type", CASES)
@pytest.mark.parametrize("name", ["euler", "heun"])
def test_karras_samplers_match_diffusers(name, kind, prediction_type):
    cls = diffusers.EulerDiscreteScheduler if name == "euler" else diffusers.HeunDiscreteScheduler
    ref = cls(beta_schedule=DIFFUSERS_SCHEDULE[kind], use_karras_sigmas=True,
              prediction_type=DIFFUSERS_TYPE[prediction_type])
    sched, model = D.NoiseSchedule(kind, 1000), make_model()
    # diffusers accumulates alphas_cumprod in float32 (~3e-5 relative off at t=999, see test_schedules); the Karras
    # sigma range comes from its ends, so hand the oracle our float64 table to compare the samplers themselves.
    ref.alphas_cumprod = sched.alphas_cumprod.clone()
    ref.set_timesteps(8)
    sigmas = D.karras_sigmas(sched, 8)
    unique_sigmas = ref.sigmas if name == "euler" else torch.cat([ref.sigmas[:1], ref.sigmas[1::2]])
    torch.testing.assert_close(sigmas.float(), unique_sigmas, rtol=1e-6, atol=0)
    unique_t = ref.timesteps if name == "euler" else torch.cat([ref.timesteps[:1], ref.timesteps[1::2]])
    torch.testing.assert_close(sched.sigma_to_t(sigmas[:-1]).float(), unique_t, rtol=1e-6, atol=1e-4)

    start = x_T()
    expected = run_diffusers(ref, model, start * (1 + sigmas[0].item() ** 2) ** 0.5)
    ours = D.SAMPLERS[name](model, start, sched, 8, prediction_type=prediction_type)
    assert_close(ours, expected)
