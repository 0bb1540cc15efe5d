"""save_pretrained / from_pretrained: a model directory is ``config.json`` + ``model.safetensors``.

The config names the model class and every config field, so loading needs nothing else. Files are
written to a temporary name and renamed into place, so a killed process never leaves a half file
under the final name. Weights are safetensors: loading runs no pickle.
"""
from __future__ import annotations

import dataclasses
import json
import os
import struct
import types
import typing
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from visionformers._io import atomic_write, atomic_write_bytes
from visionformers._validate import check_choice, check_path, is_int
from visionformers.registry import model_classes

CONFIG_NAME, WEIGHTS_NAME = "config.json", "model.safetensors"
SAVE_FORMATS = ("visionformers", "diffusers")
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


def read_json(path: str | os.PathLike, what: str = "file"):
    """Parse a JSON file; invalid, non-UTF-8 or absurdly nested content is a ValueError naming the file."""
    try:
        return json.loads(Path(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{what} {str(path)!r} is not valid JSON ({e})") from None
    except RecursionError:
        raise ValueError(f"{what} {str(path)!r} is nested too deeply to be a config; expected a flat JSON object "
                         "of fields") from None


def save_state_dict(state: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict | None = None) -> None:
    """Save tensors as safetensors atomically (temporary file, fsync, rename; the umask's mode); tensors sharing
    storage (tied weights) are saved once."""
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
    # save_pretrained writes every field: a gap means an edited or foreign file, not a default, except for the
    # fields a config class gained later (``added_fields``), whose defaults rebuild the network saved before them.
    missing = sorted(names - set(data) - set(getattr(config_cls, "added_fields", ())))
    if missing:
        raise ValueError(f"{source}: field(s) {missing} of {config_cls.__name__} are missing; save_pretrained writes "
                         "every field")
    kwargs = {k: _coerce(v, hints[k], k, source) for k, v in data.items()}
    try:
        return config_cls(**kwargs)
    except ValueError as e:  # the config's own check names the field; say which file it came from
        raise ValueError(f"{source}: {e}") from None


def save_pretrained(model: nn.Module, save_directory: str | os.PathLike, format: str = "visionformers") -> Path:
    """Write ``config.json`` + ``model.safetensors`` for a registered model (wrappers are stripped).

    ``format="diffusers"`` writes a UNet, DiT or AutoencoderKL as a diffusers model directory instead
    (``config.json`` with ``_class_name`` + ``diffusion_pytorch_model.safetensors``).
    """
    check_path("save_directory", save_directory)
    check_choice("format", format, SAVE_FORMATS)
    model = unwrap_model(model)
    if format == "diffusers":
        from visionformers.convert.from_diffusers import save_diffusers_model

        return save_diffusers_model(model, save_directory)
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
    meta = read_json(path, "config")
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
    fields (ViT resamples its position table when ``img_size`` differs). A diffusers model directory (its
    config.json names a ``_class_name``: UNet2DModel, DiTTransformer2DModel, AutoencoderKL) is converted on load.
    """
    from visionformers.convert.from_diffusers import is_diffusers_model_dir, load_diffusers_model
    from visionformers.registry import replace_config

    check_path("directory", directory)
    if is_diffusers_model_dir(directory):
        if overrides:
            raise ValueError(f"overrides {sorted(overrides)} are not accepted for a diffusers model directory "
                             f"({str(directory)!r}): its config.json fixes every field")
        return load_diffusers_model(directory, device)

    cls, config = read_config(directory)
    saved_config = config
    if overrides:
        config = replace_config(config, overrides)
    weights = Path(directory) / WEIGHTS_NAME
    if not weights.is_file():
        raise FileNotFoundError(f"{str(weights)!r} is missing: the model directory has a config but no weights")
    check_weights_fit(cls, saved_config, weights, Path(directory) / CONFIG_NAME)
    state = load_state_dict(weights, device=device)
    model = cls(config)
    if hasattr(model, "adapt_state_dict"):
        state = model.adapt_state_dict(state, saved_config)
    load_into(model, state, source=str(weights))
    return model.to(device)


# ---- checking a weights file against its config before anything is allocated ---------------------------

MAX_HEADER_BYTES = 100 * 2**20  # safetensors' own limit for the JSON header
MIN_FIELD_BOUND = 65536  # a config int may exceed every weight dimension up to this (e.g. max_len of a RoPE table)
MIN_BUFFER_BYTES = 256 * 2**20  # non-persistent buffers (position tables) a config may ask for beyond its weights
FLOAT_DTYPES = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"}
SAFETENSORS_DTYPES = FLOAT_DTYPES | {"I64", "I32", "I16", "I8", "U8", "U16", "U32", "U64", "BOOL"}


def read_safetensors_header(path: str | os.PathLike) -> dict[str, tuple[str, tuple[int, ...]]]:
    """{tensor name: (dtype, shape)} from a safetensors file's header alone (no tensor is read); a header that is
    too large, malformed or points past the end of the file is a ValueError naming the file."""
    path = Path(path)
    size = path.stat().st_size
    if size == 0:
        raise ValueError(f"weights file {str(path)!r} is empty; expected a safetensors file")

    def bad(why: str):
        raise ValueError(f"weights file {str(path)!r} is not a readable safetensors file ({why})")

    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            bad("shorter than its 8-byte header length")
        n = struct.unpack("<Q", head)[0]
        if n > min(MAX_HEADER_BYTES, size - 8):
            bad(f"header length {n} exceeds the file or {MAX_HEADER_BYTES} bytes")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
            bad(f"header is not JSON: {type(e).__name__}")
    if not isinstance(header, dict):
        bad("header is not a JSON object")
    out = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(entry, dict) or entry.get("dtype") not in SAFETENSORS_DTYPES:
            bad(f"tensor {name!r} has no known dtype")
        shape = entry.get("shape")
        offsets = entry.get("data_offsets")
        if (not isinstance(shape, list) or not all(is_int(d) and d >= 0 for d in shape)
                or not isinstance(offsets, list) or len(offsets) != 2 or not all(is_int(o) for o in offsets)
                or not 0 <= offsets[0] <= offsets[1] <= size - 8 - n):
            bad(f"tensor {name!r} has a malformed shape or data_offsets")
        out[name] = (entry["dtype"], tuple(shape))
    return out


def _config_ints(config) -> list[tuple[str, int]]:
    """(field, value) for every int of a config, including the items of tuple fields."""
    found = []
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        for v in value if isinstance(value, (tuple, list)) else (value,):
            if is_int(v):
                found.append((f.name, v))
    return found


def check_weights_fit(cls: type[nn.Module], config, weights: str | os.PathLike, source: str | os.PathLike) -> None:
    """Check a config against the weights file it comes with, before the model is allocated.

    Every int field is bounded by the file (by the largest tensor dimension, or ``MIN_FIELD_BOUND``), the model is
    built on the meta device (no memory), and each of its tensors must appear in the file's header with the same
    shape and a floating dtype where the model's is floating; position tables the weights do not hold may take at
    most the file's size (or ``MIN_BUFFER_BYTES``). Mismatches are ValueErrors naming ``source`` and the fields.
    """
    header = read_safetensors_header(weights)
    dims = [d for _, shape in header.values() for d in shape]
    bound = max(MIN_FIELD_BOUND, 4 * max(dims, default=0), len(header))
    for name, value in _config_ints(config):
        if value > bound:
            raise ValueError(f"{str(source)!r}: field {name!r}={value} exceeds every dimension of the weights file "
                             f"{str(weights)!r} (largest {max(dims, default=0)}); accepted: at most {bound}")
    try:
        with torch.device("meta"):
            shell = cls(config)
    except (ValueError, TypeError, RuntimeError, OverflowError) as e:
        raise ValueError(f"{str(source)!r}: the config does not build a {cls.__name__} ({str(e).splitlines()[0]})") from None
    own = shell.state_dict(keep_vars=True)  # tied parameters are the same object (meta tensors have no address)
    ints = _config_ints(config)
    for key, tensor in own.items():
        if key not in header:
            if any(t is tensor and k in header for k, t in own.items() if k != key):
                continue  # tied to a tensor the file holds
            raise ValueError(f"{str(weights)!r} has no tensor {key!r} that the config of {str(source)!r} asks for")
        dtype, shape = header[key]
        if shape != tuple(tensor.shape):
            odd = sorted({f"{n}={v}" for n, v in ints if v in tensor.shape and v not in shape})
            raise ValueError(f"{str(source)!r} does not fit {str(weights)!r}: {key!r} is {tuple(tensor.shape)} by the "
                             f"config but {shape} in the file" + (f" (field {', '.join(odd)})" if odd else ""))
        if tensor.is_floating_point() and dtype not in FLOAT_DTYPES:
            raise ValueError(f"{str(weights)!r}: tensor {key!r} is {dtype}, but the model's parameter is floating "
                             f"({tensor.dtype}); integer or bool weights are refused")
    unexpected = sorted(set(header) - set(own))
    if unexpected:
        raise ValueError(f"{str(weights)!r} holds tensors the config of {str(source)!r} does not build: {unexpected[:5]}")
    extra = sum(b.numel() * b.element_size() for k, b in shell.named_buffers() if k not in own)
    limit = max(MIN_BUFFER_BYTES, Path(weights).stat().st_size)
    if extra > limit:
        raise ValueError(f"{str(source)!r}: the config asks for {extra} bytes of tables beyond the weights (at most "
                         f"{limit}); check its length fields ({', '.join(f'{n}={v}' for n, v in ints)})"[:400])


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
    if _looks_like_safetensors(path):
        raise ValueError(f"{name}={str(path)!r} is a safetensors file with a torch suffix ({path.suffix!r}); rename it "
                         "to end in .safetensors")
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


def _looks_like_safetensors(path: Path) -> bool:
    """A safetensors file starts with an 8-byte little-endian header length, then '{'; torch files are zip or pickle."""
    with open(path, "rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:9] == b"{" and struct.unpack("<Q", head[:8])[0] <= path.stat().st_size


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
    ints = [k for k in state if k in own and own[k].is_floating_point() and not state[k].is_floating_point()]
    if ints:
        raise ValueError(f"{source}: tensor {ints[0]!r} is {state[ints[0]].dtype}, but {type(model).__name__}'s is "
                         f"{own[ints[0]].dtype}; integer or bool tensors are refused for floating parameters")
    if missing or unexpected or wrong:
        raise ValueError(
            f"{source} does not fit {type(model).__name__}: missing {missing[:5]}, unexpected {unexpected[:5]}, "
            f"shape mismatch {wrong[:5]}"
        )
    model.load_state_dict(state, strict=False)
