"""Samplers as plain functions with one signature (k-diffusion style):

    sample_xxx(model, x, sched, steps, *, prediction_type="eps", generator=None, callback=None) -> x0

``sched`` is the noise process, a :class:`~.schedules.NoiseSchedule` (VP) or a :class:`~.flow.RectifiedFlow`;
every sampler reads only its Gaussian path (alpha_i, sigma_i, model time t_i; see ``path.py``). ``model`` is a
:class:`~.denoiser.Denoiser` or a callable ``model(x_t, t) -> prediction`` (conditioning and guidance already bound,
see :func:`sample`), wrapped once as a denoiser (x_t, level) -> (x0, eps), so no sampler handles prediction types.
``x`` is the starting noise x ~ N(0, I) (the distribution at the first level), ``t`` a float tensor (B,) of model
times. Every coefficient is computed once in float64 before the loop; a step is the model call plus a few
tensor-times-Python-float ops. ``generator`` is a torch.Generator or a list of one per image (image b's per-step
noise then comes from generator b alone, so it does not depend on its batch-mates).
``callback(dict(step=i, x=x, denoised=x0, t=t))`` runs after each step with the new sample, the x0 estimate of
that step and the timesteps the model saw.

Which levels: on a NoiseSchedule, ddpm, ddim and dpmpp_2m visit the "trailing" subsequence
t_i = round(T - i T/steps) - 1 (Lin et al. 2024, Sec. 3.3 / Table 2; diffusers' ``timestep_spacing="trailing"``),
euler and heun the Karras sigmas at fractional t. On a flow every sampler visits the levels of
``RectifiedFlow.sampling_levels`` (diffusers' FlowMatch spacing). ddpm and ddim use the VP posterior and serve only
a NoiseSchedule (on a flow, DDIM is the Euler step); euler_maruyama serves only a flow.
"""
from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from .._validate import check_choice, check_device, check_number, fail
from .denoiser import Denoiser
from .objectives import PREDICTION_TYPES
from .path import Levels, check_process
from .schedules import NoiseSchedule, discrete_timesteps, karras_sigmas  # noqa: F401  (re-exported names)

Model = Callable[[Tensor, Tensor], Tensor]
Callback = Callable[[dict], None] | None
Generators = torch.Generator | list[torch.Generator] | None

# samplers that use the VP posterior (alphas_cumprod) and so serve only a NoiseSchedule
VP_ONLY = ("ddpm", "ddim")
# samplers that serve only a RectifiedFlow: Euler-Maruyama with w = s needs s bounded (a flow's s = sigma <= 1; the
# VE coordinate of a VP schedule reaches ~100, where a few large steps inject far too much noise)
FLOW_ONLY = ("euler_maruyama",)


def check_generators(generator, batch: int | None = None) -> None:
    """None, a torch.Generator, or a list of ``batch`` generators (one per image)."""
    if generator is None or isinstance(generator, torch.Generator):
        return
    if (isinstance(generator, (list, tuple)) and generator and all(isinstance(g, torch.Generator) for g in generator)
            and (batch is None or len(generator) == batch)):
        return
    fail("generator", generator, "None, a torch.Generator (e.g. torch.Generator().manual_seed(0)) or a list of one "
         "per image" + (f" ({batch})" if batch is not None else ""))


def check_sampler(name: str, sched) -> None:
    """ValueError unless the sampler called ``name`` serves the process ``sched`` (ddpm / ddim need a NoiseSchedule,
    euler_maruyama a RectifiedFlow)."""
    check_choice("sampler", name, SAMPLERS)
    check_process("sched", sched)
    vp = isinstance(sched, NoiseSchedule)
    if name in (FLOW_ONLY if vp else VP_ONLY):
        why = ("it needs a RectifiedFlow: its noise w = s suits a flow's s <= 1, not the VE sigmas of a VP schedule"
               if vp else "it uses the VP posterior; on a flow, DDIM is the Euler step")
        fail("sampler", name, f"one of {[n for n in SAMPLERS if n not in (FLOW_ONLY if vp else VP_ONLY)]} for "
             f"{sched!r} ({why})")


