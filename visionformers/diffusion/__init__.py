"""The noise process: a Gaussian path (VP schedules, rectified flow), the training objective, samplers and
classifier-free guidance.

Networks never see it: any callable ``model(x_t, t, **cond) -> prediction`` is trained with
:func:`training_loss` and sampled with :func:`sample`.
"""
from .densities import LOSS_WEIGHTINGS, TIMESTEP_DENSITIES, loss_weight, sample_density
from .denoiser import Denoiser
from .flow import RectifiedFlow, resolution_shift, time_shift
from .guidance import batch_cond_uncond, guided_model, rescale_guidance
from .objectives import (
    PREDICTION_TYPES,
    check_loss_options,
    min_snr_weight,
    predict_x0_eps,
    prediction_target,
    training_loss,
)
from .path import GaussianPath, Levels
from .samplers import (
    SAMPLERS,
    FLOW_ONLY,
    VP_ONLY,
    check_sampler,
    discrete_timesteps,
    karras_sigmas,
    sample,
    sample_ddim,
    sample_ddpm,
    sample_dpmpp_2m,
    sample_euler,
    sample_euler_maruyama,
    sample_heun,
)
from .discretization import Discretization
from .schedules import SCHEDULES, NoiseSchedule, rescale_zero_terminal_snr

__all__ = [
    "NoiseSchedule", "SCHEDULES", "Discretization", "rescale_zero_terminal_snr", "RectifiedFlow", "time_shift",
    "resolution_shift", "GaussianPath", "Levels", "Denoiser",
    "training_loss", "check_loss_options", "check_sampler", "predict_x0_eps", "prediction_target", "min_snr_weight",
    "PREDICTION_TYPES",
    "TIMESTEP_DENSITIES", "LOSS_WEIGHTINGS", "sample_density", "loss_weight",
    "sample", "SAMPLERS", "VP_ONLY", "FLOW_ONLY", "sample_ddpm", "sample_ddim", "sample_dpmpp_2m", "sample_euler",
    "sample_heun",
    "sample_euler_maruyama", "discrete_timesteps", "karras_sigmas", "guided_model", "batch_cond_uncond",
    "rescale_guidance",
]
