"""save_pretrained / from_pretrained: a model directory is ``config.json`` + ``model.safetensors``.

The config names the model class and every config field, so loading needs nothing else. Files are
written to a temporary name and renamed into place, so a killed process never leaves a half file
under the final name. Weights are safetensors: loading runs no pickle.
"""
from __future__ import annotations

import dataclasses
import json
import os
import types
import typing
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from visionformers._io import atomic_write, atomic_write_bytes
from visionformers._validate import check_path
from visionformers.registry import model_classes

CONFIG_NAME, WEIGHTS_NAME = "config.json", "model.safetensors"
FORMAT_VERSION = 1


def unwrap_model(model: nn.Module) -> nn.Module:
    """Strip DDP / accelerate (``.module``) and ``torch.compile`` (``._orig_mod``) wrappers."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(getattr(model, "module", None), nn.Module) and not hasattr(model, "config"):
            model = model.module
        else:
            return model


def save_state_dict(state: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict | None = None) -> None:
    """Save tensors as safetensors atomically; tensors sharing storage (tied weights) are saved once."""
    path = Path(path)
    seen, tensors = {}, {}
    for k, v in state.items():
        key = (v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape)) if v.numel() else None
        if key is not None and key in seen:
            continue  # tied to seen[key]; the model re-ties on load
        if key is not None:
            seen[key] = k
        tensors[k] = v.detach().contiguous().cpu()
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def load_state_dict(path: str | os.PathLike, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Load a safetensors file; a missing, empty, truncated or foreign file is a clear error naming it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file {str(path)!r} does not exist")
    if path.stat().st_size == 0:
        raise ValueError(f"weights file {str(path)!r} is empty; expected a safetensors file")
    try:
        return load_file(str(path), device=str(device))
    except (SafetensorError, OSError, RuntimeError, ValueError) as e:
        raise ValueError(f"weights file {str(path)!r} is not a readable safetensors file ({e})") from None


def config_to_dict(config) -> dict:
    return dataclasses.asdict(config)


def _coerce(value, hint, name: str, source: str):
    """JSON value -> the config field's type (lists back to tuples), or a ValueError naming the field."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, name, source)
            except ValueError:
                continue
        raise ValueError(f"{source}: field {name!r}={value!r} has the wrong type; expected {hint}")
    if origin is tuple or hint is tuple:
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{source}: field {name!r}={value!r} has the wrong type; expected a list")
        if args and not (len(args) == 2 and args[1] is Ellipsis):
            if len(args) != len(value):
                raise ValueError(f"{source}: field {name!r}={value!r} needs {len(args)} items")
            return tuple(_coerce(v, a, name, source) for v, a in zip(value, args))
        inner = args[0] if args else typing.Any
        return tuple(_coerce(v, inner, name, source) for v in value)
    if origin is list:
        if not isinstance(value, list):
            raise ValueError(f"{source}: field {name!r}={value!r} has the wrong type; expected a list")
        return [_coerce(v, args[0] if args else typing.Any, name, source) for v in value]
    if hint is typing.Any or hint is None or origin is typing.Literal:
        return value
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is int and isinstance(value, bool) or (isinstance(hint, type) and not isinstance(value, hint)):
        raise ValueError(f"{source}: field {name!r}={value!r} has the wrong type; expected {getattr(hint, '__name__', hint)}")
    return value


