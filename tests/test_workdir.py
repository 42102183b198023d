"""One run per workdir, writable before any compute, results written whole: through the CLI where a user meets it."""

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from omni import config as config_lib
from omni.errors import WorkdirError
from omni.train import workdir as workdir_lib
from tests.conftest import tiny_config

HOLD = """
import sys, time
from omni.train import workdir
workdir.hold(sys.argv[1])
print("held", flush=True)
time.sleep(120)
"""


def _omni(*args):
    return subprocess.run([sys.executable, "-m", "omni.cli", *args], capture_output=True, text=True, timeout=300)


def test_a_second_run_on_a_held_workdir_is_refused_and_a_killed_holder_frees_it(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(run)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        config = tmp_path / "tiny.json"
        config_lib.save_config(tiny_config(), config)
        second = _omni("train", "--config", str(config), "--workdir", str(run), "--no-progress")
        assert second.returncode == 2, second.stderr
        assert f"workdir {run} is in use by omni train (pid {holder.pid} on host" in second.stderr
        assert "Traceback" not in second.stderr and second.stderr.count("\n") == 1
        assert sorted(p.name for p in run.iterdir()) == [".omni-lock"]  # the refused run wrote nothing
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    workdir_lib.hold(run)  # SIGKILL left no stale lock: the OS released it with the process
    workdir_lib.release(run)


def test_an_ablation_workdir_is_held_too(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        run = _omni("ablate", "--config", "configs/ablate_fusion.py", "--workdir", str(tmp_path), "--no-progress")
        assert run.returncode == 2 and f"is in use by omni train (pid {holder.pid}" in run.stderr, run.stderr
    finally:
        holder.kill()
        holder.wait()


def test_an_unwritable_workdir_stops_before_any_compute(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    run = _omni("train", "--config", "configs/demo.py", "--workdir", str(blocker / "run"), "--no-progress")
    assert run.returncode == 2
    assert f"cannot write to workdir {blocker / 'run'}" in run.stderr and "Traceback" not in run.stderr
    assert "held-out loss" not in run.stdout  # nothing was evaluated or trained


def test_a_failed_write_keeps_the_previous_file_whole(tmp_path, monkeypatch):
    target = tmp_path / "eval.json"
    workdir_lib.write_atomic(target, json.dumps({"step": 1}))

    def disk_full(*_):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "replace", disk_full)
    with pytest.raises(WorkdirError, match=f"cannot write {target}: the disk is full; free space there or choose "
                                           "another --workdir"):
        workdir_lib.write_atomic(target, json.dumps({"step": 2}))
    assert json.loads(target.read_text()) == {"step": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["eval.json"]  # no temp file left behind


def test_the_lock_says_who_holds_it(tmp_path):
    workdir_lib.hold(tmp_path, "omni train")
    try:
        text = (tmp_path / workdir_lib.LOCK_FILE).read_text()
        assert f"pid {os.getpid()} on host" in text and time.strftime("%Y-%m-%d") in text
    finally:
        workdir_lib.release(tmp_path)


def test_a_read_only_workdir_says_read_only_and_not_free_space(tmp_path):
    """It advised freeing space on a read-only disk."""
    from tests.conftest import run_in_namespace

    (tmp_path / "ro").mkdir()
    shell = (f"mount -o bind,ro {tmp_path / 'ro'} {tmp_path / 'ro'} && cd {Path.cwd()} && "
             f"{sys.executable} -m omni.cli train --config configs/demo.py --workdir {tmp_path / 'ro' / 'run'} "
             f"--no-progress 2>&1; echo rc=$?")
    text = run_in_namespace(shell).stdout
    assert "rc=2" in text, text
    line = [x for x in text.splitlines() if x.startswith("omni: error:")]
    assert len(line) == 1 and f"{tmp_path / 'ro' / 'run'}" in line[0] and "read-only" in line[0], text
    assert "free space" not in text and "Traceback" not in text and "held-out loss" not in text
