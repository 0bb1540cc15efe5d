"""Samplers as plain functions with one signature (k-diffusion style):

    sample_xxx(model, x, sched, steps, *, prediction_type="eps", generator=None, callback=None) -> x0

``model(x_t, t) -> prediction`` (conditioning and guidance already bound, see :func:`sample`), ``x`` the
starting noise in VP scale (x ~ N(0, I), the distribution of x_{T-1}), ``t`` a float tensor (B,) in training-step
units. Every coefficient is computed once in float64 before the loop; a step is the model call plus a few
tensor-times-Python-float ops, so the sampler adds next to nothing to the model's own time.
``callback(dict(step=i, x=x, denoised=x0, t=t))`` runs after each step with the new sample (VP scale), the x0
estimate of that step and the timesteps the model saw.

Discrete-time samplers (ddpm, ddim, dpmpp_2m) visit the "trailing" subsequence t_i = round(T - i T/steps) - 1
(Lin et al. 2024, Sec. 3.3 / Table 2): it always starts at t = T-1, where the initial noise lives, and ends at
the cleanest step it can reach; diffusers calls this ``timestep_spacing="trailing"``. Euler / Heun run on Karras
sigmas and hand the model fractional t (log-sigma interpolation over the discrete schedule).
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from .._validate import check_choice, check_device, check_number, fail
from .objectives import PREDICTION_TYPES, check_generator, check_model_output, predict_x0_eps
from .schedules import NoiseSchedule

Model = Callable[[Tensor, Tensor], Tensor]
Callback = Callable[[dict], None] | None


def _check_args(model, x: Tensor, sched: NoiseSchedule, steps: int, prediction_type: str, generator, callback,
                *, discrete: bool) -> Model:
    """Validate the common sampler arguments once, before the loop; returns ``model`` wrapped so that each call's
    output is checked against x's shape (a tuple compare, no device sync)."""
    if not callable(model):
        fail("model", type(model).__name__, "a callable (x_t, t) -> prediction")
    if not isinstance(x, Tensor) or not x.is_floating_point() or x.ndim < 2:
        fail("x", x, "a floating tensor (B, ...) of starting noise")
    if not isinstance(sched, NoiseSchedule):
        fail("sched", type(sched).__name__, "a visionformers.diffusion.NoiseSchedule")
    if not isinstance(steps, int) or isinstance(steps, bool) or steps <= 0:
        fail("steps", steps, "an int > 0")
    if not discrete and sched.sampling.limits_x0:
        fail("sched", sched, "a schedule without clip_sample / thresholding for euler and heun (those limits apply to "
             "the x0 estimate of ddpm, ddim and dpmpp_2m)")
    if discrete and steps > sched.num_train_steps:
        fail("steps", steps, f"at most num_train_steps={sched.num_train_steps} for a discrete-time sampler "
             "(euler and heun accept any number)")
    check_choice("prediction_type", prediction_type, PREDICTION_TYPES)
    check_generator(generator)
    if callback is not None and not callable(callback):
        fail("callback", callback, "None or a callable taking one dict")
    return _checked_model(model)


def _checked_model(model: Model) -> Model:
    """``model`` with its output checked to be a tensor shaped like its input x_t."""
    if getattr(model, "_vf_output_checked", False):
        return model

    def checked(x: Tensor, t: Tensor) -> Tensor:
        out = model(x, t)
        check_model_output(out, x.shape, "x_t")
        return out

    checked._vf_output_checked = True
    return checked


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
    if not isinstance(steps, int) or isinstance(steps, bool) or steps <= 0:
        fail("steps", steps, "an int > 0")
    check_number("rho", rho, above=0, note=" (7 in Karras et al. 2022)")
    s_min, s_max = sched.log_sigmas[0].exp(), sched.log_sigmas[-1].exp()
    ramp = torch.linspace(0, 1, steps, dtype=torch.float64)
    sigmas = (s_max ** (1 / rho) + ramp * (s_min ** (1 / rho) - s_max ** (1 / rho))) ** rho
    return torch.cat([sigmas, sigmas.new_zeros(1)])


def _model_t(t: Tensor, x: Tensor) -> Tensor:
    """(steps,) timesteps -> (steps, B) float32 on x's device, built once so each step only indexes a row."""
    return t.float()[:, None].expand(-1, x.shape[0]).contiguous().to(x.device)


def _randn_like(x: Tensor, generator: torch.Generator | None) -> Tensor:
    """Noise drawn on the generator's device (so a CPU generator is reproducible on any device), moved to x's."""
    device = generator.device if generator is not None else x.device
    return torch.randn(x.shape, generator=generator, device=device, dtype=x.dtype).to(x.device)


