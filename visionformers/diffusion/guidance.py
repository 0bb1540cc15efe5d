"""Classifier-free guidance (Ho & Salimans 2022, eq. 6) with the two passes batched into one forward.

The caller names the unconditional inputs explicitly, as keyword overrides of the conditional ones:

    sample(model, shape, sched, guidance_scale=4.0,
           class_labels=labels, uncond={"class_labels": torch.full_like(labels, null_class)})
    sample(unet, shape, sched, guidance_scale=7.5,
           context=text_emb, context_mask=mask, uncond={"context": empty_emb, "context_mask": empty_mask})

Keys missing from ``uncond`` reuse the conditional value. Tensor inputs are concatenated along the batch
dimension once, before sampling starts; each step then runs the model on [x; x] and splits the output.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from .._validate import check_number, fail
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


def guided_model(
    model: Callable[..., Tensor], cond: dict, uncond: dict | None, guidance_scale: float
) -> Callable[[Tensor, Tensor], Tensor]:
    """A callable ``(x_t, t) -> prediction`` with ``cond`` bound and classifier-free guidance applied.

    guided = uncond + w (cond - uncond) on the raw prediction; since eps, x0 and v are affine in the prediction
    at fixed x_t, guiding any of them gives the same sampler step. w = 1 is the plain conditional model
    (one un-doubled forward); any other w needs ``uncond``. This w is the paper's w + 1 (eq. 6 writes
    (1 + w) cond - w uncond, no guidance at w = 0), the convention of diffusers' ``guidance_scale``.
    """
    if not callable(model):
        fail("model", type(model).__name__, "a callable (x_t, t, **cond) -> prediction")
    if not isinstance(cond, dict):
        fail("cond", type(cond).__name__, "a dict of conditional model inputs")
    if uncond is not None and not isinstance(uncond, dict):
        fail("uncond", uncond,
             "None or a dict of unconditional model inputs, e.g. uncond={'class_labels': null_labels}")
    check_number("guidance_scale", guidance_scale, at_least=0, note=" (1 disables classifier-free guidance)")
    if guidance_scale == 1:
        return lambda x, t: model(x, t, **cond)
    if not uncond:
        fail("uncond", uncond, f"a dict of unconditional model inputs when guidance_scale={guidance_scale} != 1, "
             "e.g. uncond={'class_labels': null_labels}")
    both = batch_cond_uncond(cond, uncond)
    w = float(guidance_scale)

    def guided(x: Tensor, t: Tensor) -> Tensor:
        out = model(torch.cat([x, x]), torch.cat([t, t]), **both)  # (2B, ...): conditional half first
        check_model_output(out, torch.Size((2 * x.shape[0], *x.shape[1:])), "its batched input [x_t; x_t]")
        out_cond, out_uncond = out.chunk(2)
        return torch.lerp(out_uncond, out_cond, w)  # uncond + w * (cond - uncond)

    return guided
