"""Training infrastructure: EMA, atomic checkpoints, optimizers and lr schedules, reproducible loop helpers,
trackers and reproducible multi-process sampling. Scripts in train_scripts/ are thin callers of these."""
from visionformers.training.checkpoint import (
    export_pretrained,
    is_complete,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    prune_checkpoints,
    resolve_checkpoint,
    save_checkpoint,
)
from visionformers.training.ema import EMA
from visionformers.training.loop import (
    BadStepGuard,
    DataStream,
    EpochBatchSampler,
    SeededItems,
    TrainingDiverged,
    all_finite,
    capture_rng_state,
    make_generator,
    mix_seed,
    optimizer_update,
    restore_rng_state,
    seed_everything,
)
from visionformers.training.stop import StopOnSignal, stopped_message
from visionformers.training.optim import LR_SCHEDULES, WarmupSchedule, build_lr_scheduler, build_optimizer, param_groups

__all__ = [
    "EMA",
    "export_pretrained", "is_complete", "latest_checkpoint", "list_checkpoints", "load_checkpoint",
    "prune_checkpoints", "resolve_checkpoint", "save_checkpoint",
    "BadStepGuard", "DataStream", "EpochBatchSampler", "SeededItems", "TrainingDiverged", "all_finite",
    "capture_rng_state", "make_generator", "mix_seed", "optimizer_update", "restore_rng_state", "seed_everything",
    "StopOnSignal", "stopped_message",
    "LR_SCHEDULES", "WarmupSchedule", "build_lr_scheduler", "build_optimizer", "param_groups",
]
