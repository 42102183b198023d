"""`omni ablate`: early vs late vs cross fusion, trained alike and reported side by side.

    omni ablate --config configs/ablate_fusion.py --workdir runs/ablate [--seeds 3] [--set ablate.match=params]

The plan comes from the config's `ablate` section. Every variant x seed is one ordinary training run (omni.train)
in <workdir>/runs/<variant>-s<seed>, built from the same base config, so every run has

    the same data order   same corpus, same data.shuffle_seed and packing: the same batches in the same order
    the same token budget train.steps x train.batch_size x data.seq_len positions
    the same eval set     the held-out split, evaluated every train.eval_every steps and at the end
    its seed              train.seed + i for seed i (parameter init); seeds are part of the plan

and differs only in model.fusion / model.late_layers and, with ablate.match, in width: 'params' or 'flops'
picks for each variant the model.d (a multiple of 2 x heads; SwiGLU size scaled in proportion) whose total
parameters or training FLOPs per token (omni.model.counting.flops_per_token, the training logs' formula) come closest
to the reference variant's (the first one, at the config's width). The plan is printed and saved to plan.json.

Re-running the same command resumes: finished runs (their eval.json exists) are skipped, an interrupted run
resumes from its last checkpoint like `omni train` does. A plan.json from another config is refused.

Outputs in the workdir, rewritten after every finished run:

    ablation.csv   one row per run: variant, k, seed, width, params, FLOPs/token, tokens/s (median over the
                   logged intervals), final eval loss / accuracy per target modality, task scores of the
                   generated answers at the end of each run: the demo tasks' (demo_*) on a demo corpus, else
                   those of `omni eval --generate` on ablate.task_examples held-out examples (task_<group>_*:
                   exact match and CER for text, code accuracy for audio)
    ablation.md    the same per variant as mean ± std over seeds (std over runs, ddof 1), with the plan
    ablation.png   eval loss per modality against tokens seen, the mean over seeds per variant, shaded from
                   the lowest to the highest seed
"""

from __future__ import annotations

import copy
import csv
import dataclasses
import json
import statistics
import time
from pathlib import Path

from omni import batch
from omni import config as config_lib
from omni.batch import TARGET_MODALITIES
from omni.config import Config, ConfigError, derived_mlp, parse_variant
from omni.model.counting import flops_per_token, matmul_params, param_total
from omni.train import workdir as workdir_lib
from omni.train.metrics import read_metrics


@dataclasses.dataclass
class Run:
    name: str       # folder under <workdir>/runs, e.g. "late2-s0"
    variant: str    # as in ablate.variants, e.g. "late:2"
    seed: int       # index into the plan's seeds (train.seed = base seed + this)
    config: Config


def variant_name(variant: str) -> str:
    fusion, k = parse_variant(variant)
    return f"late{k}" if fusion == "late" else fusion


def variant_config(base: Config, variant: str) -> Config:
    cfg = copy.deepcopy(base)
    cfg.model.fusion, cfg.model.late_layers = parse_variant(variant)
    return cfg


def _measures(cfg: Config, vocab_size: int, patch_dim: int) -> dict:
    m = cfg.model
    return {"params": param_total(m, vocab_size, patch_dim), "flops": flops_per_token(m, vocab_size, cfg.data.seq_len),
            "matmul_params": matmul_params(m, vocab_size)}


def match_width(cfg: Config, reference: Config, match: str, vocab_size: int, patch_dim: int) -> Config:
    """cfg with the model.d (and proportional model.mlp) whose params / FLOPs per token come closest to the
    reference's; the reference's own width when nothing is closer."""
    if match == "none":
        return cfg
    key = "params" if match == "params" else "flops"
    target = _measures(reference, vocab_size, patch_dim)[key]
    ref = reference.model
    step = 8 if ref.head_dim else 2 * ref.heads  # keep d // heads an even head size
    ref_mlp = derived_mlp(ref)
    best, best_error = None, None
    for d in range(step, 4 * ref.d + 1, step):
        trial = copy.deepcopy(cfg)
        trial.model.d = d
        trial.model.mlp = max(8, round(ref_mlp * d / ref.d / 8) * 8)  # the reference's MLP ratio
        error = abs(_measures(trial, vocab_size, patch_dim)[key] - target)
        if best_error is None or error < best_error:
            best, best_error = trial, error
    same_width = copy.deepcopy(cfg)
    if abs(_measures(same_width, vocab_size, patch_dim)[key] - target) <= best_error:
        return same_width  # the reference width (with its own derived SwiGLU size) is as close as any
    return best