@torch.no_grad()
def sample_ddpm(model: Model, x: Tensor, sched: NoiseSchedule, steps: int, *, prediction_type: str = "eps",
                generator: torch.Generator | None = None, callback: Callback = None) -> Tensor:
    """Ancestral sampling, Ho et al. 2020 Alg. 2, on the respaced chain of Nichol & Dhariwal 2021 (Sec. 4):
    x_prev ~ N(c0 x0 + ct x_t, beta_tilde) with the posterior of eq. 6-7, beta_t := 1 - abar_t / abar_prev,
    c0 = sqrt(abar_prev) beta_t / (1 - abar_t), ct = sqrt(1 - beta_t) (1 - abar_prev) / (1 - abar_t),
    beta_tilde = beta_t (1 - abar_prev) / (1 - abar_t) ("fixed_small" variance)."""
    model = _check_args(model, x, sched, steps, prediction_type, generator, callback, discrete=True)
    ts, ab, ab_prev = sched.sampling.steps(sched.alphas_cumprod, steps, "ddpm")  # ab_prev = 1 ends the chain at x0
    beta = 1 - ab / ab_prev
    c0 = (ab_prev.sqrt() * beta / (1 - ab)).tolist()
    ct = ((1 - beta).sqrt() * (1 - ab_prev) / (1 - ab)).tolist()
    std = (beta * (1 - ab_prev) / (1 - ab)).sqrt().tolist()
    alpha, sigma = ab.sqrt().tolist(), (1 - ab).sqrt().tolist()
    t_model = _model_t(ts, x)

    for i in range(steps):
        x0, _ = predict_x0_eps(model(x, t_model[i]), x, alpha[i], sigma[i], prediction_type)
        x0 = sched.sampling.limit_x0(x0)
        x = c0[i] * x0 + ct[i] * x
        if std[i] > 0:
            x = x + std[i] * _randn_like(x, generator)
        if callback is not None:
            callback(dict(step=i, x=x, denoised=x0, t=t_model[i]))
    return x


@torch.no_grad()
def sample_ddim(model: Model, x: Tensor, sched: NoiseSchedule, steps: int, *, prediction_type: str = "eps",
                generator: torch.Generator | None = None, callback: Callback = None, eta: float = 0.0) -> Tensor:
    """DDIM, Song et al. 2021 eq. 12: x_prev = sqrt(abar_prev) x0 + sqrt(1 - abar_prev - s^2) eps + s z, with
    s = eta sqrt((1 - abar_prev) / (1 - abar_t)) sqrt(1 - abar_t / abar_prev) (eq. 16). eta = 0: deterministic
    DDIM; eta = 1: the DDPM posterior. ``eta`` is reachable through ``sample(sampler=partial(sample_ddim, eta=..))``."""
    model = _check_args(model, x, sched, steps, prediction_type, generator, callback, discrete=True)
    check_number("eta", eta, at_least=0, note=" (0: deterministic DDIM, 1: DDPM variance)")
    ts, ab, ab_prev = sched.sampling.steps(sched.alphas_cumprod, steps, "ddim")
    std = eta * ((1 - ab_prev) / (1 - ab) * (1 - ab / ab_prev)).sqrt()
    c_x0, c_eps = ab_prev.sqrt().tolist(), (1 - ab_prev - std**2).clamp(min=0).sqrt().tolist()
    std = std.tolist()
    alpha, sigma = ab.sqrt().tolist(), (1 - ab).sqrt().tolist()
    t_model = _model_t(ts, x)

    for i in range(steps):
        x0, eps = predict_x0_eps(model(x, t_model[i]), x, alpha[i], sigma[i], prediction_type)
        x0 = sched.sampling.limit_x0(x0)  # eps stays the model's (diffusers' use_clipped_model_output=False)
        x = c_x0[i] * x0 + c_eps[i] * eps
        if std[i] > 0:
            x = x + std[i] * _randn_like(x, generator)
        if callback is not None:
            callback(dict(step=i, x=x, denoised=x0, t=t_model[i]))
    return x


