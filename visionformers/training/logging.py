"""Experiment tracking through accelerate's trackers: wandb, tensorboard or none.

``wandb`` runs offline with ``WANDB_MODE=offline`` (its files land in ``WANDB_DIR``, default the output dir);
``tensorboard`` writes under ``<output_dir>/logs``. Only the main process logs.
"""
from __future__ import annotations

import logging
import os
import sys

import numpy as np

from visionformers._validate import check_choice

REPORT_TO = ("none", "wandb", "tensorboard")


def setup_logging(is_main: bool, level: int = logging.INFO) -> None:
    """Plain ``logging`` to stderr: INFO on the main process, errors only elsewhere (no duplicated lines)."""
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S",
                        stream=sys.stderr, level=level if is_main else logging.ERROR, force=True)


def log_with(report_to: str) -> str | None:
    """``--report_to`` -> the ``log_with`` argument of ``accelerate.Accelerator``."""
    check_choice("report_to", report_to, REPORT_TO)
    if report_to == "tensorboard":
        try:
            import torch.utils.tensorboard  # noqa: F401
        except ImportError:
            raise ValueError("report_to='tensorboard' needs the tensorboard package (pip install tensorboard)") from None
    return None if report_to == "none" else report_to


def _hparam(value):
    """Trackers take bool/int/float/str/None hyper-parameters; anything else is logged as its repr."""
    return value if value is None or isinstance(value, (bool, int, float, str)) else repr(value)


def init_trackers(accelerator, project: str, config: dict, output_dir: str, run_name: str | None = None) -> None:
    """Start the trackers of ``accelerator`` (built with ``log_with``); a no-op when there are none."""
    if not accelerator.log_with:
        return
    init_kwargs = {"wandb": {"dir": os.environ.get("WANDB_DIR", output_dir), "name": run_name}}
    os.makedirs(init_kwargs["wandb"]["dir"], exist_ok=True)
    accelerator.init_trackers(project, config={k: _hparam(v) for k, v in config.items()}, init_kwargs=init_kwargs)


def log_scalars(accelerator, values: dict[str, float], step: int) -> None:
    if accelerator.log_with:
        accelerator.log(values, step=step)


def log_image(accelerator, key: str, image, step: int) -> None:
    """Log one image (a PIL image or an (H, W, C) uint8 array) to every active tracker."""
    if not accelerator.log_with or not accelerator.is_main_process:
        return
    array = np.asarray(image)
    if array.ndim == 2:
        array = array[:, :, None]
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.log_images({key: array[None]}, step=step, dataformats="NHWC")
        elif tracker.name == "wandb":
            tracker.log_images({key: [array]}, step=step)