def make_plan(base: Config, vocab_size: int, patch_dim: int, seeds: int | None = None) -> list[Run]:
    """Every variant x seed of base.ablate, widths matched as base.ablate.match asks."""
    config_lib.validate(base)
    seeds = base.ablate.seeds if seeds is None else seeds
    if seeds <= 0:
        raise ConfigError(f"--seeds must be positive, got {seeds}")
    names = [variant_name(v) for v in base.ablate.variants]
    if len(set(names)) != len(names):
        raise ConfigError(f"'ablate.variants' lists a variant twice: {base.ablate.variants}")
    reference = variant_config(base, base.ablate.variants[0])
    runs = []
    for variant, name in zip(base.ablate.variants, names):
        cfg = match_width(variant_config(base, variant), reference, base.ablate.match, vocab_size, patch_dim)
        for seed in range(seeds):
            run_cfg = copy.deepcopy(cfg)
            run_cfg.train.seed = base.train.seed + seed
            run_cfg.name = f"{base.name}/{name}-s{seed}"
            config_lib.validate(run_cfg)
            runs.append(Run(f"{name}-s{seed}", variant, seed, run_cfg))
    return runs


def describe_plan(runs: list[Run], base: Config, vocab_size: int, patch_dim: int) -> str:
    tc, seq = base.train, base.data.seq_len
    lines = [f"ablation plan: {len({r.variant for r in runs})} variants x {len({r.seed for r in runs})} seeds, "
             f"{tc.steps} steps x {tc.batch_size} x {seq} = {tc.steps * tc.batch_size * seq:,} tokens per run, "
             f"match: {base.ablate.match} (reference: {base.ablate.variants[0]})"]
    reference = _measures(runs[0].config, vocab_size, patch_dim)
    for run in runs:
        if run.seed:
            continue
        m, meas = run.config.model, _measures(run.config, vocab_size, patch_dim)
        lines.append(f"  {run.variant:8s} d={m.d:<5d} mlp={derived_mlp(m):<5d} "
                     f"params={meas['params'] / 1e6:.3f}M ({meas['params'] / reference['params'] - 1:+.1%})  "
                     f"FLOPs/token={meas['flops'] / 1e6:.2f}M ({meas['flops'] / reference['flops'] - 1:+.1%})")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------
# Running.


def run_ablation(base: Config, workdir: str | Path, seeds: int | None = None, progress: bool = True,
                 log=print) -> list[dict]:
    """Trains every planned run that has not finished (resuming interrupted ones), then writes the report.

    Returns the report rows (one per finished run). Stops early, without a report row for it, when a run was
    preempted (SIGTERM): re-running the command continues it.
    """
    # The trainer imports the data stack (grain, TFDS); planning and reporting do not need it.
    from omni.data import pipeline
    from omni.demo import corpus, scorer
    from omni.tools import tasks
    from omni.train import loop

    workdir = Path(workdir)
    workdir_lib.check_writable(workdir)
    workdir_lib.hold(workdir, "omni ablate")  # one ablation per workdir; each run's own workdir is locked by train
    vocab_size, patch_dim = pipeline.vocab_for(base).size, batch.patch_dim(base.data)
    runs = make_plan(base, vocab_size, patch_dim, seeds)
    _check_and_save_plan(workdir, runs, base)
    log(describe_plan(runs, base, vocab_size, patch_dim))
    start = time.perf_counter()
    for i, run in enumerate(runs, 1):
        run_dir = workdir / "runs" / run.name
        if (run_dir / "eval.json").exists():
            log(f"omni ablate: [{i}/{len(runs)}] {run.name}: finished earlier, skipped")
            continue
        log(f"omni ablate: [{i}/{len(runs)}] {run.name}: training in {run_dir}")
        end_of_run = (scorer.end_of_run_for(run.config) if run.config.data.dataset in corpus.NAMES
                      else tasks.end_of_run_for(run.config, run.config.ablate.task_examples))
        result = loop.train(run.config, run_dir, progress=progress, end_of_run=end_of_run)
        if result.get("preempted"):
            log(f"omni ablate: stopped at {run.name} (preempted); run the same command to resume")
            return collect(workdir, runs, vocab_size, patch_dim)
        rows = collect(workdir, runs, vocab_size, patch_dim)
        write_report(workdir, runs, rows, base)
    rows = collect(workdir, runs, vocab_size, patch_dim)
    write_report(workdir, runs, rows, base)
    log(f"omni ablate: {len(rows)} runs reported in {workdir}/ablation.md, ablation.csv, ablation.png "
        f"({time.perf_counter() - start:.0f} s in this invocation)")
    return rows