@torch.no_grad()
def sample_dpmpp_2m(model: Model, x: Tensor, sched: NoiseSchedule, steps: int, *, prediction_type: str = "eps",
                    generator: torch.Generator | None = None, callback: Callback = None) -> Tensor:
    """DPM-Solver++(2M), Lu et al. 2022 ("DPM-Solver++", Alg. 2), in lambda = log(alpha / sigma):
    x_next = (sigma_next / sigma) x - alpha_next (e^-h - 1) D,  h = lambda_next - lambda,
    D = (1 + 1/(2r)) x0_i - 1/(2r) x0_{i-1},  r = h_{i-1} / h_i.
    The first step has no history and the last one lands on sigma = 0 (h infinite), so both are first order
    (D = x0_i), as in k-diffusion's ``sample_dpmpp_2m`` and diffusers' ``final_sigmas_type="zero"``.
    ``generator`` is unused (the solver is deterministic) and kept for the common signature."""
    model = _check_args(model, x, sched, steps, prediction_type, generator, callback, discrete=True)
    ts, ab, _ = sched.sampling.steps(sched.alphas_cumprod, steps, "dpmpp_2m")
    alphas = torch.cat([ab.sqrt(), ab.new_ones(1)])  # (steps+1,): the chain ends at alpha = 1, sigma = 0
    sigmas = torch.cat([(1 - ab).sqrt(), ab.new_zeros(1)])
    lambdas = alphas.log() - sigmas.log()  # last entry +inf
    h = lambdas[1:] - lambdas[:-1]
    c_x = (sigmas[1:] / sigmas[:-1]).tolist()
    c_d = (-alphas[1:] * torch.expm1(-h)).tolist()
    # weight k of the history term D = x0 + k (x0 - x0_prev); k = 1 / (2 r); 0 means first order
    k = torch.zeros(steps, dtype=torch.float64)
    if steps > 2:
        k[1:-1] = h[1:-1] / (2 * h[:-2])
    k = k.tolist()
    alpha, sigma = alphas[:-1].tolist(), sigmas[:-1].tolist()
    t_model = _model_t(ts, x)

    x0_prev = None
    for i in range(steps):
        x0, _ = predict_x0_eps(model(x, t_model[i]), x, alpha[i], sigma[i], prediction_type)
        x0 = sched.sampling.limit_x0(x0)
        d = x0 if k[i] == 0 else x0 + k[i] * (x0 - x0_prev)
        x = c_x[i] * x + c_d[i] * d
        x0_prev = x0
        if callback is not None:
            callback(dict(step=i, x=x, denoised=x0, t=t_model[i]))
    return x


def _karras_tables(sched: NoiseSchedule, steps: int, x: Tensor, rho: float):
    """Python-float Karras sigmas, their VP input scale c_in = 1/sqrt(1 + sigma^2) and the model's t per sigma."""
    sigmas = karras_sigmas(sched, steps, rho)
    c_in = (1 + sigmas**2).rsqrt()
    t_model = _model_t(sched.sigma_to_t(sigmas[:-1]), x)
    return sigmas.tolist(), c_in.tolist(), t_model


def _karras_eps(model: Model, x_ve: Tensor, sigma: float, c_in: float, t: Tensor, prediction_type: str):
    """(x0, eps) at Karras sigma: the model sees the VP sample x_ve * c_in (alpha = c_in, sigma_vp = sigma c_in);
    eps is the ODE slope dx/dsigma = (x - D(x)) / sigma of Karras et al. 2022, eq. 3 with s(t) = 1."""
    x_vp = x_ve * c_in
    return predict_x0_eps(model(x_vp, t), x_vp, c_in, sigma * c_in, prediction_type)


@torch.no_grad()
def sample_euler(model: Model, x: Tensor, sched: NoiseSchedule, steps: int, *, prediction_type: str = "eps",
                 generator: torch.Generator | None = None, callback: Callback = None, rho: float = 7.0) -> Tensor:
    """Euler on the probability-flow ODE dx/dsigma = eps (Karras et al. 2022, Alg. 1 without the second-order
    correction) over the Karras sigmas of eq. 5. Works in VE scale x_ve = x_vp / alpha; any number of steps.
    ``generator`` is unused (the solver is deterministic) and kept for the common signature."""
    model = _check_args(model, x, sched, steps, prediction_type, generator, callback, discrete=False)
    sigmas, c_in, t_model = _karras_tables(sched, steps, x, rho)
    x = x / c_in[0]  # VP noise -> VE scale: x_ve = x_vp sqrt(1 + sigma_max^2)

    for i in range(steps):
        x0, eps = _karras_eps(model, x, sigmas[i], c_in[i], t_model[i], prediction_type)
        x = x + (sigmas[i + 1] - sigmas[i]) * eps
        if callback is not None:
            callback(dict(step=i, x=x * c_in[i + 1], denoised=x0, t=t_model[i]))
    return x


