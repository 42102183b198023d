"""Never lose a run: exact resume after a real SIGKILL, SIGTERM saves, unreadable and mismatching checkpoints,
restore onto another mesh. The kill tests drive `omni train` in a subprocess, as a scheduler would."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from omni import config as config_lib
from omni import sharding
from omni.data import pipeline as data
from omni.train import checkpoint, loop
from omni.train.metrics import read_metrics
from omni.train.step import build_optimizer, init_state
from tests.conftest import tiny_config

LOSS_KEYS = ("loss", "loss/text", "loss/audio", "acc", "grad_norm", "lr")


def _run_config(tmp_path: Path, steps: int, **overrides) -> Path:
    cfg = tiny_config()  # all 8 devices of the test process on 'data'
    cfg.train.steps, cfg.train.log_every, cfg.train.checkpoint_every = steps, 1, 5
    cfg.train.eval_batches = 1
    for key, value in overrides.items():
        config_lib.set_value(cfg, key, value)
    path = tmp_path / f"config-{steps}.json"
    config_lib.save_config(cfg, path)
    return path


def _omni_train(config: Path, workdir: Path, *extra) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "omni.cli", "train", "--config", str(config), "--workdir",
                             str(workdir), "--no-progress", *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait_for_step(workdir: Path, proc: subprocess.Popen, step: int, timeout: float = 180) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if any(r.get("step", 0) >= step and "loss" in r for r in read_metrics(workdir)):
            return
        if proc.poll() is not None:
            raise AssertionError(f"run ended before step {step}:\n{proc.stdout.read()}")
        time.sleep(0.02)
    raise AssertionError(f"no step {step} within {timeout} s")


def _losses(workdir: Path) -> dict[int, tuple]:
    rows = [r for r in read_metrics(workdir) if "loss" in r]
    steps = [r["step"] for r in rows]
    assert len(steps) == len(set(steps)), f"a step was logged twice: {steps}"
    return {r["step"]: tuple(r[k] for k in LOSS_KEYS) for r in rows}


@pytest.mark.slow
def test_sigkill_at_an_arbitrary_step_then_rerun_gives_the_same_losses_bitwise(tmp_path):
    steps = 60
    config = _run_config(tmp_path, steps)
    reference = _omni_train(config, tmp_path / "reference")
    out, _ = reference.communicate(timeout=300)
    assert reference.returncode == 0, out

    killed = tmp_path / "killed"
    proc = _omni_train(config, killed)
    _wait_for_step(killed, proc, 13)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    survivors = [int(p.name) for p in (killed / "checkpoints").iterdir() if p.name.isdigit()]
    assert survivors and max(survivors) < steps, "the kill came after the run had finished"

    resumed = _omni_train(config, killed)
    out, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, out
    assert f"resumed from {killed / 'checkpoints' / str(max(survivors))}" in out
    want, got = _losses(tmp_path / "reference"), _losses(killed)
    assert sorted(got) == list(range(1, steps + 1))
    assert got == want  # bitwise: same floats, step for step


@pytest.mark.slow
def test_sigterm_saves_at_the_next_step_and_exits_cleanly(tmp_path):
    config = _run_config(tmp_path, 100_000, **{"train.checkpoint_every": 0})
    proc = _omni_train(config, tmp_path / "run")
    _wait_for_step(tmp_path / "run", proc, 4)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    saved = [int(p.name) for p in (tmp_path / "run" / "checkpoints").iterdir() if p.name.isdigit()]
    assert len(saved) == 1 and saved[0] >= 4
    assert f"SIGTERM received: saved step {saved[0]} to {tmp_path / 'run' / 'checkpoints' / str(saved[0])}" in out
    assert max(r["step"] for r in read_metrics(tmp_path / "run")) == saved[0]

    more = _run_config(tmp_path, saved[0] + 2, **{"train.checkpoint_every": 0})
    resumed = _omni_train(more, tmp_path / "run")
    out, _ = resumed.communicate(timeout=120)
    assert resumed.returncode == 0 and f"(step {saved[0]})" in out, out


@pytest.fixture(scope="module")
def trained_once(tmp_path_factory):
    cfg = tiny_config()
    cfg.train.steps, cfg.train.checkpoint_every, cfg.train.eval_batches = 6, 2, 1
    workdir = tmp_path_factory.mktemp("trained")
    loop.train(cfg, workdir, progress=False)
    return cfg, workdir


@pytest.fixture
def three_checkpoints(trained_once, tmp_path):
    """A fresh copy of a run with checkpoints 2, 4, 6 that each test may damage."""
    import copy
    import shutil

    cfg, workdir = trained_once
    shutil.copytree(workdir, tmp_path / "run")
    return copy.deepcopy(cfg), tmp_path / "run"


def _state_files(workdir: Path, step: int) -> list[Path]:
    return sorted(p for p in (workdir / "checkpoints" / str(step) / "state" / "d").iterdir())


@pytest.mark.parametrize("damage", ["truncate", "delete", "garble", "no_state_metadata"])
def test_an_unreadable_checkpoint_is_reported_and_the_previous_one_restored(three_checkpoints, capsys, damage):
    cfg, workdir = three_checkpoints
    if damage == "no_state_metadata":  # damage, not another config: never "does not fit this model"
        (workdir / "checkpoints" / "6" / "state" / "_METADATA").unlink()
    for path in _state_files(workdir, 6) if damage != "no_state_metadata" else ():
        if damage == "truncate":
            path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
        elif damage == "delete":
            path.unlink()
        else:
            path.write_bytes(bytes(255 - b for b in path.read_bytes()))
    capsys.readouterr()
    cfg.train.steps = 8
    loop.train(cfg, workdir, progress=False)
    out = capsys.readouterr().out
    assert f"checkpoint {workdir / 'checkpoints' / '6'} is unreadable and is skipped" in out
    assert f"resumed from {workdir / 'checkpoints' / '4'} (step 4)" in out
    assert [p.name.split("-")[0] for p in (workdir / checkpoint.REJECTED_DIR).iterdir()] == ["6"]
    assert sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()) == [4, 6, 8]
    assert sorted(r["step"] for r in read_metrics(workdir) if "loss" in r) == [5, 8]


def test_a_half_written_save_is_ignored_and_cleaned(three_checkpoints, capsys):
    cfg, workdir = three_checkpoints
    partial = workdir / "checkpoints" / "8.orbax-checkpoint-tmp-1234567"
    (partial / "state").mkdir(parents=True)
    (partial / "state" / "manifest.ocdbt").write_bytes(b"\x00" * 10)
    cfg.train.steps = 8
    loop.train(cfg, workdir, progress=False)
    assert f"resumed from {workdir / 'checkpoints' / '6'} (step 6)" in capsys.readouterr().out
    assert not partial.exists()


def test_every_checkpoint_unreadable_is_an_error_not_a_silent_restart(three_checkpoints):
    cfg, workdir = three_checkpoints
    for step in (2, 4, 6):
        for path in _state_files(workdir, step):
            path.unlink()
    with pytest.raises(checkpoint.NoUsableCheckpointError, match="none of the checkpoints"):
        loop.train(cfg, workdir, progress=False)


def test_a_checkpoint_of_another_config_names_the_first_mismatching_parameter(three_checkpoints):
    cfg, workdir = three_checkpoints
    cfg.model.d = 64
    with pytest.raises(checkpoint.CheckpointMismatchError) as err:
        loop.train(cfg, workdir, progress=False)
    message = str(err.value)
    assert "parameter 'params." in message and "in the checkpoint but" in message
    assert "model.d (32 -> 64)" in message
    assert (workdir / "checkpoints" / "6").exists()  # nothing was moved or deleted
    assert config_lib.load_config(workdir / "config.json").model.d == 32  # the run's config was kept


def test_cli_reports_a_mismatch_as_a_user_error(three_checkpoints, tmp_path_factory):
    cfg, workdir = three_checkpoints
    cfg.model.layers = 3
    path = tmp_path_factory.mktemp("cfg") / "config.json"
    config_lib.save_config(cfg, path)
    result = subprocess.run([sys.executable, "-m", "omni.cli", "train", "--config", str(path), "--workdir",
                             str(workdir), "--no-progress"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "omni: error: checkpoint" in result.stderr and "model.layers (2 -> 3)" in result.stderr


@pytest.fixture(scope="module")
def saved_on_8_devices(tmp_path_factory):
    cfg = tiny_config(data=1, fsdp=8)
    cfg.train.steps, cfg.train.checkpoint_every, cfg.train.eval_batches = 2, 2, 1
    workdir = tmp_path_factory.mktemp("fsdp8")
    loop.train(cfg, workdir, progress=False)
    return cfg, workdir


@pytest.mark.parametrize("devices,mesh", [(1, {"data": 1}), (4, {"data": 1, "fsdp": 4})])
def test_a_checkpoint_saved_on_8_devices_restores_on_another_mesh(saved_on_8_devices, devices, mesh):
    cfg, tmp_path = saved_on_8_devices
    saved_manager = checkpoint.make_manager(tmp_path, cfg.train)
    saved_mesh = sharding.make_mesh(cfg.mesh)
    tx, _ = build_optimizer(cfg)
    _, saved_like, _ = init_state(cfg, saved_mesh, tx, data.vocab_for(cfg))
    want = checkpoint.restore_latest(saved_manager, checkpoint.abstract_like(saved_like),
                                     iter(data.train_dataset(cfg)))[1]

    other = tiny_config(**{"data": 1, "fsdp": 1, **mesh})
    other.train = cfg.train
    other_mesh = sharding.make_mesh(other.mesh, jax.devices()[:devices])
    _, like, _ = init_state(other, other_mesh, tx, data.vocab_for(other))
    step, got, meta = checkpoint.restore_latest(checkpoint.make_manager(tmp_path, other.train),
                                                checkpoint.abstract_like(like), iter(data.train_dataset(other)))
    assert step == 2 and meta["step"] == 2
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(want), jax.tree.leaves(got)):
        assert b.sharding.mesh.devices.size == devices, path
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=str(path))


AGREEMENT_SCRIPT = """
import sys, time
import jax
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(sys.argv[1], num_processes=2, process_id=int(sys.argv[2]), local_device_ids=[0])
import jax.numpy as jnp
from jax.experimental import multihost_utils
from omni.train.preemption import PreemptionWatch

