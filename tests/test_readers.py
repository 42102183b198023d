"""Readers beside a writer (omni.train.readers): eval, export and generate read a workdir while its run trains or
after it was damaged, and a run stopped by a full disk keeps its last checkpoint."""

import json
import os
import shutil
import subprocess
import sys
import time

import pytest

from omni import cli, storage
from omni.train import artifact, checkpoint, loop, readers
from tests.conftest import tiny_config

STEPS = 6


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny run with checkpoints at steps 2, 4 and 6 (keep 3); tests work on copies (`workdir`)."""
    root = tmp_path_factory.mktemp("readers") / "run"
    cfg = tiny_config()
    cfg.train.steps, cfg.train.checkpoint_every, cfg.train.keep_checkpoints, cfg.train.eval_batches = STEPS, 2, 3, 1
    loop.train(cfg, root, progress=False)
    assert checkpoint.checkpoint_steps(root) == [2, 4, 6]
    return cfg, root


@pytest.fixture
def workdir(run, tmp_path):
    shutil.copytree(run[1], tmp_path / "run")
    return tmp_path / "run"


def _one_line_error(capsys, code):
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("omni: error: ")]
    assert len(lines) == 1, err
    return lines[0]


def test_a_leased_step_outlives_keep_n_and_goes_at_the_first_save_after_its_lease(run, workdir):
    cfg = run[0]
    cfg.train.keep_checkpoints = 1
    cfg.train.steps = 8
    with readers.Lease(workdir, 6) as lease:
        assert readers.leased_steps(workdir) == {6}
        loop.train(cfg, workdir, progress=False)
        # keep-1 would leave only step 8: the step a reader holds stays, the others go
        assert checkpoint.checkpoint_steps(workdir) == [6, 8]
    assert not lease.path.exists() and readers.leased_steps(workdir) == set()
    cfg.train.steps = 10
    loop.train(cfg, workdir, progress=False)
    assert checkpoint.checkpoint_steps(workdir) == [10]


def test_a_step_leased_after_keep_n_chose_it_is_deleted_only_once_the_lease_is_gone(tmp_path):
    """Orbax picks the steps to drop when a save starts and deletes them when it is finalised: the deleter looks at
    the leases again then."""
    class Inner:
        def __init__(self):
            self.deleted = []

        def delete_steps(self, steps):
            self.deleted += list(steps)

        def delete(self, step):
            self.deleted.append(step)

    inner = Inner()
    deleter = checkpoint.LeaseAwareDeleter(inner, tmp_path)
    with readers.Lease(tmp_path, 4):
        deleter.delete_steps([2, 4])
        deleter.delete_deferred()  # still leased: kept
        assert inner.deleted == [2]
    deleter.delete_deferred()
    assert inner.deleted == [2, 4]


def test_leases_of_dead_readers_and_stale_leases_pin_nothing(tmp_path, monkeypatch):
    folder = tmp_path / readers.LEASE_DIR
    folder.mkdir()
    host = storage.host_name()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    now = time.time()
    for name, renewed in [(f"2.{host}.{dead.pid}.0123abcd.json", now),          # its process is gone: dead
                          (f"4.otherhost.{os.getpid()}.0123abcd.json", now - readers.STALE_AFTER_S - 1),  # stale
                          (f"6.otherhost.1.89abcdef.json", now - 5),             # live, on another host
                          ("8.not-a-lease.json", now)]:                           # not a name omni makes
        (folder / name).write_text(json.dumps({"renewed": renewed}))
    assert readers.leased_steps(tmp_path) == {6}


def test_a_step_deleted_while_it_is_read_is_read_again_from_the_newest(workdir):
    """The trainer's rotation deleted the step between the reader's listing and its lease: the read starts over."""
    lines, calls = [], []

    def read(step):
        calls.append(step)
        if len(calls) == 1:  # the trainer deletes it as the reader starts
            shutil.rmtree(workdir / "checkpoints" / str(step))
        return artifact.checkpoint_params(workdir, step)

    step, params = readers.read_checkpoint(workdir, None, read, log=lines.append)
    assert calls == [6, 4] and step == 4 and params  # the read went on from the newest step left
    assert len(lines) == 1 and "checkpoints/6 was deleted by the run training there while it was read" in lines[0]
    assert not (workdir / readers.LEASE_DIR).exists() or not os.listdir(workdir / readers.LEASE_DIR)


def _damage(workdir, step, how):
    state = workdir / "checkpoints" / str(step) / "state"
    if how == "metadata":
        (state / "_METADATA").unlink()
    elif how == "truncated":  # every array file cut to a few bytes
        for root, _, names in os.walk(state):
            for name in names:
                if "/d" in root or root.endswith("/d"):
                    with open(os.path.join(root, name), "r+b") as f:
                        f.truncate(7)
    else:
        shutil.rmtree(workdir / "checkpoints" / str(step) / "meta")


@pytest.mark.parametrize("how", ["metadata", "truncated", "meta"])
def test_export_of_a_workdir_whose_newest_checkpoint_is_damaged_reads_the_previous_one(workdir, tmp_path, capsys,
                                                                                      how):
    _damage(workdir, 6, how)
    assert cli.main(["export", "--workdir", str(workdir), "--out", str(tmp_path / "out")]) == 0
    captured = capsys.readouterr()
    assert f"checkpoints/6 cannot be read and is skipped" in captured.out and "Traceback" not in captured.err
    assert json.loads((tmp_path / "out" / "config.json").read_text())["export"]["step"] == 4
    assert (workdir / "checkpoints" / "6").is_dir()  # a reader moves nothing: the checkpoints are the run's
    # asked for by --step, the damaged one is an error of one line
    code = cli.main(["export", "--workdir", str(workdir), "--out", str(tmp_path / "out6"), "--step", "6"])
    line = _one_line_error(capsys, code)
    assert "checkpoints/6 cannot be read" in line and "choose another --step (the steps there are 2, 4, 6)" in line


def test_eval_and_generate_read_past_a_damaged_newest_checkpoint(workdir, capsys):
    _damage(workdir, 6, "metadata")
    assert cli.main(["eval", "--workdir", str(workdir), "--demo-examples", "0"]) == 0
    out = capsys.readouterr().out
    assert "checkpoints/6 cannot be read and is skipped" in out and (workdir / "eval-4.json").is_file()
    assert cli.main(["generate", "--model", str(workdir), "--prompt", "a red", "--max-new-tokens", "3"]) == 0
    assert "checkpoints/6 cannot be read and is skipped" in capsys.readouterr().out


def test_init_from_a_run_reads_past_its_damaged_newest_checkpoint(run, workdir, tmp_path, capsys):
    """model.init_from=<a run's workdir> reads like eval: under a lease, the damaged step 6 skipped in one line."""
    from omni import config as config_lib

    _damage(workdir, 6, "metadata")
    cfg = config_lib.apply_overrides(run[0], ["train.steps=1", "train.checkpoint_every=1",
                                              f"model.init_from={workdir}"])
    loop.train(cfg, tmp_path / "next", progress=False)
    out = capsys.readouterr().out
    assert "checkpoints/6 cannot be read and is skipped" in out
    assert f"model.init_from={workdir} (omni run, step 4)" in out
    assert not (workdir / readers.LEASE_DIR).exists() or not os.listdir(workdir / readers.LEASE_DIR)