@torch.no_grad()
def sample_heun(model: Model, x: Tensor, sched: NoiseSchedule, steps: int, *, prediction_type: str = "eps",
                generator: torch.Generator | None = None, callback: Callback = None, rho: float = 7.0) -> Tensor:
    """Heun's 2nd-order method, Karras et al. 2022 Alg. 1 (deterministic sampler), on the sigmas of eq. 5:
    an Euler step to sigma_{i+1}, then the average of the slopes at both ends; the last step (to sigma = 0)
    stays Euler. 2 steps - 1 model calls. ``generator`` is unused and kept for the common signature."""
    model = _check_args(model, x, sched, steps, prediction_type, generator, callback, discrete=False)
    sigmas, c_in, t_model = _karras_tables(sched, steps, x, rho)
    x = x / c_in[0]

    for i in range(steps):
        dt = sigmas[i + 1] - sigmas[i]
        x0, eps = _karras_eps(model, x, sigmas[i], c_in[i], t_model[i], prediction_type)
        x_next = x + dt * eps
        if sigmas[i + 1] > 0:
            _, eps_next = _karras_eps(model, x_next, sigmas[i + 1], c_in[i + 1], t_model[i + 1], prediction_type)
            x_next = x + dt * 0.5 * (eps + eps_next)
        x = x_next
        if callback is not None:
            callback(dict(step=i, x=x * c_in[i + 1], denoised=x0, t=t_model[i]))
    return x


SAMPLERS: dict[str, Callable[..., Tensor]] = {
    "ddpm": sample_ddpm,
    "ddim": sample_ddim,
    "dpmpp_2m": sample_dpmpp_2m,
    "euler": sample_euler,
    "heun": sample_heun,
}


def _infer_device(model, cond: dict, generator: torch.Generator | None) -> torch.device:
    """Where to sample: the model's parameters, else the first conditioning tensor, else the generator, else CPU."""
    if isinstance(model, torch.nn.Module):
        for p in model.parameters():
            return p.device
    for v in cond.values():
        if isinstance(v, Tensor):
            return v.device
    return generator.device if generator is not None else torch.device("cpu")


@torch.no_grad()
def sample(
    model: Callable[..., Tensor],
    shape: tuple[int, ...],
    sched: NoiseSchedule,
    sampler: str | Callable[..., Tensor] = "ddim",
    steps: int = 50,
    prediction_type: str = "eps",
    guidance_scale: float = 1.0,
    generator: torch.Generator | None = None,
    callback: Callback = None,
    *,
    uncond: dict | None = None,
    device: torch.device | str | None = None,
    **cond,
) -> Tensor:
    """Draw x0 ~ p(x0 | cond) of shape ``shape`` from ``model(x_t, t, **cond) -> prediction``.

    :param sampler: a name in ``SAMPLERS`` ("ddpm", "ddim", "dpmpp_2m", "euler", "heun") or a function with the
        common sampler signature, e.g. ``functools.partial(sample_ddim, eta=0.5)``.
    :param steps: number of sampler steps (model calls, except heun: 2 steps - 1).
    :param guidance_scale: classifier-free guidance weight w; 1 = plain conditional model. w != 1 needs ``uncond``,
        the keyword inputs that replace ``cond`` in the unconditional pass (see ``guidance.py``).
    :param generator: seeds the starting noise and, for ddpm / ddim with eta > 0, the per-step noise. Noise is
        drawn on the generator's device, so a CPU generator gives the same images on any device (at the cost of
        a host-to-device copy per stochastic step; a generator on the sampling device avoids it).
    :param device: where x lives; default: the model's parameters, else a conditioning tensor, else the generator's.
    :returns: float32 tensor of ``shape`` in the data scale (e.g. [-1, 1] images).
    The model is called in float32; wrap it (``torch.autocast``) for reduced-precision inference.
    """
    from .guidance import guided_model

    if callable(sampler):
        fn = sampler
    else:
        check_choice("sampler", sampler, SAMPLERS)
        fn = SAMPLERS[sampler]
    if not callable(model):
        fail("model", type(model).__name__, "a callable (x_t, t, **cond) -> prediction")
    if not isinstance(sched, NoiseSchedule):
        fail("sched", type(sched).__name__, "a visionformers.diffusion.NoiseSchedule")
    if not isinstance(steps, int) or isinstance(steps, bool) or steps <= 0:
        fail("steps", steps, "an int > 0")
    if (not isinstance(shape, (tuple, list, torch.Size)) or len(shape) < 2
            or not all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in shape)):
        fail("shape", shape, "a tuple of positive ints (B, ...) with at least 2 entries")
    check_choice("prediction_type", prediction_type, PREDICTION_TYPES)
    if callback is not None and not callable(callback):
        fail("callback", callback, "None or a callable taking one dict")
    check_generator(generator)
    device = check_device("device", device) if device is not None else _infer_device(model, cond, generator)
    model_fn = _checked_model(guided_model(model, cond, uncond, guidance_scale))  # validates guidance_scale, uncond

    x = torch.randn(tuple(shape), generator=generator,
                    device=generator.device if generator is not None else device).to(device)
    return fn(model_fn, x, sched, steps, prediction_type=prediction_type, generator=generator, callback=callback)

