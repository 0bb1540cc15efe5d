"""Loop helpers that make a training run reproducible and resumable to the bit.

- :func:`seed_everything` / :func:`capture_rng_state` / :func:`restore_rng_state`: every RNG a step can touch
  (python, numpy, torch CPU and accelerator, plus named ``torch.Generator`` objects) as tensors and ints, so a
  checkpoint loads with ``torch.load(weights_only=True)``.
- :class:`EpochBatchSampler`: a seeded permutation per epoch, sharded over processes, that can start in the
  middle of an epoch. Its position counts *samples of the global batch*, so a run may resume on a different
  number of processes and still see the data in the same order.
- :class:`SeededItems`: reseeds the RNG for every item from (seed, epoch, index), so random augmentations do
  not depend on DataLoader workers, the process count or where a run was resumed.
- :class:`BadStepGuard`: counts non-finite steps and stops a run after ``max_bad_steps`` in a row.
"""
from __future__ import annotations

import logging
import math
import random
from collections.abc import Iterable, Iterator

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from visionformers._validate import check_int, fail

logger = logging.getLogger(__name__)

# Mixes (seed, epoch, index) into one 63-bit seed; the odd constants are SplitMix64's (Steele et al. 2014).
_MIX = (0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB)
_MASK63 = (1 << 63) - 1


def mix_seed(*parts: int) -> int:
    """A well-spread 63-bit seed from several ints (SplitMix64 finaliser over each part)."""
    h = 0
    for p in parts:
        h = (h ^ (int(p) & ((1 << 64) - 1))) * _MIX[0] & ((1 << 64) - 1)
        h = ((h ^ (h >> 30)) * _MIX[1]) & ((1 << 64) - 1)
        h = ((h ^ (h >> 27)) * _MIX[2]) & ((1 << 64) - 1)
        h ^= h >> 31
    return h & _MASK63


def seed_everything(seed: int, rank: int = 0) -> None:
    """Seed python, numpy and torch (all devices). Each process gets its own stream: ``mix_seed(seed, rank)``."""
    if isinstance(seed, bool) or not isinstance(seed, int):
        fail("seed", seed, "an int")
    s = mix_seed(seed, rank)
    random.seed(s)
    np.random.seed(s % 2**32)
    torch.manual_seed(s)  # also seeds every CUDA device


def make_generator(seed: int, *parts: int, device: str | torch.device = "cpu") -> torch.Generator:
    """A ``torch.Generator`` on ``device`` seeded with ``mix_seed(seed, *parts)``."""
    for i, part in enumerate((seed, *parts)):
        check_int("seed" if i == 0 else f"parts[{i - 1}]", part, minimum=None)
    g = torch.Generator(device=device)
    g.manual_seed(mix_seed(seed, *parts))
    return g


# ---- RNG state as weights_only-safe values ------------------------------------------------------------


def capture_rng_state(generators: dict[str, torch.Generator] | None = None) -> dict:
    """Every RNG state as tensors / ints / floats (no numpy objects, no pickled classes)."""
    version, mt, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": {"version": version, "state": torch.tensor(mt, dtype=torch.int64), "gauss": gauss},
        "numpy": {"kind": str(kind), "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
        "generators": {name: g.get_state() for name, g in (generators or {}).items()},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict, generators: dict[str, torch.Generator] | None = None) -> None:
    """Inverse of :func:`capture_rng_state`; generators named in ``state`` but not passed are an error."""
    py = state["python"]
    random.setstate((int(py["version"]), tuple(int(v) for v in py["state"].tolist()), py["gauss"]))
    npy = state["numpy"]
    np.random.set_state((npy["kind"], npy["keys"].numpy().astype(np.uint32), int(npy["pos"]),
                         int(npy["has_gauss"]), float(npy["cached_gaussian"])))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        saved = state["cuda"]
        if len(saved) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(saved)
        else:  # a different machine shape: keep what we can, the run is still valid but not bit-exact
            logger.warning("checkpoint holds %d CUDA RNG states for %d devices; CUDA RNG not restored",
                           len(saved), torch.cuda.device_count())
    generators = generators or {}
    missing = sorted(set(state.get("generators", {})) - set(generators))
    if missing:
        fail("generators", sorted(generators), f"generators named {sorted(state['generators'])} (missing {missing})")
    for name, g_state in state.get("generators", {}).items():
        generators[name].set_state(g_state)


# ---- data order ---------------------------------------------------------------------------------------


