"""Stopping a run on request: SIGTERM (a scheduler's pre-emption) or SIGINT (Ctrl-C) ends it at the next step
boundary, after a checkpoint, with one line instead of a traceback; under ``accelerate launch`` every process
stops at the same step. A second signal (after ``REPEAT_GRACE_S``) stops at once (the last checkpoint is then the
one to resume from)."""
from __future__ import annotations

import signal
import sys
import threading
import time

import torch

SIGNALS = (signal.SIGINT, signal.SIGTERM)
# A second signal within this many seconds of the first is the same request (`accelerate launch` forwards the
# Ctrl-C that the terminal already sent to every worker), not a request to stop at once.
REPEAT_GRACE_S = 2.0


class StopOnSignal:
    """Install handlers for SIGINT / SIGTERM that only record the request; :meth:`requested` is polled by the
    training loop once per optimizer step (an all-process decision, so every process saves the same step), and
    :meth:`close` restores the previous handlers. Only the main thread can install handlers; elsewhere this is
    inert."""

    def __init__(self, accelerator=None):
        self.accelerator = accelerator
        self.signum: int | None = None
        self._first = 0.0
        self._previous = {}
        if threading.current_thread() is threading.main_thread():
            for s in SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)

    @property
    def _announce(self) -> bool:
        return self.accelerator is None or self.accelerator.is_main_process

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.signum is not None:
            if time.monotonic() - self._first < REPEAT_GRACE_S:
                return  # the same request twice: Ctrl-C reaches a worker directly and forwarded by its launcher
            self.close()  # asked again: stop now, without the checkpoint
            raise SystemExit(f"error: {name} again: stopped at once; resume from the last checkpoint")
        self.signum, self._first = signum, time.monotonic()
        if self._announce:
            print(f"\n{name}: stopping after this step, with a checkpoint ({name} again stops at once)",
                  file=sys.stderr, flush=True)

    def requested(self) -> bool:
        """Whether any process got a signal (a collective under multi-process runs: call it on every process)."""
        flag = self.signum is not None
        acc = self.accelerator
        if acc is not None and acc.num_processes > 1:
            flag = bool(acc.reduce(torch.tensor(float(flag), device=acc.device), "sum").item() > 0)
            if flag and self.signum is None:
                self.signum = signal.SIGTERM  # another process was signalled (e.g. the launcher forwarded it)
        return flag

    def close(self) -> None:
        for s, previous in self._previous.items():
            signal.signal(s, previous if previous is not None else signal.SIG_DFL)
        self._previous = {}

    @property
    def reason(self) -> str:
        return signal.Signals(self.signum).name if self.signum is not None else ""

    def exit_code(self) -> int:
        return 128 + int(self.signum) if self.signum is not None else 0

    def leave_if_stopped(self, step: int, max_steps: int, output_dir: str, accelerator, run) -> None:
        """After the loop: when a signal ended the run before ``max_steps``, print the one line, release the output
        directory and exit with 128 + the signal's number (the checkpoint was saved at the step boundary)."""
        if self.signum is None or step >= max_steps:
            return
        accelerator.print(stopped_message(step, max_steps, output_dir, self.reason))
        accelerator.end_training()
        run.close()
        raise SystemExit(self.exit_code())


def stopped_message(step: int, max_steps: int, output_dir: str, reason: str, saved: bool = True) -> str:
    """The one line a run prints when it ends before ``max_steps``."""
    where = f"checkpoint-{step} in {output_dir}" if saved else f"the last checkpoint in {output_dir}"
    return (f"stopped at step {step} of {max_steps} ({reason}); {where}; continue with --resume_from_checkpoint "
            "latest")


__all__ = ["StopOnSignal", "stopped_message"]
