"""Where training spends its noise levels: densities for the timestep u in [0, 1] and the flow's loss weights.

Esser et al. 2024 (SD3), Sec. 3.1, as implemented by diffusers' ``compute_density_for_timestep_sampling`` and
``compute_loss_weighting_for_sd3``:
  uniform:       u ~ U[0, 1)
  logit_normal:  u = sigmoid(n), n ~ N(mean, std^2)                       (SD3 eq. 19; best: mean 0, std 1)
  mode:          u = 1 - v - scale (cos^2(pi v / 2) - 1 + v), v ~ U[0, 1)  (SD3 eq. 20; scale in [-1, 2/(pi-2)])
Loss weights on a flow's sigma: none (1), sigma_sqrt (sigma^-2) and cosmap (2 / (pi (1 - 2 sigma + 2 sigma^2))).
Every draw comes from the caller's generator, so a resumed run draws the same levels as an uninterrupted one.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from .._validate import check_choice, check_number

TIMESTEP_DENSITIES = ("uniform", "logit_normal", "mode")
LOSS_WEIGHTINGS = ("none", "sigma_sqrt", "cosmap")


def check_density_args(density: str, logit_mean: float = 0.0, logit_std: float = 1.0,
                       mode_scale: float = 1.29) -> None:
    check_choice("timestep_sampling", density, TIMESTEP_DENSITIES)
    check_number("logit_mean", logit_mean, note=" (0.0 in SD3)")
    check_number("logit_std", logit_std, above=0, note=" (1.0 in SD3)")
    check_number("mode_scale", mode_scale, note=" (1.29 in SD3)")


def sample_density(n: int, density: str, *, generator: torch.Generator | None = None, logit_mean: float = 0.0,
                   logit_std: float = 1.0, mode_scale: float = 1.29) -> Tensor:
    """(n,) float32 u in [0, 1] from ``density`` (see the module docstring), drawn on the generator's device."""
    check_density_args(density, logit_mean, logit_std, mode_scale)
    device = generator.device if generator is not None else None
    if density == "logit_normal":
        return torch.normal(logit_mean, logit_std, (n,), generator=generator, device=device).sigmoid()
    u = torch.rand(n, generator=generator, device=device)
    if density == "mode":
        u = 1 - u - mode_scale * (torch.cos(math.pi * u / 2) ** 2 - 1 + u)
    return u


def loss_weight(sigma: Tensor, weighting: str) -> Tensor:
    """Per-sample loss weight at flow noise level ``sigma`` (diffusers' ``compute_loss_weighting_for_sd3``)."""
    check_choice("loss_weighting", weighting, LOSS_WEIGHTINGS)
    if weighting == "sigma_sqrt":
        return sigma.float() ** -2.0
    if weighting == "cosmap":
        return 2 / (math.pi * (1 - 2 * sigma.float() + 2 * sigma.float() ** 2))
    return torch.ones_like(sigma, dtype=torch.float32)