class EpochBatchSampler(Sampler[list[tuple[int, int]]]):
    """Batches of ``(epoch, index)`` pairs: a seeded permutation per epoch, one shard per process.

    Each global batch is ``batch_size * num_replicas`` consecutive entries of the epoch's permutation; process
    ``rank`` takes its slice. The last incomplete global batch of an epoch is dropped, so every process sees the
    same number of batches (DDP and FSDP need that). ``set_position(epoch, offset)`` starts at ``offset``
    samples into the epoch's permutation (a multiple of nothing in particular: any sample position works).
    """

    def __init__(self, num_items: int, batch_size: int, seed: int = 0, num_replicas: int = 1, rank: int = 0,
                 batch_flag: str = "batch_size"):
        if isinstance(num_items, bool) or not isinstance(num_items, int) or num_items < 1:
            fail("num_items", num_items, "an int >= 1 (the dataset is empty)")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            fail("batch_size", batch_size, "an int >= 1")
        if not 0 <= rank < num_replicas:
            fail("rank", rank, f"an int in [0, num_replicas={num_replicas})")
        if batch_size * num_replicas > num_items:
            fail(batch_flag, batch_size, f"at most {num_items // num_replicas} (dataset of {num_items} items over "
                 f"{num_replicas} process(es); the global batch must fit in one epoch): lower {batch_flag}")
        self.num_items, self.batch_size, self.seed = num_items, batch_size, seed
        self.num_replicas, self.rank = num_replicas, rank
        self.epoch, self.offset = 0, 0

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.num_replicas

    def batches_per_epoch(self) -> int:
        return self.num_items // self.global_batch

    def set_position(self, epoch: int, offset: int = 0) -> None:
        if offset < 0 or offset > self.num_items:
            fail("offset", offset, f"a sample position in [0, {self.num_items}]")
        self.epoch, self.offset = int(epoch), int(offset)

    def permutation(self, epoch: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(mix_seed(self.seed, epoch))
        return torch.randperm(self.num_items, generator=g)

    def __len__(self) -> int:
        return (self.num_items - self.offset) // self.global_batch

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        perm, epoch = self.permutation(self.epoch).tolist(), self.epoch
        for start in range(self.offset, self.num_items - self.global_batch + 1, self.global_batch):
            lo = start + self.rank * self.batch_size
            yield [(epoch, i) for i in perm[lo:lo + self.batch_size]]


class SeededItems(Dataset):
    """Wrap a map-style dataset so item ``(epoch, index)`` is drawn under torch/python/numpy RNGs seeded from
    ``(seed, epoch, index)``: augmentation randomness is a function of the item alone."""

    def __init__(self, dataset: Dataset, seed: int):
        check_int("seed", seed, minimum=None)
        self.dataset, self.seed = dataset, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]):
        return self.__getitems__([key])[0]

    def __getitems__(self, keys: list[tuple[int, int]]) -> list:
        """A batch of items (the DataLoader calls this) under one save / restore of the global RNG states."""
        py_state, np_state = random.getstate(), np.random.get_state()
        with torch.random.fork_rng(devices=[]):  # restores the torch CPU state afterwards
            try:
                return [self._draw(epoch, index) for epoch, index in keys]
            finally:
                random.setstate(py_state)
                np.random.set_state(np_state)

    def _draw(self, epoch: int, index: int):
        s = mix_seed(self.seed, epoch, index)
        # the CPU generator only: torch.manual_seed would also reseed every CUDA generator (which fork_rng
        # with devices=[] does not restore) and costs ~0.3 ms an item where default_generator takes ~2 us
        torch.default_generator.manual_seed(s)
        random.seed(s)
        np.random.seed(s % 2**32)
        return self.dataset[index]


class DataStream:
    """An endless stream of batches that knows its position: ``(epoch, samples consumed in the epoch)``.

    ``state_dict()`` after consuming k batches and ``load_state_dict`` in a new process continue with batch k+1,
    including when the new run has another number of processes (the position is in global samples).
    """

    def __init__(self, dataset: Dataset, batch_size: int, seed: int = 0, num_replicas: int = 1, rank: int = 0,
                 num_workers: int = 0, collate_fn=None, pin_memory: bool = False, batch_flag: str = "batch_size"):
        """``batch_flag``: the name that a too-large batch error gives (a script's flag, e.g. --train_batch_size)."""
        self.sampler = EpochBatchSampler(len(dataset), batch_size, seed, num_replicas, rank, batch_flag)
        # A private generator: creating a DataLoader iterator draws a base seed from it, not from the global RNG.
        self.loader = torch.utils.data.DataLoader(
            SeededItems(dataset, seed), batch_sampler=self.sampler, num_workers=num_workers,
            collate_fn=collate_fn, pin_memory=pin_memory, generator=torch.Generator().manual_seed(seed),
            persistent_workers=False,
        )
        self.epoch, self.offset = 0, 0
        self._it: Iterator | None = None

    def __iter__(self) -> DataStream:
        return self

    def __next__(self):
        while True:
            if self._it is None:
                self.sampler.set_position(self.epoch, self.offset)
                self._it = iter(self.loader)
            try:
                batch = next(self._it)
            except StopIteration:
                self._it, self.epoch, self.offset = None, self.epoch + 1, 0
                continue
            self.offset += self.sampler.global_batch
            return batch

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "offset": self.offset, "global_batch": self.sampler.global_batch}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.offset, self._it = int(state["epoch"]), int(state["offset"]), None


