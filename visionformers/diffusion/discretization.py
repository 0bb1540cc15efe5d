"""Which timesteps a discrete-time sampler visits, where each step lands, and how its x0 estimate is limited.

Our own convention ("trailing" timesteps, each step landing on the next one, the chain ending at alphas_cumprod = 1,
x0 left as predicted) is the default of every ``NoiseSchedule``. Schedules read from a diffusers scheduler config
carry that scheduler's conventions instead, so the ddpm / ddim / dpmpp_2m samplers reproduce its images:

- timestep spacing (Lin et al. 2024, "Common Diffusion Noise Schedules and Sample Steps are Flawed", Table 2):
  "linspace", "leading" (+ ``steps_offset``) or "trailing";
- DDIM's previous timestep t - T // steps with ``set_alpha_to_one`` choosing the final alphas_cumprod (1 or
  alphas_cumprod[0]), as diffusers' DDIMScheduler;
- ``clip_sample``: x0 clamped to [-clip, clip]; ``thresholding``: dynamic thresholding (Saharia et al. 2022, "Imagen",
  sec. 2.3): per image, s = max(1, quantile(|x0|, ratio)) capped at ``sample_max_value``, x0 <- clamp(x0, -s, s) / s.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from .._validate import check_choice, fail

SPACINGS = ("trailing", "leading", "linspace")
SOLVERS = ("ddpm", "ddim", "dpmpp_2m")  # the discrete-time samplers; their diffusers schedulers space steps differently


@dataclass(frozen=True)
class Discretization:
    """How discrete-time samplers walk a schedule; the defaults are visionformers' own convention."""

    timestep_spacing: str = "trailing"
    steps_offset: int = 0  # added to "leading" timesteps (diffusers' steps_offset)
    diffusers: bool = False  # True: diffusers' formulas, and DDIM steps from t to t - T // steps (not the next t)
    set_alpha_to_one: bool = True  # with diffusers: DDIM's alphas_cumprod past t = 0 is 1 (else alphas_cumprod[0])
    clip_sample: float | None = None  # clamp x0 to [-clip_sample, clip_sample]
    thresholding: tuple[float, float] | None = None  # (quantile ratio, sample_max_value) of dynamic thresholding

    def __post_init__(self):
        check_choice("timestep_spacing", self.timestep_spacing, SPACINGS)
        if not self.diffusers and (self.timestep_spacing != "trailing" or self.steps_offset):
            fail("timestep_spacing", self.timestep_spacing, "'trailing' with steps_offset=0 unless diffusers=True")
        if not isinstance(self.steps_offset, int) or isinstance(self.steps_offset, bool) or self.steps_offset < 0:
            fail("steps_offset", self.steps_offset, "an int >= 0")
        if self.clip_sample is not None and not (isinstance(self.clip_sample, (int, float)) and self.clip_sample > 0):
            fail("clip_sample", self.clip_sample, "None or a number > 0")
        if self.thresholding is not None:
            ok = (isinstance(self.thresholding, tuple) and len(self.thresholding) == 2
                  and 0 < self.thresholding[0] <= 1 and self.thresholding[1] >= 1)
            if not ok:
                fail("thresholding", self.thresholding, "None or (ratio in (0, 1], sample_max_value >= 1)")

    @property
    def limits_x0(self) -> bool:
        return self.clip_sample is not None or self.thresholding is not None

    def limit_x0(self, x0: Tensor) -> Tensor:
        """x0 after dynamic thresholding (which takes precedence, as in diffusers) or clipping; else x0 itself."""
        if self.thresholding is not None:
            ratio, max_value = self.thresholding
            flat = x0.float().reshape(x0.shape[0], -1)  # (B, C*H*W): one threshold per image
            s = torch.quantile(flat.abs(), ratio, dim=1).clamp(min=1, max=max_value)[:, None]  # (B, 1)
            return (flat.clamp(-s, s) / s).reshape(x0.shape).to(x0.dtype)
        if self.clip_sample is not None:
            return x0.clamp(-self.clip_sample, self.clip_sample)
        return x0

    def timesteps(self, num_train_steps: int, steps: int, solver: str) -> Tensor:
        """The (steps,) int64 timesteps ``solver`` visits, highest first.

        diffusers' DPMSolverMultistepScheduler spaces steps + 1 points and drops the last for "linspace" and
        "leading"; DDIM / DDPM space ``steps`` points (diffusers' ``set_timesteps``).
        """
        check_choice("solver", solver, SOLVERS)
        if not isinstance(steps, int) or isinstance(steps, bool) or not 1 <= steps <= num_train_steps:
            fail("steps", steps, f"an int in [1, num_train_steps={num_train_steps}]")
        T, n = num_train_steps, steps
        if not self.diffusers:  # ours: "trailing" round(T - i T/n) - 1 (Lin et al. 2024, Table 2)
            return (T - torch.arange(n, dtype=torch.float64) * (T / n)).round().long() - 1
        # diffusers' set_timesteps, in numpy as there, so that every rounding matches
        extra = 1 if solver == "dpmpp_2m" else 0
        if self.timestep_spacing == "trailing":
            ts = np.round(np.arange(T, 0, -T / n)) - 1
        elif self.timestep_spacing == "linspace":
            ts = np.linspace(0, T - 1, n + extra).round()[::-1][:n]
        else:
            ts = (np.arange(0, n + extra) * (T // (n + extra))).round()[::-1][:n] + self.steps_offset
        return torch.from_numpy(ts.astype(np.int64).copy())

    def steps(self, alphas_cumprod: Tensor, steps: int, solver: str) -> tuple[Tensor, Tensor, Tensor]:
        """(timesteps, alphas_cumprod at them, alphas_cumprod where each step lands), float64 tables of (steps,)."""
        T = alphas_cumprod.shape[0]
        ts = self.timesteps(T, steps, solver)
        if int(ts.max()) >= T or int(ts.min()) < 0:
            fail("steps_offset", self.steps_offset, f"a value that keeps every timestep below num_train_steps={T} "
                 f"(steps={steps} reach {int(ts.max())})")
        ab = alphas_cumprod[ts]
        if solver == "ddim" and self.diffusers:
            prev = ts - T // steps
            final = 1.0 if self.set_alpha_to_one else float(alphas_cumprod[0])
            ab_prev = torch.where(prev >= 0, alphas_cumprod[prev.clamp(min=0)], torch.full_like(ab, final))
        else:
            ab_prev = torch.cat([ab[1:], ab.new_ones(1)])  # the chain ends at alphas_cumprod = 1, i.e. x0 itself
        return ts, ab, ab_prev


NATIVE = Discretization()
