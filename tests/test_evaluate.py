"""`omni eval`: a checkpoint's held-out metrics, the same as the trainer measured for it."""

import json
import subprocess
import sys

import numpy as np
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


def test_eval_generate_scores_every_example_and_writes_predictions(run, tmp_path):
    """--generate on any dataset: the answers of the first N eval examples, scored per group, predictions on disk
    beside eval-<step>.json; the scores in the JSON are the scores of the predictions in the file."""
    from omni.tools import tasks

    workdir, _ = run
    result = evaluate.evaluate_checkpoint(workdir, generate=True, max_examples=6, max_new_tokens=8,
                                          log=lambda *a: None)
    assert result["generate"]["dataset"] == "demo" and result["generate"]["split"] == "eval"
    assert result["generate"]["examples"] == 6 == sum(s["n"] for s in result["tasks"].values())
    predictions = workdir / "eval-4.predictions.jsonl"
    assert result["generate"]["predictions"] == str(predictions)
    rows = [json.loads(line) for line in predictions.read_text().splitlines()]
    assert len(rows) == 6 and all("truth" in r and r["tokens"] <= 8 for r in rows)
    assert tasks.score_predictions(rows) == {g: {k: v for k, v in s.items() if k != "mel_l1"}
                                             for g, s in result["tasks"].items()}
    for group, score in result["tasks"].items():
        assert ("exact" in score and "cer" in score) or ("code_acc" in score and "mel_l1" in score), group
    saved = json.loads((workdir / "eval-4.json").read_text())
    assert saved["tasks"] == result["tasks"] and set(saved["demo_tasks"]) == set(result["tasks"])


def test_eval_generate_cli_on_a_prompts_file_names_a_bad_line(run, tmp_path):
    workdir, _ = run
    prompts = tmp_path / "held_out.jsonl"
    image = tmp_path / "a.png"
    from PIL import Image

    Image.fromarray(np.full((32, 32, 3), 120, np.uint8)).save(image)
    prompts.write_text(json.dumps({"id": "grey", "segments": [{"image": "a.png"}, {"text": "a grey square"}],
                                   "targets": ["text"]}) + "\n" + json.dumps({"prompt": "no answer here"}) + "\n")
    ok = subprocess.run([sys.executable, "-m", "omni.cli", "eval", "--workdir", str(workdir), "--generate",
                         "--prompts", str(prompts), "--max-new-tokens", "6"], capture_output=True, text=True,
                        timeout=300)
    assert ok.returncode == 0, ok.stderr
    assert "task text: exact 0.0%, CER" in ok.stdout and "on 1 held-out examples" in ok.stdout
    saved = json.loads((workdir / "eval-4.json").read_text())
    assert saved["generate"]["split"] == str(prompts) and saved["generate"]["examples"] == 1
    prompts.write_text('{"segments": [{"image": "nope.png"}, {"text": "x"}], "targets": ["text"]}\n')
    bad = subprocess.run([sys.executable, "-m", "omni.cli", "eval", "--workdir", str(workdir), "--generate",
                          "--prompts", str(prompts)], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and f"{prompts}:1: image file not found" in bad.stderr
