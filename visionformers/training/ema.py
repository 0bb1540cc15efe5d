"""Exponential moving average of model parameters, with the warm-up of diffusers' ``EMAModel``.

Pass the *unwrapped* module (``accelerator.unwrap_model(model)``); as a convenience, DDP / DataParallel
(``.module``) and ``torch.compile`` (``._orig_mod``) wrappers are unwrapped here too, so parameter names in the
state dict never carry a wrapper prefix. Only parameters are averaged (as in diffusers); buffers such as
BatchNorm running statistics stay those of the live model.
"""
from __future__ import annotations

import torch
from torch import nn

from .._validate import check_device, fail, is_int, is_number


def _unwrap(model: nn.Module) -> nn.Module:
    while True:
        if isinstance(getattr(model, "_orig_mod", None), nn.Module):  # torch.compile
            model = model._orig_mod
        elif isinstance(getattr(model, "module", None), nn.Module):  # DDP, DataParallel, accelerate wrappers
            model = model.module
        else:
            return model


def _foreach_copy(dst: list[torch.Tensor], src: list[torch.Tensor]) -> None:
    """``torch._foreach_copy_``, or one copy per tensor where the fused op has no rule (FSDP2 DTensor parameters)."""
    try:
        torch._foreach_copy_(dst, src)
    except NotImplementedError:
        for d, s in zip(dst, src):
            d.copy_(s)


def _is_count(value) -> bool:
    return is_int(value) and value >= 0


def _check_hparams(decay, warmup, inv_gamma, power, min_decay, update_after_step, fmt: str = "{}") -> None:
    """The EMA hyper-parameters; ``fmt`` spells the argument names (``"state[{!r}]"`` for a state dict)."""
    if not (is_number(decay) and 0.0 <= decay <= 1.0):
        fail(fmt.format("decay"), decay, "a number in [0, 1]")
    if not (isinstance(warmup, (bool, int)) and warmup in (0, 1)):
        fail(fmt.format("warmup"), warmup, "True or False")
    for name, value in (("inv_gamma", inv_gamma), ("power", power)):
        if not (is_number(value) and value > 0):
            fail(fmt.format(name), value, "a finite number > 0")
    if not (is_number(min_decay) and 0.0 <= min_decay <= decay):
        fail(fmt.format("min_decay"), min_decay, f"a number in [0, decay={decay}]")
    if not _is_count(update_after_step):
        fail(fmt.format("update_after_step"), update_after_step, "an int >= 0")


