"""`omni eval`: held-out loss and accuracy per modality, task scores of generated answers, for one checkpoint.

    omni eval --workdir runs/demo [--step N] [--set train.eval_batches=8 ...]
    omni eval --workdir runs/my --generate [--max-examples N] [--prompts held_out.jsonl] [--max-new-tokens N]

Reads the config saved with that checkpoint (overrides apply on top, e.g. another mesh for fewer devices),
restores only the parameters, evaluates the eval split and writes `<workdir>/eval-<step>.json`. On a demo
corpus the demo tasks are scored too ("demo_tasks", omni.demo.scorer). With --generate the answers of the eval
split (its first N examples, or the lines of a prompts file) are generated and scored against the truth for any
dataset (omni.tools.tasks): "tasks" in the JSON holds the scores per group, "generate" the dataset, split,
example count and the predictions file written beside the JSON (`eval-<step>.predictions.jsonl`).
The JSON names
what was measured ("data": dataset, folder, split, example count, batches; "overrides"). Evaluating another
dataset than the run's (`--set data.dataset=OTHER`) writes `eval-<step>-<OTHER's folder name>.json` instead,
so the run's own result is never replaced by another dataset's.
"""

from __future__ import annotations

import json
import re
import zlib

import jax
from flax import nnx

from omni import config as config_lib
from omni import sharding, storage
from omni.data import dataset as dataset_lib
from omni.data import pipeline
from omni.demo import corpus, scorer
from omni.progress import silent
from omni.tools import generate as generate_lib
from omni.tools import tasks as tasks_lib
from omni.train import artifact, checkpoint, compile_cache, readers, workdir as workdir_lib
from omni.train.step import (build_model, build_optimizer, check_host_batch, evaluate, make_eval_step,
                             modality_summary, same_batch_count)


def evaluate_checkpoint(workdir, step: int | None = None, overrides: list[str] = (),
                        demo_examples: int | None = None, log=print, generate: bool = False,
                        max_examples: int | None = None, prompts=None, max_new_tokens: int | None = None,
                        batch_size: int = 64, progress=silent) -> dict:
    """Evaluates a checkpoint of `workdir`; returns and saves {"step", "data", "overrides", "eval", "demo_tasks"}
    (+ "tasks" and "generate" with `generate` or `prompts`). progress (omni.progress) shows the eval batches
    as they are computed."""
    workdir = storage.path(workdir)
    checkpoint.pick_step(workdir, step)  # a workdir without checkpoints (or without `step`): one line, at once
    if jax.process_index() == 0:
        workdir_lib.check_writable(workdir)  # before any compute: the result must have a place to go

    def read(step):  # under the step's read lease, beside a run that may be training there (omni.train.readers)
        saved = checkpoint.read_meta(workdir, step)["config"]
        run_cfg = config_lib.from_dict(saved, source=f"checkpoint {step}")
        cfg = config_lib.apply_overrides(config_lib.from_dict(saved, source=f"checkpoint {step}"), list(overrides))
        compile_cache.enable(cfg.compile_cache, log)  # before the first compile
        mesh = sharding.make_mesh(cfg.mesh)
        return (run_cfg, cfg, mesh) + restore_params_onto(cfg, mesh, workdir, step)

    step, (run_cfg, cfg, mesh, graphdef, params) = readers.read_checkpoint(workdir, step, read, log)

    eval_step = make_eval_step(cfg, graphdef, mesh)
    batches = same_batch_count(pipeline.eval_batches(cfg, jax.process_index(), jax.process_count()))
    for batch in batches:
        check_host_batch(cfg, batch)
    with progress("eval", total=len(batches), unit="batch") as bar:
        # (silent: no bar to feed, so evaluate need not wait for each batch's count)
        metrics = evaluate(eval_step, params, batches, mesh, cfg.mesh.rules, None if progress is silent else bar)
    log(f"omni: {workdir / 'checkpoints' / str(step)}: held-out loss {modality_summary(metrics)} "
        f"over {metrics['tokens/target']:.0f} target tokens")
    data = dict(pipeline.split_description(cfg), batches=len(batches), eval_batches=cfg.train.eval_batches)
    out = result_path(workdir, step, data, own=same_dataset(run_cfg, cfg))
    tasks, generated, predictions = {}, None, None
    examples = cfg.demo.scored_examples if demo_examples is None else demo_examples
    if generate or prompts is not None:
        with sharding.activate(mesh, cfg.mesh.rules):
            generated, predictions = _generate_and_score(cfg, graphdef, params, max_examples, prompts,
                                                         max_new_tokens, batch_size, log)
        generated["predictions"] = str(predictions_path(out))
        if cfg.data.dataset in corpus.NAMES:  # the demo scores come from the same answers
            tasks = scorer.demo_scores(predictions, generated["scores"], log=lambda *a: None,
                                       image_tokenizer=pipeline.image_tokenizer_for(cfg))
    elif examples and cfg.data.dataset in corpus.NAMES:
        with sharding.activate(mesh, cfg.mesh.rules):
            tasks = scorer.run(cfg, graphdef, params, examples, log=log)
    log(f"omni: {compile_cache.summary()}")
    result = {"step": step, "data": data, "overrides": list(overrides), "eval": metrics, "demo_tasks": tasks}
    if generated is not None:
        result["tasks"] = generated.pop("scores")
        result["generate"] = generated
    if jax.process_index() == 0:
        if predictions is not None:
            generate_lib.write_jsonl(predictions_path(out), predictions)
        workdir_lib.write_atomic(out, json.dumps(result, indent=2) + "\n")
        log(f"omni: wrote {out}" + (f" and {predictions_path(out).name}" if predictions is not None else "")
            + ("" if out.name == f"eval-{step}.json" else
               f" (data.dataset={cfg.data.dataset}, not the run's {run_cfg.data.dataset})"))
    return result


