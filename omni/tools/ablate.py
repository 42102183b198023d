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
import io
import math
import statistics
import time

from omni import batch, storage
from omni import config as config_lib
from omni.batch import TARGET_MODALITIES
from omni.config import Config, ConfigError, derived_mlp, parse_variant
from omni.errors import InitFromError, OmniError
from omni.model.counting import flops_per_token, matmul_params, param_total
from omni.tools import scaling
from omni.train import workdir as workdir_lib
from omni.train.metrics import read_metrics


@dataclasses.dataclass
class Run:
    name: str       # folder under <workdir>/runs, e.g. "late2-s0", "late1-flops-d96-s1"
    variant: str    # as in ablate.variants, e.g. "late:2"
    seed: int       # index into the plan's seeds (train.seed = base seed + this)
    config: Config
    match: str = "none"  # how its width was matched to the reference's ("none" for the reference itself)
    label: str = ""      # the variant as the report names it: "late:1", or "late:1 @flops" under ablate.match=both
    size: str = ""       # the sweep point, e.g. "d=96" ("" without a sweep)

    def __post_init__(self):
        self.label = self.label or self.variant


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


PLANNED_KEYS = ("name", "model.fusion", "model.late_layers", "train.seed")  # the plan sets these per run


def sweep_points(base: Config) -> list[dict]:
    """[{key: value, ...}] for each point of ablate.sweep ([{}] without one). Raises ConfigError for a key that
    does not exist, a value of the wrong type, lists of different lengths, or a key the plan itself sets."""
    sweep = base.ablate.sweep
    if not sweep:
        return [{}]
    if not isinstance(sweep, dict):
        raise ConfigError(f"'ablate.sweep' must map config keys to lists of values, got {sweep!r}")
    lengths = set()
    for key, values in sweep.items():
        if not isinstance(values, (list, tuple)) or not values:
            raise ConfigError(f"'ablate.sweep' key {key!r} needs a non-empty list of values, got {values!r}")
        if key in PLANNED_KEYS or key.startswith("ablate.") or (key == "train.steps" and
                                                                base.ablate.budget == "tokens_per_param"):
            raise ConfigError(f"'ablate.sweep' cannot move {key!r}: the ablation plan sets it for every run")
        lengths.add(len(values))
    if len(lengths) > 1:
        raise ConfigError(f"'ablate.sweep' lists have different lengths ({sorted(lengths)}); several keys move "
                          f"together, one value of each per point")
    points = [{key: values[i] for key, values in sweep.items()} for i in range(lengths.pop())]
    for point in points:
        trial = copy.deepcopy(base)
        for key, value in point.items():
            config_lib.set_value(trial, key, value, source="ablate.sweep")
    if len({repr(sorted(p.items())) for p in points}) != len(points):
        raise ConfigError(f"'ablate.sweep' lists a point twice: {sweep}")
    return points


def point_label(point: dict) -> str:
    """{'model.d': 96, 'model.layers': 4} -> 'd=96 layers=4' (the last part of each key)."""
    return " ".join(f"{key.rsplit('.', 1)[-1]}={value}" for key, value in point.items())


