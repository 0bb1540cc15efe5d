"""Exponential moving average of model parameters, with the warm-up of diffusers' ``EMAModel``.

Pass the *unwrapped* module (``accelerator.unwrap_model(model)``); as a convenience, DDP / DataParallel
(``.module``) and ``torch.compile`` (``._orig_mod``) wrappers are unwrapped here too, so parameter names in the
state dict never carry a wrapper prefix. Only parameters are averaged (as in diffusers); buffers such as
BatchNorm running statistics stay those of the live model.
"""
from __future__ import annotations

import torch
from torch import nn

from .._validate import fail


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
        if not 0.0 <= decay <= 1.0:
            fail("decay", decay, "a number in [0, 1]")
        if not 0.0 <= min_decay <= decay:
            fail("min_decay", min_decay, f"a number in [0, decay={decay}]")
        if inv_gamma <= 0 or power <= 0:
            fail("inv_gamma" if inv_gamma <= 0 else "power", inv_gamma if inv_gamma <= 0 else power, "a number > 0")
        if not isinstance(update_after_step, int) or update_after_step < 0:
            fail("update_after_step", update_after_step, "an int >= 0")
        self.decay, self.warmup, self.inv_gamma, self.power = decay, warmup, inv_gamma, power
        self.min_decay, self.update_after_step = min_decay, update_after_step
        self.step = 0
        model = _unwrap(model)
        self.names = [name for name, _ in model.named_parameters()]
        self.shadow = [p.detach().clone() for p in model.parameters()]
        self._stored: list[torch.Tensor] | None = None

    def get_decay(self, step: int) -> float:
        """Decay used by the ``step``-th update (1-based), diffusers ``EMAModel.get_decay``:
        0 up to update_after_step + 1, then the warm-up ramp, clipped to [min_decay, decay]."""
        step = max(0, step - self.update_after_step - 1)
        if step <= 0:
            return 0.0
        if self.warmup:
            value = 1 - (1 + step / self.inv_gamma) ** -self.power
        else:
            value = (1 + step) / (10 + step)
        return max(min(value, self.decay), self.min_decay)

    def _params(self, model: nn.Module) -> list[nn.Parameter]:
        params = list(_unwrap(model).parameters())
        if len(params) != len(self.shadow):
            fail("model", f"{type(model).__name__} with {len(params)} parameters",
                 f"the model this EMA was built from ({len(self.shadow)} parameters)")
        return params

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """One EMA step after an optimizer step; frozen parameters (requires_grad=False) are copied, not averaged."""
        params = self._params(model)
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
        if self._stored is None:
            raise RuntimeError("EMA.restore called without a matching EMA.store")
        _foreach_copy([p.data for p in self._params(model)], self._stored)
        self._stored = None

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "EMA":
        """Move the shadow parameters (dtype applies to floating ones only)."""
        self.shadow = [s.to(device=device, dtype=dtype if dtype is not None and s.is_floating_point() else None)
                       for s in self.shadow]
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
        if sorted(shadow) != sorted(self.names):
            missing, extra = sorted(set(self.names) - set(shadow)), sorted(set(shadow) - set(self.names))
            fail("state['shadow']", f"missing={missing[:5]} unexpected={extra[:5]}", "the parameter names of the model")
        for name, s in zip(self.names, self.shadow):
            if shadow[name].shape != s.shape:
                fail(f"state['shadow'][{name!r}]", shadow[name], f"shape {tuple(s.shape)}")
            s.copy_(shadow[name])
        self.step = int(state["step"])
        for key in ("decay", "warmup", "inv_gamma", "power", "min_decay", "update_after_step"):
            if key in state:
                setattr(self, key, type(getattr(self, key))(state[key]))
