"""Classifier-free guidance (Ho & Salimans 2022, eq. 6) with the two passes batched into one forward, optionally
limited to an interval of noise levels (Kynkaenniemi et al. 2024) and rescaled (Lin et al. 2024, Sec. 3.4).

The caller names the unconditional inputs explicitly, as keyword overrides of the conditional ones:

    sample(model, shape, sched, guidance_scale=4.0,
           class_labels=labels, uncond={"class_labels": torch.full_like(labels, null_class)})
    sample(unet, shape, sched, guidance_scale=7.5,
           context=text_emb, context_mask=mask, uncond={"context": empty_emb, "context_mask": empty_mask})

Keys missing from ``uncond`` reuse the conditional value. Tensor inputs are concatenated along the batch
dimension once, before sampling starts; each step then runs the model on [x; x] and splits the output.

Guidance interval (Kynkaenniemi et al. 2024, "Applying Guidance in a Limited Interval", eq. 2): guidance applies
only at noise levels s in (lo, hi], elsewhere the step runs the plain conditional model (one un-doubled forward).
s is the noise-to-signal ratio sigma / alpha of the level (the paper's EDM sigma, Karras et al. 2022), the same
unit for every process: a VP level with Karras sigma s, a flow level with s = sigma / (1 - sigma) (infinite at
pure noise). (0, inf) covers every level of a sampler; an empty interval (lo == hi) turns guidance off.
"""
from __future__ import annotations

from collections.abc import Callable

import math

import torch
from torch import Tensor

from .._validate import check_number, fail, is_number
from .objectives import check_model_output


def batch_cond_uncond(cond: dict, uncond: dict) -> dict:
    """Merge conditional and unconditional keyword inputs into one doubled batch: tensors -> cat([cond, uncond])."""
    if not isinstance(cond, dict):
        fail("cond", type(cond).__name__, "a dict of conditional model inputs")
    if not isinstance(uncond, dict):
        fail("uncond", uncond, "a dict of unconditional model inputs, e.g. uncond={'class_labels': null_labels}")
    merged = {}
    for key in {**cond, **uncond}:
        c = cond.get(key)
        u = uncond.get(key, c)
        if isinstance(c, Tensor) and isinstance(u, Tensor):
            if c.shape[1:] != u.shape[1:] or c.shape[0] != u.shape[0]:
                fail(f"uncond[{key!r}]", u, f"a tensor shaped like the conditional {key} {tuple(c.shape)}")
            merged[key] = torch.cat([c, u.to(device=c.device, dtype=c.dtype)])
        elif isinstance(c, Tensor) or isinstance(u, Tensor):
            fail(f"uncond[{key!r}]", u, f"a tensor when {key}={'a tensor' if isinstance(c, Tensor) else repr(c)} "
                 "(both passes run in one batch, so the unconditional input must be a tensor too, e.g. "
                 "the null class index or the empty-prompt embedding)")
        elif c != u:
            fail(f"uncond[{key!r}]", u, f"the conditional value {c!r}: non-tensor inputs cannot differ between passes")
        else:
            merged[key] = c
    return merged


def rescale_guidance(guided: Tensor, cond: Tensor, guidance_rescale: float) -> Tensor:
    """CFG rescale, Lin et al. 2024, Sec. 3.4 (eq. 15-17; diffusers' ``rescale_noise_cfg``): scale the guided
    prediction to the per-sample std of the conditional one, then mix phi of that with 1 - phi of the guided one.
    The std is torch's default (unbiased) over every dimension but the batch, as in diffusers."""
    dims = tuple(range(1, guided.ndim))
    rescaled = guided * (cond.std(dim=dims, keepdim=True) / guided.std(dim=dims, keepdim=True))
    return torch.lerp(guided, rescaled, guidance_rescale)  # phi rescaled + (1 - phi) guided


