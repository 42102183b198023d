"""`omni eval`: a checkpoint's held-out metrics, the same as the trainer measured for it."""

import json
import subprocess
import sys

import pytest

from omni.tools import evaluate
from omni.train import loop
from tests.conftest import tiny_config


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("run")
    cfg = tiny_config()
    cfg.train.steps, cfg.train.checkpoint_every, cfg.train.eval_batches = 4, 2, 2
    result = loop.train(cfg, workdir, progress=False)
    return workdir, result


def test_eval_of_the_last_checkpoint_matches_the_trainers_final_eval(run):
    workdir, trained = run
    result = evaluate.evaluate_checkpoint(workdir, log=lambda *a: None)
    assert result["step"] == 4
    for key in ("loss", "loss/text", "loss/audio", "acc/text", "acc/audio", "tokens/target"):
        assert result["eval"][key] == pytest.approx(trained["eval"][key], rel=1e-6), key
    assert json.loads((workdir / "eval-4.json").read_text())["eval"]["loss"] == pytest.approx(result["eval"]["loss"])


def test_eval_of_an_earlier_step_and_on_another_mesh(run):
    workdir, trained = run
    earlier = evaluate.evaluate_checkpoint(workdir, step=2, log=lambda *a: None)
    assert earlier["step"] == 2 and earlier["eval"]["loss"] > trained["eval"]["loss"]
    resharded = evaluate.evaluate_checkpoint(workdir, overrides=["mesh.data=2", "mesh.fsdp=4"], log=lambda *a: None)
    assert resharded["eval"]["loss"] == pytest.approx(trained["eval"]["loss"], rel=1e-5)


def test_eval_cli_prints_metrics_and_names_a_missing_step(run):
    workdir, _ = run
    ok = subprocess.run([sys.executable, "-m", "omni.cli", "eval", "--workdir", str(workdir), "--step", "2"],
                        capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0, ok.stderr
    assert "held-out loss text" in ok.stdout and (workdir / "eval-2.json").exists()
    bad = subprocess.run([sys.executable, "-m", "omni.cli", "eval", "--workdir", str(workdir), "--step", "3"],
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "no checkpoint of step 3 in" in bad.stderr