def _check_and_save_plan(workdir: Path, runs: list[Run], base: Config) -> None:
    """Refuses a workdir whose earlier plan trained a run of the same name with another config."""
    path = workdir / "plan.json"
    planned = {r.name: config_lib.to_dict(r.config) for r in runs}
    if path.exists():
        earlier = json.loads(path.read_text())["runs"]
        for name, cfg in planned.items():
            keys = config_lib.changed_keys(earlier[name], cfg) if name in earlier else []
            if keys:
                raise ConfigError(f"{workdir} holds an ablation planned with another config: run {name} differs in "
                                  f"{', '.join(keys)}; use a new --workdir, or delete {workdir}")
        planned = {**earlier, **planned}
    path.write_text(json.dumps({"base": config_lib.to_dict(base), "runs": planned}, indent=2) + "\n")


# ----------------------------------------------------------------------------------------------------------
# Reporting.


def collect(workdir: Path, runs: list[Run], vocab_size: int, patch_dim: int) -> list[dict]:
    """One row per finished run: its plan entry, sizes, speed, final eval and demo scores, and eval curve."""
    rows = []
    for run in runs:
        run_dir = Path(workdir) / "runs" / run.name
        if not (run_dir / "eval.json").exists():
            continue
        result = json.loads((run_dir / "eval.json").read_text())
        metrics = read_metrics(run_dir)
        cfg, tokens_per_step = run.config, run.config.train.batch_size * run.config.data.seq_len
        meas = _measures(cfg, vocab_size, patch_dim)
        speeds = [r["tokens_per_s"] for r in metrics if "tokens_per_s" in r]
        row = {"variant": run.variant, "fusion": cfg.model.fusion, "k": cfg.model.late_layers, "seed": run.seed,
               "train_seed": cfg.train.seed, "d": cfg.model.d, "mlp": derived_mlp(cfg.model),
               "params": meas["params"], "matmul_params": meas["matmul_params"], "flops_per_token": meas["flops"],
               "tokens": result["step"] * tokens_per_step,
               "tokens_per_s": statistics.median(speeds) if speeds else float("nan")}
        for modality in TARGET_MODALITIES:  # None where the eval split has no target of it (absent, not 0)
            row[f"eval_loss_{modality}"] = result["eval"].get(f"loss/{modality}")
            row[f"eval_acc_{modality}"] = result["eval"].get(f"acc/{modality}")
        # the end-of-run task scores (eval.json "demo_tasks": the demo tasks', or omni eval --generate's groups)
        prefix = "demo" if any(m in s for s in result.get("demo_tasks", {}).values() for m in DEMO_ONLY) else "task"
        for task, scores in sorted(result.get("demo_tasks", {}).items()):
            for metric in TASK_METRICS:
                if metric in scores and not (metric == "code_acc_mean" and "pitch_acc" in scores):
                    row[f"{prefix}_{task}_{metric}"] = scores[metric]
        row["curve"] = [(r["step"] * tokens_per_step, {m: r.get(f"eval/loss/{m}") for m in TARGET_MODALITIES})
                        for r in metrics if "eval/loss/text" in r]
        rows.append(row)
    return rows


TASK_METRICS = ("exact", "cer", "pitch_acc", "code_acc_mean")  # the task scores a report row carries
DEMO_ONLY = ("shape", "volume", "pitch_acc")  # scores only the demo tasks have


def _mean_std(values, percent: bool = False) -> str:
    fmt = (lambda x: f"{100 * x:.1f}%") if percent else _fmt
    if not values:
        return ""
    if len(values) == 1:
        return fmt(values[0])
    return f"{fmt(statistics.mean(values))} ± {fmt(statistics.stdev(values))}"


def _fmt(x: float) -> str:
    return f"{x:.3g}" if abs(x) < 1000 else f"{x:,.0f}"


