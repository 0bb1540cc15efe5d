"""Training objective and the one place where eps / x0 / v / flow predictions are converted into each other.

With x_t = alpha x0 + sigma eps (any Gaussian path, see ``path.py``) the parametrisations are
  eps, x0, v = alpha eps - sigma x0 (Salimans & Ho 2022, Sec. 4 and App. D; needs alpha^2 + sigma^2 = 1, VP)
  and flow = eps - x0 (the velocity dx/dsigma of rectified flow: Esser et al. 2024, eq. 2-3, diffusers' FlowMatch),
and each pair (x_t, prediction) determines (x0, eps) linearly. The loss and every sampler go through
:func:`predict_x0_eps` / :func:`prediction_target`, so a sign convention cannot drift between them. Which types
a process accepts is its ``prediction_types``.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from .._validate import check_choice, check_number, check_tensor, fail
from .densities import LOSS_WEIGHTINGS, check_density_args, loss_weight
from .path import check_process
from .schedules import NoiseSchedule, _expand

PREDICTION_TYPES = ("eps", "x0", "v", "flow")


def check_model_output(pred, expected_shape, like: str) -> None:
    """The model's prediction must be a tensor of ``expected_shape`` (that of ``like``, e.g. x0 or x_t):
    anything else would broadcast into a silently wrong result or fail deep inside the update formulas."""
    if not isinstance(pred, Tensor):
        fail("model output", type(pred).__name__, f"a tensor shaped like {like} {tuple(expected_shape)}")
    if pred.shape != expected_shape:
        fail("model output", pred, f"a tensor shaped like {like} {tuple(expected_shape)}")


def check_generator(generator) -> None:
    if generator is not None and not isinstance(generator, torch.Generator):
        fail("generator", generator, "None or a torch.Generator (e.g. torch.Generator().manual_seed(0))")


def predict_x0_eps(pred: Tensor, x_t: Tensor, alpha, sigma, prediction_type: str) -> tuple[Tensor, Tensor]:
    """(x0, eps) implied by a model prediction at x_t; alpha, sigma are floats or tensors broadcastable to x_t.

    eps: x0 = (x_t - sigma eps) / alpha            (Ho et al. 2020, eq. 15)
    x0:  eps = (x_t - alpha x0) / sigma
    v:   x0 = alpha x_t - sigma v, eps = sigma x_t + alpha v   (Salimans & Ho 2022, App. D)
    flow: x_t = (alpha + sigma) x0 + sigma f, so x0 = (x_t - sigma f) / (alpha + sigma), eps = x0 + f
    """
    if prediction_type == "eps":
        return (x_t - sigma * pred) / alpha, pred
    if prediction_type == "x0":
        return pred, (x_t - alpha * pred) / sigma
    if prediction_type == "v":
        return alpha * x_t - sigma * pred, sigma * x_t + alpha * pred
    if prediction_type == "flow":
        x0 = (x_t - sigma * pred) / (alpha + sigma)
        return x0, x0 + pred
    check_choice("prediction_type", prediction_type, PREDICTION_TYPES)
    raise AssertionError("unreachable")


def prediction_target(x0: Tensor, eps: Tensor, alpha, sigma, prediction_type: str) -> Tensor:
    """What a model of ``prediction_type`` should output for x_t = alpha x0 + sigma eps (inverse of predict_x0_eps)."""
    if prediction_type == "eps":
        return eps
    if prediction_type == "x0":
        return x0
    if prediction_type == "v":
        return alpha * eps - sigma * x0
    if prediction_type == "flow":
        return eps - x0
    check_choice("prediction_type", prediction_type, PREDICTION_TYPES)
    raise AssertionError("unreachable")


def min_snr_weight(snr: Tensor, gamma: float, prediction_type: str) -> Tensor:
    """Min-SNR-gamma loss weight (Hang et al. 2023, sec. 3.4) for an MSE on ``prediction_type``.

    The paper weights the x0-space error by min(snr, gamma). Since |x0 err|^2 = |eps err|^2 / snr and
    |x0 err|^2 = |v err|^2 / (1 + snr), the same weighting on the other targets is
      x0: min(snr, gamma);  eps: min(snr, gamma) / snr = gamma / max(snr, gamma);  v: min(snr, gamma) / (snr + 1);
      flow (alpha + sigma = 1): x0 err = sigma f err, so min(snr, gamma) sigma^2 = min(snr, gamma) / (1 + sqrt(snr))^2.
    The eps form is written without a division by snr so that snr = 0 (zero terminal SNR) gives weight 1.
    """
    check_choice("prediction_type", prediction_type, PREDICTION_TYPES)
    check_tensor("snr", snr, floating=True)
    check_number("gamma", gamma, above=0, note=" (5 in Hang et al. 2023)")
    if prediction_type == "x0":
        return snr.clamp(max=gamma)
    if prediction_type == "eps":
        return gamma / snr.clamp(min=gamma)
    if prediction_type == "flow":
        return snr.clamp(max=gamma) / (1 + snr.sqrt()) ** 2
    return snr.clamp(max=gamma) / (snr + 1)


def check_loss_options(sched, prediction_type: str, min_snr_gamma: float | None = None,
                       timestep_sampling: str = "uniform", loss_weighting: str = "none", **density_args) -> None:
    """The process-dependent options of :func:`training_loss`, checked together (scripts call it before training)."""
    check_process("sched", sched)
    check_choice("prediction_type", prediction_type, PREDICTION_TYPES)
    sched.check_prediction_type(prediction_type)
    check_number("min_snr_gamma", min_snr_gamma, above=0, optional=True, note=" (5 in Hang et al. 2023)")
    check_density_args(timestep_sampling, **density_args)
    check_choice("loss_weighting", loss_weighting, LOSS_WEIGHTINGS)
    if loss_weighting != "none" and isinstance(sched, NoiseSchedule):
        fail("loss_weighting", loss_weighting, "'none' with a NoiseSchedule (sigma_sqrt and cosmap weight a "
             "RectifiedFlow's sigma; use min_snr_gamma for a VP schedule)")


def training_loss(
    model: Callable[..., Tensor],
    x0: Tensor,
    sched,
    prediction_type: str = "eps",
    min_snr_gamma: float | None = None,
    *,
    offset_noise: float = 0.0,
    generator: torch.Generator | None = None,
    timestep_sampling: str = "uniform",
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
    mode_scale: float = 1.29,
    loss_weighting: str = "none",
    **cond,
) -> Tensor:
    """Denoising loss of Ho et al. 2020 (eq. 14, "L_simple") on the chosen target, as a scalar; on a
    :class:`~.flow.RectifiedFlow` with prediction_type "flow" this is the conditional flow-matching loss of
    Lipman et al. 2023 / Esser et al. 2024 (eq. 3-4).

    :param model: any callable ``(x_t, t, **cond) -> prediction`` with prediction shaped like x0; t is a
        tensor (B,) of model times (a NoiseSchedule: integer steps in [0, T) as floats; a flow: sigma * T).
    :param x0: clean data (B, ...) (images: (B, C, H, W)).
    :param sched: the noise process, a ``NoiseSchedule`` or a ``RectifiedFlow``.
    :param min_snr_gamma: None for uniform weighting, else gamma > 0 of Min-SNR-gamma (Hang et al. 2023;
        5 in the paper).
    :param offset_noise: std of a per-(sample, channel) constant added to the noise (Guttenberg 2023,
        "Diffusion with offset noise"); lets the model change the mean brightness of an image. 0 disables it.
    :param generator: draws t and the noise; drawn on the generator's device, then moved to x0's.
    :param timestep_sampling: the density of the training time, "uniform", "logit_normal" (``logit_mean``,
        ``logit_std``) or "mode" (``mode_scale``), see ``densities.py``. On a flow it is the density of u with
        sigma = shift(u); on a NoiseSchedule "uniform" is t ~ U{0..T-1} and the others floor(u T).
    :param loss_weighting: on a flow, "none", "sigma_sqrt" or "cosmap" (SD3 Sec. 3.1, ``densities.loss_weight``).
    """
    check_tensor("x0", x0, floating=True)
    if x0.ndim < 2 or x0.shape[0] == 0:
        fail("x0", x0, "a non-empty batch (B, ...) with at least 2 dimensions")
    if not callable(model):
        fail("model", type(model).__name__, "a callable (x_t, t, **cond) -> prediction")
    density_args = dict(logit_mean=logit_mean, logit_std=logit_std, mode_scale=mode_scale)
    check_loss_options(sched, prediction_type, min_snr_gamma, timestep_sampling, loss_weighting, **density_args)
    check_number("offset_noise", offset_noise, at_least=0, note=" (0.1 in Guttenberg 2023)")
    check_generator(generator)
    if offset_noise > 0 and x0.ndim < 3:
        fail("x0", x0, "a (B, C, ...) tensor when offset_noise > 0 (the offset is per channel)")

    b, gen_device = x0.shape[0], generator.device if generator is not None else x0.device
    t = sched.training_times(b, timestep_sampling, generator=generator, device=x0.device, **density_args)
    noise = torch.randn(x0.shape, generator=generator, device=gen_device, dtype=x0.dtype).to(x0.device)
    if offset_noise > 0:
        offset_shape = (*x0.shape[:2], *([1] * (x0.ndim - 2)))  # (B, C, 1, 1): one constant per image channel
        noise = noise + offset_noise * torch.randn(offset_shape, generator=generator, device=gen_device,
                                                   dtype=x0.dtype).to(x0.device)

    alpha, sigma = sched._alpha_sigma(t)  # (B,) each (NoiseSchedule: exact table values); t in range by construction
    alpha_x, sigma_x = _expand(alpha, x0).to(x0.dtype), _expand(sigma, x0).to(x0.dtype)
    x_t = alpha_x * x0 + sigma_x * noise
    pred = model(x_t, t.float(), **cond)
    check_model_output(pred, x0.shape, "x0")

    target = prediction_target(x0, noise, alpha_x, sigma_x, prediction_type)
    per_sample = (pred.float() - target.float()).pow(2).flatten(1).mean(1)  # (B,)
    if min_snr_gamma is not None:
        per_sample = per_sample * min_snr_weight(alpha**2 / sigma**2, float(min_snr_gamma), prediction_type)
    if loss_weighting != "none":
        per_sample = per_sample * loss_weight(sigma, loss_weighting)
    return per_sample.mean()