def _setup(name: str, model, x: Tensor, sched, steps: int, prediction_type: str, generator, callback, *,
           discrete: bool, rho: float = 7.0) -> tuple[Denoiser, Levels]:
    """Validate the common sampler arguments once, before the loop; returns the denoiser and the levels to visit."""
    if not callable(model):
        fail("model", type(model).__name__, "a callable (x_t, t) -> prediction")
    if not isinstance(x, Tensor) or not x.is_floating_point() or x.ndim < 2:
        fail("x", x, "a floating tensor (B, ...) of starting noise")
    check_sampler(name, sched)
    if not isinstance(steps, int) or isinstance(steps, bool) or steps <= 0:
        fail("steps", steps, "an int > 0")
    if not discrete and isinstance(sched, NoiseSchedule) and sched.sampling.limits_x0:
        fail("sched", sched, "a schedule without clip_sample / thresholding for euler and heun (those limits apply to "
             "the x0 estimate of ddpm, ddim and dpmpp_2m)")
    if discrete and isinstance(sched, NoiseSchedule) and steps > sched.num_train_steps:
        fail("steps", steps, f"at most num_train_steps={sched.num_train_steps} for a discrete-time sampler "
             "(euler and heun accept any number)")
    check_choice("prediction_type", prediction_type, PREDICTION_TYPES)
    check_generators(generator, x.shape[0])
    if callback is not None and not callable(callback):
        fail("callback", callback, "None or a callable taking one dict")
    denoiser = model if isinstance(model, Denoiser) else Denoiser(model, sched, prediction_type)
    if denoiser.sched is not sched:
        fail("sched", sched, f"the process of the denoiser passed as model ({denoiser.sched!r})")
    # a NoiseSchedule's discrete timesteps follow its Discretization, which may depend on the solver (diffusers')
    solver = {"solver": name} if discrete and isinstance(sched, NoiseSchedule) else {}
    return denoiser, sched.sampling_levels(steps, discrete=discrete, rho=rho, **solver)


def _model_t(t: Tensor, x: Tensor) -> Tensor:
    """(steps,) timesteps -> (steps, B) float32 on x's device, built once so each step only indexes a row."""
    return t.float()[:, None].expand(-1, x.shape[0]).contiguous().to(x.device)


def randn_like(x: Tensor, generator: Generators) -> Tensor:
    """Noise shaped like x, drawn on the generator's device (so a CPU generator is reproducible on any device), moved
    to x's; with a list of generators, row b comes from generator b."""
    if isinstance(generator, (list, tuple)):
        return torch.stack([torch.randn(x.shape[1:], generator=g, device=g.device, dtype=x.dtype).to(x.device)
                            for g in generator])
    device = generator.device if generator is not None else x.device
    return torch.randn(x.shape, generator=generator, device=device, dtype=x.dtype).to(x.device)


@torch.no_grad()
def sample_ddpm(model: Model, x: Tensor, sched: NoiseSchedule, steps: int, *, prediction_type: str = "eps",
                generator: Generators = None, callback: Callback = None) -> Tensor:
    """Ancestral sampling, Ho et al. 2020 Alg. 2, on the respaced chain of Nichol & Dhariwal 2021 (Sec. 4):
    x_prev ~ N(c0 x0 + ct x_t, beta_tilde) with the posterior of eq. 6-7, beta_t := 1 - abar_t / abar_prev,
    c0 = sqrt(abar_prev) beta_t / (1 - abar_t), ct = sqrt(1 - beta_t) (1 - abar_prev) / (1 - abar_t),
    beta_tilde = beta_t (1 - abar_prev) / (1 - abar_t) ("fixed_small" variance). NoiseSchedule only."""
    den, levels = _setup("ddpm", model, x, sched, steps, prediction_type, generator, callback, discrete=True)
    ab = sched.alphas_cumprod[levels.t.long()]
    ab_prev = torch.cat([ab[1:], ab.new_ones(1)])  # the chain ends at abar = 1, i.e. x0 itself
    beta = 1 - ab / ab_prev
    c0 = (ab_prev.sqrt() * beta / (1 - ab)).tolist()
    ct = ((1 - beta).sqrt() * (1 - ab_prev) / (1 - ab)).tolist()
    std = (beta * (1 - ab_prev) / (1 - ab)).sqrt().tolist()
    alpha, sigma = ab.sqrt().tolist(), (1 - ab).sqrt().tolist()
    t_model = _model_t(levels.t, x)

    for i in range(steps):
        x0, _ = den(x, alpha[i], sigma[i], t_model[i])
        x0 = sched.sampling.limit_x0(x0)
        x = c0[i] * x0 + ct[i] * x
        if std[i] > 0:
            x = x + std[i] * randn_like(x, generator)
        if callback is not None:
            callback(dict(step=i, x=x, denoised=x0, t=t_model[i]))
    return x


