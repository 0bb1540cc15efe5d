"""A diffusers scheduler config (DDPMScheduler, DDIMScheduler, DPMSolverMultistepScheduler) -> our noise process.

Every setting that changes the images is honoured, or named in a ValueError: the betas (``beta_schedule``,
``beta_start``/``beta_end``, ``trained_betas``, ``rescale_betas_zero_snr``), ``prediction_type``, the timestep
spacing (``timestep_spacing``, ``steps_offset``), DDIM's ``set_alpha_to_one``, ``clip_sample`` and dynamic
``thresholding``. The betas are built in float32 as diffusers builds them, so alphas_cumprod is the same table.
"""
from __future__ import annotations

import math

import torch

from visionformers.diffusion.discretization import Discretization
from visionformers.diffusion.schedules import NoiseSchedule, cosine_betas, rescale_zero_terminal_snr

__all__ = ["schedule_from_diffusers", "SCHEDULER_SAMPLERS"]

# the scheduler class -> the sampler of ours that takes the same steps
SCHEDULER_SAMPLERS = {"DDPMScheduler": "ddpm", "DDIMScheduler": "ddim", "DPMSolverMultistepScheduler": "dpmpp_2m"}
PREDICTION_TYPES = {"epsilon": "eps", "sample": "x0", "v_prediction": "v"}
_NO_OP_KEYS = ("tensor_format", "timestep_values")

_COMMON = dict(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear", trained_betas=None,
               prediction_type="epsilon", thresholding=False, dynamic_thresholding_ratio=0.995, sample_max_value=1.0,
               timestep_spacing="leading", steps_offset=0, rescale_betas_zero_snr=False)
_DEFAULTS = {
    "DDPMScheduler": dict(_COMMON, variance_type="fixed_small", clip_sample=True, clip_sample_range=1.0),
    "DDIMScheduler": dict(_COMMON, clip_sample=True, set_alpha_to_one=True, clip_sample_range=1.0),
    "DPMSolverMultistepScheduler": dict(
        _COMMON, timestep_spacing="linspace", solver_order=2, algorithm_type="dpmsolver++", solver_type="midpoint",
        lower_order_final=True, euler_at_final=False, use_karras_sigmas=False, use_exponential_sigmas=False,
        use_beta_sigmas=False, use_lu_lambdas=False, use_flow_sigmas=False, flow_shift=1.0, final_sigmas_type="zero",
        lambda_min_clipped=-math.inf, variance_type=None, use_dynamic_shifting=False, time_shift_type="exponential"),
}
# fields with only these values honoured (DPM-Solver++(2M) with a first-order last step onto sigma = 0)
_FIXED = {
    "DDPMScheduler": dict(variance_type=("fixed_small",)),
    "DPMSolverMultistepScheduler": dict(
        solver_order=(2,), algorithm_type=("dpmsolver++",), solver_type=("midpoint",), lower_order_final=(True,),
        euler_at_final=(False,), use_karras_sigmas=(False,), use_exponential_sigmas=(False,), use_beta_sigmas=(False,),
        use_lu_lambdas=(False,), use_flow_sigmas=(False,), final_sigmas_type=("zero",), lambda_min_clipped=(-math.inf,),
        variance_type=(None,), use_dynamic_shifting=(False,)),
}


def _betas(c: dict, cls: str) -> torch.Tensor:
    """diffusers' ``betas`` (float32) for the config's beta_schedule."""
    T, start, end, kind = c["num_train_timesteps"], c["beta_start"], c["beta_end"], c["beta_schedule"]
    if c["trained_betas"] is not None:
        betas = torch.tensor(c["trained_betas"], dtype=torch.float32)
        if betas.ndim != 1 or betas.shape[0] != T:
            raise ValueError(f"diffusers {cls} config field trained_betas has {tuple(betas.shape)} entries; expected "
                             f"num_train_timesteps={T}")
        return betas
    if kind == "linear":
        return torch.linspace(start, end, T, dtype=torch.float32)
    if kind == "scaled_linear":  # latent diffusion: linear in sqrt(beta)
        return torch.linspace(start**0.5, end**0.5, T, dtype=torch.float32) ** 2
    if kind == "squaredcos_cap_v2":  # Nichol & Dhariwal 2021, eq. 17, betas capped at 0.999
        return cosine_betas(T).float()
    if kind == "sigmoid" and cls == "DDPMScheduler":  # GeoDiff
        return torch.sigmoid(torch.linspace(-6, 6, T)) * (end - start) + start
    accepted = "linear, scaled_linear, squaredcos_cap_v2" + (", sigmoid" if cls == "DDPMScheduler" else "")
    raise ValueError(f"diffusers {cls} config field beta_schedule={kind!r} is not supported; accepted: {accepted}")


