"""Rectified flow: the linear path x_sigma = (1 - sigma) x0 + sigma eps, sigma in [0, 1].

Liu et al. 2023 ("Flow Straight and Fast"), Lipman et al. 2023 (flow matching) and Esser et al. 2024 (SD3,
Sec. 2-3): a model trained on this path predicts the velocity dx/dsigma = eps - x0 (prediction type "flow",
SD3's and diffusers' convention) and samples by integrating that ODE from sigma = 1 (pure noise) to 0.
The model sees t = sigma * num_train_steps (1000: diffusers' and SD3's convention), so flow models converted
from diffusers run unchanged.

``shift`` is SD3's time shift (Esser et al. 2024, eq. 23; diffusers' ``FlowMatchEulerDiscreteScheduler(shift=)``):
sigma' = shift sigma / (1 + (shift - 1) sigma), which moves every level towards more noise for shift > 1.
Flux picks it from the image's sequence length (:func:`resolution_shift`).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from .._validate import check_int, check_number, check_tensor, fail
from .densities import sample_density
from .path import GaussianPath, Levels


def time_shift(sigma, shift: float):
    """SD3's shift of a noise level: shift sigma / (1 + (shift - 1) sigma) (Esser et al. 2024, eq. 23).
    Works on floats and tensors; shift = 1 is the identity, sigma = 0 and 1 are fixed points."""
    return shift * sigma / (1 + (shift - 1) * sigma)


def resolution_shift(seq_len: int, base_shift: float = 0.5, max_shift: float = 1.15, base_seq_len: int = 256,
                     max_seq_len: int = 4096) -> float:
    """Flux's resolution-dependent shift: mu interpolated linearly from ``base_shift`` at ``base_seq_len`` tokens to
    ``max_shift`` at ``max_seq_len`` (diffusers' ``calculate_shift``), returned as the SD3 shift exp(mu). Flux's
    exponential time shift e^mu / (e^mu + 1/sigma - 1) is :func:`time_shift` with shift = e^mu.

    :param seq_len: the number of image tokens the model sees (e.g. (H / patch) * (W / patch) for a DiT).
    """
    check_int("seq_len", seq_len, minimum=1)
    check_number("base_shift", base_shift, note=" (0.5 in Flux)")
    check_number("max_shift", max_shift, note=" (1.15 in Flux)")
    check_int("base_seq_len", base_seq_len, minimum=1)
    check_int("max_seq_len", max_seq_len, minimum=1)
    if max_seq_len == base_seq_len:
        fail("max_seq_len", max_seq_len, f"a length other than base_seq_len={base_seq_len}")
    slope = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return math.exp(base_shift + slope * (seq_len - base_seq_len))


class RectifiedFlow(GaussianPath):
    """The rectified-flow path: alpha = 1 - sigma, sigma = t / num_train_steps (see the module docstring).

    :param shift: SD3's time shift > 0 (1: none; SD3 uses 3.0). Applied to the sampling levels and to the
        training noise levels (sigma = shift(u), u drawn from the timestep density).
    :param num_train_steps: the scale of the model's time input, t = sigma * num_train_steps.

    Levels are continuous: the model's t is a float in [0, num_train_steps].
    """

    prediction_types = ("flow", "x0")
    default_sampler = "heun"
    ode_k = 1

    def __init__(self, shift: float = 1.0, num_train_steps: int = 1000):
        check_number("shift", shift, above=0, note=" (1: no shift; 3.0 in SD3)")
        check_int("num_train_steps", num_train_steps, minimum=2)
        self.shift = float(shift)
        self.num_train_steps = num_train_steps

    @classmethod
    def for_resolution(cls, seq_len: int, num_train_steps: int = 1000, **kwargs) -> RectifiedFlow:
        """A flow with Flux's resolution-dependent shift for ``seq_len`` image tokens (see :func:`resolution_shift`)."""
        return cls(resolution_shift(seq_len, **kwargs), num_train_steps)

    def __repr__(self) -> str:
        return f"RectifiedFlow(shift={self.shift}, num_train_steps={self.num_train_steps})"

    def alpha_sigma(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """(1 - sigma, sigma) with sigma = t / num_train_steps; t: a floating tensor in [0, num_train_steps]."""
        check_tensor("t", t, floating=True)
        if t.numel() and not bool(((t >= 0) & (t <= self.num_train_steps)).all()):  # False for NaN too
            values = t.detach().flatten()
            bad = values[~((values >= 0) & (values <= self.num_train_steps))][0].item()
            fail("t", f"a tensor containing {bad}", f"model times in [0, num_train_steps={self.num_train_steps}]")
        return self._alpha_sigma(t)

    def _alpha_sigma(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """:meth:`alpha_sigma` without the range check (t already known to be valid, e.g. drawn in range)."""
        sigma = t / self.num_train_steps
        return 1 - sigma, sigma

    def sampling_levels(self, steps: int, *, discrete: bool = False, rho: float = 7.0) -> Levels:
        """sigma_i = shift(1 - i (1 - 1/T) / (N - 1)), i = 0..N-1, then sigma_N = 0: N levels evenly spaced in
        unshifted time from 1 down to 1/T, as diffusers' FlowMatchEuler / FlowMatchHeun schedulers space them
        (their ``set_timesteps`` with T = num_train_timesteps). ``discrete`` and ``rho`` do not apply to a flow
        (its levels are continuous) and are accepted for the common sampler interface."""
        check_int("steps", steps, minimum=1)
        end = 1.0 / self.num_train_steps
        u = torch.linspace(1.0, end, steps, dtype=torch.float64)  # steps = 1: [1.0]
        sigma = torch.cat([time_shift(u, self.shift), u.new_zeros(1)])
        return Levels(1 - sigma, sigma, sigma[:-1] * self.num_train_steps)

    def training_times(self, n: int, density: str, *, generator: torch.Generator | None, device,
                       **density_args) -> Tensor:
        """(n,) float model times t = shift(u) * T, u drawn from ``density`` (see :func:`~.densities.sample_density`)
        on the generator's device, then moved to ``device``."""
        u = sample_density(n, density, generator=generator, **density_args)
        return (time_shift(u, self.shift) * self.num_train_steps).to(device)
