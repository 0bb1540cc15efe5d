"""The one notion every noise process shares: a Gaussian path x_t = alpha(t) x0 + sigma(t) eps.

Both processes provide it: the discrete variance-preserving :class:`~.schedules.NoiseSchedule`
(alpha^2 + sigma^2 = 1) and the rectified flow :class:`~.flow.RectifiedFlow` (alpha + sigma = 1). ``t`` is
the model's time input. Everything else (prediction conversions, the loss, every sampler, the guidance
interval) only reads alpha and sigma, so a sampler written once on the path serves both processes.

Samplers run on :class:`Levels`: the (alpha_i, sigma_i) they visit, i = 0..N, ending at the clean data
(alpha_N, sigma_N) = (1, 0), and the model time t_i of each of the N noisy levels.
"""
from __future__ import annotations

from typing import NamedTuple

from torch import Tensor

from .._validate import fail


class Levels(NamedTuple):
    """alpha, sigma: (N+1,) float64, the last entry (1, 0); t: (N,) float64 model times of levels 0..N-1."""

    alpha: Tensor
    sigma: Tensor
    t: Tensor


class GaussianPath:
    """Base of the noise processes: x_t = alpha(t) x0 + sigma(t) eps, t the model's time input.

    Subclasses set ``num_train_steps`` (the model's t lies in [0, num_train_steps]), ``prediction_types``
    (what a model on this path may predict), ``default_sampler`` (the name :func:`~.samplers.sample` uses when
    given none), ``ode_k`` and implement :meth:`alpha_sigma`,
    :meth:`sampling_levels` and :meth:`training_times`.

    ``ode_k`` picks the coordinates the ODE samplers integrate in: y = x / (alpha + k sigma) against
    s = sigma / (alpha + k sigma), where the path reads y = (1 - k s) x0 + s eps, linear in s for fixed (x0, eps),
    with slope dy/ds = eps - k x0. k = 0 is the variance-exploding view of Karras et al. 2022 (eq. 3 with
    s(t) = 1: y = x / alpha, s = sigma / alpha); k = 1 on a flow is x and sigma themselves (slope: the velocity).
    """

    num_train_steps: int
    prediction_types: tuple[str, ...]
    default_sampler: str
    ode_k: int

    def alpha_sigma(self, t: Tensor) -> tuple[Tensor, Tensor]:
        raise AssertionError(f"{type(self).__name__} must define alpha_sigma")

    def sampling_levels(self, steps: int, *, discrete: bool, rho: float = 7.0) -> Levels:
        raise AssertionError(f"{type(self).__name__} must define sampling_levels")

    def check_prediction_type(self, prediction_type: str) -> None:
        """ValueError unless a model on this path may predict ``prediction_type``."""
        if prediction_type not in self.prediction_types:
            fail("prediction_type", prediction_type, f"one of {list(self.prediction_types)} for {self!r}")


def check_process(name: str, value) -> None:
    """``value`` must be a noise process (a NoiseSchedule or a RectifiedFlow)."""
    if not isinstance(value, GaussianPath):
        fail(name, type(value).__name__,
             "a visionformers.diffusion.NoiseSchedule or visionformers.diffusion.RectifiedFlow")
