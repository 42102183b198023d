"""Phases outside the step loop under several processes: every process runs the same collectives, and one that
cannot complete ends the job with a message naming the phase instead of hanging."""

import json
import subprocess
import sys
import time

import pytest

from omni import config as config_lib
from tests.conftest import tiny_config

BOUNDED = """
import time
from omni.train import distributed
with distributed.bounded("the end-of-run eval", 1.0, processes=2):
    time.sleep(60)
"""


def test_a_phase_that_never_completes_ends_the_process_naming_it():
    start = time.monotonic()
    result = subprocess.run([sys.executable, "-c", BOUNDED], capture_output=True, text=True, timeout=60)
    assert result.returncode == 3 and time.monotonic() - start < 30
    assert "omni: error: the end-of-run eval did not finish within 1 s on process 0 of 2" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_processes_with_different_eval_batch_counts_finish_the_run(tmp_path):
    """Process 0 holds the long eval examples (4 batches), process 1 the short ones (1 batch): every eval still
    runs the same number of collective steps on both."""
    lines = [{"segments": [{"text": f"short train line {i}"}], "targets": ["text"], "split": "train"}
             for i in range(16)]
    for i in range(8):  # eval examples [p::2]: the even ones (process 0) fill two rows each, the odd ones a few tokens
        text = f"long eval line {i} " * 6 if i % 2 == 0 else f"e{i}"
        lines.append({"segments": [{"text": text}], "targets": ["text"], "split": "eval", "id": f"eval-{i}"})
    manifest = tmp_path / "manifest.jsonl"
    manifest.write_text("".join(json.dumps(line) + "\n" for line in lines))
    build = subprocess.run([sys.executable, "-m", "omni.cli", "data", "build", "--manifest", str(manifest),
                            "--out", str(tmp_path / "ds")], capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr
    cfg = tiny_config()
    cfg.data.dataset, cfg.data.seq_len, cfg.train.batch_size = str(tmp_path / "ds"), 64, 4
    cfg.train.steps, cfg.train.log_every, cfg.train.checkpoint_every = 2, 1, 0
    config = tmp_path / "config.json"
    config_lib.save_config(cfg, config)
    run = subprocess.run([sys.executable, "-m", "omni.cli", "launch", "local", "--processes", "2",
                          "--devices-per-process", "2", "--", "train", "--config", str(config), "--workdir",
                          str(tmp_path / "run"), "--no-progress", "--set", "train.phase_timeout_s=120"],
                         capture_output=True, text=True, timeout=400)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
    assert "omni: step 2 held-out loss" in run.stdout
    assert json.loads((tmp_path / "run" / "eval.json").read_text())["eval"]["tokens/target"] > 0
