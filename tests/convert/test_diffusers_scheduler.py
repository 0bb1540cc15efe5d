"""diffusers scheduler configs -> our schedule: the same tables, timesteps and x0 limits; unhonoured settings named."""
import pytest
import torch
from _diffusers_models import diffusers

from visionformers.convert.diffusers_scheduler import schedule_from_diffusers


def _config(cls, **kw):
    return {**cls(**kw).config, "_class_name": cls.__name__}


@pytest.mark.parametrize("cls", ["DDIMScheduler", "DDPMScheduler", "DPMSolverMultistepScheduler"])
@pytest.mark.parametrize("kw", [
    dict(timestep_spacing="leading", steps_offset=1, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
    dict(timestep_spacing="trailing", beta_schedule="squaredcos_cap_v2"),
    dict(timestep_spacing="linspace", rescale_betas_zero_snr=True),
])
def test_tables_and_timesteps_match_diffusers(cls, kw):
    scheduler = getattr(diffusers, cls)(**kw)
    sched, _, sampler = schedule_from_diffusers({**scheduler.config, "_class_name": cls})
    assert torch.equal(sched.alphas_cumprod.float(), scheduler.alphas_cumprod)
    for steps in (7, 10, 50):
        scheduler.set_timesteps(steps)
        ts, ab, ab_prev = sched.sampling.steps(sched.alphas_cumprod, steps, sampler)
        assert ts.tolist() == scheduler.timesteps.tolist()
        if cls == "DDIMScheduler":  # lands on t - T // steps, or the final alphas_cumprod past 0
            prev = [scheduler.alphas_cumprod[p].item() if p >= 0 else scheduler.final_alpha_cumprod.item()
                    for p in (ts - 1000 // steps).tolist()]
            assert torch.allclose(ab_prev.float(), torch.tensor(prev))


def test_thresholding_and_clipping_match_diffusers():
    x0 = 3 * torch.randn(4, 3, 8, 8)
    scheduler = diffusers.DDIMScheduler(thresholding=True, dynamic_thresholding_ratio=0.9, sample_max_value=2.5)
    sched, _, _ = schedule_from_diffusers(_config(diffusers.DDIMScheduler, thresholding=True,
                                                  dynamic_thresholding_ratio=0.9, sample_max_value=2.5))
    assert torch.allclose(sched.sampling.limit_x0(x0), scheduler._threshold_sample(x0.clone()), atol=1e-6)
    sched, prediction, _ = schedule_from_diffusers(_config(diffusers.DDIMScheduler, clip_sample_range=0.5,
                                                           prediction_type="v_prediction"))
    assert prediction == "v" and torch.equal(sched.sampling.limit_x0(x0), x0.clamp(-0.5, 0.5))
    assert not schedule_from_diffusers(_config(diffusers.DPMSolverMultistepScheduler))[0].sampling.limits_x0


@pytest.mark.parametrize("cls, field, value", [
    ("DPMSolverMultistepScheduler", "use_karras_sigmas", True),
    ("DPMSolverMultistepScheduler", "algorithm_type", "sde-dpmsolver++"),
    ("DPMSolverMultistepScheduler", "solver_order", 3),
    ("DDPMScheduler", "variance_type", "learned_range"),
    ("DDIMScheduler", "beta_schedule", "exp"),
    ("DDIMScheduler", "timestep_spacing", "karras"),
    ("DDIMScheduler", "some_new_setting", 1),
    ("EulerDiscreteScheduler", "_class_name", "EulerDiscreteScheduler"),
])
def test_unhonoured_settings_are_named(cls, field, value):
    config = _config(getattr(diffusers, cls)) if cls != "EulerDiscreteScheduler" else {}
    with pytest.raises(ValueError, match=field if field != "_class_name" else value):
        schedule_from_diffusers({**config, field: value})


def test_euler_refuses_a_clipping_schedule():
    import visionformers as vf

    sched, _, _ = schedule_from_diffusers(_config(diffusers.DDIMScheduler))  # clip_sample=True by default
    with pytest.raises(ValueError, match="clip_sample"):
        vf.diffusion.sample(lambda x, t: x, (1, 1, 2, 2), sched, "euler", steps=2)