# ---- non-finite steps ---------------------------------------------------------------------------------


class TrainingDiverged(RuntimeError):
    """Raised after too many consecutive non-finite steps; the message says what to try."""


def all_finite(tensors: Iterable[torch.Tensor | None]) -> bool:
    """True when every given tensor holds only finite values (one sync for the whole set)."""
    flags = [torch.isfinite(t).all() for t in tensors if t is not None]
    return bool(torch.stack(flags).all()) if flags else True


def optimizer_update(accelerator, model: torch.nn.Module, optimizer, lr_scheduler, ema, bad: torch.Tensor,
                     max_grad_norm: float) -> tuple[bool, torch.Tensor]:
    """One optimizer update at accelerate's sync point, with the same decision on every process.

    Clips the gradients to ``max_grad_norm`` (0: the norm is only measured); the step is bad when any process
    saw a non-finite loss (``bad`` > 0) or the norm is not finite, and is then skipped (under fp16 the scaler
    skips it by itself). ``ema`` (or None) follows good steps only; the gradients are zeroed and the lr schedule
    advances either way. Returns (bad, gradient norm): ``bad`` goes to :meth:`BadStepGuard.update`.
    """
    grad_norm = accelerator.clip_grad_norm_(model.parameters(), max_grad_norm or math.inf)
    bad = accelerator.reduce(bad, "sum") if accelerator.num_processes > 1 else bad
    is_bad = bool(bad > 0) or not math.isfinite(float(grad_norm))
    if not is_bad or accelerator.scaler is not None:
        optimizer.step()
        is_bad = is_bad or optimizer.step_was_skipped
    if ema is not None and not is_bad:
        ema.update(model)
    optimizer.zero_grad(set_to_none=True)
    lr_scheduler.step()
    return is_bad, grad_norm


class BadStepGuard:
    """Skip-and-count policy for NaN / Inf losses or gradients.

    ``update(bad)`` after every optimizer step: a bad step is logged and counted (``total``, ``consecutive``);
    ``max_bad_steps`` bad steps in a row raise :class:`TrainingDiverged`. ``max_bad_steps=0`` never stops.
    """

    def __init__(self, max_bad_steps: int = 10, mixed_precision: str = "no", learning_rate: float | None = None):
        if isinstance(max_bad_steps, bool) or not isinstance(max_bad_steps, int) or max_bad_steps < 0:
            fail("max_bad_steps", max_bad_steps, "an int >= 0 (0 never stops)")
        self.max_bad_steps, self.mixed_precision, self.learning_rate = max_bad_steps, mixed_precision, learning_rate
        self.total = 0
        self.consecutive = 0

    def update(self, bad: bool, step: int, what: str = "loss or gradient") -> None:
        if not bad:
            self.consecutive = 0
            return
        self.total += 1
        self.consecutive += 1
        logger.warning("step %d: non-finite %s; update skipped (%d in a row, %d in total)",
                       step, what, self.consecutive, self.total)
        if self.max_bad_steps and self.consecutive >= self.max_bad_steps:
            raise TrainingDiverged(self.advice(step))

    def advice(self, step: int) -> str:
        tips = []
        lr = f" (now {self.learning_rate:g})" if self.learning_rate else ""
        tips.append(f"lower --learning_rate{lr} or raise --lr_warmup_steps")
        if self.mixed_precision == "fp16":
            tips.append("use --mixed_precision bf16 (same range as fp32) or no instead of fp16")
        tips.append("set --max_grad_norm (e.g. 1.0)")
        tips.append("check the data for NaN/Inf pixels")
        return (f"training stopped at step {step}: {self.consecutive} consecutive steps had a non-finite loss or "
                f"gradient ({self.total} skipped in total). Try: " + "; ".join(tips) + ". Resume from the last "
                "checkpoint with --resume_from_checkpoint latest.")

    def state_dict(self) -> dict:
        return {"total": self.total, "consecutive": self.consecutive}

    def load_state_dict(self, state: dict) -> None:
        self.total, self.consecutive = int(state["total"]), int(state["consecutive"])
