"""The noise process: schedules, the training objective, samplers and classifier-free guidance.

Networks never see it: any callable ``model(x_t, t, **cond) -> prediction`` is trained with
:func:`training_loss` and sampled with :func:`sample`.
"""
from .guidance import batch_cond_uncond, guided_model
from .objectives import PREDICTION_TYPES, min_snr_weight, predict_x0_eps, prediction_target, training_loss
from .samplers import (
    SAMPLERS,
    discrete_timesteps,
    karras_sigmas,
    sample,
    sample_ddim,
    sample_ddpm,
    sample_dpmpp_2m,
    sample_euler,
    sample_heun,
)
from .discretization import Discretization
from .schedules import SCHEDULES, NoiseSchedule, rescale_zero_terminal_snr

__all__ = [
    "NoiseSchedule", "SCHEDULES", "Discretization", "rescale_zero_terminal_snr",
    "training_loss", "predict_x0_eps", "prediction_target", "min_snr_weight", "PREDICTION_TYPES",
    "sample", "SAMPLERS", "sample_ddpm", "sample_ddim", "sample_dpmpp_2m", "sample_euler", "sample_heun",
    "discrete_timesteps", "karras_sigmas", "guided_model", "batch_cond_uncond",
]
