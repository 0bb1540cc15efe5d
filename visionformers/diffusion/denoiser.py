"""The model wrapped once as a denoiser (k-diffusion's ``Denoiser`` idea): a raw prediction -> (x0, eps).

Samplers never look at the prediction type: they call ``denoiser(x_t, alpha, sigma, t)`` at a level of the path and
get (x0, eps) back, through :func:`~.objectives.predict_x0_eps`. The guidance interval is decided here too, from
the level's noise-to-signal ratio, so every sampler honours it without knowing about it.
"""
from __future__ import annotations

import math
from collections.abc import Callable

from torch import Tensor

from .._validate import check_choice, fail
from .guidance import check_guidance_interval, guidance_active
from .objectives import PREDICTION_TYPES, check_model_output, predict_x0_eps
from .path import check_process


class Denoiser:
    """``model(x_t, t) -> prediction`` of ``prediction_type`` on the path ``sched``, seen as (x0, eps).

    :param model: a callable ``(x_t, t) -> prediction``; with ``guidance_interval`` it must also take
        ``guide=bool`` (what :func:`~.guidance.guided_model` returns): guide=False outside the interval.
    :param guidance_interval: None, or (lo, hi) in noise-to-signal ratio sigma / alpha (see ``guidance.py``).
    """

    def __init__(self, model: Callable[..., Tensor], sched, prediction_type: str, guidance_interval=None):
        if not callable(model):
            fail("model", type(model).__name__, "a callable (x_t, t) -> prediction")
        check_process("sched", sched)
        check_choice("prediction_type", prediction_type, PREDICTION_TYPES)
        sched.check_prediction_type(prediction_type)
        self.model, self.sched, self.prediction_type = model, sched, prediction_type
        self.guidance_interval = check_guidance_interval(guidance_interval)

    def __call__(self, x: Tensor, alpha: float, sigma: float, t: Tensor) -> tuple[Tensor, Tensor]:
        """(x0, eps) at x_t = ``x`` on the level (alpha, sigma) whose model time is ``t`` (B,)."""
        if self.guidance_interval is None:
            out = self.model(x, t)
        else:
            level = sigma / alpha if alpha > 0 else math.inf
            out = self.model(x, t, guide=guidance_active(level, self.guidance_interval))
        check_model_output(out, x.shape, "x_t")
        return predict_x0_eps(out, x, alpha, sigma, self.prediction_type)
