"""A small callback protocol for training loops, and the built-in callbacks.

A loop owns a :class:`LoopState` and a :class:`CallbackList` and calls one hook per event:

    callbacks = CallbackList([EarlyStopping("val_loss", patience=3), LrThroughputLogger(samples_per_step=256)])
    state = LoopState(model=model, accelerator=accelerator)
    callbacks.on_train_begin(state)
    while not state.should_stop:
        ...one optimizer step...; state.step += 1
        callbacks.on_step_end(state, {"loss": loss, "lr": lr})
        if state.step % eval_every == 0:
            callbacks.on_evaluate(state, {"val_loss": val})
        if saved: callbacks.on_checkpoint_saved(state, path)
    callbacks.on_train_end(state)

A callback overrides only the hooks it needs. Callbacks that carry counters across evaluations (early stopping,
the best checkpoint's score) return them from ``state_dict()``; ``CallbackList.state_dict()`` gathers them by
class name into a JSON-able dict, which the scripts put in the checkpoint's ``train_state``, so a resumed run
takes the same decisions at the same steps as an uninterrupted one.

Every hook runs on every process with the same arguments (metrics gathered over processes, steps counted the
same way), so the processes agree on ``should_stop`` without a collective.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any

from visionformers._validate import check_choice, check_int, check_number, fail

__all__ = [
    "LoopState", "Callback", "CallbackList", "EarlyStopping", "LrThroughputLogger", "add_early_stopping_arguments",
    "early_stopping_from_args",
]

logger = logging.getLogger(__name__)


@dataclass
class LoopState:
    """What the loop shares with its callbacks; a callback asks the loop to stop with :meth:`stop`."""

    step: int = 0  # optimizer steps done
    epoch: int = 0
    model: Any = None  # the (prepared) model, for callbacks that save or inspect it
    accelerator: Any = None  # accelerate.Accelerator or None (trackers, process rank, saving)
    should_stop: bool = False
    stop_reason: str | None = None
    extra: dict = field(default_factory=dict)  # anything else a loop wants its callbacks to see

    def stop(self, reason: str) -> None:
        if not self.should_stop:
            self.should_stop, self.stop_reason = True, reason


class Callback:
    """Base class: every hook does nothing. ``state_dict`` / ``load_state_dict`` carry resumable counters."""

    def on_train_begin(self, state: LoopState) -> None: ...

    def on_step_end(self, state: LoopState, logs: dict) -> None: ...

    def on_evaluate(self, state: LoopState, metrics: dict) -> None: ...

    def on_checkpoint_saved(self, state: LoopState, path) -> None: ...

    def on_train_end(self, state: LoopState) -> None: ...

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class CallbackList(Callback):
    """Calls each callback's hook in order; its state is every callback's, keyed by class name."""

    def __init__(self, callbacks=()):
        self.callbacks = [c for c in callbacks if c is not None]
        for c in self.callbacks:
            if not isinstance(c, Callback):
                fail("callbacks", type(c).__name__, "Callback instances (visionformers.training.callbacks.Callback)")
        names = [type(c).__name__ for c in self.callbacks]
        if len(set(names)) != len(names):
            fail("callbacks", names, "at most one callback of each class (their states are keyed by class name)")

    def on_train_begin(self, state):
        for c in self.callbacks:
            c.on_train_begin(state)

    def on_step_end(self, state, logs):
        for c in self.callbacks:
            c.on_step_end(state, logs)

    def on_evaluate(self, state, metrics):
        for c in self.callbacks:
            c.on_evaluate(state, metrics)

    def on_checkpoint_saved(self, state, path):
        for c in self.callbacks:
            c.on_checkpoint_saved(state, path)

    def on_train_end(self, state):
        for c in self.callbacks:
            c.on_train_end(state)

    def state_dict(self) -> dict:
        return {type(c).__name__: s for c in self.callbacks if (s := c.state_dict())}

    def load_state_dict(self, state: dict) -> None:
        for c in self.callbacks:
            if type(c).__name__ in state:
                c.load_state_dict(state[type(c).__name__])


class EarlyStopping(Callback):
    """Stop when ``metric`` has not improved by more than ``min_delta`` for ``patience`` evaluations in a row.

    ``mode`` "min" (losses) or "max" (accuracies). The first evaluation sets the best value; an evaluation
    improves on it when ``value < best - min_delta`` ("min") or ``value > best + min_delta`` ("max"). After
    ``patience`` evaluations without improvement the loop is asked to stop, with a message naming the metric,
    its best value and the step it was reached at. ``patience=0`` stops at the first evaluation that does not
    improve. ``metrics`` (optional): the names the loop reports, to reject an unknown ``metric`` up front.
    """

    def __init__(self, metric: str, patience: int, min_delta: float = 0.0, mode: str = "min", metrics=None):
        if not isinstance(metric, str) or not metric:
            fail("metric", metric, "the name of a reported metric")
        if metrics is not None:
            check_choice("early_stopping_metric", metric, tuple(metrics))
        check_int("patience", patience, minimum=0)
        check_number("min_delta", min_delta, at_least=0)
        check_choice("mode", mode, ("min", "max"))
        self.metric, self.patience, self.min_delta, self.mode = metric, patience, float(min_delta), mode
        self.best: float | None = None
        self.best_step: int | None = None
        self.bad_evaluations = 0

    def on_train_begin(self, state: LoopState) -> None:
        if self.bad_evaluations >= max(1, self.patience):  # resumed from the checkpoint of a stopped run
            self._stop(state)

    def _stop(self, state: LoopState) -> None:
        best = "no finite value" if self.best is None else f"{self.best:.6g} (step {self.best_step})"
        state.stop(f"early stopping at step {state.step}: {self.metric} has not improved on {best} by more "
                   f"than {self.min_delta:g} for {self.bad_evaluations} evaluation(s) (patience {self.patience})")

    def improved(self, value: float) -> bool:
        if self.best is None:
            return True
        return value < self.best - self.min_delta if self.mode == "min" else value > self.best + self.min_delta

    def on_evaluate(self, state: LoopState, metrics: dict) -> None:
        if self.metric not in metrics:
            fail("early_stopping_metric", self.metric, f"one of the reported metrics {sorted(metrics)}")
        value = float(metrics[self.metric])
        if not math.isnan(value) and self.improved(value):
            self.best, self.best_step, self.bad_evaluations = value, state.step, 0
            return
        self.bad_evaluations += 1
        if self.bad_evaluations >= max(1, self.patience):  # patience 0 and 1 both stop at the first miss (as Keras)
            self._stop(state)

    def state_dict(self) -> dict:
        return {"best": self.best, "best_step": self.best_step, "bad_evaluations": self.bad_evaluations}

    def load_state_dict(self, state: dict) -> None:
        self.best = None if state["best"] is None else float(state["best"])
        self.best_step = None if state["best_step"] is None else int(state["best_step"])
        self.bad_evaluations = int(state["bad_evaluations"])


class LrThroughputLogger(Callback):
    """Every ``every`` steps, logs the learning rate and the throughput (steps/s, and samples/s when
    ``samples_per_step`` is given) since the last log to the accelerator's trackers (``train/lr``,
    ``train/steps_per_s``, ``train/samples_per_s``). Wall-clock figures only go to the log, never into arithmetic."""

    def __init__(self, every: int = 10, samples_per_step: int | None = None):
        check_int("every", every)
        check_int("samples_per_step", samples_per_step, optional=True)
        self.every, self.samples_per_step = every, samples_per_step
        self._last: tuple[int, float] | None = None
        self.last_logged: dict = {}

    def on_train_begin(self, state: LoopState) -> None:
        self._last = (state.step, time.perf_counter())

    def on_step_end(self, state: LoopState, logs: dict) -> None:
        if self._last is None:
            self._last = (state.step - 1, time.perf_counter())
        if state.step % self.every:
            return
        now = time.perf_counter()
        steps, seconds = state.step - self._last[0], max(1e-9, now - self._last[1])
        values = {"train/steps_per_s": steps / seconds}
        if "lr" in logs:
            values["train/lr"] = float(logs["lr"])
        if self.samples_per_step:
            values["train/samples_per_s"] = steps * self.samples_per_step / seconds
        self._last, self.last_logged = (state.step, now), values
        if state.accelerator is not None and state.accelerator.log_with:
            state.accelerator.log(values, step=state.step)


def add_early_stopping_arguments(parser, metrics: dict[str, str], default: str) -> None:
    """``--early_stopping_patience`` / ``_metric`` / ``_min_delta`` for a script reporting ``metrics``
    (name -> "min" or "max")."""
    a = parser.add_argument
    a("--early_stopping_patience", type=int, default=None, help="stop after this many evaluations without "
      "improvement of --early_stopping_metric (default: never)")
    a("--early_stopping_metric", default=default, help=f"the metric early stopping watches: {', '.join(metrics)}")
    a("--early_stopping_min_delta", type=float, default=0.0, help="smallest change that counts as an improvement")


def early_stopping_from_args(args, metrics: dict[str, str]) -> EarlyStopping | None:
    """An :class:`EarlyStopping` from the flags of :func:`add_early_stopping_arguments`, or None when off;
    ValueError (naming the flag) for an unknown metric, a negative patience or min_delta."""
    check_choice("early_stopping_metric", args.early_stopping_metric, tuple(metrics))
    if args.early_stopping_patience is None:
        return None
    check_int("early_stopping_patience", args.early_stopping_patience, minimum=0)
    check_number("early_stopping_min_delta", args.early_stopping_min_delta, at_least=0)
    metric = args.early_stopping_metric
    return EarlyStopping(metric, args.early_stopping_patience, args.early_stopping_min_delta, metrics[metric])
