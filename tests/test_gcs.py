"""The pod job as documented: every location a gs:// URL, against a real GCS server (fake-gcs-server).

The hosts of a pod share nothing but a bucket, so a workdir, a dataset, an export and model.init_from on gs://
must behave as they do on local disk: the same losses, the same files, one run per workdir, resume after a kill,
and no local folder named `gs:` ever. The slow scenarios (SIGKILL and resume, storage outages, a 2-process job)
are marked slow and run in CI after the default suite.
"""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from omni import config as config_lib
from omni import storage
from omni.train import checkpoint
from omni.train import workdir as workdir_lib
from omni.train.metrics import read_metrics
from tests.conftest import tiny_config

LOSS_KEYS = ("loss", "loss/text", "loss/audio", "acc", "grad_norm", "lr")


def omni(*args, cwd, env=None, timeout=300):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu", **(env or {}))
    return subprocess.run([sys.executable, "-m", "omni.cli", *map(str, args)], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=timeout)


def start(*args, cwd, env=None) -> subprocess.Popen:
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu", **(env or {}))
    return subprocess.Popen([sys.executable, "-m", "omni.cli", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env, cwd=cwd)


def no_url_folders(root) -> None:
    """No folder named like a URL scheme (gs:, s3:) anywhere under `root`."""
    for folder, names, _ in os.walk(root):
        bad = [n for n in names if n.endswith(":")]
        assert not bad, f"{folder} holds {bad}"


def tiny(steps=20, **overrides):
    cfg = tiny_config()
    cfg.train.steps, cfg.train.log_every, cfg.train.checkpoint_every, cfg.train.eval_batches = steps, 5, 10, 1
    for key, value in overrides.items():
        config_lib.set_value(cfg, key, value)
    return cfg


def losses(workdir) -> dict:
    rows = [r for r in read_metrics(workdir) if "loss" in r]
    steps = [r["step"] for r in rows]
    assert len(steps) == len(set(steps)), f"a step was logged twice: {steps}"
    return {r["step"]: tuple(r[k] for k in LOSS_KEYS) for r in rows}


TENSORBOARD_SCALARS = """
import json, sys, types
sys.modules["tensorboard.compat.notf"] = types.ModuleType("notf")  # TensorBoard's own gfile (fsspec), not TF's
from tensorboard.backend.event_processing import event_accumulator
ea = event_accumulator.EventAccumulator(sys.argv[1], size_guidance={event_accumulator.SCALARS: 0})
ea.Reload()
print(json.dumps({tag: [[s.step, s.value] for s in ea.Scalars(tag)] for tag in ea.Tags()["scalars"]}))
"""


def tensorboard_scalars(folder) -> dict:
    """{tag: [[step, value], ...]} as TensorBoard's own reader loads them from `folder` (local or gs://)."""
    run = subprocess.run([sys.executable, "-c", TENSORBOARD_SCALARS, str(folder)], capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------------------------------------


def test_a_run_on_a_bucket_matches_the_same_run_on_disk(bucket, tmp_path):
    config = storage.path(bucket) / "tiny.json"
    config_lib.save_config(tiny(), config)  # --config itself from the bucket
    remote, local = f"{bucket}/run", tmp_path / "run"
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    on_gcs = omni("train", "--config", config, "--workdir", remote, "--no-progress", cwd=cwd)
    assert on_gcs.returncode == 0, on_gcs.stderr[-3000:]
    on_disk = omni("train", "--config", config, "--workdir", local, "--no-progress", cwd=cwd)
    assert on_disk.returncode == 0, on_disk.stderr[-3000:]
    assert losses(remote) == losses(local) and sorted(losses(remote)) == [5, 10, 15, 20]

    assert storage.listdir(remote) == ["checkpoints", "config.json", "eval.json", "metrics", "tensorboard"]
    assert checkpoint.checkpoint_steps(remote) == [10, 20]
    assert json.loads(storage.path(f"{remote}/config.json").read_text()) == \
        json.loads((local / "config.json").read_text())
    assert json.loads(storage.path(f"{remote}/eval.json").read_text())["eval"] == \
        json.loads((local / "eval.json").read_text())["eval"]
    tb_remote, tb_local = tensorboard_scalars(f"{remote}/tensorboard"), tensorboard_scalars(local / "tensorboard")
    learned = [tag for tag in tb_local if tag in LOSS_KEYS or tag.startswith("eval/")]
    assert set(tb_remote) == set(tb_local) and len(learned) > 10
    assert {t: tb_remote[t] for t in learned} == {t: tb_local[t] for t in learned}  # timings aside, identical
    assert [s for s, _ in tb_remote["loss"]] == [5, 10, 15, 20]
    assert [v for _, v in tb_remote["loss"]] == pytest.approx([losses(remote)[s][0] for s in (5, 10, 15, 20)])
    no_url_folders(cwd)
    assert os.listdir(cwd) == []

    again = omni("train", "--config", config, "--workdir", remote, "--no-progress", cwd=cwd)
    assert again.returncode == 0 and f"resumed from {remote}/checkpoints/20 (step 20)" in again.stdout
    assert "already reached train.steps=20" in again.stdout


HOLD = """
import sys, time
from omni.train import workdir
workdir.hold(sys.argv[1])
print("held", flush=True)
time.sleep(120)
"""


def _holder(url, env=None):
    proc = subprocess.Popen([sys.executable, "-c", HOLD, url], stdout=subprocess.PIPE, text=True,
                            env=dict(os.environ, **(env or {})))
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_one_run_per_bucket_workdir(bucket, tmp_path):
    config = tmp_path / "tiny.json"
    config_lib.save_config(tiny(), config)
    holder = _holder(f"{bucket}/run")
    try:
        second = omni("train", "--config", config, "--workdir", f"{bucket}/run", "--no-progress", cwd=tmp_path)
        assert second.returncode == 2, second.stderr[-3000:]
        assert f"workdir {bucket}/run is in use by omni train (pid {holder.pid} on host" in second.stderr
        assert "Traceback" not in second.stderr and second.stderr.count("\n") == 1
        assert storage.listdir(f"{bucket}/run") == [workdir_lib.LOCK_FILE]  # the refused run wrote nothing
    finally:
        holder.kill()
        holder.wait()


def test_a_lock_goes_stale_and_is_taken_over_in_one_line(bucket, monkeypatch):
    holder = _holder(f"{bucket}/run", env={"OMNI_LOCK_HEARTBEAT_S": "0.5"})
    monkeypatch.setattr(workdir_lib.socket, "gethostname", lambda: "another-host")  # as if it ran elsewhere
    holder.kill()
    holder.wait()
    monkeypatch.setattr(workdir_lib, "HEARTBEAT_S", 0.5)
    monkeypatch.setattr(workdir_lib, "STALE_AFTER_S", 2.0)
    with pytest.raises(workdir_lib.WorkdirError, match="in use by omni train .* renewed [01] s ago"):
        workdir_lib.hold(f"{bucket}/run")  # not stale yet
    time.sleep(2.5)
    lines = []
    workdir_lib.hold(f"{bucket}/run", log=lines.append)
    try:
        assert len(lines) == 1 and f"took over the lock of workdir {bucket}/run" in lines[0]
        assert f"omni train (pid {holder.pid} on host" in lines[0] and "stale after 2 s" in lines[0]
    finally:
        workdir_lib.release(f"{bucket}/run")
    assert storage.listdir(f"{bucket}/run") == []  # released: the lock object is gone


def test_the_lock_of_a_killed_process_on_this_host_is_taken_over_at_once(bucket):
    holder = _holder(f"{bucket}/run")
    holder.kill()
    holder.wait()
    lines = []
    workdir_lib.hold(f"{bucket}/run", log=lines.append)  # no wait for STALE_AFTER_S: the pid is gone
    workdir_lib.release(f"{bucket}/run")
    assert len(lines) == 1 and f"(pid {holder.pid} on host" in lines[0] and "is no longer running on this host" in \
        lines[0]


def test_a_holder_whose_lock_was_taken_over_stops_before_its_next_checkpoint(bucket, monkeypatch):
    monkeypatch.setattr(workdir_lib, "HEARTBEAT_S", 0.2)
    workdir_lib.hold(f"{bucket}/run")
    try:
        workdir_lib.check_held(f"{bucket}/run")  # held: nothing to say
        storage.write_text(f"{bucket}/run/{workdir_lib.LOCK_FILE}", '{"holder": "another run"}')  # taken over
        time.sleep(1.0)
        with pytest.raises(workdir_lib.WorkdirError, match="was taken over by another run; this run stops here"):
            workdir_lib.check_held(f"{bucket}/run")
    finally:
        workdir_lib.release(f"{bucket}/run")
    assert storage.listdir(f"{bucket}/run") == [workdir_lib.LOCK_FILE]  # the new holder's lock is not deleted


@pytest.mark.slow
def test_every_verb_takes_gs_urls_from_a_manifest_to_an_hf_export_and_back(bucket, tmp_path):
    """data build -> train -> eval -> generate -> export (both formats) -> model.init_from, every location on
    gs://: the manifest and the files it names, the tokenizer and codec folders, the dataset, the workdir, the
    exports, the prompts file and the outputs. Run from an empty folder that must stay empty."""
    from tests.test_data_cli import _user_corpus

    corpus = _user_corpus(tmp_path / "corpus").parent
    storage.upload_folder(corpus, f"{bucket}/corpus")
    manifest = f"{bucket}/corpus/manifest.jsonl"
    cwd = tmp_path / "cwd"
    cwd.mkdir()

    def ok(*args, **kw):
        run = omni(*args, cwd=cwd, **kw)
        assert run.returncode == 0, (args, run.stderr[-3000:])
        return run

    ok("tokenizer", "train", "--manifest", manifest, "--vocab-size", "300", "--out", f"{bucket}/tok")
    ok("codec", "fit", "--manifest", manifest, "--out", f"{bucket}/codec", "--codebooks", "2", "--codebook-size", "16",
       "--no-progress")
    ok("codec", "encode", "--codec", f"{bucket}/codec", "--wav", f"{bucket}/corpus/wav/1.wav", "--out",
       f"{bucket}/c.npy")
    ok("codec", "decode", "--codec", f"{bucket}/codec", "--codes", f"{bucket}/c.npy", "--out", f"{bucket}/c.wav")
    ok("imagetok", "fit", "--manifest", manifest, "--out", f"{bucket}/imagetok", "--codebooks", "1",
       "--codebook-size", "8", "--iters", "2", "--no-progress")
    built = ok("data", "build", "--manifest", manifest, "--out", f"{bucket}/data", "--tokenizer", f"{bucket}/tok",
               "--codec", f"{bucket}/codec", "--no-progress")
    assert f"omni: built {bucket}/data" in built.stdout
    assert storage.listdir(f"{bucket}/data") == ["codec", "omni_dataset.json", "tfds", "tokenizer"]
    refused = omni("data", "build", "--manifest", manifest, "--out", f"{bucket}/data", "--codec", f"{bucket}/codec",
                   cwd=cwd)
    assert refused.returncode == 2 and "already holds a dataset; pass --overwrite" in refused.stderr
    ok("data", "build", "--manifest", manifest, "--out", f"{bucket}/data", "--tokenizer", f"{bucket}/tok",
       "--codec", f"{bucket}/codec", "--overwrite", "--no-progress")
    assert f"{bucket}/data" in ok("data", "split", "--dataset", f"{bucket}/data").stdout

    config = tmp_path / "tiny.json"
    config_lib.save_config(tiny(steps=10, **{"data.dataset": f"{bucket}/data"}), config)
    run = f"{bucket}/run"
    ok("train", "--config", config, "--workdir", run, "--no-progress")
    ok("data", "show", "--config", config, "--out", f"{bucket}/batch.png")
    evaluated = ok("eval", "--workdir", run, "--generate", "--max-examples", "2", "--max-new-tokens", "4",
                   "--no-progress")
    assert f"wrote {run}/eval-10.json" in evaluated.stdout
    assert json.loads(storage.path(f"{run}/eval-10.json").read_text())["generate"]["examples"] == 2
    storage.write_text(f"{bucket}/prompts.jsonl", json.dumps({"prompt": "red", "id": "p0"}) + "\n")
    ok("generate", "--model", run, "--prompts", f"{bucket}/prompts.jsonl", "--out", f"{bucket}/answers.jsonl",
       "--max-new-tokens", "3")
    assert json.loads(storage.path(f"{bucket}/answers.jsonl").read_text())["id"] == "p0"
    ok("generate", "--model", run, "--prompt", "play", "--target", "audio", "--max-new-tokens", "4", "--out",
       f"{bucket}/answer.wav")

    exported = ok("export", "--workdir", run, "--out", f"{bucket}/export", "--dtype", "float32", "--no-progress")
    assert f"to {bucket}/export (" in exported.stdout
    assert storage.listdir(f"{bucket}/export") == ["README.md", "codec", "config.json", "model.safetensors",
                                                    "tokenizer"]
    refused = omni("export", "--workdir", run, "--out", f"{bucket}/export", cwd=cwd)
    assert refused.returncode == 2 and "already exists and is not empty" in refused.stderr
    from_export = ok("generate", "--model", f"{bucket}/export", "--prompts", f"{bucket}/prompts.jsonl", "--out",
                     f"{bucket}/answers-export.jsonl", "--max-new-tokens", "3")
    assert from_export.returncode == 0
    assert storage.path(f"{bucket}/answers-export.jsonl").read_text() == \
        storage.path(f"{bucket}/answers.jsonl").read_text()  # the export answers as its checkpoint did

    ok("export", "--format", "hf", "--workdir", run, "--out", f"{bucket}/hf", "--dtype", "float32", "--no-progress")
    assert "config.json" in storage.listdir(f"{bucket}/hf") and "tokenizer.json" in storage.listdir(f"{bucket}/hf")
    for source in (f"{bucket}/hf", f"{bucket}/export", run):
        stage = f"{bucket}/stage-{storage.path(source).name}"
        started = ok("train", "--config", config, "--workdir", stage, "--set", "train.steps=2", "--set",
                     f"model.init_from={source}", "--no-progress")
        assert f"model.init_from={source} (" in started.stdout
    no_url_folders(cwd)
    assert os.listdir(cwd) == []


# ---------------------------------------------------------------------------------------------- slow scenarios


def _wait_for_step(workdir, proc, step: int, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if any(r.get("step", 0) >= step and "loss" in r for r in read_metrics(workdir)):
            return
        if proc.poll() is not None:
            out = proc.stdout.read()
            raise AssertionError(f"run ended before step {step}:\n{out[:4000]}\n...\n{out[-3000:]}")
        time.sleep(0.2)
    raise AssertionError(f"no step {step} within {timeout} s")


def _reference(tmp_path, cfg) -> dict:
    config = tmp_path / "reference.json"
    config_lib.save_config(cfg, config)
    run = omni("train", "--config", config, "--workdir", tmp_path / "reference", "--no-progress", cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    return losses(tmp_path / "reference")


@pytest.mark.slow
def test_sigkill_on_a_bucket_workdir_then_the_same_command_resumes_bitwise(bucket, tmp_path):
    cfg = tiny(steps=40, **{"train.log_every": 1, "train.checkpoint_every": 5})
    want = _reference(tmp_path, cfg)
    config = tmp_path / "run.json"
    config_lib.save_config(cfg, config)
    run = f"{bucket}/run"
    proc = start("train", "--config", config, "--workdir", run, "--no-progress", cwd=tmp_path)
    _wait_for_step(run, proc, 13)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    survivors = checkpoint.checkpoint_steps(run)
    assert survivors and max(survivors) < 40, "the kill came after the run had finished"
    resumed = omni("train", "--config", config, "--workdir", run, "--no-progress", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {run}/checkpoints/{max(survivors)}" in resumed.stdout
    got = losses(run)
    assert sorted(got) == list(range(1, 41)) and got == want  # bitwise: the same floats, step for step
    assert "checkpoints.rejected" not in storage.listdir(run)


@pytest.mark.slow
def test_storage_outages_mid_save_and_mid_restore_set_nothing_aside(bucket, tmp_path, gcs_server):
    """The bucket stops answering for a few seconds while a run saves checkpoints, then while the next run
    restores: both wait (the libraries' retries, then omni's), nothing is moved to checkpoints.rejected/, and the
    losses equal an uninterrupted run's."""
    cfg = tiny(steps=30, **{"train.log_every": 1, "train.checkpoint_every": 3})
    want = _reference(tmp_path, cfg)
    config, run = tmp_path / "run.json", f"{bucket}/run"
    config_lib.save_config(cfg, config)
    proc = start("train", "--config", config, "--workdir", run, "--no-progress", cwd=tmp_path)
    _wait_for_step(run, proc, 7)
    gcs_server.stop()  # saves (every 3 steps) and metric writes now meet a closed port
    time.sleep(4)
    gcs_server.start()
    _wait_for_step(run, proc, 17)
    proc.send_signal(signal.SIGKILL)  # then preempted
    proc.wait()
    saved = checkpoint.checkpoint_steps(run)[-1]
    assert 9 <= saved < 30  # a checkpoint saved after the outage

    proc = start("train", "--config", config, "--workdir", run, "--no-progress", cwd=tmp_path)
    lines = []
    for line in proc.stdout:  # the model is built: the restore comes next
        lines.append(line)
        if "MFLOP/token" in line:
            gcs_server.stop()
            time.sleep(4)
            gcs_server.start()
            break
    out, _ = proc.communicate(timeout=300)
    out = "".join(lines) + out
    assert proc.returncode == 0, out[-3000:]
    assert f"resumed from {run}/checkpoints/{saved}" in out and "unreadable" not in out
    assert "checkpoints.rejected" not in storage.listdir(run)
    assert losses(run) == want


@pytest.mark.slow
def test_a_two_process_job_on_a_bucket_workdir_and_dataset(bucket, tmp_path):
    from omni.data import pipeline

    cfg = tiny(steps=10, **{"train.log_every": 2, "train.checkpoint_every": 5})
    storage.upload_folder(pipeline.dataset_for(cfg).path, f"{bucket}/demo-data")  # the demo corpus, on the bucket
    cfg.data.dataset = f"{bucket}/demo-data"
    config = tmp_path / "run.json"
    config_lib.save_config(cfg, config)
    run = f"{bucket}/run"
    out = omni("launch", "local", "--processes", "2", "--devices-per-process", "4", "--", "train", "--config", config,
               "--workdir", run, "--no-progress", cwd=tmp_path)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "on 8 cpu devices" in out.stdout and out.stdout.count("omni: step 10 held-out loss") == 1
    assert [r["step"] for r in read_metrics(run) if "loss" in r] == [2, 4, 6, 8, 10]  # written once, by process 0
    assert checkpoint.checkpoint_steps(run) == [5, 10]
    assert json.loads(storage.path(f"{run}/eval.json").read_text())["data"]["path"] == f"{bucket}/demo-data"
    no_url_folders(tmp_path)


COMPILE_TWICE = """
import sys
import jax, jax.numpy as jnp
from omni.train import compile_cache
compile_cache.enable(sys.argv[1])
jax.jit(lambda x: x * 2 + 1)(jnp.ones(3)).block_until_ready()
print(compile_cache.summary())
"""


def test_the_compile_cache_may_live_on_the_bucket(bucket):
    runs = [subprocess.run([sys.executable, "-c", COMPILE_TWICE, f"{bucket}/jax-cache"], capture_output=True,
                           text=True, timeout=120) for _ in range(2)]
    assert all(r.returncode == 0 for r in runs), runs[0].stderr[-2000:]
    assert "0 program(s) read from it" in runs[0].stdout and any("-cache" in n for n in
                                                                 storage.listdir(f"{bucket}/jax-cache"))
    assert "0 compiled and added" in runs[1].stdout  # the second process read every program from the bucket
