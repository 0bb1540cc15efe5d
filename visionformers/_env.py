"""Every ``VISIONFORMERS_*`` environment switch, parsed in one place.

A switch is read when it is used, never at import, so a bad value cannot stop ``import visionformers``; where it
is read, a bad value raises the project's ``ValueError`` naming the variable, the value and what is accepted.

- ``VISIONFORMERS_NATIVE``: on ``1 true on yes``, off ``0 false off no``; unset: on (where Linux and a compiler).
- ``VISIONFORMERS_CACHE``: a directory path; unset: ``$XDG_CACHE_HOME/visionformers``, else
  ``~/.cache/visionformers``.
- ``VISIONFORMERS_TRACEBACK``: a flag as ``VISIONFORMERS_NATIVE``; unset: off.

A module with a switch of its own lists it here and reads it with ``flag``, ``integer`` or ``choice``.
Flags and choices ignore case and surrounding blanks. An empty value is a value, and not an accepted one.
"""
from __future__ import annotations

import os
import re
from collections.abc import Iterable
from pathlib import Path

from visionformers._validate import fail

__all__ = ["flag", "integer", "choice", "directory", "native", "cache", "traceback"]

TRUE = ("1", "true", "on", "yes")
FALSE = ("0", "false", "off", "no")


def _check_name(name: str) -> None:
    if not name.startswith("VISIONFORMERS_"):
        fail("name", name, "a VISIONFORMERS_* environment variable")


def flag(name: str, default: bool) -> bool:
    """The on/off switch ``name``: ``default`` where unset, else one of ``TRUE`` / ``FALSE`` (any case)."""
    _check_name(name)
    value = os.environ.get(name)
    if value is None:
        return default
    word = value.strip().lower()
    if word not in TRUE + FALSE:
        fail(f"environment variable {name}", value, f"one of {', '.join(TRUE)} (on) or {', '.join(FALSE)} (off)")
    return word in TRUE


def integer(name: str, default: int, minimum: int = 0) -> int:
    """The whole-number switch ``name`` (decimal digits only): ``default`` where unset."""
    _check_name(name)
    value = os.environ.get(name)
    if value is None:
        return default
    if not re.fullmatch(r"\s*\d+\s*", value) or int(value) < minimum:
        fail(f"environment variable {name}", value, f"a whole number >= {minimum} written in digits (e.g. {default})")
    return int(value)


def choice(name: str, default: str, choices: Iterable[str]) -> str:
    """The switch ``name`` as one of ``choices`` (lower-case words; the value's case and blanks are ignored)."""
    _check_name(name)
    choices = list(choices)
    value = os.environ.get(name)
    if value is None:
        return default
    word = value.strip().lower()
    if word not in choices:
        fail(f"environment variable {name}", value, f"one of {choices}")
    return word


def directory(name: str) -> Path | None:
    """The path switch ``name``, None where unset (``~`` is expanded; existence is the caller's business)."""
    _check_name(name)
    value = os.environ.get(name)
    if value is None:
        return None
    if not value.strip():
        fail(f"environment variable {name}", value, "a directory path (unset it for the default)")
    return Path(value).expanduser()


def native() -> bool:
    """``VISIONFORMERS_NATIVE``: whether the optional native kernels may be used (default on)."""
    return flag("VISIONFORMERS_NATIVE", True)


def cache() -> Path | None:
    """``VISIONFORMERS_CACHE``: the cache directory the user chose, None for the default."""
    return directory("VISIONFORMERS_CACHE")


def traceback() -> bool:
    """``VISIONFORMERS_TRACEBACK``: scripts re-raise a bad-argument error with its traceback (default off)."""
    return flag("VISIONFORMERS_TRACEBACK", False)
