"""Argument checks shared by every public entry point.

Each raises ``ValueError`` whose message names the argument, the value given and what is accepted,
so a caller never sees a traceback from deep inside torch.
"""
from __future__ import annotations

import functools
import os
from collections.abc import Callable, Iterable, Sequence

import torch


def fail(name: str, value, accepted: str) -> None:
    """Raise the project's standard bad-argument error."""
    raise ValueError(f"{name}={_short(value)} is not accepted; expected {accepted}")


def _short(value) -> str:
    if isinstance(value, torch.Tensor):
        return f"Tensor(shape={tuple(value.shape)}, dtype={value.dtype})"
    text = repr(value)
    return text if len(text) <= 120 else text[:117] + "..."


def check_choice(name: str, value, choices: Iterable) -> None:
    choices = list(choices)
    if value not in choices:
        fail(name, value, f"one of {choices}")


def check_positive(name: str, value, *, allow_zero: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and (value >= 0 if allow_zero else value > 0)
    if not ok:
        fail(name, value, "a number >= 0" if allow_zero else "a number > 0")


def check_divisible(name: str, value: int, divisor: int, divisor_name: str) -> None:
    if divisor <= 0 or value % divisor != 0:
        fail(name, value, f"a multiple of {divisor_name}={divisor}")


def check_tensor(
    name: str,
    x,
    *,
    ndim: int | Sequence[int] | None = None,
    floating: bool | None = None,
    integer: bool | None = None,
) -> None:
    """Check that ``x`` is a tensor of the given rank and dtype family."""
    if not isinstance(x, torch.Tensor):
        fail(name, type(x).__name__, "a torch.Tensor")
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else tuple(ndim)
        if x.ndim not in allowed:
            fail(name, x, f"a tensor with {' or '.join(map(str, allowed))} dimensions")
    if floating and not x.is_floating_point():
        fail(name, x, "a floating-point tensor (float32, float16 or bfloat16)")
    if integer and (x.is_floating_point() or x.is_complex() or x.dtype == torch.bool):
        fail(name, x, "an integer tensor (torch.long)")


def check_image(name: str, x, *, channels: int, size: tuple[int, int] | None = None) -> None:
    """Check a (B, C, H, W) floating image batch; ``size`` is (H, W) when the model needs exactly that."""
    check_tensor(name, x, ndim=4, floating=True)
    if x.shape[1] != channels:
        fail(name, x, f"{channels} channels in dim 1 (B, {channels}, H, W)")
    if size is not None and tuple(x.shape[-2:]) != tuple(size):
        fail(name, x, f"spatial size (H, W)={tuple(size)}")


# ---- scripts ------------------------------------------------------------------------------------------


def check_args(args, rules: Iterable[tuple[str, Callable[[object], bool], str]]) -> None:
    """Script arguments: ``rules`` are (name, predicate, accepted); the first failing one raises the ValueError
    ``--name=value is not accepted; expected ...`` before any work starts."""
    for name, ok, accepted in rules:
        value = getattr(args, name)
        if not ok(value):
            fail(f"--{name}", value, accepted)


def script_errors(main: Callable) -> Callable:
    """Wrap a script's ``main`` for the command line (``script_errors(main)()`` under ``__main__``; called from
    Python, ``main`` keeps raising): a bad argument (ValueError / FileNotFoundError, which name it) exits with the
    one line ``error: ...`` on stderr instead of a traceback. ``VISIONFORMERS_TRACEBACK=1`` re-raises, for debugging."""

    @functools.wraps(main)
    def run(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except (ValueError, FileNotFoundError) as e:
            if os.environ.get("VISIONFORMERS_TRACEBACK"):
                raise
            raise SystemExit(f"error: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None

    return run