def make_plan(base: Config, vocab_size: int, patch_dim: int, seeds: int | None = None) -> list[Run]:
    """Every sweep point x variant (x matching, under match=both) x seed of base.ablate, widths matched as asked.

    At each point the reference (the first variant) has the point's sizes; the others are matched to it. Every
    run sees the same data (data.* untouched, so the same batches in the same order) and, at one point, the same
    number of tokens (ablate.budget)."""
    config_lib.validate(base)
    seeds = base.ablate.seeds if seeds is None else seeds
    if seeds <= 0:
        raise ConfigError(f"--seeds must be positive, got {seeds}")
    names = [variant_name(v) for v in base.ablate.variants]
    if len(set(names)) != len(names):
        raise ConfigError(f"'ablate.variants' lists a variant twice: {base.ablate.variants}")
    matches = ["flops", "params"] if base.ablate.match == "both" else [base.ablate.match]
    runs = []
    for point in sweep_points(base):
        at_point = copy.deepcopy(base)
        for key, value in point.items():
            config_lib.set_value(at_point, key, value, source="ablate.sweep")
        reference = variant_config(at_point, base.ablate.variants[0])
        steps = _budget_steps(at_point, reference, vocab_size, patch_dim)
        size = point_label(point)
        for i, (variant, name) in enumerate(zip(base.ablate.variants, names)):
            for match in (["none"] if i == 0 else matches):
                cfg = match_width(variant_config(at_point, variant), reference, match, vocab_size, patch_dim)
                cfg.train.steps = steps
                labelled = base.ablate.match == "both" and i > 0
                stem = "-".join([name] + ([match] if labelled else []) + ([size.replace(" ", "-").replace("=", "")]
                                                                            if size else []))
                for seed in range(seeds):
                    run_cfg = copy.deepcopy(cfg)
                    run_cfg.train.seed = base.train.seed + seed
                    run_cfg.name = f"{base.name}/{stem}-s{seed}"
                    try:
                        config_lib.validate(run_cfg)
                    except ConfigError as e:
                        where = f"ablate.sweep point {size}, " if size else ""
                        raise ConfigError(f"{where}variant {variant}: {e}") from None
                    runs.append(Run(f"{stem}-s{seed}", variant, seed, run_cfg, match=match,
                                    label=f"{variant} @{match}" if labelled else variant, size=size))
    return runs


def check_init_from(runs: list[Run]) -> None:
    """The model.init_from of every run checked (headers and sizes, no weights read) before the first one trains:
    a folder that cannot start a run (damaged files, sizes that do not fit, a late or cross fusion variant) is
    one error now, naming the run, not a traceback hours later after the runs before it."""
    from omni.data import pipeline
    from omni.train import artifact, init_from

    seen = set()
    for run in runs:
        cfg = run.config
        if not cfg.model.init_from:
            continue
        key = repr((dataclasses.asdict(cfg.model), cfg.data.tokenizer))
        if key in seen:  # the seeds of one variant start from the same folder with the same model
            continue
        seen.add(key)
        try:
            cfg = init_from.with_source_tokenizer(cfg, log=lambda *_: None)
            init_from.check(cfg, artifact.abstract_model(cfg, pipeline.vocab_for(cfg))[1])
        except OmniError as e:
            where = f"ablate.sweep point {run.size}, " if run.size else ""
            raise InitFromError(f"{where}run {run.name}: {e}") from None


def _budget_steps(at_point: Config, reference: Config, vocab_size: int, patch_dim: int) -> int:
    """train.steps of every run at this sweep point, by ablate.budget."""
    if at_point.ablate.budget == "fixed":
        return at_point.train.steps
    tokens_per_step = at_point.train.batch_size * at_point.data.seq_len
    tokens = at_point.ablate.tokens_per_param * param_total(reference.model, vocab_size, patch_dim)
    return max(1, math.ceil(tokens / tokens_per_step))