def config_from_dict(config_cls: type, data: dict, source: str = "config"):
    """Rebuild a frozen config dataclass, rejecting unknown keys and wrong types with the field named."""
    if not isinstance(data, dict):
        raise ValueError(f"{source}: expected a JSON object of config fields, got {type(data).__name__}")
    hints = typing.get_type_hints(config_cls)
    names = {f.name for f in dataclasses.fields(config_cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"{source}: unknown key(s) {unknown} for {config_cls.__name__}; accepted: {sorted(names)}")
    missing = sorted(names - set(data))
    if missing:  # save_pretrained writes every field: a gap means an edited or foreign file, not a default
        raise ValueError(f"{source}: field(s) {missing} of {config_cls.__name__} are missing; save_pretrained writes "
                         "every field")
    kwargs = {k: _coerce(v, hints[k], k, source) for k, v in data.items()}
    return config_cls(**kwargs)


def save_pretrained(model: nn.Module, save_directory: str | os.PathLike) -> Path:
    """Write ``config.json`` + ``model.safetensors`` for a registered model (wrappers are stripped)."""
    check_path("save_directory", save_directory)
    model = unwrap_model(model)
    config = getattr(model, "config", None)
    if config is None or not dataclasses.is_dataclass(config):
        raise ValueError(f"model={type(model).__name__} has no dataclass `config`; only visionformers models can be saved")
    out = Path(save_directory)
    if out.exists() and not out.is_dir():
        raise ValueError(f"save_directory={str(out)!r} is an existing file; expected a directory (new or existing)")
    out.mkdir(parents=True, exist_ok=True)
    save_state_dict(model.state_dict(), out / WEIGHTS_NAME, metadata={"format": "pt"})
    meta = {"architecture": type(model).__name__, "format_version": FORMAT_VERSION, "config": config_to_dict(config)}
    atomic_write_bytes(out / CONFIG_NAME, json.dumps(meta, indent=2).encode())
    return out


def read_config(directory: str | os.PathLike):
    """Parse ``config.json`` -> (model class, config instance); errors name the file and the problem."""
    check_path("directory", directory)
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"model directory {str(directory)!r} does not exist")
    path = directory / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{str(path)!r} is missing; a model directory holds {CONFIG_NAME} and {WEIGHTS_NAME}")
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{str(path)!r} is not valid JSON ({e})") from None
    if not isinstance(meta, dict) or "architecture" not in meta or "config" not in meta:
        raise ValueError(f"{str(path)!r} lacks the keys 'architecture' and 'config'; was it written by save_pretrained?")
    version = meta.get("format_version", FORMAT_VERSION)
    if isinstance(version, bool) or not isinstance(version, int) or not 1 <= version <= FORMAT_VERSION:
        raise ValueError(f"{str(path)!r}: format_version={version!r} is not readable by this version of visionformers; "
                         f"accepted: 1..{FORMAT_VERSION}")
    classes = model_classes()
    arch = meta["architecture"]
    if not isinstance(arch, str) or arch not in classes:
        raise ValueError(f"{str(path)!r}: architecture={arch!r} is unknown; accepted: {sorted(classes)}")
    cls, config_cls = classes[arch]
    return cls, config_from_dict(config_cls, meta["config"], source=str(path))


def from_pretrained(directory: str | os.PathLike, device: str | torch.device = "cpu", **overrides) -> nn.Module:
    """Rebuild a model saved by ``save_pretrained``; ``overrides`` change config fields (e.g. ``img_size``).

    A model may define ``adapt_state_dict(state_dict, source_config)`` to adapt weights to changed
    fields (ViT resamples its position table when ``img_size`` differs).
    """
    from visionformers.registry import replace_config

    cls, config = read_config(directory)
    saved_config = config
    if overrides:
        config = replace_config(config, overrides)
    weights = Path(directory) / WEIGHTS_NAME
    if not weights.is_file():
        raise FileNotFoundError(f"{str(weights)!r} is missing: the model directory has a config but no weights")
    state = load_state_dict(weights, device=device)
    model = cls(config)
    if hasattr(model, "adapt_state_dict"):
        state = model.adapt_state_dict(state, saved_config)
    load_into(model, state, source=str(weights))
    return model.to(device)


CHECKPOINT_CONTAINER_KEYS = ("state_dict", "model", "model_state", "module")  # where trainers nest the weights


def load_weights_file(path: str | os.PathLike, name: str = "path") -> dict[str, torch.Tensor]:
    """A foreign weights file's tensors: safetensors, or a torch file read with ``weights_only=True`` (no code runs).

    Weights nested by trainers (``{"state_dict": ...}``, ``{"model": ...}``) are unwrapped and a DDP ``module.``
    prefix is stripped. ``name`` is the argument that errors name (e.g. ``init_checkpoint``).
    """
    check_path(name, path)
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{name}={str(path)!r} is not a file; pass a local .pth/.pt or .safetensors file")
    if path.suffix == ".safetensors":
        return load_state_dict(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # unpickling errors come in many types; name the file and the cause in one line
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"{name}={str(path)!r} is not a loadable weights file ({first})") from None
    for key in CHECKPOINT_CONTAINER_KEYS:
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{name}={str(path)!r} is not accepted; expected a state dict (name -> tensor), possibly "
                         "under 'state_dict' or 'model'")
    if all(k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return obj


def load_into(model: nn.Module, state: dict[str, torch.Tensor], source: str = "state_dict") -> None:
    """``load_state_dict(strict)`` that tolerates only tied duplicates and names mismatches clearly."""
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        bad = next((k for k, v in state.items() if not isinstance(v, torch.Tensor)), None) if isinstance(state, dict) else None
        what = f"entry {bad!r} is a {type(state[bad]).__name__}" if bad is not None else f"got {type(state).__name__}"
        raise ValueError(f"{source}: expected a dict of name -> tensor; {what}")
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    tied_ok = {k for k in missing if any(own[k].data_ptr() == own[j].data_ptr() for j in state if j in own)}
    missing = [k for k in missing if k not in tied_ok]
    unexpected = [k for k in state if k not in own]
    wrong = [f"{k}: {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in state if k in own and state[k].shape != own[k].shape]
    if missing or unexpected or wrong:
        raise ValueError(
            f"{source} does not fit {type(model).__name__}: missing {missing[:5]}, unexpected {unexpected[:5]}, "
            f"shape mismatch {wrong[:5]}"
        )
    model.load_state_dict(state, strict=False)
