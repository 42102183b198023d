"""`omni eval`: held-out loss and accuracy per modality, and the demo tasks' scores, for one checkpoint.

    omni eval --workdir runs/demo [--step N] [--set train.eval_batches=8 ...]

Reads the config saved with that checkpoint (overrides apply on top, e.g. another mesh for fewer devices),
restores only the parameters, evaluates the eval split and writes `<workdir>/eval-<step>.json`. The JSON names
what was measured ("data": dataset, folder, split, example count, batches; "overrides"). Evaluating another
dataset than the run's (`--set data.dataset=OTHER`) writes `eval-<step>-<OTHER's folder name>.json` instead,
so the run's own result is never replaced by another dataset's.
"""

from __future__ import annotations

import json
import re
import zlib
from pathlib import Path

import jax
from flax import nnx

from omni import config as config_lib
from omni import sharding
from omni.data import dataset as dataset_lib
from omni.data import pipeline
from omni.demo import corpus, scorer
from omni.progress import silent
from omni.train import checkpoint, compile_cache, workdir as workdir_lib
from omni.train.step import (build_model, build_optimizer, check_host_batch, evaluate, make_eval_step,
                             modality_summary, same_batch_count)


def evaluate_checkpoint(workdir: str | Path, step: int | None = None, overrides: list[str] = (),
                        demo_examples: int | None = None, log=print, progress=silent) -> dict:
    """Evaluates a checkpoint of `workdir`; returns and saves {"step", "data", "overrides", "eval", "demo_tasks"}.
    progress (omni.progress) shows the eval batches as they are computed."""
    workdir = Path(workdir)
    step = checkpoint.pick_step(workdir, step)
    if jax.process_index() == 0:
        workdir_lib.check_writable(workdir)  # before any compute: the result must have a place to go
    saved = checkpoint.read_meta(workdir, step)["config"]
    run_cfg = config_lib.from_dict(saved, source=f"checkpoint {step}")
    cfg = config_lib.apply_overrides(config_lib.from_dict(saved, source=f"checkpoint {step}"), list(overrides))
    compile_cache.enable(cfg.compile_cache, log)  # before the first compile
    mesh = sharding.make_mesh(cfg.mesh)
    graphdef, params = restore_params_onto(cfg, mesh, workdir, step)

    eval_step = make_eval_step(cfg, graphdef, mesh)
    batches = same_batch_count(pipeline.eval_batches(cfg, jax.process_index(), jax.process_count()))
    for batch in batches:
        check_host_batch(cfg, batch)
    with progress("eval", total=len(batches), unit="batch") as bar:
        # (silent: no bar to feed, so evaluate need not wait for each batch's count)
        metrics = evaluate(eval_step, params, batches, mesh, cfg.mesh.rules, None if progress is silent else bar)
    log(f"omni: {workdir / 'checkpoints' / str(step)}: held-out loss {modality_summary(metrics)} "
        f"over {metrics['tokens/target']:.0f} target tokens")
    tasks = {}
    examples = cfg.demo.scored_examples if demo_examples is None else demo_examples
    if examples and cfg.data.dataset in corpus.NAMES:
        with sharding.activate(mesh, cfg.mesh.rules):
            tasks = scorer.run(cfg, graphdef, params, examples, log=log)
    log(f"omni: {compile_cache.summary()}")
    data = dict(pipeline.split_description(cfg), batches=len(batches), eval_batches=cfg.train.eval_batches)
    result = {"step": step, "data": data, "overrides": list(overrides), "eval": metrics, "demo_tasks": tasks}
    if jax.process_index() == 0:
        out = result_path(workdir, step, data, own=same_dataset(run_cfg, cfg))
        workdir_lib.write_atomic(out, json.dumps(result, indent=2) + "\n")
        log(f"omni: wrote {out}" + ("" if out.name == f"eval-{step}.json" else
                                    f" (data.dataset={cfg.data.dataset}, not the run's {run_cfg.data.dataset})"))
    return result


def same_dataset(run_cfg, cfg) -> bool:
    """Whether cfg evaluates the dataset the run trained on: the same generated corpus with the same settings,
    or the same folder (however its path is spelled)."""
    a, b = run_cfg.data, cfg.data
    if a.dataset == b.dataset:
        return a.dataset not in dataset_lib.GENERATED or (run_cfg.demo == cfg.demo and a.cache_dir == b.cache_dir)
    if a.dataset in dataset_lib.GENERATED or b.dataset in dataset_lib.GENERATED:
        return False
    return Path(a.dataset).expanduser().resolve() == Path(b.dataset).expanduser().resolve()


def result_path(workdir: Path, step: int, data: dict, own: bool) -> Path:
    """eval-<step>.json for the run's own dataset; eval-<step>-<dataset>.json for another (plus a hash of its
    folder when a file of that name already holds another folder's result)."""
    if own:
        return workdir / f"eval-{step}.json"
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(data["name"]).name or data["name"]).strip("._") or "dataset"
    out = workdir / f"eval-{step}-{slug}.json"
    try:
        earlier = json.loads(out.read_text())["data"]["path"] if out.exists() else data["path"]
    except (ValueError, KeyError, TypeError):
        earlier = None
    if earlier != data["path"]:
        out = workdir / f"eval-{step}-{slug}-{zlib.crc32(data['path'].encode()):08x}.json"
    return out


def restore_params_onto(cfg, mesh, workdir: Path, step: int):
    """(graphdef, the checkpoint's parameters sharded on `mesh` as training shards them)."""
    tx, _ = build_optimizer(cfg)
    vocab = pipeline.vocab_for(cfg)
    graphdef, abstract_params = nnx.split(nnx.eval_shape(lambda: build_model(cfg, vocab)), nnx.Param)
    param_shardings = sharding.state_shardings(cfg, mesh, abstract_params, tx)["params"]
    target = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                          nnx.to_pure_dict(abstract_params), param_shardings)
    return graphdef, checkpoint.restore_params(workdir, step, target)