watch = PreemptionWatch()
print("ready", flush=True)
for step in range(1, 100_000):
    multihost_utils.process_allgather(jnp.full(1, step))  # a collective per step, as training has
    if watch.reached(step):
        print("stopped at", step, flush=True)
        break
    time.sleep(0.005)
"""


def test_sigterm_to_one_process_stops_every_process_at_the_same_step(tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    procs = [subprocess.Popen([sys.executable, "-c", AGREEMENT_SCRIPT, f"127.0.0.1:{port}", str(i)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True) for i in range(2)]
    try:
        for proc in procs:
            assert proc.stdout.readline().strip() == "ready"
        time.sleep(1.0)
        procs[1].send_signal(signal.SIGTERM)  # only one host hears it, as on a pod
        outs = [proc.communicate(timeout=60)[0] for proc in procs]
    finally:
        for proc in procs:
            proc.kill()
    stops = [[line for line in out.splitlines() if line.startswith("stopped at")] for out in outs]
    assert all(len(s) == 1 for s in stops), outs
    assert stops[0] == stops[1]


KILL_DURING_SAVE_SCRIPT = """
import os, signal, sys
import jax.numpy as jnp
import orbax.checkpoint as ocp
from omni.train import checkpoint
from omni.config import TrainConfig

manager = checkpoint.make_manager(sys.argv[1], TrainConfig(keep_checkpoints=1))
small = {"w": jnp.ones((4, 4))}
manager.save(1, args=ocp.args.Composite(state=ocp.args.StandardSave(small), meta=ocp.args.JsonSave({"step": 1})))
manager.wait_until_finished()
big = {"w": jnp.ones((64, 1024, 1024))}  # 256 MiB: the async write is still going when the kill lands
manager.save(2, args=ocp.args.Composite(state=ocp.args.StandardSave(big), meta=ocp.args.JsonSave({"step": 2})))
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_a_kill_during_an_async_save_keeps_the_last_good_checkpoint(tmp_path):
    import orbax.checkpoint as ocp

    from omni.config import TrainConfig

    result = subprocess.run([sys.executable, "-c", KILL_DURING_SAVE_SCRIPT, str(tmp_path)], capture_output=True,
                            timeout=120)
    assert result.returncode == -signal.SIGKILL
    manager = checkpoint.make_manager(tmp_path, TrainConfig(keep_checkpoints=1))
    steps = manager.all_steps()
    # keep_checkpoints=1, yet step 1 may only be gone if step 2 was finalised before the kill.
    assert steps in ([1], [2]), steps
    restored = manager.restore(steps[-1], args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
    assert restored["meta"]["step"] == steps[-1]
    manager.close()


def test_time_based_checkpoints_without_a_step_interval(tmp_path):
    cfg = tiny_config()
    cfg.train.steps, cfg.train.log_every, cfg.train.eval_batches = 4, 1, 1
    cfg.train.checkpoint_every, cfg.train.checkpoint_minutes = 0, 1e-6  # due at every logging step
    loop.train(cfg, tmp_path, progress=False)
    assert checkpoint.checkpoint_steps(tmp_path) == [2, 3, 4]  # keep 3; step 1 was saved, then rotated out

    cfg.train.steps, cfg.train.checkpoint_minutes = 8, 60.0  # not due again within this test: only the last step
    loop.train(cfg, tmp_path, progress=False)
    assert checkpoint.checkpoint_steps(tmp_path) == [3, 4, 8]
