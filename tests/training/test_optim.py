"""Parameter groups and warm-up schedules."""
import json
import math

import pytest
import torch
from torch import nn

from visionformers.training.optim import WarmupSchedule, build_lr_scheduler, build_optimizer, param_groups


def _model():
    m = nn.Sequential(nn.Conv2d(1, 4, 3), nn.GroupNorm(2, 4), nn.Flatten(), nn.Linear(4, 2))
    m[3].bias.requires_grad_(False)
    return m


def test_param_groups_decay_only_matrices_and_skip_frozen():
    m = _model()
    decay, no_decay = param_groups(m, 0.1)
    assert {id(p) for p in decay["params"]} == {id(m[0].weight), id(m[3].weight)}
    assert {id(p) for p in no_decay["params"]} == {id(m[0].bias), id(m[1].weight), id(m[1].bias)}
    assert (decay["weight_decay"], no_decay["weight_decay"]) == (0.1, 0.0)


@pytest.mark.parametrize("kind", ["constant", "linear", "cosine"])
def test_schedule_warmup_then_shape(kind):
    s = WarmupSchedule(kind, warmup_steps=4, total_steps=14, min_ratio=0.1)
    assert [s(i) for i in range(4)] == pytest.approx([0.2, 0.4, 0.6, 0.8])
    assert s(4) == pytest.approx(1.0)
    end = {"constant": 1.0, "linear": 0.1, "cosine": 0.1}[kind]
    assert s(14) == pytest.approx(end) and s(100) == pytest.approx(end)
    if kind == "cosine":  # half way through the decay: the cosine's mid point
        assert s(9) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))


def test_scheduler_state_is_json_and_restores_the_position():
    m = _model()
    opt = build_optimizer(m, learning_rate=1.0)
    sched = build_lr_scheduler(opt, "cosine", 2, 10)
    for _ in range(5):
        opt.step()
        sched.step()
    state = json.loads(json.dumps(sched.state_dict()))
    opt2 = build_optimizer(m, learning_rate=1.0)
    sched2 = build_lr_scheduler(opt2, "cosine", 2, 10)
    sched2.load_state_dict(state)
    opt.step(), sched.step(), opt2.step(), sched2.step()
    assert sched2.get_last_lr() == sched.get_last_lr()


def test_bad_arguments_name_themselves():
    with pytest.raises(ValueError, match="kind"):
        WarmupSchedule("step", 0, 10)
    with pytest.raises(ValueError, match="learning_rate"):
        build_optimizer(_model(), learning_rate=0)
    with pytest.raises(ValueError, match="name"):
        build_optimizer(_model(), name="lion")
    frozen = nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(ValueError, match="trainable"):
        build_optimizer(frozen)
    assert isinstance(build_optimizer(_model(), "sgd"), torch.optim.SGD)