def test_a_workdir_whose_every_checkpoint_is_damaged_is_one_line(workdir, tmp_path, capsys):
    for step in (2, 4, 6):
        _damage(workdir, step, "metadata")
    code = cli.main(["export", "--workdir", str(workdir), "--out", str(tmp_path / "out")])
    line = _one_line_error(capsys, code)
    assert "none of the checkpoints in" in line and "(6, 4, 2) can be read" in line
    assert not (tmp_path / "out").exists()


TRAIN_SETS = ["model.d=32", "model.layers=2", "model.heads=4", "model.kv_heads=2", "model.dtype=float32",
              "data.seq_len=128", "demo.train_examples=300", "demo.eval_examples=48", "train.batch_size=8",
              "train.warmup_steps=1", "train.log_every=2", "train.eval_every=0", "train.checkpoint_every=2",
              "demo.scored_examples=0", "train.eval_batches=1"]


def _train_command(workdir, steps, *extra):
    sets = [arg for s in TRAIN_SETS + [f"train.steps={steps}", *extra] for arg in ("--set", s)]
    return [sys.executable, "-m", "omni.cli", "train", "--config", "configs/demo.py", "--workdir", str(workdir),
            "--no-progress", *sets]


@pytest.mark.slow
def test_a_full_disk_stops_train_in_one_line_keeps_the_last_checkpoint_and_leaves_no_partial_save(tmp_path):
    from conftest import run_in_namespace

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    small = tmp_path / "small"
    small.mkdir()
    # A run that saved step 2 on a big disk, moved onto a disk with room for it and little more, resumed to step 4.
    first = subprocess.run(_train_command(tmp_path / "w", 2), cwd=root, capture_output=True, text=True)
    assert first.returncode == 0, first.stderr[-2000:]
    used_kib = int(subprocess.run(["du", "-sk", str(tmp_path / "w")], capture_output=True, text=True).stdout.split()[0])
    command = " ".join(f"'{arg}'" for arg in _train_command(small / "w", 4))
    result = run_in_namespace(f"mount -t tmpfs -o size={used_kib + 60}k none {small} && cp -a {tmp_path / 'w'} "
                              f"{small / 'w'} && cd {root} && {command}; echo rc=$?; ls -a {small / 'w' / 'checkpoints'}")
    out = result.stdout + result.stderr
    assert "rc=2" in out and "Traceback" not in out, out[-3000:]
    assert "omni: error: cannot save checkpoint 4 in " in out, out[-3000:]
    assert ("the disk is full; free space there or choose another --workdir. The last complete checkpoint, step 2, "
            "is intact: run the same command to resume from it") in out
    listing = result.stdout.split("rc=2", 1)[1].split()
    assert "2" in listing and not any("orbax-checkpoint-tmp" in name for name in listing), listing


