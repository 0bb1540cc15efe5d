"""Discrete variance-preserving noise schedules: q(x_t | x_0) = N(alpha_t x_0, sigma_t^2 I), t in [0, T).

Notation used across ``visionformers.diffusion``:
  alpha_t = sqrt(alphas_cumprod[t]), sigma_t = sqrt(1 - alphas_cumprod[t])   (alpha_t^2 + sigma_t^2 = 1)
  snr(t) = alpha_t^2 / sigma_t^2
  the variance-exploding ("Karras") sigma of the same noise level is sigma_t / alpha_t = sqrt(1 / snr(t)).
Tables are built in float64 on the CPU once; device copies in float32 are cached on first use.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from .._validate import check_choice, check_int, check_number, check_tensor, fail
from .densities import check_density_args, sample_density
from .discretization import NATIVE, Discretization
from .path import GaussianPath, Levels

# Ho et al.'s linear betas end at 0.02 for T = 1000 and are scaled by 1000 / T, so they reach 1 (alphas_cumprod
# <= 0, every coefficient NaN) at T = 20: the smallest usable T for "linear".
_MIN_LINEAR_STEPS = 21

SCHEDULES = ("linear", "cosine", "sigmoid")

# Stand-in for alphas_cumprod = 0 (zero terminal SNR) in the log-sigma table only: the Karras sigma of the last
# step becomes 2**12 instead of infinity, the value diffusers' EulerDiscreteScheduler substitutes too.
_MIN_ALPHA_CUMPROD = 2.0**-24


def linear_betas(num_train_steps: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> Tensor:
    """Linear betas of Ho et al. 2020 (Sec. 4: 1e-4 .. 0.02 over T=1000), rescaled by 1000/T as in
    improved-DDPM (Nichol & Dhariwal 2021, ``get_named_beta_schedule``) so any T gives the same curve."""
    scale = 1000.0 / num_train_steps
    return torch.linspace(scale * beta_start, scale * beta_end, num_train_steps, dtype=torch.float64)


def cosine_betas(num_train_steps: int, s: float = 0.008, max_beta: float = 0.999) -> Tensor:
    """Cosine schedule of Nichol & Dhariwal 2021, eq. 17: alphas_cumprod(t) = f(t) / f(0),
    f(t) = cos^2((t/T + s) / (1 + s) * pi/2), betas_t = 1 - alphas_cumprod(t+1)/alphas_cumprod(t) clipped at 0.999."""
    t = torch.arange(num_train_steps + 1, dtype=torch.float64) / num_train_steps
    f = torch.cos((t + s) / (1 + s) * math.pi / 2) ** 2
    return (1 - f[1:] / f[:-1]).clamp(max=max_beta)


def sigmoid_betas(
    num_train_steps: int, start: float = -3.0, end: float = 3.0, tau: float = 1.0, max_beta: float = 0.999
) -> Tensor:
    """Sigmoid schedule of Jabri et al. 2022 (RIN, Alg. 1 ``sigmoid_schedule``), discretised as in lucidrains'
    denoising-diffusion-pytorch: alphas_cumprod(t) = (sigmoid(end/tau) - sigmoid((t/T (end - start) + start)/tau))
    / (sigmoid(end/tau) - sigmoid(start/tau)), betas from consecutive ratios, clipped at 0.999."""
    t = torch.arange(num_train_steps + 1, dtype=torch.float64) / num_train_steps
    v_start = torch.tensor(start / tau, dtype=torch.float64).sigmoid()
    v_end = torch.tensor(end / tau, dtype=torch.float64).sigmoid()
    f = (v_end - ((t * (end - start) + start) / tau).sigmoid()) / (v_end - v_start)
    f = f / f[0]
    return (1 - f[1:] / f[:-1]).clamp(0, max_beta)


def rescale_zero_terminal_snr(betas: Tensor) -> Tensor:
    """Lin et al. 2024, Algorithm 1: shift and scale sqrt(alphas_cumprod) so the last step has SNR exactly 0
    while the first step keeps its value; betas are recovered from the rescaled cumulative product."""
    alphas_bar_sqrt = torch.cumprod(1 - betas, 0).sqrt()
    first, last = alphas_bar_sqrt[0].clone(), alphas_bar_sqrt[-1].clone()
    alphas_bar_sqrt = (alphas_bar_sqrt - last) * (first / (first - last))
    alphas_bar = alphas_bar_sqrt**2
    alphas = torch.cat([alphas_bar[:1], alphas_bar[1:] / alphas_bar[:-1]])
    return 1 - alphas


def _expand(v: Tensor, x: Tensor) -> Tensor:
    """(B,) -> (B, 1, ..., 1) so a per-sample scalar broadcasts against x of any rank."""
    return v.reshape(-1, *([1] * (x.ndim - 1)))


class NoiseSchedule(GaussianPath):
    """A discrete VP noise schedule ("linear", "cosine", "sigmoid") with q_sample, snr and sigma <-> t maps."""

    prediction_types = ("eps", "x0", "v", "flow")
    default_sampler = "ddim"
    ode_k = 0  # ODE samplers run in the variance-exploding view x / alpha against sigma / alpha (see path.py)

    def __init__(self, kind: str = "cosine", num_train_steps: int = 1000, *, zero_terminal_snr: bool = False):
        check_choice("kind", kind, SCHEDULES)
        if not isinstance(num_train_steps, int) or isinstance(num_train_steps, bool) or num_train_steps < 2:
            fail("num_train_steps", num_train_steps, "an int >= 2")
        if kind == "linear" and num_train_steps < _MIN_LINEAR_STEPS:
            fail("num_train_steps", num_train_steps,
                 f"an int >= {_MIN_LINEAR_STEPS} for kind='linear' (its betas are scaled by 1000 / num_train_steps "
                 "and reach 1 below that, which makes every coefficient NaN); use more steps or kind='cosine'")
        if not isinstance(zero_terminal_snr, (bool, int)) or zero_terminal_snr not in (0, 1):
            fail("zero_terminal_snr", zero_terminal_snr, "True or False")
        self.kind = kind
        self.num_train_steps = num_train_steps
        self.zero_terminal_snr = bool(zero_terminal_snr)

        betas = {"linear": linear_betas, "cosine": cosine_betas, "sigmoid": sigmoid_betas}[kind](num_train_steps)
        if not bool(((betas > 0) & (betas < 1)).all()):  # a guard for the formulas above: every beta in (0, 1)
            fail("num_train_steps", num_train_steps,
                 f"a value for which every beta of kind={kind!r} lies in (0, 1) (got betas in "
                 f"[{betas.min().item():.4g}, {betas.max().item():.4g}])")
        if zero_terminal_snr:
            betas = rescale_zero_terminal_snr(betas)
        self._set_betas(betas, torch.cumprod(1 - betas, 0))

    @classmethod
    def from_betas(cls, betas: Tensor, *, name: str = "custom", sampling: Discretization = NATIVE,
                   terminal_alphas_cumprod: float | None = None) -> "NoiseSchedule":
        """A schedule of explicit betas (T,) in (0, 1] (1 only last: zero terminal SNR), e.g. a diffusers scheduler's.

        alphas_cumprod is the cumulative product in the betas' own dtype (float32 betas reproduce diffusers' float32
        table exactly), then kept in float64. ``sampling`` sets how discrete-time samplers walk it.
        ``terminal_alphas_cumprod`` replaces the last entry (diffusers' DPM-Solver puts 2^-24 in place of the 0 of
        zero terminal SNR, so that its first sigma is finite).
        """
        check_tensor("betas", betas, ndim=1, floating=True)
        if betas.shape[0] < 2 or not bool(((betas > 0) & (betas <= 1)).all()) or bool((betas[:-1] >= 1).any()):
            fail("betas", betas, "a (T,) tensor with T >= 2 and every beta in (0, 1), the last in (0, 1]")
        if not isinstance(sampling, Discretization):
            fail("sampling", sampling, "a visionformers.diffusion.Discretization")
        self = cls.__new__(cls)
        self.kind, self.num_train_steps = name, betas.shape[0]
        self.zero_terminal_snr = bool(betas[-1] == 1)
        alphas_cumprod = torch.cumprod(1 - betas, 0)
        if terminal_alphas_cumprod is not None:
            alphas_cumprod[-1] = terminal_alphas_cumprod
        self._set_betas(betas.double(), alphas_cumprod.double(), sampling)
        return self

    def _set_betas(self, betas: Tensor, alphas_cumprod: Tensor, sampling: Discretization = NATIVE) -> None:
        self.sampling = sampling  # the timesteps discrete-time samplers visit and how they limit x0
        self.betas = betas  # (T,) float64
        self.alphas_cumprod = alphas_cumprod  # (T,) float64, alpha_t^2
        # log of the Karras sigma, increasing in t; interpolated for fractional t (k-diffusion's DiscreteSchedule).
        ab = torch.where(self.alphas_cumprod > 0, self.alphas_cumprod, _MIN_ALPHA_CUMPROD)
        self.log_sigmas = (0.5 * ((1 - ab) / ab).log())  # (T,) float64
        self._device_tables: dict[torch.device, tuple[Tensor, Tensor, Tensor]] = {}

    def __repr__(self) -> str:
        extra = f", sampling={self.sampling}" if self.sampling != NATIVE else ""
        return (f"NoiseSchedule({self.kind!r}, num_train_steps={self.num_train_steps}, "
                f"zero_terminal_snr={self.zero_terminal_snr}{extra})")

    def _tables(self, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
        """float32 (alpha, sigma, log_sigma) tables on ``device``, copied once per device."""
        if device not in self._device_tables:
            ab = self.alphas_cumprod
            tables = (ab.sqrt(), (1 - ab).sqrt(), self.log_sigmas)
            self._device_tables[device] = tuple(v.float().to(device) for v in tables)
        return self._device_tables[device]

    # --- continuous-time view: Karras sigma <-> fractional t --------------------------------------------

    def t_to_sigma(self, t: Tensor) -> Tensor:
        """Karras sigma at (fractional) t by linear interpolation of log sigma between integer steps
        (t is clamped to [0, T-1])."""
        _check_t_dtype(t)
        log_sigmas = self.log_sigmas.to(t.device) if t.dtype == torch.float64 else self._tables(t.device)[2]
        return _interp(log_sigmas, t.to(log_sigmas.dtype)).exp()

    def sigma_to_t(self, sigma: Tensor) -> Tensor:
        """Inverse of :meth:`t_to_sigma`: fractional t in [0, T-1] (clamped outside the table), as in
        k-diffusion's ``DiscreteSchedule.sigma_to_t`` and diffusers' ``_sigma_to_t``."""
        check_tensor("sigma", sigma, floating=True)
        log_sigmas = self.log_sigmas.to(device=sigma.device, dtype=sigma.dtype)
        log_sigma = sigma.clamp(min=1e-10).log()
        low = (torch.searchsorted(log_sigmas, log_sigma, right=True) - 1).clamp(0, self.num_train_steps - 2)
        lo, hi = log_sigmas[low], log_sigmas[low + 1]
        w = ((log_sigma - lo) / (hi - lo)).clamp(0, 1)
        return low + w

    # --- per-sample coefficients --------------------------------------------------------------------

    def alpha_sigma(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """(alpha_t, sigma_t), each shaped like t, float32 on t's device.

        t must lie in [0, T). Integer t indexes the table exactly; floating t (as samplers pass to models) goes
        through the log-sigma interpolation of :meth:`t_to_sigma`, so alpha = 1/sqrt(1 + sigma_K^2),
        sigma = sigma_K * alpha.
        """
        self._check_t(t)
        return self._alpha_sigma(t)

    def _check_t(self, t: Tensor) -> None:
        """t: a real tensor with every value in [0, T) (NaN rejected); one host sync for the range."""
        _check_t_dtype(t)
        if t.numel() and not bool(((t >= 0) & (t < self.num_train_steps)).all()):  # False for NaN too
            values = t.detach().flatten()
            bad = values[~((values >= 0) & (values < self.num_train_steps))][0].item()
            fail("t", f"a tensor containing {bad}", f"timesteps in [0, num_train_steps={self.num_train_steps})")

    def _alpha_sigma(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """:meth:`alpha_sigma` without the range check (t already known to be valid, e.g. drawn in range)."""
        if t.is_floating_point():
            sigma_k = self.t_to_sigma(t.float())
            alpha = (1 + sigma_k**2).rsqrt()
            return alpha, sigma_k * alpha
        alpha, sigma, _ = self._tables(t.device)
        return alpha[t], sigma[t]

    def sampling_levels(self, steps: int, *, discrete: bool, rho: float = 7.0, solver: str = "ddim") -> Levels:
        """The levels a sampler visits: ``discrete``: the timesteps of this schedule's ``sampling``
        (:class:`Discretization`; by default the trailing ones of :func:`discrete_timesteps`) for ``solver``, with
        their exact table values; else the Karras sigmas of :func:`karras_sigmas` (alpha = 1 / sqrt(1 + s^2),
        sigma = s alpha) at fractional t. Both end at (alpha, sigma) = (1, 0)."""
        if discrete:
            ts, ab, _ = self.sampling.steps(self.alphas_cumprod, steps, solver)
            return Levels(torch.cat([ab.sqrt(), ab.new_ones(1)]), torch.cat([(1 - ab).sqrt(), ab.new_zeros(1)]),
                          ts.double())
        s = karras_sigmas(self, steps, rho)
        alpha = (1 + s**2).rsqrt()
        return Levels(alpha, s * alpha, self.sigma_to_t(s[:-1]))

    def training_times(self, n: int, density: str, *, generator: torch.Generator | None, device,
                       **density_args) -> Tensor:
        """(n,) integer timesteps: uniform draws t ~ U{0..T-1} (Ho et al. 2020, Alg. 1); another density draws
        u in [0, 1] and takes t = min(floor(u T), T - 1), as diffusers' SD3 training does on its discrete table."""
        gen_device = generator.device if generator is not None else device
        if density == "uniform":
            check_density_args(density, **density_args)
            return torch.randint(0, self.num_train_steps, (n,), generator=generator, device=gen_device).to(device)
        u = sample_density(n, density, generator=generator, **density_args)
        return (u * self.num_train_steps).long().clamp(0, self.num_train_steps - 1).to(device)

    def snr(self, t: Tensor) -> Tensor:
        """Signal-to-noise ratio alpha_t^2 / sigma_t^2 (Kingma et al. 2021, eq. 2), float32 shaped like t."""
        alpha, sigma = self.alpha_sigma(t)
        return alpha**2 / sigma**2

    def q_sample(self, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """x_t = alpha_t x0 + sigma_t noise (Ho et al. 2020, eq. 4). x0, noise: (B, ...); t: (B,) integer
        timesteps in [0, T) (or floating ones, see :meth:`alpha_sigma`), all on x0's device."""
        check_tensor("x0", x0, floating=True)
        if x0.ndim < 1:
            fail("x0", x0, "a batch (B, ...) with at least 1 dimension")
        check_tensor("noise", noise, floating=True)
        if noise.shape != x0.shape:
            fail("noise", noise, f"a tensor shaped like x0 {tuple(x0.shape)}")
        if noise.device != x0.device:
            fail("noise", f"a tensor on {noise.device}", f"a tensor on x0's device {x0.device}")
        check_tensor("t", t)
        if t.shape != x0.shape[:1]:
            fail("t", t, f"a tensor of shape (B,)=({x0.shape[0]},)")
        if t.device != x0.device:
            fail("t", f"a tensor on {t.device}", f"a tensor on x0's device {x0.device}")
        alpha, sigma = self.alpha_sigma(t)
        return _expand(alpha, x0).to(x0.dtype) * x0 + _expand(sigma, x0).to(x0.dtype) * noise


def discrete_timesteps(num_train_steps: int, steps: int) -> Tensor:
    """The "trailing" timesteps round(T - i T/steps) - 1, i = 0..steps-1 (Lin et al. 2024, Table 2), as int64.
    1 <= steps <= num_train_steps (more would repeat timesteps and end below t = 0)."""
    if not isinstance(num_train_steps, int) or isinstance(num_train_steps, bool) or num_train_steps < 1:
        fail("num_train_steps", num_train_steps, "an int >= 1")
    if not isinstance(steps, int) or isinstance(steps, bool) or not 1 <= steps <= num_train_steps:
        fail("steps", steps, f"an int in [1, num_train_steps={num_train_steps}]")
    return (num_train_steps - torch.arange(steps, dtype=torch.float64) * (num_train_steps / steps)).round().long() - 1


def karras_sigmas(sched: NoiseSchedule, steps: int, rho: float = 7.0) -> Tensor:
    """Karras et al. 2022, eq. 5: sigma_i = (smax^(1/rho) + i/(N-1) (smin^(1/rho) - smax^(1/rho)))^rho,
    i = 0..N-1, then sigma_N = 0; smin / smax are the schedule's sigmas at t = 0 and t = T-1. (N+1,) float64."""
    if not isinstance(sched, NoiseSchedule):
        fail("sched", type(sched).__name__, "a visionformers.diffusion.NoiseSchedule")
    check_int("steps", steps, minimum=1)
    check_number("rho", rho, above=0, note=" (7 in Karras et al. 2022)")
    s_min, s_max = sched.log_sigmas[0].exp(), sched.log_sigmas[-1].exp()
    ramp = torch.linspace(0, 1, steps, dtype=torch.float64)
    sigmas = (s_max ** (1 / rho) + ramp * (s_min ** (1 / rho) - s_max ** (1 / rho))) ** rho
    return torch.cat([sigmas, sigmas.new_zeros(1)])


def _check_t_dtype(t) -> None:
    """t: a real tensor; a bool tensor would index the tables as a mask."""
    check_tensor("t", t)
    if t.dtype == torch.bool or t.is_complex():
        fail("t", t, "an integer (torch.long) or floating tensor of timesteps")


def _interp(table: Tensor, t: Tensor) -> Tensor:
    """Linear interpolation of a (T,) table at fractional positions t (clamped to [0, T-1])."""
    last = table.shape[0] - 1
    t = t.clamp(0, last)
    low = t.floor().long().clamp(max=last - 1)
    return torch.lerp(table[low], table[low + 1], t - low)