class EMA:
    """Shadow copy of a model's parameters, updated as ema <- decay * ema + (1 - decay) * param."""

    def __init__(
        self,
        model: nn.Module,
        decay: float = 0.9999,
        warmup: bool = True,
        inv_gamma: float = 1.0,
        power: float = 2 / 3,
        min_decay: float = 0.0,
        update_after_step: int = 0,
    ):
        """
        :param decay: the ceiling of the decay (0.9999 for long diffusion runs).
        :param warmup: True: decay = 1 - (1 + step / inv_gamma)^-power (diffusers ``use_ema_warmup``; power 2/3 suits
            runs of ~1M steps, 3/4 shorter ones); False: diffusers' default ramp (1 + step) / (10 + step).
        :param min_decay: the floor of the decay.
        :param update_after_step: updates before this count copy the parameters (decay 0).
        """
        if not isinstance(model, nn.Module):
            fail("model", type(model).__name__, "a torch.nn.Module")
        _check_hparams(decay, warmup, inv_gamma, power, min_decay, update_after_step)
        self.decay, self.warmup, self.inv_gamma, self.power = decay, warmup, inv_gamma, power
        self.min_decay, self.update_after_step = min_decay, update_after_step
        self.step = 0
        model = _unwrap(model)
        self.names = [name for name, _ in model.named_parameters()]
        self.shadow = [p.detach().clone() for p in model.parameters()]
        self._shapes = tuple(s.shape for s in self.shadow)  # compared against the model on every call
        self._signature: tuple | None = None  # (shape, dtype, device) per shadow tensor, see _params
        self._stored: list[torch.Tensor] | None = None

    def get_decay(self, step: int) -> float:
        """Decay used by the ``step``-th update (1-based), diffusers ``EMAModel.get_decay``:
        0 up to update_after_step + 1, then the warm-up ramp, clipped to [min_decay, decay]."""
        if not _is_count(step):
            fail("step", step, "an int >= 0")
        step = max(0, step - self.update_after_step - 1)
        if step <= 0:
            return 0.0
        if self.warmup:
            value = 1 - (1 + step / self.inv_gamma) ** -self.power
        else:
            value = (1 + step) / (10 + step)
        return max(min(value, self.decay), self.min_decay)

    def _params(self, model: nn.Module, *, for_update: bool = False) -> list[nn.Parameter]:
        """The model's parameters, checked to match the shadow in number and shapes, and for :meth:`update` (whose
        fused lerp needs it) trained ones in dtype and device too; the common case is one tuple compare."""
        if not isinstance(model, nn.Module):
            fail("model", type(model).__name__, "a torch.nn.Module (the model this EMA was built from)")
        params = list(_unwrap(model).parameters())
        if len(params) != len(self.shadow):
            fail("model", f"{type(model).__name__} with {len(params)} parameters",
                 f"the model this EMA was built from ({len(self.shadow)} parameters)")
        if for_update:
            if self._signature is None:
                self._signature = tuple((s.shape, s.dtype, s.device) for s in self.shadow)
            if tuple((p.shape, p.dtype, p.device) for p in params) == self._signature:
                return params
        shapes = tuple(p.shape for p in params)
        if shapes != self._shapes:
            i = next(i for i, (a, b) in enumerate(zip(shapes, self._shapes)) if a != b)
            fail("model", f"{type(model).__name__} whose parameter {self.names[i]!r} has shape {tuple(shapes[i])}",
                 f"the model this EMA was built from ({self.names[i]!r} of shape {tuple(self._shapes[i])})")
        if for_update:
            for name, s, p in zip(self.names, self.shadow, params):
                if p.requires_grad and (s.dtype != p.dtype or s.device != p.device):
                    fail("model", f"{type(model).__name__} whose parameter {name!r} is {p.dtype} on {p.device}",
                         f"trained parameters in the EMA's dtype and device ({s.dtype} on {s.device}); move one "
                         "of them (ema.to(...) or model.to(...)) before update")
        return params

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """One EMA step after an optimizer step; frozen parameters (requires_grad=False) are copied, not averaged."""
        params = self._params(model, for_update=True)
        self.step += 1
        weight = 1.0 - self.get_decay(self.step)
        trained = [(s, p) for s, p in zip(self.shadow, params) if p.requires_grad]
        frozen = [(s, p) for s, p in zip(self.shadow, params) if not p.requires_grad]
        if trained:
            s, p = zip(*trained)
            torch._foreach_lerp_(list(s), list(p), weight)  # s += (1 - decay) (p - s): one fused kernel per group
        if frozen:
            s, p = zip(*frozen)
            _foreach_copy(list(s), list(p))

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Load the averaged parameters into ``model`` (call :meth:`store` first to get the training ones back)."""
        _foreach_copy([p.data for p in self._params(model)], self.shadow)

    @torch.no_grad()
    def store(self, model: nn.Module) -> None:
        """Keep a copy of the model's current (training) parameters for :meth:`restore`."""
        self._stored = [p.detach().clone() for p in self._params(model)]

    @torch.no_grad()
    def restore(self, model: nn.Module) -> None:
        """Put back the parameters saved by :meth:`store` (and free the copy)."""
        params = self._params(model)
        if self._stored is None:
            raise RuntimeError("EMA.restore called without a matching EMA.store")
        _foreach_copy([p.data for p in params], self._stored)
        self._stored = None

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "EMA":
        """Move the shadow parameters (dtype applies to floating ones only)."""
        if device is not None:
            check_device("device", device)
        if dtype is not None and not isinstance(dtype, torch.dtype):
            fail("dtype", dtype, "None or a torch.dtype such as torch.float32")
        self.shadow = [s.to(device=device, dtype=dtype if dtype is not None and s.is_floating_point() else None)
                       for s in self.shadow]
        self._signature = None
        return self

    def state_dict(self) -> dict:
        """{'step', 'decay', ..., 'shadow': {param name: tensor}}: what a checkpoint carries to resume the average."""
        return {
            "step": self.step,
            "decay": self.decay, "warmup": self.warmup, "inv_gamma": self.inv_gamma, "power": self.power,
            "min_decay": self.min_decay, "update_after_step": self.update_after_step,
            "shadow": {name: s for name, s in zip(self.names, self.shadow)},
        }

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        """Restore the step count, hyper-parameters and averages saved by :meth:`state_dict`."""
        shadow = state.get("shadow") if isinstance(state, dict) else None
        if not isinstance(shadow, dict) or "step" not in state:
            fail("state", type(state).__name__, "a dict from EMA.state_dict() with 'step' and 'shadow'")
        if set(shadow) != set(self.names):
            missing, extra = sorted(set(self.names) - set(shadow)), sorted(map(str, set(shadow) - set(self.names)))
            fail("state['shadow']", f"missing={missing[:5]} unexpected={extra[:5]}", "the parameter names of the model")
        for name, s in zip(self.names, self.shadow):
            if not isinstance(shadow[name], torch.Tensor) or shadow[name].shape != s.shape:
                fail(f"state['shadow'][{name!r}]", shadow[name], f"a tensor of shape {tuple(s.shape)}")
        if not _is_count(state["step"]):
            fail("state['step']", state["step"], "an int >= 0")
        keys = ("decay", "warmup", "inv_gamma", "power", "min_decay", "update_after_step")
        hparams = {key: state.get(key, getattr(self, key)) for key in keys}
        _check_hparams(**hparams, fmt="state[{!r}]")
        # Everything is checked before anything changes, so a rejected state leaves the EMA as it was.
        for name, s in zip(self.names, self.shadow):
            s.copy_(shadow[name])
        self.step = int(state["step"])
        self.warmup, self.update_after_step = bool(hparams["warmup"]), int(hparams["update_after_step"])
        for key in ("decay", "inv_gamma", "power", "min_decay"):
            setattr(self, key, float(hparams[key]))
