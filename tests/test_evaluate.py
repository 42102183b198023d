"""`omni eval`: a checkpoint's held-out metrics, the same as the trainer measured for it."""

import json
import re
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
    # stderr is not a terminal here: the progress is a line of counts and rates, on stdout
    assert re.search(r"^eval: 2/2 batch in [\d.]+ s \([\d.]+ batch/s, tokens \d+\)$", ok.stdout, re.M), ok.stdout
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


def test_eval_generate_skips_a_prompt_that_fills_the_context_and_keeps_the_other_scores(run, tmp_path):
    """An example whose prompt leaves no room for its answer is skipped in one line and its row says why; the
    held-out loss and the other answers' scores are still written (they were lost with the whole eval before)."""
    workdir, _ = run
    from omni.data.audio import write_wav

    write_wav(tmp_path / "a.wav", np.sin(np.arange(16000) * 0.05).astype(np.float32) * 0.3, 16000)
    prompts = tmp_path / "held_out.jsonl"
    too_long = " ".join(["play loud c e g"] * 100)
    prompts.write_text(json.dumps({"id": "short", "segments": [{"text": "play loud c"}, {"audio": "a.wav"}],
                                   "targets": ["audio"]}) + "\n"
                       + json.dumps({"id": "long", "segments": [{"text": too_long}, {"audio": "a.wav"}],
                                     "targets": ["audio"]}) + "\n")
    lines = []
    result = evaluate.evaluate_checkpoint(workdir, generate=True, prompts=prompts, max_new_tokens=4, log=lines.append)
    assert result["generate"]["examples"] == 2 and result["generate"]["skipped"] == 1
    assert result["tasks"]["audio"]["n"] == 1
    skipped = [line for line in lines if line.startswith("omni: skipped 1 of 2 examples")]
    assert len(skipped) == 1 and f"{prompts}:2: the prompt has" in skipped[0], lines
    rows = [json.loads(line) for line in (workdir / "eval-4.predictions.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == ["short", "long"] and "skipped" in rows[1] and "codes" not in rows[1]
    assert rows[1]["truth"] == rows[0]["truth"] and "skipped" not in rows[0] and rows[0]["tokens"] <= 4
    saved = json.loads((workdir / "eval-4.json").read_text())
    assert saved["generate"]["skipped"] == 1 and saved["eval"]["loss"] == pytest.approx(result["eval"]["loss"])


# ---------------------------------------------------------------------------------------------------------------
# Absent is not zero; results name the data they measured and another dataset's never replace the run's own.


def _text_only_dataset(root):
    """A dataset with the demo's vocabulary (bytes, tone codec) but no audio at all: audio is absent."""
    from omni.data import dataset
    from omni.data.codec import ToneCodec

    root.mkdir(parents=True, exist_ok=True)
    lines = [{"id": f"t{i}", "segments": [{"text": f"a small caption number {i}"}], "targets": ["text"],
              "split": "eval" if i % 4 == 0 else "train"} for i in range(40)]
    manifest = root / "manifest.jsonl"
    manifest.write_text("".join(json.dumps(line) + "\n" for line in lines))
    report = dataset.BuildReport()
    examples, codec = dataset.manifest_examples(manifest, ToneCodec(), 0.0, report, skip_bad=False)
    dataset.build(examples, root / "textonly", codec, report=report)
    return root / "textonly"


def _tensorboard_tags(folder) -> set:
    """Every scalar tag in the TensorBoard event files under `folder` (read without TensorFlow)."""
    import struct

    from tensorboardX.proto import event_pb2

    tags = set()
    for path in folder.rglob("events.out.tfevents.*"):
        data = path.read_bytes()
        at = 0
        while at < len(data):
            (length,) = struct.unpack("<Q", data[at:at + 8])
            event = event_pb2.Event.FromString(data[at + 12:at + 12 + length])
            tags |= {value.tag for value in event.summary.value}
            at += 12 + length + 4
    return tags


def test_another_dataset_writes_its_own_named_file_and_absent_audio_is_null_not_zero(run, tmp_path):
    workdir, _ = run
    own = evaluate.evaluate_checkpoint(workdir, log=lambda *a: None)
    assert own["data"]["name"] == "demo" and own["data"]["split"] == "eval" and own["data"]["examples"] == 48
    own_text = (workdir / "eval-4.json").read_text()
    other = _text_only_dataset(tmp_path)
    lines = []
    result = evaluate.evaluate_checkpoint(workdir, overrides=[f"data.dataset={other}"], log=lines.append)
    out = workdir / "eval-4-textonly.json"
    assert (workdir / "eval-4.json").read_text() == own_text  # the run's own result is left as it was
    saved = json.loads(out.read_text())
    assert saved["data"] == {"name": str(other), "path": str(other), "split": "eval", "examples": 10,
                             "batches": result["data"]["batches"], "eval_batches": 2}
    assert saved["overrides"] == [f"data.dataset={other}"]
    assert saved["eval"]["loss/audio"] is None and saved["eval"]["acc/audio"] is None
    assert saved["eval"]["tokens/audio"] == 0 and saved["eval"]["loss/text"] > 0
    summary = next(line for line in lines if "held-out loss" in line)
    assert "text " in summary and "audio" not in summary and "0.000" not in summary
    assert any(str(out) in line and "not the run's demo" in line for line in lines)
    # the same dataset spelt another way is the run's own
    assert evaluate.same_dataset(_cfg(str(other)), _cfg(str(other) + "/../textonly"))
    assert not evaluate.same_dataset(_cfg("demo"), _cfg(str(other)))


def _cfg(dataset):
    cfg = tiny_config()
    cfg.data.dataset = dataset
    return cfg


def test_a_modality_absent_from_training_data_is_left_out_of_logs_json_and_tensorboard(tmp_path, capsys):
    cfg = tiny_config()
    cfg.data.dataset = str(_text_only_dataset(tmp_path / "data"))
    cfg.data.seq_len = 64
    cfg.train.steps, cfg.train.log_every, cfg.train.checkpoint_every = 3, 1, 0
    workdir = tmp_path / "run"
    result = loop.train(cfg, workdir, progress=False)
    console = capsys.readouterr().out
    held_out = [line for line in console.splitlines() if "held-out loss" in line]
    assert len(held_out) == 2 and all("text " in line and "audio" not in line for line in held_out), console
    assert result["eval"]["loss/audio"] is None and result["eval"]["tokens/audio"] == 0
    assert json.loads((workdir / "eval.json").read_text())["eval"]["acc/audio"] is None
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    trained = [r for r in rows if "loss/text" in r]
    evals = [r for r in rows if "eval/loss/text" in r]
    assert len(trained) == 3 and len(evals) == 2
    for row in trained:
        assert row["loss/audio"] is None and row["acc/audio"] is None and row["tokens/audio"] == 0
        assert row["loss/text"] > 0
    for row in evals:
        assert row["eval/loss/audio"] is None and row["eval/acc/audio"] is None
    tags = _tensorboard_tags(workdir / "tensorboard")
    assert {"loss/text", "eval/loss/text", "tokens/audio"} <= tags
    assert not {"loss/audio", "acc/audio", "eval/loss/audio", "eval/acc/audio"} & tags


def test_export_shows_its_progress_as_lines_without_a_terminal(run, tmp_path):
    workdir, _ = run
    done = subprocess.run([sys.executable, "-m", "omni.cli", "export", "--workdir", str(workdir), "--out",
                           str(tmp_path / "exported"), "--no-progress"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    line = re.search(r"^export: (\d+)/(\d+) tensor in [\d.]+ s \([\d.]+ tensor/s, MiB ([\d.]+)\)$", done.stdout, re.M)
    assert line and line.group(1) == line.group(2), done.stdout[-2000:]
    tensors = json.loads((tmp_path / "exported" / "config.json").read_text())["export"]["tensors"]
    assert int(line.group(1)) == len(tensors) + 1  # every tensor, then the file
    assert float(line.group(3)) == pytest.approx((tmp_path / "exported" / "model.safetensors").stat().st_size / 2**20,
                                                 abs=0.06)


def test_a_second_eval_process_reads_every_program_from_the_compile_cache(run, tmp_path):
    """Timing-free evidence: the first process compiles and writes entries, the second compiles nothing."""
    workdir, _ = run
    cache = tmp_path / "compiled"
    counts = []
    for _ in range(2):
        done = subprocess.run([sys.executable, "-m", "omni.cli", "eval", "--workdir", str(workdir),
                               "--set", f"compile_cache={cache}"], capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        line = next(line for line in done.stdout.splitlines() if line.startswith(f"omni: compile cache {cache}:"))
        counts.append(tuple(map(int, re.findall(r"(\d+) (?:program|compiled)", line))))
        if len(counts) == 1:
            entries = sorted(p.name for p in cache.iterdir())
    (hits1, misses1), (hits2, misses2) = counts
    assert hits1 == 0 and misses1 > 0
    assert any(name.startswith("jit_eval_fn-") for name in entries) and len(entries) == misses1  # one per program
    assert (hits2, misses2) == (misses1, 0)  # every program the first process compiled, read back
    assert sorted(p.name for p in cache.iterdir()) == entries  # and nothing new written


def test_compile_cache_setting(monkeypatch, tmp_path):
    from omni.train import compile_cache

    monkeypatch.delenv("OMNI_COMPILE_CACHE", raising=False)
    monkeypatch.setenv("OMNI_CACHE", str(tmp_path))
    assert compile_cache.folder_for("auto") == tmp_path / "jax-compile"
    assert compile_cache.folder_for("off") is None
    assert compile_cache.folder_for(str(tmp_path / "x")) == tmp_path / "x"
    monkeypatch.setenv("OMNI_COMPILE_CACHE", "off")
    assert compile_cache.folder_for(str(tmp_path / "x")) is None