def write_report(workdir: Path, runs: list[Run], rows: list[dict], base: Config) -> None:
    workdir = Path(workdir)
    if not rows:
        return
    columns = [k for k in rows[0] if k != "curve"]
    for row in rows:
        columns += [k for k in row if k not in columns and k != "curve"]
    with open(workdir / "ablation.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows([{k: row.get(k, "") for k in columns} for row in rows])
    (workdir / "ablation.md").write_text(_markdown(runs, rows, columns, base))
    _plot(workdir / "ablation.png", runs, rows)


def _by_variant(runs: list[Run], rows: list[dict]) -> dict[str, list[dict]]:
    grouped = {run.variant: [] for run in runs}
    for row in rows:
        grouped[row["variant"]].append(row)
    return {variant: group for variant, group in grouped.items() if group}


def _reported_modalities(rows: list[dict]) -> list[str]:
    """The eval-loss columns of the table: text and audio always (absent shows as such), image only when some run
    learned image codes (most datasets take images as patches, never targets)."""
    return [m for m in TARGET_MODALITIES
            if m in ("text", "audio") or any(r.get(f"eval_loss_{m}") is not None for r in rows)]


def _markdown(runs: list[Run], rows: list[dict], columns: list[str], base: Config) -> str:
    tc = base.train
    modalities = _reported_modalities(rows)
    demo_columns = [c for c in columns if c.startswith(("demo_", "task_"))]
    header = ["variant", "k", "d", "params", "FLOPs/token", "tokens/s"]
    header += [f"eval loss {m}" for m in modalities] + [
        c.split("_", 1)[1].replace("_acc_mean", " acc").replace("_", " ") for c in demo_columns]
    lines = [
        "# Fusion ablation", "",
        f"{len({r.variant for r in runs})} variants x {len({r.seed for r in runs})} seeds (train.seed "
        f"{base.train.seed}..{base.train.seed + max(r.seed for r in runs)}); every run {tc.steps} steps x "
        f"{tc.batch_size} x {base.data.seq_len} = {tc.steps * tc.batch_size * base.data.seq_len:,} tokens on "
        f"dataset '{base.data.dataset}' in the same order (data.shuffle_seed {base.data.shuffle_seed}); widths "
        f"matched on: {base.ablate.match} (reference {base.ablate.variants[0]}). Values are mean ± std over "
        f"seeds; eval losses are the final held-out loss per target modality; task scores (after the losses) are "
        f"of greedy answers to held-out examples at the end of each run; tokens/s is the median logged "
        f"training speed.", "",
        "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for variant, group in _by_variant(runs, rows).items():
        first = group[0]
        cells = [variant, str(first["k"]), str(first["d"]), f"{first['params'] / 1e6:.3f}M",
                 f"{first['flops_per_token'] / 1e6:.2f}M", _mean_std([r["tokens_per_s"] for r in group])]
        cells += [_mean_std([r[f"eval_loss_{m}"] for r in group if r.get(f"eval_loss_{m}") is not None]) or "absent"
                  for m in modalities]
        cells += [_mean_std([r[c] for r in group if c in r], percent=True) if any(c in r for r in group) else ""
                  for c in demo_columns]
        planned = len({r.seed for r in runs})
        seeds_done = f" ({len(group)} of {planned} seeds)" if len(group) != planned else ""
        lines.append("| " + " | ".join([cells[0] + seeds_done] + cells[1:]) + " |")
    lines += ["", "Per-run figures: ablation.csv. Curves: ablation.png.", ""]
    return "\n".join(lines)


def _plot(path: Path, runs: list[Run], rows: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    # a modality no eval measured (absent: no target tokens) gets no panel rather than a line at 0
    present = [m for m in TARGET_MODALITIES if any(losses.get(m) is not None for r in rows for _, losses in r["curve"])]
    present = present or list(TARGET_MODALITIES[:1])
    fig, axes = plt.subplots(1, len(present), figsize=(6 * len(present), 4.2), squeeze=False)
    for ax, modality in zip(axes[0], present):
        for variant, group in _by_variant(runs, rows).items():
            curves = [{tokens: losses[modality] for tokens, losses in r["curve"] if losses.get(modality) is not None}
                      for r in group]
            shared = sorted(set.intersection(*(set(c) for c in curves)))
            losses = np.array([[c[t] for t in shared] for c in curves])
            tokens = np.array(shared, dtype=float)
            line, = ax.plot(tokens, losses.mean(axis=0), label=f"{variant} ({len(group)} seeds)")
            if len(group) > 1:
                ax.fill_between(tokens, losses.min(axis=0), losses.max(axis=0), color=line.get_color(), alpha=0.2)
        ax.set_yscale("log")
        ax.set_xlabel("tokens seen")
        ax.set_ylabel(f"held-out {modality} loss")
        ax.set_title(f"{modality}: mean over seeds, shaded min-max")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
