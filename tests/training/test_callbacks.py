import argparse

import pytest

from visionformers.training import callbacks as cb


def run_evaluations(stopper, values):
    """Feed ``values`` as successive evaluations (one per step); -> (steps evaluated, state)."""
    state, steps = cb.LoopState(), []
    callbacks = cb.CallbackList([stopper])
    callbacks.on_train_begin(state)
    for value in values:
        state.step += 1
        callbacks.on_evaluate(state, {"val_loss": value})
        steps.append(state.step)
        if state.should_stop:
            break
    return steps, state


def test_stops_after_patience_evaluations_without_improvement():
    steps, state = run_evaluations(cb.EarlyStopping("val_loss", patience=3), [5, 4, 4, 4.5, 4, 1, 1])
    assert steps == [1, 2, 3, 4, 5] and state.should_stop  # best 4 at step 2, then 3 misses
    assert "val_loss" in state.stop_reason and "step 2" in state.stop_reason and "patience 3" in state.stop_reason


def test_min_delta_and_mode_max():
    stopper = cb.EarlyStopping("val_loss", patience=2, min_delta=0.1, mode="max")
    steps, state = run_evaluations(stopper, [0.5, 0.55, 0.58, 0.7, 0.75, 0.79])
    # 0.55 and 0.58 are within min_delta of 0.5: two misses
    assert steps == [1, 2, 3] and stopper.best == 0.5
    stopper = cb.EarlyStopping("val_loss", patience=2, min_delta=0.1, mode="max")
    assert run_evaluations(stopper, [0.5, 0.55, 0.7, 0.75, 0.79])[0] == [1, 2, 3, 4, 5]


def test_counters_survive_a_state_dict_round_trip():
    values = [3, 2, 2.5, 2.2, 2.1, 2.4]
    full = run_evaluations(cb.EarlyStopping("val_loss", patience=3), values)[0]
    first = cb.EarlyStopping("val_loss", patience=3)
    run_evaluations(first, values[:3])
    saved = cb.CallbackList([first]).state_dict()
    resumed = cb.EarlyStopping("val_loss", patience=3)
    cb.CallbackList([resumed]).load_state_dict(saved)
    state = cb.LoopState(step=3)
    for value in values[3:]:
        state.step += 1
        resumed.on_evaluate(state, {"val_loss": value})
        if state.should_stop:
            break
    assert state.step == full[-1] == 5


def test_a_resumed_stopped_run_stops_at_once():
    stopper = cb.EarlyStopping("val_loss", patience=1)
    run_evaluations(stopper, [1, 2])
    again = cb.EarlyStopping("val_loss", patience=1)
    again.load_state_dict(stopper.state_dict())
    state = cb.LoopState(step=2)
    again.on_train_begin(state)
    assert state.should_stop


@pytest.mark.parametrize("kwargs, name", [
    (dict(metric="val_loss", patience=-1), "patience"),
    (dict(metric="val_loss", patience=1.5), "patience"),
    (dict(metric="val_loss", patience=1, min_delta=-0.1), "min_delta"),
    (dict(metric="val_loss", patience=1, mode="up"), "mode"),
    (dict(metric="accuracy", patience=1, metrics=("val_loss",)), "early_stopping_metric"),
])
def test_bad_arguments(kwargs, name):
    with pytest.raises(ValueError, match=name):
        cb.EarlyStopping(**kwargs)


def test_unknown_metric_at_evaluation_and_from_flags():
    with pytest.raises(ValueError, match="early_stopping_metric.*accuracy"):
        cb.EarlyStopping("accuracy", patience=1).on_evaluate(cb.LoopState(), {"val_loss": 1.0})
    p = argparse.ArgumentParser()
    cb.add_early_stopping_arguments(p, {"val_loss": "min"}, default="val_loss")
    with pytest.raises(ValueError, match="early_stopping_metric.*top1"):
        cb.early_stopping_from_args(p.parse_args(["--early_stopping_metric", "top1"]), {"val_loss": "min"})
    with pytest.raises(ValueError, match="early_stopping_patience.*-2"):
        cb.early_stopping_from_args(p.parse_args(["--early_stopping_patience", "-2"]), {"val_loss": "min"})
    assert cb.early_stopping_from_args(p.parse_args([]), {"val_loss": "min"}) is None
    stopper = cb.early_stopping_from_args(p.parse_args(["--early_stopping_patience", "2"]), {"val_loss": "min"})
    assert (stopper.metric, stopper.patience, stopper.mode) == ("val_loss", 2, "min")


def test_callback_list_order_and_custom_loop():
    events = []

    class Recorder(cb.Callback):
        def on_train_begin(self, state):
            events.append("begin")

        def on_step_end(self, state, logs):
            events.append(("step", state.step, logs["loss"]))

        def on_evaluate(self, state, metrics):
            events.append(("eval", state.step, metrics["val_loss"]))

        def on_checkpoint_saved(self, state, path):
            events.append(("saved", path))

        def on_train_end(self, state):
            events.append("end")

    callbacks, state = cb.CallbackList([Recorder(), None]), cb.LoopState()
    callbacks.on_train_begin(state)
    for step in (1, 2):
        state.step = step
        callbacks.on_step_end(state, {"loss": 0.5 * step})
    callbacks.on_evaluate(state, {"val_loss": 0.1})
    callbacks.on_checkpoint_saved(state, "out/checkpoint-2")
    callbacks.on_train_end(state)
    assert events == ["begin", ("step", 1, 0.5), ("step", 2, 1.0), ("eval", 2, 0.1), ("saved", "out/checkpoint-2"), "end"]
    with pytest.raises(ValueError, match="callbacks"):
        cb.CallbackList([object()])
    with pytest.raises(ValueError, match="callbacks"):
        cb.CallbackList([Recorder(), Recorder()])


def test_lr_throughput_logger_logs_to_the_tracker():
    logged = []

    class FakeAccelerator:
        log_with = ["fake"]

        def log(self, values, step):
            logged.append((step, values))

    logger = cb.LrThroughputLogger(every=2, samples_per_step=8)
    state = cb.LoopState(accelerator=FakeAccelerator())
    logger.on_train_begin(state)
    for step in range(1, 5):
        state.step = step
        logger.on_step_end(state, {"lr": 0.1 * step})
    assert [s for s, _ in logged] == [2, 4]
    values = logged[-1][1]
    assert values["train/lr"] == pytest.approx(0.4) and values["train/samples_per_s"] == pytest.approx(8 * values["train/steps_per_s"])
