"""Loop helpers: RNG capture/restore, the resumable data order, per-item seeding, the non-finite step guard."""
import io
import random

import numpy as np
import pytest
import torch
from torch.utils.data import Dataset

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
    restore_rng_state,
    seed_everything,
)


def _draw(g):
    return (random.random(), float(np.random.rand()), float(np.random.randn()), torch.rand(3).tolist(),
            torch.rand(2, generator=g).tolist())


def test_rng_state_round_trip_through_weights_only_load():
    seed_everything(3)
    g = make_generator(3, 1)
    np.random.randn()  # leave numpy with a cached gaussian, the awkward part of its state
    state = capture_rng_state({"noise": g})
    buf = io.BytesIO()
    torch.save(state, buf)
    expected = _draw(g)
    _draw(g)  # move every stream on
    restore_rng_state(torch.load(io.BytesIO(buf.getvalue()), weights_only=True), {"noise": g})
    assert _draw(g) == expected


def test_restore_names_missing_generators():
    state = capture_rng_state({"noise": make_generator(0)})
    with pytest.raises(ValueError, match="generators"):
        restore_rng_state(state, {})


def test_seed_everything_differs_per_rank_and_repeats():
    seed_everything(0, rank=0)
    a = torch.rand(4)
    seed_everything(0, rank=1)
    b = torch.rand(4)
    seed_everything(0, rank=0)
    assert torch.equal(a, torch.rand(4)) and not torch.equal(a, b)
    assert mix_seed(1, 2) != mix_seed(2, 1) and 0 <= mix_seed(2**70, -5) < 2**63


def test_sampler_shards_cover_each_epoch_once_and_drop_the_tail():
    n, bs, world = 23, 3, 2
    shards = [list(EpochBatchSampler(n, bs, seed=5, num_replicas=world, rank=r)) for r in range(world)]
    assert len(shards[0]) == len(shards[1]) == n // (bs * world)
    seen = [i for shard in shards for batch in shard for (_, i) in batch]
    assert len(seen) == len(set(seen)) == (n // (bs * world)) * bs * world
    perm = EpochBatchSampler(n, bs, 5, world, 0).permutation(0).tolist()
    assert [i for (_, i) in shards[1][0]] == perm[3:6]  # rank 1 takes the second slice of each global batch


def test_sampler_epochs_differ_and_position_skips():
    s = EpochBatchSampler(20, 4, seed=1)
    assert not torch.equal(s.permutation(0), s.permutation(1))
    full = list(s)
    s.set_position(0, offset=8)
    assert list(s) == full[2:]


class _Noisy(Dataset):
    """Items that draw from torch, numpy and python RNGs, like a random augmentation."""

    def __len__(self):
        return 12

    def __getitem__(self, i):
        return {"x": torch.rand(2) + i, "np": float(np.random.rand()), "py": random.random()}


def _collect(stream, n):
    return [next(stream) for _ in range(n)]


def test_data_stream_resume_matches_uninterrupted_across_epochs_and_process_counts():
    straight = DataStream(_Noisy(), batch_size=4, seed=7)
    ref = _collect(straight, 7)  # 3 batches per epoch: crosses two epoch boundaries
    first = DataStream(_Noisy(), batch_size=4, seed=7)
    _collect(first, 4)
    resumed = DataStream(_Noisy(), batch_size=4, seed=7)
    resumed.load_state_dict(first.state_dict())
    for a, b in zip(ref[4:], _collect(resumed, 3)):
        assert torch.equal(a["x"], b["x"]) and torch.equal(a["np"], b["np"]) and torch.equal(a["py"], b["py"])
    # Two processes of batch 2 see, together, exactly the single-process batches of 4 (same items, same draws).
    ranks = [DataStream(_Noisy(), batch_size=2, seed=7, num_replicas=2, rank=r) for r in range(2)]
    for batch in ref[:3]:
        parts = [next(s) for s in ranks]
        assert torch.equal(torch.cat([p["x"] for p in parts]), batch["x"])


def test_seeded_items_do_not_touch_the_global_rng():
    torch.manual_seed(0)
    before = torch.get_rng_state()
    items = SeededItems(_Noisy(), seed=1)
    a, b = items[(0, 3)], items[(0, 3)]
    assert torch.equal(a["x"], b["x"]) and not torch.equal(a["x"], items[(1, 3)]["x"])
    assert torch.equal(torch.get_rng_state(), before)


def test_seeded_items_batch_equals_items_one_by_one_and_restores_every_rng():
    """The DataLoader fetches a batch through ``__getitems__`` (one save / restore of the RNG states)."""
    items = SeededItems(_Noisy(), seed=1)
    keys = [(0, 3), (0, 7), (1, 3)]
    states = (torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate())
    batch = items.__getitems__(keys)
    assert torch.equal(torch.get_rng_state(), states[0])
    assert np.array_equal(np.random.get_state()[1], states[1]) and random.getstate() == states[2]
    for key, got in zip(keys, batch):
        one = items[key]
        assert torch.equal(got["x"], one["x"]) and got["np"] == one["np"] and got["py"] == one["py"]


def test_seeded_items_seed_only_the_cpu_generator(monkeypatch):
    """Items draw exactly what they would after torch.manual_seed(s), without reseeding CUDA generators
    (an item loaded in the main process must not reset the training's GPU dropout stream)."""
    calls = []
    monkeypatch.setattr(torch, "manual_seed", lambda s: calls.append(s))
    item = SeededItems(_Noisy(), seed=1)[(2, 5)]
    assert calls == []
    monkeypatch.undo()
    torch.manual_seed(mix_seed(1, 2, 5))
    assert torch.equal(item["x"], _Noisy()[5]["x"])


def test_bad_step_guard_counts_and_stops_with_advice():
    guard = BadStepGuard(max_bad_steps=3, mixed_precision="fp16", learning_rate=1e-3)
    guard.update(True, 1)
    guard.update(False, 2)  # a good step resets the run of bad ones
    guard.update(True, 3)
    guard.update(True, 4)
    assert (guard.total, guard.consecutive) == (3, 2)
    with pytest.raises(TrainingDiverged, match=r"lower --learning_rate.*bf16"):
        guard.update(True, 5)
    restored = BadStepGuard(3)
    restored.load_state_dict(guard.state_dict())
    assert (restored.total, restored.consecutive) == (4, 3)
    with pytest.raises(ValueError, match="max_bad_steps"):
        BadStepGuard(-1)


def test_all_finite():
    assert all_finite([torch.ones(2), None])
    assert not all_finite([torch.ones(2), torch.tensor([1.0, float("inf")])])
    assert not all_finite([torch.tensor(float("nan"))])
