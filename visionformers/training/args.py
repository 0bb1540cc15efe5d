"""The command-line options every step-based training script shares (train_unet.py, train_vae.py): batching,
AdamW and its lr schedule, mixed precision, EMA, seeding, checkpoints and tracking, with their checks, and the
``Accelerator`` these options describe."""
from __future__ import annotations

import argparse
import os

from accelerate import Accelerator

from visionformers._validate import check_args
from visionformers.training.logging import REPORT_TO, log_with, setup_logging
from visionformers.training.optim import LR_SCHEDULES
from visionformers.training.pipeline import default_mixed_precision, force_cpu


def add_training_arguments(parser, *, output_dir: str, output_dir_help: str, max_train_steps: int = 1000,
                           use_ema: bool = False) -> None:
    """Add the shared options to ``parser``; the keyword arguments are the defaults (and --output_dir's help)
    that differ between scripts. :func:`check_training_arguments` checks them."""
    a = parser.add_argument
    a("--train_batch_size", type=int, default=64, help="per process")
    a("--dataloader_num_workers", type=int, default=0, help="data loading processes (0: in the main process)")
    a("--max_train_steps", type=int, default=max_train_steps,
      help="optimizer steps of the whole run (sets the lr schedule)")
    a("--stop_after_steps", type=int, default=None, help="stop this process after N steps (checkpoint kept)")
    a("--gradient_accumulation_steps", type=int, default=1, help="micro-batches per optimizer step")
    a("--learning_rate", type=float, default=1e-3, help="peak AdamW learning rate")
    a("--lr_scheduler", default="cosine", choices=LR_SCHEDULES, help="shape of the lr schedule after warm-up")
    a("--lr_warmup_steps", type=int, default=50, help="linear warm-up steps")
    a("--adam_beta1", type=float, default=0.9, help="AdamW beta1")
    a("--adam_beta2", type=float, default=0.999, help="AdamW beta2")
    a("--adam_weight_decay", type=float, default=0.0, help="AdamW weight decay")
    a("--max_grad_norm", type=float, default=1.0, help="0 disables clipping (the norm is still checked)")
    a("--mixed_precision", default=None, choices=["no", "fp16", "bf16"], help="default: bf16 if supported")
    a("--use_ema", action=argparse.BooleanOptionalAction, default=use_ema, help="keep an EMA of the weights (exported)")
    a("--ema_max_decay", type=float, default=0.999, help="upper bound of the EMA decay")
    a("--seed", type=int, default=0, help="seed of weights, data order and noise")
    a("--output_dir", default=output_dir, help=output_dir_help)
    a("--overwrite_output_dir", action="store_true",
      help="start a new run in an --output_dir holding another run (its checkpoints are removed)")
    a("--checkpointing_steps", type=int, default=200, help="save a checkpoint every N steps (0: none)")
    a("--checkpoints_total_limit", type=int, default=None, help="keep at most N checkpoints (default: all)")
    a("--resume_from_checkpoint", default=None, help="'latest' or a checkpoint directory")
    a("--report_to", default="none", choices=REPORT_TO, help="experiment tracker")
    a("--tracker_project_name", default="visionformers", help="project name of the tracker")
    a("--logging_steps", type=int, default=10, help="log the loss every N steps")
    a("--max_bad_steps", type=int, default=10, help="stop after this many non-finite steps in a row")


def check_training_arguments(args) -> None:
    """ValueError naming the first option of :func:`add_training_arguments` out of range (``check_args``)."""
    check_args(args, [(name, lambda v: v >= 1, "an int >= 1") for name in (
        "train_batch_size", "max_train_steps", "gradient_accumulation_steps", "logging_steps")] + [
        ("checkpointing_steps", lambda v: v >= 0, "an int >= 0 (0: no checkpoints)"),
        ("learning_rate", lambda v: v > 0, "a number > 0"),
        ("max_grad_norm", lambda v: v >= 0, "a number >= 0 (0: no clipping)"),
        ("stop_after_steps", lambda v: v is None or v >= 1, "an int >= 1"),
        ("adam_beta1", lambda v: 0 <= v < 1, "a number in [0, 1)"),
        ("adam_beta2", lambda v: 0 <= v < 1, "a number in [0, 1)"),
        ("adam_weight_decay", lambda v: v >= 0, "a number >= 0"),
        ("lr_warmup_steps", lambda v: v >= 0, "an int >= 0"),
        ("output_dir", lambda v: not os.path.isfile(v), "a directory (this path is an existing file)")])


def accelerator_from_args(args) -> Accelerator:
    """The ``Accelerator`` of a training script's --mixed_precision (default: bf16 where supported),
    --gradient_accumulation_steps and --report_to (tracker logs under <output_dir>/logs), with ``logging`` set up
    (INFO on the main process only)."""
    accelerator = Accelerator(cpu=force_cpu(), mixed_precision=args.mixed_precision or default_mixed_precision(),
                              gradient_accumulation_steps=args.gradient_accumulation_steps,
                              log_with=log_with(args.report_to), project_dir=os.path.join(args.output_dir, "logs"))
    setup_logging(accelerator.is_main_process)
    return accelerator