def describe_plan(runs: list[Run], base: Config, vocab_size: int, patch_dim: int) -> str:
    tc, seq = base.train, base.data.seq_len
    points = list(dict.fromkeys(r.size for r in runs))
    budget = (f"{tc.steps} steps x {tc.batch_size} x {seq} = {tc.steps * tc.batch_size * seq:,} tokens per run"
              if base.ablate.budget == "fixed" else
              f"{base.ablate.tokens_per_param:g} tokens per reference parameter at each size")
    lines = [f"ablation plan: {len({r.label for r in runs})} variants x {len({r.seed for r in runs})} seeds"
             + (f" x {len(points)} sizes ({', '.join(points)})" if points != [""] else "")
             + f", {budget}, match: {base.ablate.match} (reference: {base.ablate.variants[0]})"]
    for size in points:
        at_size = [r for r in runs if r.size == size and r.seed == 0]
        reference = _measures(at_size[0].config, vocab_size, patch_dim)
        for run in at_size:
            m, meas = run.config.model, _measures(run.config, vocab_size, patch_dim)
            lines.append(f"  {(size + '  ') if size else ''}{run.label:15s} d={m.d:<5d} mlp={derived_mlp(m):<5d} "
                         f"params={meas['params'] / 1e6:.3f}M ({meas['params'] / reference['params'] - 1:+.1%})  "
                         f"FLOPs/token={meas['flops'] / 1e6:.2f}M ({meas['flops'] / reference['flops'] - 1:+.1%})"
                         + (f"  steps={run.config.train.steps}" if base.ablate.budget != "fixed" else ""))
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------
# Running.


