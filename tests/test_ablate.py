"""`omni ablate`: the plan is fair (same data, tokens, eval; only fusion, width and seed differ), widths are
matched as asked, the runner resumes after a kill without redoing finished runs, and the reports hold every
variant with the right aggregates."""

import csv
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from omni import config as config_lib
from omni.batch import patch_dim
from omni.config import ConfigError
from omni.data import pipeline as data
from omni.model.counting import flops_per_token, param_total
from omni.tools import ablate
from tests.conftest import tiny_config

VARIANTS = ["early", "late:1", "cross"]
PLAN_VARIANTS = ["early", "late:1", "mot", "cross"]  # planned only, never trained here


def _base(match="none", variants=VARIANTS):
    cfg = tiny_config()
    cfg.model.encoder_layers = 1
    cfg.ablate.variants = list(variants)
    cfg.ablate.match = match
    return cfg


def _sizes(cfg):
    return data.vocab_for(cfg).size, patch_dim(cfg.data)


def test_plan_changes_only_fusion_width_and_seed():
    base = _base("flops", PLAN_VARIANTS)
    runs = ablate.make_plan(base, *_sizes(base), seeds=2)
    assert [r.name for r in runs] == ["early-s0", "early-s1", "late1-s0", "late1-s1", "mot-s0", "mot-s1", "cross-s0",
                                      "cross-s1"]
    for run in runs:
        changed = config_lib.changed_keys(config_lib.to_dict(base), config_lib.to_dict(run.config))
        allowed = {"name", "model.fusion", "model.late_layers", "model.d", "model.mlp", "train.seed"}
        assert set(changed) <= allowed, changed  # same data, order, steps, batch, eval, optimizer
        assert run.config.train.seed == base.train.seed + run.seed
    assert {(r.config.model.fusion, r.config.model.late_layers) for r in runs} == {("early", 0), ("late", 1),
                                                                                   ("mot", 0), ("cross", 0)}


@pytest.mark.parametrize("match", ["flops", "params"])
def test_matched_width_is_the_closest_candidate(match):
    base = _base(match, PLAN_VARIANTS)
    vocab_size, patch_dim = _sizes(base)
    runs = {r.variant: r.config for r in ablate.make_plan(base, vocab_size, patch_dim, seeds=1)}
    assert runs["early"].model.d == base.model.d  # the reference keeps its width

    def measure(cfg):
        m = cfg.model
        return param_total(m, vocab_size, patch_dim) if match == "params" else flops_per_token(
            m, vocab_size, cfg.data.seq_len)

    target = measure(runs["early"])
    for variant in ("late:1", "mot", "cross"):
        chosen = runs[variant]
        error = abs(measure(chosen) - target)
        for d in range(8, 4 * base.model.d + 1, 8):  # every other width (MLP in proportion) is no closer
            trial = ablate.variant_config(base, variant)
            trial.model.d, trial.model.mlp = d, max(8, round(64 * d / 32 / 8) * 8)
            assert abs(measure(trial) - target) >= error
    if match == "params":  # late:1 has 3 copies of its first layer, mot of every layer: they must get narrower
        assert runs["mot"].model.d <= runs["late:1"].model.d < base.model.d  # (the same step of 8 at this size)
    else:  # same FLOPs per token at the same width
        assert runs["late:1"].model.d == runs["mot"].model.d == base.model.d


def test_plan_from_another_config_is_refused(tmp_path):
    base = _base()
    runs = ablate.make_plan(base, *_sizes(base), seeds=1)
    ablate._check_and_save_plan(tmp_path, runs, base)
    ablate._check_and_save_plan(tmp_path, runs, base)  # the same plan again: fine
    more = ablate.make_plan(base, *_sizes(base), seeds=2)
    ablate._check_and_save_plan(tmp_path, more, base)  # more seeds extend it
    base.train.lr = 1e-2
    with pytest.raises(ConfigError, match=r"early-s0 differs in train\.lr"):
        ablate._check_and_save_plan(tmp_path, ablate.make_plan(base, *_sizes(base), seeds=1), base)
    with pytest.raises(ConfigError, match="twice"):
        ablate.make_plan(config_lib.apply_overrides(_base(), ["ablate.variants=['late:1', 'late:1']"]), *_sizes(base))


def _row(variant, seed, text, audio, speed, caption):
    fusion, k = config_lib.parse_variant(variant)
    return {"variant": variant, "label": variant, "size": "", "fusion": fusion, "k": k, "seed": seed, "d": 32,
            "params": 1000 + k,
            "flops_per_token": 2e6, "tokens_per_s": speed, "eval_loss_text": text, "eval_loss_audio": audio,
            "demo_caption_exact": caption,
            "curve": [(0, {"text": 6.0, "audio": 6.0}), (1024, {"text": text, "audio": audio})]}


