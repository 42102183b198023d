"""`omni launch`: the environment a process joins a job from, the rendered cluster files (checked as a scheduler
would read them), and real local multi-process jobs: one that trains, one whose process dies."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from omni import config as config_lib
from omni.config import ConfigError
from omni.launch import runners as launch
from omni.train import distributed
from tests.conftest import tiny_config

TRAIN = ["train", "--config", "configs/demo.py", "--workdir", "/shared/runs/x"]


def test_environment_decides_how_a_process_joins():
    assert distributed.settings({}) is None
    assert distributed.settings({"OMNI_DISTRIBUTED": "auto"}) == {"heartbeat_timeout_seconds": 100}
    explicit = {"OMNI_COORDINATOR": "10.0.0.1:1234", "OMNI_NUM_PROCESSES": "4", "OMNI_PROCESS_ID": "3",
                "OMNI_HEARTBEAT_S": "20"}
    assert distributed.settings(explicit) == {"coordinator_address": "10.0.0.1:1234", "num_processes": 4,
                                              "process_id": 3, "heartbeat_timeout_seconds": 20}
    with pytest.raises(distributed.DistributedError, match="OMNI_PROCESS_ID not set"):
        distributed.settings({"OMNI_COORDINATOR": "h:1", "OMNI_NUM_PROCESSES": "2"})
    with pytest.raises(distributed.DistributedError, match="must be in 0..1"):
        distributed.settings(dict(explicit, OMNI_NUM_PROCESSES="2"))
    with pytest.raises(distributed.DistributedError, match="not host:port"):
        distributed.settings(dict(explicit, OMNI_COORDINATOR="10.0.0.1"))
    with pytest.raises(distributed.DistributedError, match="only value is 'auto'"):
        distributed.settings({"OMNI_DISTRIBUTED": "yes"})


def _bash_n(script: str, tmp_path: Path) -> None:
    path = tmp_path / "script.sh"
    path.write_text(script)
    result = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_slurm_script(tmp_path):
    script = launch.slurm_script(TRAIN, nodes=4, gpus_per_node=8, partition="a100", setup="source ~/venv/bin/activate")
    _bash_n(script, tmp_path)
    directives = dict(re.findall(r"^#SBATCH --([\w-]+)=(\S+)$", script, re.M))
    assert directives["nodes"] == "4" and directives["ntasks-per-node"] == "1" and directives["gpus-per-node"] == "8"
    assert directives["partition"] == "a100"
    body = [l for l in script.splitlines() if l and not l.startswith("#")]
    assert body[-1] == ("srun --kill-on-bad-exit=1 --ntasks-per-node=1 omni train --config configs/demo.py "
                        "--workdir /shared/runs/x")
    assert "export OMNI_DISTRIBUTED=auto" in body[-2] and body.index("source ~/venv/bin/activate") < len(body) - 2
    with pytest.raises(ConfigError):
        launch.slurm_script(TRAIN, nodes=0, gpus_per_node=8)


@pytest.mark.parametrize("slices", [1, 2])
def test_gke_jobset(slices):
    manifest = yaml.safe_load(yaml.safe_dump(launch.gke_jobset(TRAIN, "gcr.io/p/omni:1", "v5p-128", "4x4x4",
                                                                slices=slices, name="run1")))
    assert manifest["apiVersion"] == "jobset.x-k8s.io/v1alpha2" and manifest["kind"] == "JobSet"
    assert manifest["metadata"]["name"] == "run1"
    (replicated,) = manifest["spec"]["replicatedJobs"]
    assert replicated["replicas"] == slices
    job = replicated["template"]["spec"]
    assert job["parallelism"] == job["completions"] == 16  # v5p-128: 64 chips on 16 hosts of 4
    pod = job["template"]["spec"]
    assert pod["restartPolicy"] == "Never" and pod["nodeSelector"]["cloud.google.com/gke-tpu-topology"] == "4x4x4"
    (container,) = pod["containers"]
    assert container["image"] == "gcr.io/p/omni:1" and container["command"] == ["omni", *TRAIN]
    assert container["resources"]["limits"]["google.com/tpu"] == 4
    env = {e["name"]: e for e in container["env"]}
    assert env["OMNI_DISTRIBUTED"]["value"] == "auto"
    assert ("MEGASCALE_SLICE_ID" in env) == (slices > 1)
    if slices > 1:
        assert env["MEGASCALE_NUM_SLICES"]["value"] == "2"
        assert env["MEGASCALE_COORDINATOR_ADDRESS"]["value"].startswith("run1-slice-0-0.run1:")
    with pytest.raises(ConfigError, match="does not hold the 64 chips"):
        launch.gke_jobset(TRAIN, "img", "v5p-128", "4x4x2")
    with pytest.raises(ConfigError, match="unknown TPU accelerator"):
        launch.gke_jobset(TRAIN, "img", "h100-8", "2x2")


@pytest.mark.parametrize("slices", [1, 2])
def test_tpu_script(slices, tmp_path):
    script = launch.tpu_script(TRAIN, "t1", "us-east5-a", "v5p-16", slices=slices, project="proj")
    _bash_n(script, tmp_path)
    lines = script.splitlines()
    creates = [l for l in lines if " create " in l]
    assert len(creates) == 1 and ("queued-resources" in creates[0]) == (slices > 1)
    assert any(l.startswith("trap ") and "delete" in l for l in lines)  # deleted even when the run fails
    runs = [l for l in lines if "omni train" in l]
    assert len(runs) == slices and all(l.endswith("&") and "--worker=all" in l for l in runs)  # all at once
    for i, line in enumerate(runs):
        assert "OMNI_DISTRIBUTED=auto" in line and ("MEGASCALE_SLICE_ID=%d" % i in line) == (slices > 1)
    assert "--keep" not in script and "delete" not in launch.tpu_script(TRAIN, "t1", "z", "v5p-16", keep=True)
    assert launch.tpu_slice("v5litepod-16") == launch.TpuSlice("v5litepod-16", 16, 4, 4)
    assert launch.tpu_slice("v4-8") == launch.TpuSlice("v4-8", 4, 1, 4)


def test_dry_run_prints_and_writes_nothing(tmp_path):
    result = subprocess.run([sys.executable, "-m", "omni.cli", "launch", "slurm", "--nodes", "2", "--gpus-per-node",
                             "4", "--dry-run", "--config", "configs/demo.py", "--workdir", "runs/x"],
                            capture_output=True, text=True, cwd=tmp_path,
                            env=dict(os.environ, PYTHONPATH=str(Path.cwd())))
    assert result.returncode == 0, result.stderr
    assert "srun --kill-on-bad-exit=1" in result.stdout and "would write omni.sbatch" in result.stderr
    assert list(tmp_path.iterdir()) == []
    bad = subprocess.run([sys.executable, "-m", "omni.cli", "launch", "gke", "--image", "i", "--tpu-type", "v5p-8",
                          "--topology", "9x9", "--dry-run", "--", "train"], capture_output=True, text=True)
    assert bad.returncode == 2 and "--topology '9x9' does not hold the 4 chips of v5p-8" in bad.stderr


def _config(tmp_path, **train) -> Path:
    cfg = tiny_config()
    cfg.train.log_every = 2
    for key, value in train.items():
        setattr(cfg.train, key, value)
    path = tmp_path / "config.json"
    config_lib.save_config(cfg, path)
    return path


def _launch(*args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "omni.cli", "launch", "local", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


@pytest.mark.slow
def test_two_local_processes_train_one_job(tmp_path):
    config = _config(tmp_path, steps=10, checkpoint_every=5)
    out, _ = _launch("--processes", "2", "--devices-per-process", "4", "--", "train", "--config", str(config),
                     "--workdir", str(tmp_path / "run"), "--no-progress").communicate(timeout=300)
    assert "on 8 cpu devices" in out and out.count("omni: step 10 held-out loss") == 1, out[-3000:]  # logs once
    assert all(line.startswith(("[p0]", "[p1]", "omni launch:")) for line in out.splitlines() if line), out[-2000:]
    rows = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in rows if "loss" in r]
    assert steps == [2, 4, 6, 8, 10]  # written once, by process 0
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["10", "5"]
    result = json.loads((tmp_path / "run" / "eval.json").read_text())
    first = next(r for r in rows if r["step"] == 0 and "eval/loss/text" in r)
    assert result["eval"]["loss/text"] < first["eval/loss/text"] - 1.0


@pytest.mark.slow
def test_a_dead_process_stops_the_job_at_once(tmp_path):
    config = _config(tmp_path, steps=100000, checkpoint_every=0, eval_every=0)
    proc = _launch("--processes", "2", "--devices-per-process", "2", "--", "train", "--config", str(config),
                   "--workdir", str(tmp_path / "run"), "--no-progress")
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if "held-out loss" in line:  # both processes are in the training loop
            break
    pids = [int(p) for p in re.search(r"pids ([\d ]+)", "".join(lines)).group(1).split()]
    time.sleep(2)
    killed_at = time.monotonic()
    os.kill(pids[1], signal.SIGKILL)
    rest, _ = proc.communicate(timeout=60)
    assert proc.returncode != 0
    assert time.monotonic() - killed_at < 30  # not the coordination service's heartbeat timeout
    assert "process 1 exited with code -9; stopping the other 1 process(es)" in rest, rest[-2000:]
    with pytest.raises(ProcessLookupError):
        os.kill(pids[0], 0)


def _losses(workdir: Path) -> dict:
    rows = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def _train_one_process(config: Path, workdir: Path) -> str:
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    result = subprocess.run([sys.executable, "-m", "omni.cli", "train", "--config", str(config), "--workdir",
                             str(workdir), "--no-progress"], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    return result.stdout


@pytest.mark.slow
def test_two_processes_match_one_and_resume_on_one(tmp_path):
    """data.shards=2: a 2-process x 4-device run (hybrid mesh, the data axis across the 2 processes as DCN
    granules) has the loss curve of a 1 x 8 run; stopped by SIGTERM and resumed by one process, it still
    follows that curve (data order included)."""
    cfg = tiny_config()
    cfg.data.shards = 2
    cfg.train.steps, cfg.train.log_every, cfg.train.checkpoint_every = 12, 1, 0
    config = tmp_path / "config.json"
    config_lib.save_config(cfg, config)
    _train_one_process(config, tmp_path / "one")
    reference = _losses(tmp_path / "one")

    out, _ = _launch("--processes", "2", "--devices-per-process", "4", "--", "train", "--config", str(config),
                     "--workdir", str(tmp_path / "two"), "--no-progress", "--set", "mesh.dcn_data=2",
                     "--set", "mesh.dcn_fsdp=1").communicate(timeout=300)  # a hybrid mesh: data over 2 "slices"
    two = _losses(tmp_path / "two")
    assert sorted(two) == sorted(reference) == list(range(1, 13)), out[-2000:]
    for step in reference:
        assert two[step] == pytest.approx(reference[step], rel=1e-4), step

    proc = _launch("--processes", "2", "--devices-per-process", "4", "--", "train", "--config", str(config),
                   "--workdir", str(tmp_path / "moved"), "--no-progress")
    metrics = tmp_path / "moved" / "metrics.jsonl"
    deadline = time.time() + 240
    while not (metrics.exists() and '"step": 3' in metrics.read_text()):
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[0][-3000:]
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)  # the launcher passes it on: both processes save the same step and exit
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0 and "SIGTERM received: saved step" in out, out[-3000:]
    saved = int(re.search(r"saved step (\d+)", out).group(1))
    assert 3 <= saved < 12
    resumed = _train_one_process(config, tmp_path / "moved")
    assert f"resumed from {tmp_path / 'moved' / 'checkpoints' / str(saved)}" in resumed
    moved = _losses(tmp_path / "moved")
    assert sorted(moved) == list(range(1, 13))
    for step in reference:
        assert moved[step] == pytest.approx(reference[step], rel=1e-4), step