def predictions_path(eval_json):
    """Where the generated answers go: beside the eval JSON, named after it."""
    return eval_json.with_name(f"{eval_json.stem}.predictions.jsonl")


def _generate_and_score(cfg, graphdef, params, max_examples, prompts, max_new_tokens, batch_size, log):
    """({"dataset", "split", "examples", "max_new_tokens", "scores"}, predictions) of the eval split or a
    prompts file (omni.tools.tasks)."""
    model = artifact.live(cfg, graphdef, params)
    tasks, split = tasks_lib.eval_tasks(cfg, max_examples, prompts, model.codec, model.image_tokenizer)
    demo_caps = scorer.MAX_NEW_TOKENS if cfg.data.dataset in corpus.NAMES and max_new_tokens is None else None
    predictions, scores = tasks_lib.run(model, tasks, max_new_tokens=max_new_tokens, max_new_by_group=demo_caps,
                                        batch_size=batch_size, log=log, source=str(prompts or ""))
    for group, score in scores.items():
        log(f"omni: {tasks_lib.describe(group, score)}")
    return ({"dataset": cfg.data.dataset, "split": split, "examples": len(tasks),
             "skipped": sum("skipped" in row for row in predictions),
             "max_new_tokens": max_new_tokens or f"up to data.seq_len={cfg.data.seq_len}", "scores": scores},
            predictions)


def same_dataset(run_cfg, cfg) -> bool:
    """Whether cfg evaluates the dataset the run trained on: the same generated corpus with the same settings,
    or the same folder (however its path is spelled)."""
    a, b = run_cfg.data, cfg.data
    if a.dataset == b.dataset:
        return a.dataset not in dataset_lib.GENERATED or (run_cfg.demo == cfg.demo and a.cache_dir == b.cache_dir)
    if a.dataset in dataset_lib.GENERATED or b.dataset in dataset_lib.GENERATED:
        return False
    return storage.same(a.dataset, b.dataset)


def result_path(workdir, step: int, data: dict, own: bool):
    """eval-<step>.json for the run's own dataset; eval-<step>-<dataset>.json for another (plus a hash of its
    folder when a file of that name already holds another folder's result)."""
    if own:
        return workdir / f"eval-{step}.json"
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", data["name"].rstrip("/").rsplit("/", 1)[-1] or data["name"]).strip("._") \
        or "dataset"
    out = workdir / f"eval-{step}-{slug}.json"
    try:
        earlier = json.loads(out.read_text())["data"]["path"] if out.exists() else data["path"]
    except (ValueError, KeyError, TypeError):
        earlier = None
    if earlier != data["path"]:
        out = workdir / f"eval-{step}-{slug}-{zlib.crc32(data['path'].encode()):08x}.json"
    return out


def restore_params_onto(cfg, mesh, workdir, step: int):
    """(graphdef, the checkpoint's parameters sharded on `mesh` as training shards them)."""
    tx, _ = build_optimizer(cfg)
    vocab = pipeline.vocab_for(cfg)
    graphdef, abstract_params = nnx.split(nnx.eval_shape(lambda: build_model(cfg, vocab)), nnx.Param)
    param_shardings = sharding.state_shardings(cfg, mesh, abstract_params, tx)["params"]
    target = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                          nnx.to_pure_dict(abstract_params), param_shardings)
    return graphdef, artifact.checkpoint_params(workdir, step, target)
