"""`omni bench` on CPU: the figures it prints are consistent with each other and with the FLOP formula."""

import json
import subprocess
import sys

import numpy as np
import pytest

from omni import config as config_lib
from omni.batch import AUDIO, IMAGE, TEXT, check_batch
from omni.config import derived_head_dim, derived_mlp
from omni.tools import bench


def _small():
    cfg = config_lib.load_config("configs/bench/omni_cpu.py")
    cfg.model.d, cfg.model.layers = 64, 2  # batch 8 over the test process's 8 devices
    return cfg


def test_synthetic_batch_packs_all_three_modalities_in_their_shares():
    cfg = config_lib.load_config("configs/bench/omni_1b.py")  # only the data side: no model is built
    vocab = bench.bench_vocab(32768, 8, 1024)
    batch = bench.synthetic_batch(cfg, vocab, np.random.default_rng(0))
    check_batch(batch, cfg.data.seq_len, cfg.data.patch_size**2 * 3)
    shares = bench.modality_shares(batch)
    assert shares["pad"] < 0.05 and shares["image"] > 0.15 and shares["audio"] > 0.15 and shares["text"] > 0.15
    assert not batch["is_target"][batch["modality"] == IMAGE].any()
    assert batch["is_target"][batch["modality"] == AUDIO].any() and batch["is_target"][batch["modality"] == TEXT].any()
    for row in batch["segment_ids"]:  # segments numbered 1, 2, ... in order, padding (0) only at the end
        used = row[row > 0]
        assert used[0] == 1 and np.all(np.diff(used) >= 0) and np.all(np.diff(used) <= 1)
        assert np.all(row[len(used):] == 0)
    assert bench.attention_in_segments({"segment_ids": np.array([[1, 1, 2, 0], [1, 1, 1, 1]])}) == pytest.approx((4 + 1 + 16) / 32, abs=1e-4)
    text_only = bench.modality_shares(bench.synthetic_batch(cfg, vocab, np.random.default_rng(0), text_only=True))
    assert text_only["image"] == 0 and text_only["audio"] == 0


@pytest.mark.parametrize("text_only", [False, True])
def test_bench_figures_agree_with_each_other_and_the_flop_formula(tmp_path, text_only):
    cfg = _small()
    result = bench.run(cfg, text_only=text_only, warmup=1, steps=2, vocab_size=4096, codebooks=2,
                       codebook_size=256, out=tmp_path / "bench.jsonl")
    b, l = result["batch"]
    m = cfg.model
    hand = 6 * (m.layers * (4 * m.d * m.heads * derived_head_dim(m) + 3 * m.d * derived_mlp(m)) + m.d * 4096) \
        + 6 * m.layers * l * m.heads * derived_head_dim(m)
    assert result["vocab"] == 4096 and result["flops_per_token"] == hand
    assert result["tokens_per_s"] == pytest.approx(b * l / result["step_time_s"])
    assert result["tflops_per_s"] == pytest.approx(hand * b * l / result["step_time_s"] / 1e12)
    assert result["mfu"] == pytest.approx(result["tflops_per_s"] / result["matmul_peak_tflops"])
    assert 0 < result["mfu"] < 1.5 and result["compile_s"] > 0 and np.isfinite(result["loss"])
    assert (result["positions"]["image"] == 0) == text_only
    assert result["attention"] == "xla" and 1 <= result["segments_per_row"] <= result["max_segments"]
    assert 0 < result["attention_in_segments"] <= 1
    saved = [json.loads(line) for line in (tmp_path / "bench.jsonl").read_text().splitlines()]
    assert saved == [json.loads(json.dumps(result))]


# The accelerator hosts this benchmark runs on have jax/flax/optax/orbax but not grain, tensorflow-datasets or
# tensorboardX: the CLI must get through `omni bench` without importing any of them.
_WITHOUT_PIPELINE_PACKAGES = """
import sys
BLOCKED = ("grain", "tensorflow_datasets", "tensorflow", "tensorboardX", "array_record")
class Blocked:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"{name} is not installed on this host")
sys.meta_path.insert(0, Blocked())
from omni.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_bench_cli_prints_one_json_line_without_grain_tfds_or_tensorboardx(tmp_path):
    out = tmp_path / "b.jsonl"
    result = subprocess.run([sys.executable, "-c", _WITHOUT_PIPELINE_PACKAGES, "bench",
                             "--config", "configs/bench/omni_cpu.py", "--set", "model.layers=1",
                             "--steps", "1", "--warmup", "0", "--vocab", "2048", "--codebooks", "1",
                             "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
    assert len(lines) == 1 and json.loads(lines[0])["what"] == "bench"
    assert json.loads(out.read_text()) == json.loads(lines[0])
