"""`omni eval`: held-out loss and accuracy per modality, and the demo tasks' scores, for one checkpoint.

    omni eval --workdir runs/demo [--step N] [--set train.eval_batches=8 ...]

Reads the config saved with that checkpoint (overrides apply on top, e.g. another mesh for fewer devices),
restores only the parameters, evaluates the eval split and writes `<workdir>/eval-<step>.json`.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
from flax import nnx

from omni import config as config_lib
from omni import sharding
from omni.data import pipeline
from omni.demo import corpus, scorer
from omni.train import checkpoint, workdir as workdir_lib
from omni.train.step import (build_model, build_optimizer, check_host_batch, evaluate, make_eval_step,
                             modality_summary, same_batch_count)


def evaluate_checkpoint(workdir: str | Path, step: int | None = None, overrides: list[str] = (),
                        demo_examples: int | None = None, log=print) -> dict:
    """Evaluates a checkpoint of `workdir`; returns and saves {"step", "eval", "demo_tasks"}."""
    workdir = Path(workdir)
    step = checkpoint.pick_step(workdir, step)
    if jax.process_index() == 0:
        workdir_lib.check_writable(workdir)  # before any compute: the result must have a place to go
    cfg = config_lib.from_dict(checkpoint.read_meta(workdir, step)["config"], source=f"checkpoint {step}")
    cfg = config_lib.apply_overrides(cfg, list(overrides))
    mesh = sharding.make_mesh(cfg.mesh)
    graphdef, params = restore_params_onto(cfg, mesh, workdir, step)

    eval_step = make_eval_step(cfg, graphdef, mesh)
    batches = same_batch_count(pipeline.eval_batches(cfg, jax.process_index(), jax.process_count()))
    for batch in batches:
        check_host_batch(cfg, batch)
    metrics = evaluate(eval_step, params, batches, mesh, cfg.mesh.rules)
    log(f"omni: {workdir / 'checkpoints' / str(step)}: held-out loss {modality_summary(metrics)} "
        f"over {metrics['tokens/target']:.0f} target tokens")
    tasks = {}
    examples = cfg.demo.scored_examples if demo_examples is None else demo_examples
    if examples and cfg.data.dataset in corpus.NAMES:
        with sharding.activate(mesh, cfg.mesh.rules):
            tasks = scorer.run(cfg, graphdef, params, examples, log=log)
    result = {"step": step, "eval": metrics, "demo_tasks": tasks}
    if jax.process_index() == 0:
        out = workdir / f"eval-{step}.json"
        workdir_lib.write_atomic(out, json.dumps(result, indent=2) + "\n")
        log(f"omni: wrote {out}")
    return result


def restore_params_onto(cfg, mesh, workdir: Path, step: int):
    """(graphdef, the checkpoint's parameters sharded on `mesh` as training shards them)."""
    tx, _ = build_optimizer(cfg)
    vocab = pipeline.vocab_for(cfg)
    graphdef, abstract_params = nnx.split(nnx.eval_shape(lambda: build_model(cfg, vocab)), nnx.Param)
    param_shardings = sharding.state_shardings(cfg, mesh, abstract_params, tx)["params"]
    target = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                          nnx.to_pure_dict(abstract_params), param_shardings)
    return graphdef, checkpoint.restore_params(workdir, step, target)
