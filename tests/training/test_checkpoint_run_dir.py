"""One run per output directory (issue items 3 and 7): the lock, stale locks, another run's directory, writability."""
import json
import os
import socket
import subprocess
import sys

import pytest

from visionformers.training import lock, run_dir

ARGS = {"model": "unet_tiny", "resolution": 8, "max_train_steps": 20, "output_dir": "x", "logging_steps": 2}


def test_item3_a_second_run_is_refused_while_the_first_holds_the_lock(tmp_path):
    first = run_dir.open_run(tmp_path, ARGS)
    owner = json.loads((tmp_path / lock.LOCK_NAME).read_text())
    assert owner["pid"] == os.getpid() and owner["host"] == socket.gethostname()
    # another live process holds it: a sleeping child writes its own lock file
    first.close()
    assert not (tmp_path / lock.LOCK_NAME).exists()
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / lock.LOCK_NAME).write_text(json.dumps({"pid": child.pid, "host": socket.gethostname(),
                                                           "time": "now"}))
        with pytest.raises(ValueError, match=rf"in use by another run \(process {child.pid} on "):
            run_dir.open_run(tmp_path, ARGS)
    finally:
        child.kill()
        child.wait()
    # the child is gone: its lock is stale and is taken over
    again = run_dir.open_run(tmp_path, ARGS)
    assert json.loads((tmp_path / lock.LOCK_NAME).read_text())["pid"] == os.getpid()
    again.close()
    # a lock of another host cannot be checked: refused, with the file to remove named
    (tmp_path / lock.LOCK_NAME).write_text(json.dumps({"pid": 1, "host": "elsewhere", "time": "now"}))
    with pytest.raises(ValueError, match=r"remove .*\.lock"):
        run_dir.open_run(tmp_path, ARGS)


def test_item3_another_runs_directory_is_refused_unless_resuming_or_overwriting(tmp_path):
    run_dir.open_run(tmp_path, ARGS).close()
    (tmp_path / "checkpoint-20").mkdir()  # a checkpoint of that run (contents do not matter here)
    run_dir.open_run(tmp_path, {**ARGS, "logging_steps": 5, "output_dir": "y"}).close()  # same run: bookkeeping only
    other = {**ARGS, "max_train_steps": 600}
    with pytest.raises(ValueError, match=r"holds another run .*--max_train_steps 600 \(saved: 20\).*"
                                         r"--overwrite_output_dir"):
        run_dir.open_run(tmp_path, other)
    run_dir.open_run(tmp_path, other, overwrite=True).close()
    assert not (tmp_path / "checkpoint-20").exists()
    assert json.loads((tmp_path / run_dir.RUN_FILE).read_text())["args"]["max_train_steps"] == 600


def test_item7_an_unwritable_output_dir_is_found_before_training(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match=r"--output_dir=.*file/out' is not writable"):
        run_dir.open_run(tmp_path / "file" / "out", ARGS)
    if os.geteuid() != 0:  # root writes anywhere
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        try:
            with pytest.raises(ValueError, match="not writable"):
                lock.check_writable(ro)
        finally:
            ro.chmod(0o700)


def test_item6_a_forwarded_signal_is_one_request_and_a_later_one_stops_at_once(monkeypatch):
    import signal

    from visionformers.training import stop as stop_module

    stop = stop_module.StopOnSignal()
    try:
        assert not stop.requested()
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGINT)  # the launcher's forwarded copy of the same Ctrl-C
        assert stop.requested() and stop.reason == "SIGINT" and stop.exit_code() == 130
        monkeypatch.setattr(stop_module, "REPEAT_GRACE_S", 0.0)
        with pytest.raises(SystemExit, match="SIGTERM again: stopped at once"):
            os.kill(os.getpid(), signal.SIGTERM)
    finally:
        stop.close()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