@torch.no_grad()
def sample_ddim(model: Model, x: Tensor, sched: NoiseSchedule, steps: int, *, prediction_type: str = "eps",
                generator: Generators = None, callback: Callback = None, eta: float = 0.0) -> Tensor:
    """DDIM, Song et al. 2021 eq. 12: x_prev = sqrt(abar_prev) x0 + sqrt(1 - abar_prev - s^2) eps + s z, with
    s = eta sqrt((1 - abar_prev) / (1 - abar_t)) sqrt(1 - abar_t / abar_prev) (eq. 16). eta = 0: deterministic
    DDIM; eta = 1: the DDPM posterior. ``eta`` is reachable through ``sample(sampler=partial(sample_ddim, eta=..))``.
    NoiseSchedule only."""
    den, levels = _setup("ddim", model, x, sched, steps, prediction_type, generator, callback, discrete=True)
    check_number("eta", eta, at_least=0, note=" (0: deterministic DDIM, 1: DDPM variance)")
    ab = sched.alphas_cumprod[levels.t.long()]
    _, _, ab_prev = sched.sampling.steps(sched.alphas_cumprod, steps, "ddim")  # diffusers: t - T // steps
    std = eta * ((1 - ab_prev) / (1 - ab) * (1 - ab / ab_prev)).sqrt()
    c_x0, c_eps = ab_prev.sqrt().tolist(), (1 - ab_prev - std**2).clamp(min=0).sqrt().tolist()
    std = std.tolist()
    alpha, sigma = ab.sqrt().tolist(), (1 - ab).sqrt().tolist()
    t_model = _model_t(levels.t, x)

    for i in range(steps):
        x0, eps = den(x, alpha[i], sigma[i], t_model[i])
        x0 = sched.sampling.limit_x0(x0)  # eps stays the model's (diffusers' use_clipped_model_output=False)
        x = c_x0[i] * x0 + c_eps[i] * eps
        if std[i] > 0:
            x = x + std[i] * randn_like(x, generator)
        if callback is not None:
            callback(dict(step=i, x=x, denoised=x0, t=t_model[i]))
    return x


@torch.no_grad()
def sample_dpmpp_2m(model: Model, x: Tensor, sched, steps: int, *, prediction_type: str = "eps",
                    generator: Generators = None, callback: Callback = None) -> Tensor:
    """DPM-Solver++(2M), Lu et al. 2022 ("DPM-Solver++", Alg. 2), in lambda = log(alpha / sigma), on any path:
    x_next = (sigma_next / sigma) x - alpha_next (e^-h - 1) D,  h = lambda_next - lambda,
    D = (1 + 1/(2r)) x0_i - 1/(2r) x0_{i-1},  r = h_{i-1} / h_i.
    The first step has no history and the last one lands on sigma = 0 (h infinite), so both are first order
    (D = x0_i), as in k-diffusion's ``sample_dpmpp_2m`` and diffusers' ``final_sigmas_type="zero"``. On a flow the
    first level is pure noise (alpha = 0, lambda = -inf): that step is x_next = sigma_next x + alpha_next x0 and the
    second step's history weight 1/(2r) is 0. ``generator`` is unused (deterministic), kept for the signature."""
    den, levels = _setup("dpmpp_2m", model, x, sched, steps, prediction_type, generator, callback, discrete=True)
    alphas, sigmas = levels.alpha, levels.sigma  # (steps+1,): the chain ends at alpha = 1, sigma = 0
    lambdas = alphas.log() - sigmas.log()  # first entry -inf on a flow, last entry +inf
    limit_x0 = sched.sampling.limit_x0 if isinstance(sched, NoiseSchedule) else None  # a flow has no x0 limits
    h = lambdas[1:] - lambdas[:-1]
    c_x = (sigmas[1:] / sigmas[:-1]).tolist()
    c_d = (-alphas[1:] * torch.expm1(-h)).tolist()
    # weight k of the history term D = x0 + k (x0 - x0_prev); k = 1 / (2 r); 0 means first order
    k = torch.zeros(steps, dtype=torch.float64)
    if steps > 2:
        k[1:-1] = h[1:-1] / (2 * h[:-2])
    k = k.tolist()
    alpha, sigma = alphas[:-1].tolist(), sigmas[:-1].tolist()
    t_model = _model_t(levels.t, x)

    x0_prev = None
    for i in range(steps):
        x0, _ = den(x, alpha[i], sigma[i], t_model[i])
        if limit_x0 is not None:
            x0 = limit_x0(x0)
        d = x0 if k[i] == 0 else x0 + k[i] * (x0 - x0_prev)
        x = c_x[i] * x + c_d[i] * d
        x0_prev = x0
        if callback is not None:
            callback(dict(step=i, x=x, denoised=x0, t=t_model[i]))
    return x