def check_guidance_interval(guidance_interval) -> tuple[float, float] | None:
    """None, or a pair (lo, hi) of noise-to-signal ratios with 0 <= lo <= hi (hi may be inf); returned as floats."""
    if guidance_interval is None:
        return None
    ok = (isinstance(guidance_interval, (tuple, list)) and len(guidance_interval) == 2
          and all(is_number(v) or v == math.inf for v in guidance_interval))
    if not ok:
        fail("guidance_interval", guidance_interval, "None or a pair (lo, hi) of noise levels sigma / alpha, "
             "e.g. (0.28, 5.42) (Kynkaenniemi et al. 2024), hi may be math.inf")
    lo, hi = (float(v) for v in guidance_interval)
    if lo < 0 or lo > hi:
        fail("guidance_interval", guidance_interval, "a pair (lo, hi) with 0 <= lo <= hi (noise levels sigma / alpha; "
             "lo == hi is an empty interval)")
    return lo, hi


def guidance_active(level: float, guidance_interval: tuple[float, float] | None) -> bool:
    """Whether guidance applies at noise-to-signal ratio ``level``: lo < level <= hi (always without an interval)."""
    return guidance_interval is None or guidance_interval[0] < level <= guidance_interval[1]


def guided_model(
    model: Callable[..., Tensor], cond: dict, uncond: dict | None, guidance_scale: float, *,
    guidance_rescale: float = 0.0,
) -> Callable[..., Tensor]:
    """A callable ``(x_t, t, guide=True) -> prediction`` with ``cond`` bound and classifier-free guidance applied
    (``guide=False``: the plain conditional model, used outside a guidance interval).

    guided = uncond + w (cond - uncond) on the raw prediction; since eps, x0, v and flow are affine in the
    prediction at fixed x_t, guiding any of them gives the same sampler step. w = 1 is the plain conditional model
    (one un-doubled forward); any other w needs ``uncond``. This w is the paper's w + 1 (eq. 6 writes
    (1 + w) cond - w uncond, no guidance at w = 0), the convention of diffusers' ``guidance_scale``.
    ``guidance_rescale`` in [0, 1] is phi of :func:`rescale_guidance` (0: off; 0.7 in Lin et al. 2024), applied to
    the raw prediction as diffusers does (it is not affine, so it depends on what the model predicts).
    """
    if not callable(model):
        fail("model", type(model).__name__, "a callable (x_t, t, **cond) -> prediction")
    if not isinstance(cond, dict):
        fail("cond", type(cond).__name__, "a dict of conditional model inputs")
    if uncond is not None and not isinstance(uncond, dict):
        fail("uncond", uncond,
             "None or a dict of unconditional model inputs, e.g. uncond={'class_labels': null_labels}")
    check_number("guidance_scale", guidance_scale, at_least=0, note=" (1 disables classifier-free guidance)")
    check_number("guidance_rescale", guidance_rescale, at_least=0, note=" and <= 1 (0: off; 0.7 in Lin et al. 2024)")
    if guidance_rescale > 1:
        fail("guidance_rescale", guidance_rescale, "a number in [0, 1] (0: off; 0.7 in Lin et al. 2024)")
    if guidance_scale == 1:
        return lambda x, t, guide=True: model(x, t, **cond)
    if not uncond:
        fail("uncond", uncond, f"a dict of unconditional model inputs when guidance_scale={guidance_scale} != 1, "
             "e.g. uncond={'class_labels': null_labels}")
    both = batch_cond_uncond(cond, uncond)
    w, phi = float(guidance_scale), float(guidance_rescale)

    def guided(x: Tensor, t: Tensor, guide: bool = True) -> Tensor:
        if not guide:
            return model(x, t, **cond)
        out = model(torch.cat([x, x]), torch.cat([t, t]), **both)  # (2B, ...): conditional half first
        check_model_output(out, torch.Size((2 * x.shape[0], *x.shape[1:])), "its batched input [x_t; x_t]")
        out_cond, out_uncond = out.chunk(2)
        out = torch.lerp(out_uncond, out_cond, w)  # uncond + w * (cond - uncond)
        return rescale_guidance(out, out_cond, phi) if phi > 0 else out

    return guided