@pytest.mark.slow
def test_eval_export_and_generate_in_a_loop_beside_a_train_with_keep_1_never_fail(tmp_path, capfd):
    """The interleavings a user meets: every read while a run saves every 2 steps and keeps one checkpoint."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    workdir = tmp_path / "w"
    trainer = subprocess.Popen(_train_command(workdir, 2000, "train.keep_checkpoints=1"), cwd=root,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 300
        while not checkpoint.checkpoint_steps(workdir):
            assert trainer.poll() is None and time.time() < deadline, trainer.stderr.read()[-2000:]
            time.sleep(0.5)
        commands = [["export", "--workdir", str(workdir), "--out", str(tmp_path / "out-{i}")],
                    ["generate", "--model", str(workdir), "--prompt", "a red", "--max-new-tokens", "2"],
                    ["eval", "--workdir", str(workdir), "--demo-examples", "0"]]
        steps = []
        for i in range(9):
            argv = [arg.format(i=i) for arg in commands[i % 3]]
            assert cli.main(argv) == 0, capfd.readouterr().err[-3000:]
            captured = capfd.readouterr()
            assert "Traceback" not in captured.err and "Error" not in captured.err, captured.err[-3000:]
            steps.append(json.loads((tmp_path / f"out-{i}" / "config.json").read_text())["export"]["step"]
                         if i % 3 == 0 else None)
        assert trainer.poll() is None, "the run ended before the reads did: the test read beside nothing"
    finally:
        trainer.terminate()
        trainer.wait(60)
    assert [s for s in steps if s is not None] == sorted(s for s in steps if s is not None)
    assert not any(name.startswith("out-") and ".tmp-" in name for name in os.listdir(tmp_path))


def test_a_lease_on_a_bucket_workdir_pins_its_step(bucket):
    with readers.Lease(bucket, 12) as lease:
        assert lease.path is not None and readers.leased_steps(bucket) == {12}
    assert readers.leased_steps(bucket) == set()