def run_ablation(base: Config, workdir, seeds: int | None = None, progress: bool = True,
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

    workdir = storage.path(workdir)
    vocab_size, patch_dim = pipeline.vocab_for(base).size, batch.patch_dim(base.data)
    runs = make_plan(base, vocab_size, patch_dim, seeds)  # a plan that cannot run leaves no workdir behind
    check_init_from(runs)
    workdir_lib.check_writable(workdir)
    workdir_lib.hold(workdir, "omni ablate")  # one ablation per workdir; each run's own workdir is locked by train
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


def _check_and_save_plan(workdir, runs: list[Run], base: Config) -> None:
    """Refuses a workdir whose earlier plan trained a run of the same name with another config."""
    path = workdir / "plan.json"
    planned = {r.name: config_lib.to_dict(r.config) for r in runs}
    if path.exists():
        earlier = json.loads(path.read_text())["runs"]
        for name, cfg in planned.items():
            # ablate.* describes the plan, not how a run trains: a plan may grow variants, seeds or sizes
            # an earlier plan is read through today's schema: a key added since then holds its default there
            before = config_lib.to_dict(config_lib.from_dict(earlier[name])) if name in earlier else cfg
            keys = [k for k in config_lib.changed_keys(before, cfg) if not k.startswith("ablate.")]
            if keys:
                raise ConfigError(f"{workdir} holds an ablation planned with another config: run {name} differs in "
                                  f"{', '.join(keys)}; use a new --workdir, or delete {workdir}")
        planned = {**earlier, **planned}
    storage.write_text(path, json.dumps({"base": config_lib.to_dict(base), "runs": planned}, indent=2) + "\n")


# ----------------------------------------------------------------------------------------------------------
# Reporting.


def collect(workdir, runs: list[Run], vocab_size: int, patch_dim: int) -> list[dict]:
    """One row per finished run: its plan entry, sizes, speed, final eval and demo scores, and eval curve."""
    rows = []
    for run in runs:
        run_dir = storage.path(workdir) / "runs" / run.name
        if not (run_dir / "eval.json").exists():
            continue
        result = json.loads((run_dir / "eval.json").read_text())
        metrics = read_metrics(run_dir)
        cfg, tokens_per_step = run.config, run.config.train.batch_size * run.config.data.seq_len
        meas = _measures(cfg, vocab_size, patch_dim)
        speeds = [r["tokens_per_s"] for r in metrics if "tokens_per_s" in r]
        row = {"variant": run.variant, "label": run.label, "match": run.match, "size": run.size,
               "fusion": cfg.model.fusion, "k": cfg.model.late_layers, "seed": run.seed,
               "train_seed": cfg.train.seed, "d": cfg.model.d, "layers": cfg.model.layers, "mlp": derived_mlp(cfg.model),
               "params": meas["params"], "matmul_params": meas["matmul_params"], "flops_per_token": meas["flops"],
               "tokens": result["step"] * tokens_per_step,
               "train_flops": meas["flops"] * result["step"] * tokens_per_step,  # flops_per_token counts training
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


def write_report(workdir, runs: list[Run], rows: list[dict], base: Config) -> None:
    workdir = storage.path(workdir)
    if not rows:
        return
    columns = [k for k in rows[0] if k != "curve"]
    for row in rows:
        columns += [k for k in row if k not in columns and k != "curve"]
    table = io.StringIO(newline="")
    writer = csv.DictWriter(table, fieldnames=columns)
    writer.writeheader()
    writer.writerows([{k: row.get(k, "") for k in columns} for row in rows])
    storage.write_text(workdir / "ablation.csv", table.getvalue())
    storage.write_text(workdir / "ablation.md", _markdown(runs, rows, columns, base))
    _plot(workdir / "ablation.png", runs, rows)
    if any(r.size for r in runs):
        _plot_scaling(workdir / "scaling.png", runs, rows)


def _by_variant(runs: list[Run], rows: list[dict]) -> dict[tuple[str, str], list[dict]]:
    """{(label, size): its finished rows}, in plan order."""
    grouped = {(run.label, run.size): [] for run in runs}
    for row in rows:
        grouped[(row["label"], row["size"])].append(row)
    return {key: group for key, group in grouped.items() if group}


def _reported_modalities(rows: list[dict]) -> list[str]:
    """The eval-loss columns of the table: text and audio always (absent shows as such), image only when some run
    learned image codes (most datasets take images as patches, never targets)."""
    return [m for m in TARGET_MODALITIES
            if m in ("text", "audio") or any(r.get(f"eval_loss_{m}") is not None for r in rows)]


def _markdown(runs: list[Run], rows: list[dict], columns: list[str], base: Config) -> str:
    tc = base.train
    modalities = _reported_modalities(rows)
    demo_columns = [c for c in columns if c.startswith(("demo_", "task_"))]
    swept = any(r.size for r in runs)
    header = ["variant"] + (["size"] if swept else []) + ["k", "d", "params", "FLOPs/token", "tokens/s"]
    header += [f"eval loss {m}" for m in modalities] + [
        c.split("_", 1)[1].replace("_acc_mean", " acc").replace("_", " ") for c in demo_columns]
    lines = [
        "# Fusion ablation", "",
        f"{len({r.label for r in runs})} variants x {len({r.seed for r in runs})} seeds (train.seed "
        f"{base.train.seed}..{base.train.seed + max(r.seed for r in runs)})"
        + (f" x {len({r.size for r in runs})} sizes" if swept else "") + "; every run "
        + (f"{tc.steps} steps x {tc.batch_size} x {base.data.seq_len} = "
           f"{tc.steps * tc.batch_size * base.data.seq_len:,} tokens" if base.ablate.budget == "fixed" else
           f"{base.ablate.tokens_per_param:g} tokens per reference parameter of its size")
        + f" on dataset '{base.data.dataset}' in the same order (data.shuffle_seed {base.data.shuffle_seed}); widths "
        f"matched on: {base.ablate.match} (reference {base.ablate.variants[0]}). Values are mean ± std over "
        f"seeds; eval losses are the final held-out loss per target modality; task scores (after the losses) are "
        f"of greedy answers to held-out examples at the end of each run; tokens/s is the median logged "
        f"training speed.", "",
        "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for (label, size), group in _by_variant(runs, rows).items():
        first = group[0]
        cells = [label] + ([size] if swept else []) + [str(first["k"]), str(first["d"]), f"{first['params'] / 1e6:.3f}M",
                 f"{first['flops_per_token'] / 1e6:.2f}M", _mean_std([r["tokens_per_s"] for r in group])]
        cells += [_mean_std([r[f"eval_loss_{m}"] for r in group if r.get(f"eval_loss_{m}") is not None]) or "absent"
                  for m in modalities]
        cells += [_mean_std([r[c] for r in group if c in r], percent=True) if any(c in r for r in group) else ""
                  for c in demo_columns]
        planned = len({r.seed for r in runs})
        seeds_done = f" ({len(group)} of {planned} seeds)" if len(group) != planned else ""
        lines.append("| " + " | ".join([cells[0] + seeds_done] + cells[1:]) + " |")
    lines += ["", "Per-run figures: ablation.csv. Curves: ablation.png.", ""]
    if swept:
        lines += scaling_section(runs, rows)
    return "\n".join(lines)


def _plot(path, runs: list[Run], rows: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    # a modality no eval measured (absent: no target tokens) gets no panel rather than a line at 0
    present = [m for m in TARGET_MODALITIES if any(losses.get(m) is not None for r in rows for _, losses in r["curve"])]
    present = present or list(TARGET_MODALITIES[:1])
    order = [r.size for r in runs]
    largest = max((row["size"] for row in rows), key=order.index)
    fig, axes = plt.subplots(1, len(present), figsize=(6 * len(present), 4.2), squeeze=False)
    for ax, modality in zip(axes[0], present):
        for (label, size), group in _by_variant(runs, rows).items():
            if size != largest:
                continue  # a sweep's curves: the largest finished size here, every size in scaling.png
            curves = [{tokens: losses[modality] for tokens, losses in r["curve"] if losses.get(modality) is not None}
                      for r in group]
            shared = sorted(set.intersection(*(set(c) for c in curves)))
            losses = np.array([[c[t] for t in shared] for c in curves])
            tokens = np.array(shared, dtype=float)
            line, = ax.plot(tokens, losses.mean(axis=0), label=f"{label} ({len(group)} seeds)")
            if len(group) > 1:
                ax.fill_between(tokens, losses.min(axis=0), losses.max(axis=0), color=line.get_color(), alpha=0.2)
        ax.set_yscale("log")
        ax.set_xlabel("tokens seen")
        ax.set_ylabel(f"held-out {modality} loss")
        ax.set_title(f"{modality}: mean over seeds, shaded min-max")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    _save_figure(fig, path)


# ----------------------------------------------------------------------------------------------------------
# Scaling (ablate.sweep).


def scaling_points(runs: list[Run], rows: list[dict], modality: str) -> dict[str, dict[int, tuple[list, list]]]:
    """{label: {seed: (training FLOPs of each size, final held-out loss of `modality` there)}}."""
    points: dict[str, dict[int, tuple[list, list]]] = {run.label: {} for run in runs}
    for row in rows:
        loss = row.get(f"eval_loss_{modality}")
        if loss is None:
            continue
        compute, losses = points[row["label"]].setdefault(row["seed"], ([], []))
        compute.append(row["train_flops"])
        losses.append(loss)
    return {label: by_seed for label, by_seed in points.items() if by_seed}


def scaling_fits(runs: list[Run], rows: list[dict]) -> list[dict]:
    """Per variant and modality: the fit over all seeds' points and the compute ratio against the reference
    (the first variant) at the loss the reference reached at its largest size, from the pooled fits and per seed."""
    reference = runs[0].label
    results = []
    for modality in TARGET_MODALITIES:
        points = scaling_points(runs, rows, modality)
        if reference not in points:
            continue
        ref_c, ref_l = (sum((list(v[i]) for v in points[reference].values()), []) for i in (0, 1))
        ref_fit = scaling.fit_power_law(ref_c, ref_l)
        largest = max(ref_c)
        target = statistics.mean(loss for c, loss in zip(ref_c, ref_l) if c == largest)
        for label, by_seed in points.items():
            compute, losses = (sum((list(v[i]) for v in by_seed.values()), []) for i in (0, 1))
            fit = scaling.fit_power_law(compute, losses)
            pooled = scaling.compute_ratio(fit, ref_fit, target)
            seed_ratios, missing = scaling.ratio_over_seeds(by_seed, points[reference])
            results.append({"label": label, "modality": modality, "fit": fit, "ratio": pooled,
                            "seed_ratios": seed_ratios, "missing": missing, "target_loss": target,
                            "compute": compute, "losses": losses})
    return results


def scaling_section(runs: list[Run], rows: list[dict]) -> list[str]:
    reference = runs[0].label
    lines = ["## Scaling", "",
             f"Final held-out loss per modality against training FLOPs (scaling.png), fitted per variant with "
             f"L = E + A * (C / C0)^-alpha (C0 = the variant's smallest compute; omni.tools.scaling). The compute ratio "
             f"is C_variant / C_{reference} at equal loss, read on the fitted curves at the loss {reference} reached at "
             f"its largest size: below 1 the variant needs less compute. 'pooled' fits every seed's points at once; "
             f"'per seed' fits each seed alone (mean ± std). A fit the points do not support is named, not drawn.", "",
             "| variant | modality | sizes | E | A | alpha | fit | compute ratio, pooled | per seed |",
             "|---|---|---|---|---|---|---|---|---|"]
    for result in scaling_fits(runs, rows):
        fit, ratio = result["fit"], result["ratio"]
        params = [_fmt(fit.E), _fmt(fit.A), _fmt(fit.alpha)] if fit.supported else ["", "", ""]
        if result["label"] == reference:
            pooled, per_seed = "1 (reference)", ""
        else:
            pooled = (f"{ratio.ratio:.3g}" + (" (extrapolated)" if ratio.extrapolated else "")
                      if math.isfinite(ratio.ratio) else f"none: {ratio.why}")
            ratios, missing = result["seed_ratios"], result["missing"]
            per_seed = (_mean_std(ratios) + (f" ({len(ratios)} of {len(ratios) + len(missing)} seeds; "
                                             f"{'; '.join(missing)})" if missing else "")
                        if ratios else "none: " + "; ".join(missing))
        lines.append(f"| {result['label']} | {result['modality']} | {fit.points} | " + " | ".join(params)
                     + f" | {'fitted' if fit.supported else 'not supported: ' + fit.why} | {pooled} | {per_seed} |")
    lines.append("")
    return lines


def _plot_scaling(path, runs: list[Run], rows: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fits = scaling_fits(runs, rows)
    modalities = list(dict.fromkeys(r["modality"] for r in fits)) or list(TARGET_MODALITIES[:1])
    fig, axes = plt.subplots(1, len(modalities), figsize=(6 * len(modalities), 4.4), squeeze=False)
    for ax, modality in zip(axes[0], modalities):
        for result in (r for r in fits if r["modality"] == modality):
            compute, losses = np.array(result["compute"]), np.array(result["losses"])
            sizes = np.unique(compute)
            means = np.array([losses[compute == c].mean() for c in sizes])
            spread = np.array([[means[i] - losses[compute == c].min(), losses[compute == c].max() - means[i]]
                               for i, c in enumerate(sizes)]).T
            line = ax.errorbar(sizes, means, yerr=spread, fmt="o", capsize=3, label=result["label"])
            fit = result["fit"]
            if fit.supported:
                grid = np.geomspace(sizes[0], sizes[-1], 64)
                ax.plot(grid, fit.loss_at(grid), color=line[0].get_color(), alpha=0.8,
                        label=f"{result['label']} fit: alpha {fit.alpha:.2f}")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("training FLOPs")
        ax.set_ylabel(f"final held-out {modality} loss")
        ax.set_title(f"{modality}: mean over seeds (bars: min-max)")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    fig.tight_layout()
    _save_figure(fig, path)


def _save_figure(fig, path) -> None:
    """A matplotlib figure as a PNG at `path` (a local path or a URL), written whole."""
    import matplotlib.pyplot as plt

    data = io.BytesIO()
    fig.savefig(data, dpi=110, format="png")
    plt.close(fig)
    storage.write_bytes(path, data.getvalue())
