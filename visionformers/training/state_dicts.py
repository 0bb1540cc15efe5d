"""State dicts that look the same through DDP, FSDP1 and FSDP2 wrappers, and an optimizer state as safetensors.

Model and optimizer states go through ``torch.distributed.checkpoint.state_dict``: full (unsharded), on the CPU,
keyed by parameter name without wrapper prefixes, so a checkpoint loads into any number of processes and any
wrapper. Under FSDP these calls are collectives: every process must make them.
"""
from __future__ import annotations

import json

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)



def _inner_optimizer(optimizer):
    return getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps the real one


def is_fsdp(model: nn.Module) -> bool:
    names = {"FullyShardedDataParallel", "FSDPModule"}
    return any(c.__name__ in names for m in model.modules() for c in type(m).__mro__)


def full_model_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Full CPU state dict with wrapper prefixes stripped; a collective under FSDP (other ranks may get {})."""
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_model_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load a full state dict into a (possibly wrapped / sharded) model; every process passes the full dict."""
    set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=is_fsdp(model), strict=True))


def ema_state_dict(model: nn.Module, ema) -> dict[str, torch.Tensor]:
    """Full EMA weights as a model state dict: swap the average in, gather, swap back (works when sharded)."""
    ema.store(model)
    ema.copy_to(model)
    try:
        # Copies: without a device move the state dict aliases the parameters that restore() overwrites.
        return {k: v.clone() for k, v in full_model_state_dict(model).items()}
    finally:
        ema.restore(model)


def _encode(value):
    if isinstance(value, tuple):
        return {"__tuple__": [_encode(v) for v in value]}
    if isinstance(value, list):
        return [_encode(v) for v in value]
    if isinstance(value, dict):
        return {k: _encode(v) for k, v in value.items()}
    return value


def _decode(value):
    if isinstance(value, dict):
        if set(value) == {"__tuple__"}:
            return tuple(_decode(v) for v in value["__tuple__"])
        return {k: _decode(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_decode(v) for v in value]
    return value


def optimizer_to_safetensors(state: dict) -> tuple[dict[str, torch.Tensor], str]:
    """Name-keyed optimizer state -> (tensors, JSON skeleton). Tensors are referenced as {"__tensor__": key}."""
    tensors, skeleton = {}, {"state": {}, "param_groups": _encode(state["param_groups"])}
    for pname, pstate in state["state"].items():
        entry = {}
        for key, value in pstate.items():
            if isinstance(value, torch.Tensor):
                name = f"{pname}/{key}"
                tensors[name] = value.detach().cpu().contiguous()
                entry[key] = {"__tensor__": name}
            else:
                entry[key] = _encode(value)
        skeleton["state"][pname] = entry
    return tensors, json.dumps(skeleton)


def optimizer_from_safetensors(tensors: dict[str, torch.Tensor], skeleton: str) -> dict:
    data = json.loads(skeleton)
    state = {
        pname: {k: tensors[v["__tensor__"]] if isinstance(v, dict) and "__tensor__" in v else _decode(v)
                for k, v in entry.items()}
        for pname, entry in data["state"].items()
    }
    return {"state": state, "param_groups": _decode(data["param_groups"])}


def optimizer_state_dict(model: nn.Module, optimizer) -> dict:
    return get_optimizer_state_dict(model, _inner_optimizer(optimizer),
                                    options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_optimizer_state(model: nn.Module, optimizer, state: dict) -> None:
    set_optimizer_state_dict(model, _inner_optimizer(optimizer), state,
                             options=StateDictOptions(full_state_dict=is_fsdp(model)))
