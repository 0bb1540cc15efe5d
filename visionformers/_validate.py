"""Argument checks shared by every public entry point.

Each raises ``ValueError`` whose message names the argument, the value given and what is accepted,
so a caller never sees a traceback from deep inside torch.
"""
from __future__ import annotations

import argparse
import functools
import math
import numbers
import os
import sys
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


def is_int(value) -> bool:
    """A Python int that is not a bool (``True`` is an int to Python, never a size or a count here)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value) -> bool:
    """A finite real number (int, float, numpy scalar) that is not a bool; strings such as "4" are not numbers."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def check_int(name: str, value, *, minimum: int | None = 1, optional: bool = False, note: str = "") -> None:
    """An int (not a bool) >= ``minimum``; with ``optional`` None is accepted too."""
    if optional and value is None:
        return
    if not is_int(value) or (minimum is not None and value < minimum):
        accepted = "an int" if minimum is None else "a positive int" if minimum == 1 else f"an int >= {minimum}"
        fail(name, value, ("None or " if optional else "") + accepted + note)


def check_number(
    name: str,
    value,
    *,
    above: float | None = None,
    at_least: float | None = None,
    below: float | None = None,
    optional: bool = False,
    note: str = "",
) -> None:
    """A finite real number (not a bool or a string) in the given range; ``optional`` accepts None."""
    if optional and value is None:
        return
    bounds = []
    if above is not None:
        bounds.append(f"> {above}")
    if at_least is not None:
        bounds.append(f">= {at_least}")
    if below is not None:
        bounds.append(f"< {below}")
    ok = is_number(value) and (
        (above is None or value > above) and (at_least is None or value >= at_least) and (below is None or value < below)
    )
    if not ok:
        fail(name, value, ("None or " if optional else "") + "a number" + (" " + " and ".join(bounds) if bounds else "") + note)


def check_probability(name: str, value) -> None:
    """A dropout-style rate in [0, 1)."""
    if not is_number(value) or not 0 <= value < 1:
        fail(name, value, "a probability in [0, 1)")


def check_bool(name: str, value, *, optional: bool = False) -> None:
    """True or False (not a string such as "false", which Python would read as true); ``optional`` accepts None."""
    if not (isinstance(value, bool) or (optional and value is None)):
        fail(name, value, ("None, " if optional else "") + "True or False")


def check_path(name: str, value) -> None:
    """A file or directory argument: a non-empty str or os.PathLike (existence is the caller's check)."""
    if not isinstance(value, (str, os.PathLike)) or not str(value):
        fail(name, value, "a path: a non-empty str or os.PathLike")


def check_device(name: str, device) -> torch.device:
    """``device`` as a torch.device, or the ValueError naming it: unparseable, or a backend this machine lacks."""
    accepted = "a torch.device or a string such as 'cpu', 'cuda' or 'cuda:0' naming an available device"
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        fail(name, device, accepted)
    if parsed.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0 or (parsed.index is not None and parsed.index >= count):
            fail(name, device, f"{accepted} (this machine has {count} CUDA device(s))")
    elif parsed.type == "mps" and not torch.backends.mps.is_available():
        fail(name, device, f"{accepted} (MPS is not available here)")
    return parsed


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
        fail(name, x, "a floating-point tensor")
    if integer and (x.is_floating_point() or x.is_complex() or x.dtype == torch.bool):
        fail(name, x, "an integer tensor (torch.long)")


def autocast_on(x: torch.Tensor) -> bool:
    """Whether ``torch.autocast`` will cast x for its layers: autocast is on for x's device type and x is not
    float64 (autocast never casts float64 tensors, so those still meet the parameters as they are)."""
    return x.dtype != torch.float64 and torch.is_autocast_enabled(x.device.type)


def check_dtype(name: str, x: torch.Tensor, dtype: torch.dtype) -> None:
    """A floating input must have the dtype of the parameters it meets (``dtype``), unless autocast casts it.

    Only a dtype compare on the usual path (free, and static under torch.compile); outside autocast a mismatch
    would fail inside the first convolution or matmul anyway, so no working input is rejected.
    """
    if x.dtype != dtype and not autocast_on(x):
        fail(name, x, f"dtype {dtype}, the model's parameter dtype (pass {name}.to({dtype}), call model.to({x.dtype}), "
                      "or run under torch.autocast)")


def check_image(
    name: str, x, *, channels: int, size: tuple[int, int] | None = None, dtype: torch.dtype | None = None
) -> None:
    """Check a (B, C, H, W) floating image batch; ``size`` is (H, W) when the model needs exactly that, ``dtype``
    the model's parameter dtype (any dtype under autocast). An empty batch (B = 0) is accepted."""
    check_tensor(name, x, ndim=4)
    if not x.is_floating_point():
        if dtype is None:
            fail(name, x, f"a floating-point tensor (uint8 images: {name}.float() / 255)")
        fail(name, x, f"a floating-point tensor of dtype {dtype}, the model's parameter dtype "
                      f"(uint8 images: {name}.to({dtype}) / 255)")
    if dtype is not None:
        check_dtype(name, x, dtype)
    if x.shape[1] != channels:
        fail(name, x, f"{channels} channels in dim 1 (B, {channels}, H, W)")
    if size is not None and tuple(x.shape[-2:]) != tuple(size):
        fail(name, x, f"spatial size (H, W)={tuple(size)}")
    if x.shape[-2] == 0 or x.shape[-1] == 0:
        fail(name, x, "a height and width of at least 1")


# ---- scripts ------------------------------------------------------------------------------------------


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """``--help`` that shows every option's default and keeps the description's line breaks."""


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
    one line ``error: ...`` on stderr instead of a traceback, and Ctrl-C with ``interrupted`` (status 130).
    ``VISIONFORMERS_TRACEBACK=1`` re-raises, for debugging."""

    @functools.wraps(main)
    def run(*args, **kwargs):
        from visionformers import _env  # (it imports this module)

        try:
            return main(*args, **kwargs)
        except (ValueError, FileNotFoundError) as e:
            if _env.traceback():
                raise
            raise SystemExit(f"error: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
        except KeyboardInterrupt:  # Ctrl-C outside a training loop (which stops at a step boundary itself)
            if os.environ.get("VISIONFORMERS_TRACEBACK"):
                raise
            print("interrupted", file=sys.stderr)
            raise SystemExit(130) from None

    return run