def schedule_from_diffusers(config: dict) -> tuple[NoiseSchedule, str, str]:
    """A diffusers ``scheduler_config.json`` dict -> (schedule, our prediction type, the matching sampler name)."""
    if not isinstance(config, dict):
        raise ValueError(f"config={type(config).__name__} is not accepted; expected a scheduler_config.json dict")
    cls = config.get("_class_name")
    if cls not in _DEFAULTS:
        raise ValueError(f"diffusers scheduler _class_name={cls!r} is not supported; accepted: {list(_DEFAULTS)}")
    defaults = _DEFAULTS[cls]
    config = dict(config)
    for key in _NO_OP_KEYS:  # written by early diffusers releases, read by none today
        config.pop(key, None)
    if "predict_epsilon" in config:  # the early spelling of prediction_type
        legacy = config.pop("predict_epsilon")
        config.setdefault("prediction_type", "epsilon" if legacy else "sample")
    unknown = sorted(k for k in config if not k.startswith("_") and k not in defaults)
    if unknown:
        raise ValueError(f"diffusers {cls} config field(s) {unknown} are not supported; accepted: {sorted(defaults)}")
    c = {**defaults, **{k: v for k, v in config.items() if not k.startswith("_")}}
    for name, ok in _FIXED.get(cls, {}).items():
        if c[name] not in ok:
            raise ValueError(f"diffusers {cls} config field {name}={c[name]!r} is not supported; accepted: "
                             f"{' or '.join(repr(v) for v in ok)}")
    if c["prediction_type"] not in PREDICTION_TYPES:
        raise ValueError(f"diffusers {cls} config field prediction_type={c['prediction_type']!r} is not supported; "
                         f"accepted: {list(PREDICTION_TYPES)}")
    T = c["num_train_timesteps"]
    if not isinstance(T, int) or isinstance(T, bool) or T < 2:
        raise ValueError(f"diffusers {cls} config field num_train_timesteps={T!r} is not supported; accepted: an int >= 2")
    betas = _betas(c, cls)
    if c["rescale_betas_zero_snr"]:
        betas = rescale_zero_terminal_snr(betas)
    clip = c.get("clip_sample", False)
    try:
        sampling = Discretization(
            timestep_spacing=c["timestep_spacing"], steps_offset=c["steps_offset"], diffusers=True,
            set_alpha_to_one=bool(c.get("set_alpha_to_one", True)),
            clip_sample=float(c["clip_sample_range"]) if clip and not c["thresholding"] else None,
            thresholding=(float(c["dynamic_thresholding_ratio"]), float(c["sample_max_value"])) if c["thresholding"] else None,
        )
        # DPM-Solver keeps the zero-SNR step at alphas_cumprod = 2^-24 (a finite first sigma), the others at 0
        terminal = 2.0**-24 if cls == "DPMSolverMultistepScheduler" and c["rescale_betas_zero_snr"] else None
        sched = NoiseSchedule.from_betas(betas, name=f"diffusers {c['beta_schedule']}", sampling=sampling,
                                         terminal_alphas_cumprod=terminal)
    except ValueError as e:
        raise ValueError(f"diffusers {cls} config is not supported: {e}") from None
    return sched, PREDICTION_TYPES[c["prediction_type"]], SCHEDULER_SAMPLERS[cls]
