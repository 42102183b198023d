"""The command line, run as a user runs it: a subprocess, its exit code and what it prints."""

import os
import subprocess
import sys

import pytest


def omni(*args, cwd=None):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, "-m", "omni.cli", *args], capture_output=True, text=True, env=env,
                          cwd=cwd, timeout=300)


def test_bad_config_key_names_it(tmp_path):
    run = omni("train", "--config", "configs/demo.py", "--workdir", str(tmp_path), "--set", "train.stepz=5")
    assert run.returncode == 2
    assert "unknown config key 'train.stepz'" in run.stderr and "Did you mean 'train.steps'" in run.stderr
    assert "Traceback" not in run.stderr
    assert not (tmp_path / "config.json").exists()  # nothing ran


def test_bad_override_value_names_key_and_allowed_values(tmp_path):
    run = omni("train", "--config", "configs/demo.py", "--workdir", str(tmp_path), "--set", "model.dtype=float8")
    assert run.returncode == 2
    assert "bad value 'float8' for 'model.dtype'" in run.stderr and "'bfloat16', 'float32'" in run.stderr


def test_mesh_device_mismatch_says_what_fits(tmp_path):
    run = omni("train", "--config", "configs/demo.py", "--workdir", str(tmp_path),
               "--set", "mesh.data=4", "--set", "mesh.tensor=4")
    assert run.returncode == 2, run.stderr
    assert "mesh data=4 fsdp=1 tensor=4 does not fit: it needs 16 devices but 8 are available" in run.stderr
    assert "Shapes that fit 8 devices" in run.stderr and "Traceback" not in run.stderr


def test_config_verb_prints_resolved_config_and_schema():
    run = omni("config", "--config", "configs/demo.py", "--set", "train.steps=9")
    assert run.returncode == 0 and '"steps": 9' in run.stdout
    schema = omni("config", "--schema")
    assert "model.remat" in schema.stdout and "recompute" in schema.stdout


@pytest.mark.slow
def test_demo_command_trains_and_resumes(tmp_path):
    """The README's first command, shortened: trains, shows progress and demo metrics, then resumes."""
    workdir = tmp_path / "demo"
    args = ("train", "--config", "configs/demo.py", "--workdir", str(workdir), "--set", "train.steps=30",
            "--set", "train.eval_every=0", "--set", "train.checkpoint_every=15", "--set", "train.demo_eval_examples=4")
    run = omni(*args)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "held-out loss" in run.stdout and "demo caption" in run.stdout
    again = omni(*args[:-4], "--set", "train.steps=40", "--set", "train.demo_eval_examples=4")
    assert again.returncode == 0, again.stderr[-2000:]
    assert "resumed from" in again.stdout and "(step 30)" in again.stdout