def test_report_aggregates_over_seeds(tmp_path):
    base = _base()
    runs = ablate.make_plan(base, *_sizes(base), seeds=2)
    rows = [_row("early", 0, 1.0, 2.0, 100.0, 0.5), _row("early", 1, 3.0, 2.0, 300.0, 0.7),
            _row("late:1", 0, 0.5, 0.25, 90.0, 0.9), _row("late:1", 1, 0.5, 0.75, 110.0, 0.9),
            _row("cross", 0, 4.0, 4.0, 50.0, 0.0)]  # cross-s1 unfinished
    ablate.write_report(tmp_path, runs, rows, base)
    table = {line.split(" | ")[0].strip("| "): line.split(" | ")
             for line in (tmp_path / "ablation.md").read_text().splitlines() if line.startswith("| ")}
    assert table["early"][5:8] == ["200 ± 141", "2 ± 1.41", "2 ± 0"]  # tokens/s, text, audio: mean ± stdev
    assert table["late:1"][6:9] == ["0.5 ± 0", "0.5 ± 0.354", "90.0% ± 0.0% |"]
    assert table["cross (1 of 2 seeds)"][6] == "4"  # a single finished seed: its value, flagged
    with open(tmp_path / "ablation.csv") as f:
        assert [(r["variant"], r["seed"]) for r in csv.DictReader(f)] == [(r["variant"], str(r["seed"])) for r in rows]
    assert (tmp_path / "ablation.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_shows_a_modality_without_targets_as_absent_never_zero(tmp_path):
    base = _base()
    runs = ablate.make_plan(base, *_sizes(base), seeds=1)
    rows = [_row("early", 0, 1.0, None, 100.0, 0.5), _row("late:1", 0, 0.5, None, 90.0, 0.9)]
    for row in rows:
        row["curve"] = [(0, {"text": 6.0, "audio": None}), (1024, {"text": row["eval_loss_text"], "audio": None})]
    ablate.write_report(tmp_path, runs, rows, base)
    table = {line.split(" | ")[0].strip("| "): line.split(" | ")
             for line in (tmp_path / "ablation.md").read_text().splitlines() if line.startswith("| ")}
    assert table["early"][6:8] == ["1", "absent"] and table["late:1"][6:8] == ["0.5", "absent"]
    with open(tmp_path / "ablation.csv") as f:
        assert [r["eval_loss_audio"] for r in csv.DictReader(f)] == ["", ""]
    assert (tmp_path / "ablation.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_sweep_plan_keeps_data_order_and_token_budget():
    base = config_lib.apply_overrides(_base("flops"), ["ablate.sweep={'model.d': [32, 48, 64, 96]}"])
    runs = ablate.make_plan(base, *_sizes(base), seeds=2)
    assert len(runs) == 4 * 3 * 2
    assert [r.name for r in runs[:3]] == ["early-d32-s0", "early-d32-s1", "late1-d32-s0"]
    assert [r.size for r in runs[::6]] == ["d=32", "d=48", "d=64", "d=96"]
    tokens = {r.config.train.steps * r.config.train.batch_size * r.config.data.seq_len for r in runs}
    assert tokens == {base.train.steps * base.train.batch_size * base.data.seq_len}  # budget 'fixed'
    for run in runs:
        assert config_lib.to_dict(run.config)["data"] == config_lib.to_dict(base)["data"]  # same data, same order
        changed = config_lib.changed_keys(config_lib.to_dict(base), config_lib.to_dict(run.config))
        assert set(changed) <= {"name", "model.fusion", "model.late_layers", "model.d", "model.mlp", "train.seed"}
        if run.variant == "early":
            assert f"d={run.config.model.d}" == run.size  # the reference has the point's size
    # the others are matched to the reference of their own size: late:1 at the same width, cross narrower
    for size in ("d=32", "d=96"):
        at = {r.variant: r.config.model.d for r in runs if r.size == size and r.seed == 0}
        assert at["late:1"] == at["early"] and at["cross"] < at["early"]

    rule = config_lib.apply_overrides(base, ["ablate.budget=tokens_per_param", "ablate.tokens_per_param=2.5"])
    vocab_size, pd = _sizes(base)
    runs = ablate.make_plan(rule, vocab_size, pd, seeds=1)
    steps = {}
    for run in runs:
        steps.setdefault(run.size, set()).add(run.config.train.steps)
    assert all(len(s) == 1 for s in steps.values())  # one budget for every variant of a size
    per_step = base.train.batch_size * base.data.seq_len
    for run in (r for r in runs if r.variant == "early"):
        expected = -(-2.5 * param_total(run.config.model, vocab_size, pd) // per_step)
        assert run.config.train.steps == expected
    ordered = [next(iter(steps[f"d={d}"])) for d in (32, 48, 64, 96)]
    assert ordered == sorted(ordered) and ordered[0] < ordered[-1]


@pytest.mark.parametrize("sweep, message", [
    ("{'model.dd': [32, 64]}", "model.dd"),
    ("{'model.d': [32, 64], 'model.layers': [2]}", "different lengths"),
    ("{'model.fusion': ['early', 'late']}", "cannot move 'model.fusion'"),
    ("{'model.d': 32}", "needs a non-empty list"),
    ("{'model.d': ['wide']}", "model.d"),
    ("{'model.d': [32, 32]}", "a point twice"),
])
def test_bad_sweeps_name_the_key(sweep, message):
    base = config_lib.apply_overrides(_base(), [f"ablate.sweep={sweep}"])
    with pytest.raises(ConfigError, match=message):
        ablate.make_plan(base, *_sizes(base), seeds=1)


def test_both_matchings_plan_each_variant_matched_each_way():
    both = _base("both")
    runs = ablate.make_plan(both, *_sizes(both), seeds=1)
    assert [(r.name, r.label) for r in runs] == [
        ("early-s0", "early"), ("late1-flops-s0", "late:1 @flops"), ("late1-params-s0", "late:1 @params"),
        ("cross-flops-s0", "cross @flops"), ("cross-params-s0", "cross @params")]
    for match in ("flops", "params"):
        single = {r.variant: r.config.model for r in ablate.make_plan(_base(match), *_sizes(both), seeds=1)}
        for run in runs[1:]:
            if run.match == match:
                assert run.config.model == single[run.variant], run.label


def test_scaling_report_fits_curves_and_compute_ratios(tmp_path):
    base = config_lib.apply_overrides(_base(), ["ablate.sweep={'model.d': [32, 48, 64, 96]}",
                                                "ablate.variants=['early', 'late:1']"])
    runs = ablate.make_plan(base, *_sizes(base), seeds=2)
    rows = []
    for run in runs:  # early: L = 1 + 2 (C / 1e9)^-0.5; late:1 reaches each loss with half the compute
        compute = 1e9 * {"d=32": 1, "d=48": 3, "d=64": 10, "d=96": 30}[run.size]
        effective = compute * (2 if run.variant == "late:1" else 1) * (1 + 0.01 * run.seed)
        loss = 1 + 2 * (effective / 1e9) ** -0.5
        rows.append({**_row(run.variant, run.seed, loss, None, 100.0, 0.5), "label": run.label, "size": run.size,
                     "train_flops": compute})
    ablate.write_report(tmp_path, runs, rows, base)
    report = (tmp_path / "ablation.md").read_text()
    cells = [[c.strip() for c in line.strip().strip("|").split("|")]
             for line in report.split("## Scaling")[1].splitlines() if line.startswith("| ") and "---" not in line]
    scaling_rows = {tuple(c[:2]): c[2:] for c in cells}
    # sizes, E, A, alpha, fit, pooled ratio, per-seed ratio
    assert scaling_rows[("early", "text")] == ["4", "1", "2", "0.5", "fitted", "1 (reference)", ""]
    late = scaling_rows[("late:1", "text")]
    assert late[:5] == ["4", "1", "1.41", "0.5", "fitted"]  # A / sqrt(2): the same curve at half the compute
    assert float(late[5]) == pytest.approx(0.5, rel=1e-3)
    assert float(late[6].split(" ± ")[0]) == pytest.approx(0.5, rel=1e-3)
    assert ("early", "audio") not in scaling_rows  # no audio losses: no fit drawn at 0
    assert (tmp_path / "scaling.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    few = [r for r in rows if r["size"] != "d=96"]  # 3 sizes: reported as unsupported, with the reason
    ablate.write_report(tmp_path, runs, few, base)
    assert "not supported: too few sizes (3 < 4)" in (tmp_path / "ablation.md").read_text()


def test_a_sweep_survives_the_saved_config():
    base = config_lib.apply_overrides(_base(), ["ablate.sweep={'model.d': [32, 48], 'model.layers': [2, 3]}"])
    again = config_lib.from_dict(json.loads(json.dumps(config_lib.to_dict(base))))
    assert again.ablate.sweep == {"model.d": [32, 48], "model.layers": [2, 3]}
    assert [r.size for r in ablate.make_plan(again, *_sizes(base), seeds=1)][::3] == ["d=32 layers=2", "d=48 layers=3"]


def test_cli_sweep_values():
    from omni.cli import _sweep

    assert _sweep(["model.d=64,96", "model.layers=2, 4"]) == {"model.d": [64, 96], "model.layers": [2, 4]}
    with pytest.raises(ConfigError, match="KEY=V1,V2"):
        _sweep(["model.d"])


def _omni_ablate(config: Path, workdir: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "omni.cli", "ablate", "--config", str(config), "--workdir",
                             str(workdir), "--no-progress"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


@pytest.mark.slow
def test_runner_resumes_after_a_kill_without_redoing_finished_runs(tmp_path):
    cfg = _base("flops")
    cfg.train.steps, cfg.train.eval_every, cfg.train.checkpoint_every, cfg.demo.scored_examples = 16, 8, 4, 4
    config_path = tmp_path / "ablate.json"
    config_lib.save_config(cfg, config_path)
    workdir = tmp_path / "ablate"

    proc = _omni_ablate(config_path, workdir)
    second = workdir / "runs" / "late1-s0" / "checkpoints"
    deadline = time.time() + 240
    while not (second.exists() and any(p.name.isdigit() for p in second.iterdir())):
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[0][-3000:]
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)  # mid-way through the second variant
    proc.wait()
    first_eval = workdir / "runs" / "early-s0" / "eval.json"
    finished_at = first_eval.stat().st_mtime_ns
    assert not (workdir / "runs" / "late1-s0" / "eval.json").exists()
    with open(workdir / "ablation.csv") as f:  # the report after the first run was already written
        assert [r["variant"] for r in csv.DictReader(f)] == ["early"]

    out, _ = _omni_ablate(config_path, workdir).communicate(timeout=400)
    assert "early-s0: finished earlier, skipped" in out, out[-3000:]
    assert "resumed from" in out and "late1-s0/checkpoints" in out, out[-3000:]
    assert first_eval.stat().st_mtime_ns == finished_at  # not trained again
    with open(workdir / "ablation.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["variant"] for r in rows] == VARIANTS
    for row in rows:
        assert int(row["tokens"]) == 16 * 8 * 128 and float(row["tokens_per_s"]) > 0
        assert 0 < float(row["eval_loss_text"]) < 6 and 0 < float(row["eval_loss_audio"]) < 6  # they learned
        assert "demo_caption_exact" in row
    markdown = (workdir / "ablation.md").read_text()
    for variant in VARIANTS:
        assert f"| {variant} |" in markdown
    plan = json.loads((workdir / "plan.json").read_text())
    assert sorted(plan["runs"]) == ["cross-s0", "early-s0", "late1-s0"]
    assert (workdir / "ablation.png").stat().st_size > 10_000


def test_report_carries_task_scores_of_any_dataset(tmp_path):
    """A run on a non-demo dataset ends with omni eval --generate's scores per group: the report gets exact and
    CER for text answers and code accuracy for audio ones (task_* columns); a demo run keeps its demo_* ones."""
    base = _base()
    runs = ablate.make_plan(base, *_sizes(base), seeds=1)[:2]
    general = {"text": {"n": 4, "exact": 0.25, "cer": 0.5, "wer": 0.75},
               "audio": {"n": 2, "code_acc": [0.5, 0.7], "code_acc_mean": 0.6, "frames_diff": 1.0}}
    demo = {"caption": {"n": 4, "exact": 0.75, "cer": 0.1, "shape": 0.75},
            "synth": {"n": 4, "pitch_acc": 1.0, "code_acc": [1.0, 0.5], "code_acc_mean": 0.75}}
    for run, tasks in zip(runs, (general, demo)):
        run_dir = tmp_path / "runs" / run.name
        run_dir.mkdir(parents=True)
        losses = {f"{k}/{m}": 1.0 for k in ("loss", "acc") for m in ("text", "audio")}
        (run_dir / "eval.json").write_text(json.dumps({"step": 2, "eval": losses, "demo_tasks": tasks}))
    rows = ablate.collect(tmp_path, runs, *_sizes(base))
    assert {k: v for k, v in rows[0].items() if k.startswith("task_")} == {
        "task_audio_code_acc_mean": 0.6, "task_text_exact": 0.25, "task_text_cer": 0.5}
    assert {k: v for k, v in rows[1].items() if k.startswith(("task_", "demo_"))} == {
        "demo_caption_exact": 0.75, "demo_caption_cer": 0.1, "demo_synth_pitch_acc": 1.0}
    ablate.write_report(tmp_path, runs, rows, base)
    header = next(line for line in (tmp_path / "ablation.md").read_text().splitlines() if line.startswith("| variant"))
    assert header.endswith("| audio code acc | text exact | text cer | caption exact | caption cer | synth pitch acc |")