def _ode_tables(levels: Levels, k: int):
    """Python floats for the ODE samplers: alpha_i, sigma_i, the scale c_i = alpha_i + k sigma_i of the coordinates
    y = x / c and their time s_i = sigma_i / c_i (see ``path.GaussianPath``)."""
    c = levels.alpha + k * levels.sigma
    return levels.alpha.tolist(), levels.sigma.tolist(), c.tolist(), (levels.sigma / c).tolist()


def _slope(den: Denoiser, y: Tensor, i: int, tables, t_model: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """(dy/ds, x0, eps) at level i: the denoiser sees x = y c_i; dy/ds = eps - k x0 (eq. 3 of Karras et al. 2022
    for k = 0; the velocity eps - x0 of rectified flow for k = 1)."""
    alpha, sigma, c, _ = tables
    x0, eps = den(y * c[i], alpha[i], sigma[i], t_model[i])
    return (eps if k == 0 else eps - k * x0), x0, eps


@torch.no_grad()
def sample_euler(model: Model, x: Tensor, sched, steps: int, *, prediction_type: str = "eps",
                 generator: Generators = None, callback: Callback = None, rho: float = 7.0) -> Tensor:
    """Euler on the probability-flow ODE dy/ds = eps - k x0 in the path's coordinates (Karras et al. 2022, Alg. 1
    without the second-order correction). On a NoiseSchedule: the VE view over the Karras sigmas of eq. 5 (any
    number of steps); on a flow: x_next = x + (sigma_next - sigma) v, diffusers' FlowMatchEulerDiscreteScheduler.
    ``rho`` only applies to a NoiseSchedule. ``generator`` is unused (deterministic), kept for the signature."""
    den, levels = _setup("euler", model, x, sched, steps, prediction_type, generator, callback, discrete=False,
                         rho=rho)
    k, tables, t_model = sched.ode_k, _ode_tables(levels, sched.ode_k), _model_t(levels.t, x)
    c, s = tables[2], tables[3]
    y = x / c[0]  # VP noise -> VE scale: x sqrt(1 + s_max^2); a flow: c = 1

    for i in range(steps):
        d, x0, _ = _slope(den, y, i, tables, t_model, k)
        y = y + (s[i + 1] - s[i]) * d
        if callback is not None:
            callback(dict(step=i, x=y * c[i + 1], denoised=x0, t=t_model[i]))
    return y  # the last level has alpha = 1, sigma = 0: c = 1


@torch.no_grad()
def sample_heun(model: Model, x: Tensor, sched, steps: int, *, prediction_type: str = "eps",
                generator: Generators = None, callback: Callback = None, rho: float = 7.0) -> Tensor:
    """Heun's 2nd-order method, Karras et al. 2022 Alg. 1 (deterministic sampler), in the path's coordinates: an
    Euler step to s_{i+1}, then the average of the slopes at both ends; the last step (to sigma = 0) stays Euler.
    2 steps - 1 model calls. On a flow this is diffusers' FlowMatchHeunDiscreteScheduler.
    ``generator`` is unused and kept for the common signature."""
    den, levels = _setup("heun", model, x, sched, steps, prediction_type, generator, callback, discrete=False,
                         rho=rho)
    k, tables, t_model = sched.ode_k, _ode_tables(levels, sched.ode_k), _model_t(levels.t, x)
    sigma, c, s = tables[1], tables[2], tables[3]
    y = x / c[0]

    for i in range(steps):
        ds = s[i + 1] - s[i]
        d, x0, _ = _slope(den, y, i, tables, t_model, k)
        y_next = y + ds * d
        if sigma[i + 1] > 0:
            d_next, _, _ = _slope(den, y_next, i + 1, tables, t_model, k)
            y_next = y + ds * 0.5 * (d + d_next)
        y = y_next
        if callback is not None:
            callback(dict(step=i, x=y * c[i + 1], denoised=x0, t=t_model[i]))
    return y


@torch.no_grad()
def sample_euler_maruyama(model: Model, x: Tensor, sched, steps: int, *, prediction_type: str = "eps",
                          generator: Generators = None, callback: Callback = None, diffusion: float = 1.0,
                          rho: float = 7.0) -> Tensor:
    """Euler-Maruyama on the reverse SDE with the marginals of the probability-flow ODE (SiT, Ma et al. 2024,
    Sec. 2.3: any diffusion coefficient w keeps the marginals; Song et al. 2021, eq. 6), in the path's coordinates
    (y, s) where the score is -eps / s. As in SiT's sampler (dx = [v - w score] dt + sqrt(2 w) dW, reversed), going
    from s_i down to s_{i+1} (|ds| = s_i - s_{i+1}):
        y_next = y + ds (eps - k x0) - w (eps / s_i) |ds| + sqrt(2 w |ds|) z,   w = diffusion * s_i,
    so diffusion = 1 is SiT's default diffusion_form="sigma" (w_t = sigma_t) and diffusion = 0 the Euler ODE step.
    The last step, onto sigma = 0, is the deterministic Euler step (no noise is added to the final sample; SiT
    takes a mean step there too). Noise comes from ``generator`` (per image with a list). RectifiedFlow only
    (see ``FLOW_ONLY``)."""
    den, levels = _setup("euler_maruyama", model, x, sched, steps, prediction_type, generator, callback,
                         discrete=False, rho=rho)
    check_number("diffusion", diffusion, at_least=0, note=" (0: the Euler ODE step; 1: SiT's w_t = sigma_t)")
    k, tables, t_model = sched.ode_k, _ode_tables(levels, sched.ode_k), _model_t(levels.t, x)
    c, s = tables[2], tables[3]
    y = x / c[0]

    for i in range(steps):
        ds = s[i + 1] - s[i]
        d, x0, eps = _slope(den, y, i, tables, t_model, k)
        y = y + ds * d
        if s[i + 1] > 0 and diffusion > 0:
            w = diffusion * s[i]
            y = y - (w * -ds / s[i]) * eps + math.sqrt(-2 * w * ds) * randn_like(y, generator)
        if callback is not None:
            callback(dict(step=i, x=y * c[i + 1], denoised=x0, t=t_model[i]))
    return y


SAMPLERS: dict[str, Callable[..., Tensor]] = {
    "ddpm": sample_ddpm,
    "ddim": sample_ddim,
    "dpmpp_2m": sample_dpmpp_2m,
    "euler": sample_euler,
    "heun": sample_heun,
    "euler_maruyama": sample_euler_maruyama,
}


def _infer_device(model, cond: dict, generator: Generators) -> torch.device:
    """Where to sample: the model's parameters, else the first conditioning tensor, else the generator, else CPU."""
    if isinstance(model, torch.nn.Module):
        for p in model.parameters():
            return p.device
    for v in cond.values():
        if isinstance(v, Tensor):
            return v.device
    if isinstance(generator, (list, tuple)):
        return generator[0].device
    return generator.device if generator is not None else torch.device("cpu")


@torch.no_grad()
def sample(
    model: Callable[..., Tensor],
    shape: tuple[int, ...],
    sched,
    sampler: str | Callable[..., Tensor] | None = None,
    steps: int = 50,
    prediction_type: str = "eps",
    guidance_scale: float = 1.0,
    generator: Generators = None,
    callback: Callback = None,
    *,
    uncond: dict | None = None,
    guidance_rescale: float = 0.0,
    guidance_interval: tuple[float, float] | None = None,
    noise: Tensor | None = None,
    device: torch.device | str | None = None,
    **cond,
) -> Tensor:
    """Draw x0 ~ p(x0 | cond) of shape ``shape`` from ``model(x_t, t, **cond) -> prediction``.

    :param sched: the noise process: a ``NoiseSchedule`` (VP) or a ``RectifiedFlow`` (prediction_type "flow").
    :param sampler: a name in ``SAMPLERS`` ("ddpm", "ddim", "dpmpp_2m", "euler", "heun", "euler_maruyama";
        ddpm / ddim need a NoiseSchedule, euler_maruyama a RectifiedFlow) or a function with the common sampler
        signature, e.g. ``functools.partial(sample_ddim, eta=0.5)``; None: the process's ``default_sampler``
        ("ddim" on a NoiseSchedule, "heun" on a RectifiedFlow).
    :param steps: number of sampler steps (model calls, except heun: 2 steps - 1).
    :param guidance_scale: classifier-free guidance weight w; 1 = plain conditional model. w != 1 needs ``uncond``,
        the keyword inputs that replace ``cond`` in the unconditional pass (see ``guidance.py``).
    :param guidance_rescale: phi of CFG rescale (Lin et al. 2024, Sec. 3.4), in [0, 1]; 0 = off.
    :param guidance_interval: None (guide every step) or (lo, hi): guide only at noise levels sigma / alpha in
        (lo, hi] (Kynkaenniemi et al. 2024), the plain conditional model elsewhere.
    :param generator: seeds the starting noise and a stochastic sampler's per-step noise. A list of one generator
        per image makes image b depend on generator b alone (its noise and per-step noise), whatever its batch-mates.
        Noise is drawn on the generator's device, so a CPU generator gives the same images on any device (at the
        cost of a host-to-device copy per stochastic step).
    :param noise: the starting noise (a tensor of ``shape``) instead of drawing it from ``generator``.
    :param device: where x lives; default: the model's parameters, else a conditioning tensor, else the generator's.
    :returns: float32 tensor of ``shape`` in the data scale (e.g. [-1, 1] images).
    The model is called in float32; wrap it (``torch.autocast``) for reduced-precision inference.
    """
    from .guidance import guided_model

    check_process("sched", sched)
    if callable(sampler):
        fn = sampler
    else:
        sampler = sched.default_sampler if sampler is None else sampler
        check_choice("sampler", sampler, SAMPLERS)
        fn = SAMPLERS[sampler]
    if not callable(model):
        fail("model", type(model).__name__, "a callable (x_t, t, **cond) -> prediction")
    if not isinstance(steps, int) or isinstance(steps, bool) or steps <= 0:
        fail("steps", steps, "an int > 0")
    if (not isinstance(shape, (tuple, list, torch.Size)) or len(shape) < 2
            or not all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in shape)):
        fail("shape", shape, "a tuple of positive ints (B, ...) with at least 2 entries")
    shape = tuple(shape)
    check_choice("prediction_type", prediction_type, PREDICTION_TYPES)
    if callback is not None and not callable(callback):
        fail("callback", callback, "None or a callable taking one dict")
    check_generators(generator, shape[0])
    if noise is not None and (not isinstance(noise, Tensor) or not noise.is_floating_point()
                              or tuple(noise.shape) != shape):
        fail("noise", noise, f"None or a floating tensor of shape {shape}")
    if device is not None:
        device = check_device("device", device)
    else:
        device = noise.device if noise is not None else _infer_device(model, cond, generator)
    guided = guided_model(model, cond, uncond, guidance_scale, guidance_rescale=guidance_rescale)
    denoiser = Denoiser(guided, sched, prediction_type, guidance_interval)  # checks prediction_type against sched

    if noise is not None:
        x = noise.float().to(device)
    elif isinstance(generator, (list, tuple)):
        x = torch.stack([torch.randn(shape[1:], generator=g, device=g.device).to(device) for g in generator])
    else:
        x = torch.randn(shape, generator=generator,
                        device=generator.device if generator is not None else device).to(device)
    return fn(denoiser, x, sched, steps, prediction_type=prediction_type, generator=generator, callback=callback)
