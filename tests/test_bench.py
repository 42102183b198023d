"""`omni bench` on CPU: the figures it prints are consistent with each other and with the FLOP formula."""

import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh

from omni import config as config_lib
from omni.batch import AUDIO, IMAGE, TEXT, check_batch
from omni.config import derived_head_dim, derived_mlp
from omni.tools import bench, reference
from omni.train.perf import compiled_stats


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


def _tiny_reference_config(layers=2, scan=True):
    """d 64, `layers` layers, seq 128, batch 8 (one row per test device), float32, vocab 4096."""
    cfg = config_lib.load_config("configs/bench/omni_cpu.py")
    cfg.model.d, cfg.model.layers, cfg.model.scan_layers = 64, layers, scan
    cfg.data.seq_len = 128
    return cfg


def test_reference_prints_omni_reference_and_their_ratios_and_compile_only_matches(tmp_path):
    cfg = _tiny_reference_config()
    kw = dict(warmup=0, steps=1, vocab_size=4096, codebooks=2, codebook_size=256)
    omni_line, ref, ratios = bench.run(cfg, reference=True, out=tmp_path / "b.jsonl", **kw)
    assert [omni_line["what"], ref["what"], ratios["what"]] == ["bench", "reference", "ratios"]
    saved = [json.loads(line) for line in (tmp_path / "b.jsonl").read_text().splitlines()]
    assert saved == json.loads(json.dumps([omni_line, ref, ratios]))
    for name, field in bench.RATIOS.items():
        assert ratios[name] == pytest.approx(omni_line[field] / ref[field]), name
    for line in (omni_line, ref):
        assert line["step_time_s"] > 0 and np.isfinite(line["loss"]) and line["compile_only"] is False
        assert line["kernels_per_step"] >= line["dot_kernels_per_step"] > 0 and line["bytes_per_step"] > 0
        assert line["compiled_peak_memory_gib"] > 0 and line["loop_trip_counts"] == [2, 2]  # forward, backward scan
    # The same arithmetic: both count the same weight matmuls, attention and unembedding.
    assert ref["matmul_params"] == omni_line["matmul_params"]
    assert ratios["flops_ratio"] == pytest.approx(1.0, abs=0.05)

    # --compile-only: nothing runs, the compiled figures are the ones of the run above.
    compiled = bench.run(cfg, reference=True, compile_only=True, **kw)
    for got, ran in zip(compiled, (omni_line, ref)):
        assert got["compile_only"] is True and got["step_time_s"] is None and got["loss"] is None
        assert got["mfu"] is None and got["matmul_peak_tflops"] is None and got["timed_steps"] == 0
        for field in ("flops_per_step", "bytes_per_step", "kernels_per_step", "dot_kernels_per_step",
                      "xla_cost_flops", "compiled_peak_memory_gib", "params"):
            assert got[field] == ran[field], field
    assert compiled[2]["step_time_ratio"] is None and compiled[2]["kernels_ratio"] == ratios["kernels_ratio"]


def _reference_compiled(layers: int, scan: bool, vocab: int = 4096) -> tuple[dict, int]:
    """The reference's compile-only line at the tiny size on one device, batch 2, and its matmul params."""
    cfg = _tiny_reference_config(layers, scan)
    cfg.train.batch_size = 2
    mesh = Mesh(np.array(jax.devices()[:1]), ("data",))
    line = bench.run_reference(cfg, mesh, vocab, warmup=0, steps=0, peak=None, sheet=None, matmul_size=None,
                               compile_only=True)
    return line, reference.matmul_params(cfg, vocab)


def test_reference_compiled_flops_match_the_hand_count_and_grow_linearly_with_layers():
    m = _tiny_reference_config().model
    results = {}
    for layers in (2, 4):
        for scan in (True, False):
            line, matmuls = _reference_compiled(layers, scan)
            results[layers, scan] = line
            b, t = line["batch"]
            # 6 x matmul params x tokens, and attention as XLA computes it: the whole [T, T] square (the causal
            # half masked, not skipped): QK^T and AV forward (2 x 2 T^2 x heads x head_dim), twice that backward.
            hand = 6 * matmuls * b * t + 12 * layers * b * t * t * m.heads * derived_head_dim(m)
            # A scan also computes the first layer's input gradient, which the unrolled program drops.
            assert hand * 0.95 <= line["flops_per_step"] <= hand * 1.1, (layers, scan, line["flops_per_step"] / hand)
        # Unrolled (no loop), our count from the HLO agrees with XLA's cost analysis (which adds elementwise work).
        unrolled = results[layers, False]
        assert unrolled["loop_trip_counts"] == [] and results[layers, True]["loop_trip_counts"] == [layers, layers]
        assert unrolled["flops_per_step"] <= unrolled["xla_cost_flops"] <= 1.1 * unrolled["flops_per_step"]  # + elementwise
        assert unrolled["xla_cost_bytes"] == pytest.approx(unrolled["bytes_per_step"], rel=0.1)
    # Linear in layers: f(2) - f(0) = f(4) - f(2), f(0) (unembedding and loss alone) = 6 x d x vocab x tokens.
    f2, f4 = results[2, True]["flops_per_step"], results[4, True]["flops_per_step"]
    b, t = results[2, True]["batch"]
    assert 2 * f2 - f4 == pytest.approx(6 * m.d * 4096 * b * t, rel=0.05)
    assert results[4, True]["kernels_per_step"] > results[2, True]["kernels_per_step"]


def test_hlo_step_counts_weight_loop_bodies_by_their_trip_count():
    def f(w, x):
        return jax.lax.scan(lambda h, wi: (jnp.tanh(h @ wi), None), x, w)[0].sum()

    stats = {}
    for layers in (2, 4):
        stats[layers] = compiled_stats(jax.jit(f).lower(jnp.ones((layers, 128, 128)), jnp.ones((32, 128))).compile())
        assert stats[layers]["flops_per_step"] == 2 * 32 * 128 * 128 * layers  # the matmuls, every iteration
        assert stats[layers]["loop_trip_counts"] == [layers]
        assert stats[layers]["compiled_peak_memory_gib"] > 0
    assert stats[2]["xla_cost_flops"] == pytest.approx(stats[4]["xla_cost_flops"], rel=0.01)  # XLA: body once
    body = (stats[4]["kernels_per_step"] - stats[2]["kernels_per_step"]) / 2  # kernels per iteration
    assert body >= 2 and stats[2]["kernels_per_step"] - 2 * body >= 0
