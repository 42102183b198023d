"""The trainer, top to bottom: mesh -> data -> sharded init -> (resume) -> jitted steps -> eval -> checkpoints.

    omni train --config configs/demo.py --workdir runs/demo [--set train.steps=200 ...]

The workdir receives `config.json` (the resolved config), `metrics.jsonl`, `tensorboard/`, `checkpoints/`
and, at the end, `eval.json`. Running the same command on the same workdir resumes from the latest checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import time
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from omni import config as config_lib, sharding
from omni.batch import FIELDS, patch_dim, runs_per_row
from omni.config import Config
from omni.loss import loss_sums, metrics_from_sums
from omni.model import OmniTransformer, attention_implementation, flops_per_token, param_count

# Datasheet dense bf16 peaks per chip, FLOP/s, for the 'mfu_datasheet' figure.
DATASHEET_PEAK = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "TPU v4": 275e12, "TPU v5 lite": 197e12,
                  "TPU v5p": 459e12, "TPU v6 lite": 918e12}


# ----------------------------------------------------------------------------------------------------------
# Model, optimizer and sharded state.


def build_model(cfg: Config, seed: int | None = None, vocab=None) -> OmniTransformer:
    """The model for `cfg`; the vocabulary is the dataset's unless given (benchmarks have no dataset)."""
    if vocab is None:
        from omni import data

        vocab = data.vocab_for(cfg.data)
    return OmniTransformer(cfg.model, vocab.size, patch_dim(cfg.data),
                           rngs=nnx.Rngs(cfg.train.seed if seed is None else seed))


def build_optimizer(cfg: Config):
    tc = cfg.train
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=tc.lr, warmup_steps=tc.warmup_steps,
        decay_steps=max(tc.steps, tc.warmup_steps + 1), end_value=tc.lr * tc.min_lr_ratio)
    decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)  # no decay on norms and biases
    tx = optax.adamw(schedule, b1=tc.b1, b2=tc.b2, eps=tc.eps, weight_decay=tc.weight_decay, mask=decay_mask)
    if tc.clip_norm > 0:
        tx = optax.chain(optax.clip_by_global_norm(tc.clip_norm), tx)
    return tx, schedule


def state_shardings(cfg: Config, mesh, graphdef_and_abstract_params, tx):
    """NamedShardings of {step, params, opt_state}: params from their logical names and the mesh rules,
    optimizer moments like their params, scalars replicated."""
    _, abstract_params = graphdef_and_abstract_params
    specs = nnx.to_pure_dict(nnx.get_partition_spec(abstract_params))
    shapes = nnx.to_pure_dict(abstract_params)
    param_sh = jax.tree.map(
        lambda spec, shape: NamedSharding(mesh, _divisible(_logical_spec(spec, cfg.mesh.rules), shape.shape, mesh)),
        specs, shapes, is_leaf=lambda x: isinstance(x, PartitionSpec))
    replicated = NamedSharding(mesh, PartitionSpec())
    abstract_opt = jax.eval_shape(tx.init, nnx.to_pure_dict(abstract_params))
    opt_sh = optax.tree_map_params(tx, lambda _, s: s, abstract_opt, param_sh,
                                   transform_non_params=lambda _: replicated)
    return {"step": replicated, "params": param_sh, "opt_state": opt_sh}


def _logical_spec(spec: PartitionSpec, rules) -> PartitionSpec:
    known = {name for name, _ in rules}
    for name in spec:
        if name is not None and name not in known:
            raise config_lib.ConfigError(f"parameter axis '{name}' has no entry in 'mesh.rules'; add "
                                         f"['{name}', <mesh axis or None>]")
    return sharding.logical_to_spec(spec, rules)


def _divisible(spec: PartitionSpec, shape, mesh) -> PartitionSpec:
    """Replicates a dimension its mesh axes do not divide (2 KV heads on tensor=4, say), instead of failing:
    the usual GQA practice of repeating KV heads across tensor shards."""
    out = []
    for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        names = axes if isinstance(axes, tuple) else (axes,) if axes else ()
        out.append(axes if dim % int(np.prod([mesh.shape[a] for a in names] or [1])) == 0 else None)
    return PartitionSpec(*out)


def init_state(cfg: Config, mesh, tx, vocab=None):
    """The initial train state, created directly in its shardings (no full copy on one device)."""
    abstract_model = nnx.eval_shape(lambda: build_model(cfg, vocab=vocab))
    graphdef, abstract_params = nnx.split(abstract_model, nnx.Param)
    shardings = state_shardings(cfg, mesh, (graphdef, abstract_params), tx)

    @partial(jax.jit, out_shardings=shardings)
    def create():
        params = nnx.to_pure_dict(nnx.state(build_model(cfg, vocab=vocab), nnx.Param))
        return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params)}

    return graphdef, create(), shardings


# ----------------------------------------------------------------------------------------------------------
# Steps.


def make_train_step(cfg: Config, graphdef, tx, schedule, mesh, shardings):
    accum = cfg.train.grad_accum
    rules = cfg.mesh.rules

    def sums_and_grads(params, batch):
        def ce_sum(p):
            sums = loss_sums(nnx.merge(graphdef, p)(batch), batch)
            return sums["ce"], sums

        grads, sums = jax.grad(ce_sum, has_aux=True)(params)
        return grads, sums

    def step_fn(state, batch):
        params = state["params"]
        if accum == 1:
            grads, sums = sums_and_grads(params, batch)
        else:
            # Row i of micro-batch j is global row i * accum + j: every data shard holds part of every micro-batch.
            micro = jax.tree.map(lambda x: jnp.swapaxes(x.reshape((-1, accum) + x.shape[1:]), 0, 1), batch)

            def body(carry, mb):
                mb = {k: sharding.constrain(v, "batch", "length", *([None] * (v.ndim - 2))) for k, v in mb.items()}
                return jax.tree.map(jnp.add, carry, sums_and_grads(params, mb)), None

            zeros = jax.eval_shape(sums_and_grads, params, jax.tree.map(lambda x: x[0], micro))
            zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), zeros)
            (grads, sums), _ = jax.lax.scan(body, zeros, micro)
        # Mean over every target token of the global step (loss.py documents this normalisation).
        grads = jax.tree.map(lambda g: g / jnp.maximum(sums["count"], 1.0), grads)
        updates, opt_state = tx.update(grads, state["opt_state"], params)
        new_state = {"step": state["step"] + 1, "params": optax.apply_updates(params, updates),
                     "opt_state": opt_state}
        metrics = metrics_from_sums(sums)
        metrics["grad_norm"] = optax.tree.norm(grads)
        metrics["lr"] = schedule(state["step"])
        return new_state, metrics

    batch_sh = {k: sharding.batch_sharding(mesh, rules, 3 if k == "patches" else 2) for k in FIELDS}
    replicated = NamedSharding(mesh, PartitionSpec())
    jitted = jax.jit(step_fn, in_shardings=(shardings, batch_sh), out_shardings=(shardings, replicated),
                     donate_argnums=0)

    def run(state, batch):
        with sharding.activate(mesh, rules):
            return jitted(state, batch)

    return run


def make_eval_step(cfg: Config, graphdef, mesh):
    @jax.jit
    def eval_fn(params, batch):
        return loss_sums(nnx.merge(graphdef, params)(batch), batch)

    def run(params, batch):
        with sharding.activate(mesh, cfg.mesh.rules):
            return eval_fn(params, batch)

    return run


def evaluate(eval_step, params, batches, mesh, rules) -> dict:
    """Per-modality held-out loss / accuracy over the given (process-local) eval batches."""
    totals = None
    for batch in batches:
        sums = eval_step(params, sharding.global_batch(batch, mesh, rules))
        totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
    return {k: float(v) for k, v in metrics_from_sums(totals).items()}


def measure_matmul_peak(mesh, dtype: str, n: int = 1024, reps: int = 5) -> float:
    """FLOP/s of a matmul on every device of the mesh at once (batch of per-device matmuls), measured now."""
    devices = mesh.devices.size
    sh = NamedSharding(mesh, PartitionSpec(tuple(mesh.axis_names)))
    a = jax.device_put(jnp.ones((devices, n, n), dtype), sh)
    f = jax.jit(lambda x: jnp.einsum("bij,bjk->bik", x, x))
    f(a).block_until_ready()
    start = time.perf_counter()
    for _ in range(reps):
        out = f(a)
    out.block_until_ready()
    return 2.0 * devices * n**3 * reps / (time.perf_counter() - start)


def datasheet_peak(mesh) -> float | None:
    kind = mesh.devices.flat[0].device_kind
    for name, peak in DATASHEET_PEAK.items():
        if name in kind:
            return peak * mesh.devices.size
    return None


# ----------------------------------------------------------------------------------------------------------
# The loop.


def train(cfg: Config, workdir: str | Path, progress: bool = True) -> dict:
    """Trains (or resumes) in `workdir`; returns the final eval metrics."""
    from tqdm.auto import tqdm

    # The input pipeline (grain), checkpoints and event files are imported here, not at the top: `omni bench`
    # uses this module's step functions on accelerator hosts that have none of grain or tensorboardX.
    from omni import checkpoint, data, demo_eval, preemption
    from omni.metrics import MetricWriter

    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    is_main = jax.process_index() == 0
    log = print if is_main else (lambda *a, **k: None)

    mesh = sharding.make_mesh(cfg.mesh)
    rules = cfg.mesh.rules
    _check_batch_fits_mesh(cfg, mesh)
    tx, schedule = build_optimizer(cfg)
    graphdef, state, shardings = init_state(cfg, mesh, tx)
    vocab = data.vocab_for(cfg.data)
    n_params = param_count(state["params"])
    flops_tok = flops_per_token(cfg.model, vocab.size, cfg.data.seq_len)
    log(f"omni: {cfg.name}: {n_params / 1e6:.2f}M params, {flops_tok / 1e6:.1f} MFLOP/token, mesh "
        f"{dict(mesh.shape)} on {mesh.devices.size} {mesh.devices.flat[0].platform} devices")

    def put(host_batch):  # checked on the host, then placed on the devices
        check_packed_rows(cfg, host_batch)
        return sharding.global_batch(host_batch, mesh, rules)

    train_iter = data.train_dataset(cfg, jax.process_index(), jax.process_count())
    if cfg.data.prefetch:
        train_iter = data.Prefetched(train_iter, put, cfg.data.prefetch)
    eval_data = data.eval_batches(cfg, jax.process_index(), jax.process_count())
    for batch in eval_data:
        check_packed_rows(cfg, batch)
    manager = checkpoint.make_manager(workdir, cfg.train)
    start_step = 0
    try:
        restored = checkpoint.restore_latest(manager, checkpoint.abstract_like(state), train_iter,
                                             config=config_lib.to_dict(cfg), log=log)
    except Exception:
        manager.close()  # let Orbax's background threads end before the error reaches the user
        train_iter.close()
        raise
    _save_resolved_config(cfg, workdir, log)  # after the restore: a config that does not fit never replaces it
    if restored is not None:
        start_step, state, _ = restored
        log(f"omni: resumed from {checkpoint.step_path(manager, start_step)} (step {start_step})")
    if start_step >= cfg.train.steps:
        log(f"omni: the run already reached train.steps={cfg.train.steps}; raise it to train further")

    train_step = make_train_step(cfg, graphdef, tx, schedule, mesh, shardings)
    eval_step = make_eval_step(cfg, graphdef, mesh)
    writer = MetricWriter(workdir, resume_step=start_step)
    peak = measure_matmul_peak(mesh, cfg.model.dtype)
    sheet = datasheet_peak(mesh)
    dataset = data.dataset_for(cfg.data)
    meta = {"config": config_lib.to_dict(cfg), "dataset": str(dataset.path),
            "tokenizer": data.tokenizer_for(cfg.data).identity(), "codec": dataset.meta.get("codec"),
            "vocab": {"size": vocab.size, "text_size": vocab.text_size, "codebook_sizes": list(vocab.codebook_sizes)}}

    if start_step == 0:
        first_eval = evaluate(eval_step, state["params"], eval_data, mesh, rules)
        writer.write(0, {f"eval/{k}": v for k, v in first_eval.items()})
        log(f"omni: step 0 held-out loss {modality_summary(first_eval)}")

    tokens_per_step = cfg.train.batch_size * cfg.data.seq_len
    bar = tqdm(total=cfg.train.steps, initial=start_step, disable=not (progress and is_main), desc="train",
               dynamic_ncols=True)
    watch = preemption.PreemptionWatch()
    last_save_time, preempted_at = time.monotonic(), None
    interval_start, interval_steps, wait_s = time.perf_counter(), 0, 0.0
    try:
        for step in range(start_step, cfg.train.steps):
            t0 = time.perf_counter()
            batch = next(train_iter) if cfg.data.prefetch else put(next(train_iter))
            wait_s += time.perf_counter() - t0
            state, metrics = train_step(state, batch)
            interval_steps += 1
            done = step + 1
            log_step = done % cfg.train.log_every == 0 or done == cfg.train.steps
            if step == start_step:  # the first step includes compilation: time it apart, log its losses only
                jax.block_until_ready(metrics)
                row = {"compile_time_s": time.perf_counter() - interval_start}
                if log_step:
                    row.update({k: float(v) for k, v in jax.device_get(metrics).items()})
                writer.write(done, row)
                interval_start, interval_steps, wait_s = time.perf_counter(), 0, 0.0
            elif log_step:
                metrics = jax.device_get(metrics)
                elapsed = time.perf_counter() - interval_start
                step_time = elapsed / interval_steps
                row = {k: float(v) for k, v in metrics.items()}
                row.update(step_time_s=step_time, tokens_per_s=tokens_per_step / step_time,
                           mfu=flops_tok * tokens_per_step / step_time / peak,
                           host_wait_frac=wait_s / elapsed, matmul_peak_tflops=peak / 1e12)
                if sheet:
                    row["mfu_datasheet"] = flops_tok * tokens_per_step / step_time / sheet
                writer.write(done, row)
                bar.set_postfix(loss=f"{row['loss']:.3f}", text=f"{row['loss/text']:.3f}",
                                audio=f"{row['loss/audio']:.3f}", tok_s=f"{row['tokens_per_s']:.0f}")
                interval_start, interval_steps, wait_s = time.perf_counter(), 0, 0.0
            if cfg.train.eval_every and done % cfg.train.eval_every == 0 and done != cfg.train.steps:
                ev = evaluate(eval_step, state["params"], eval_data, mesh, rules)
                writer.write(done, {f"eval/{k}": v for k, v in ev.items()})
                if is_main:
                    bar.write(f"step {done}: held-out loss {modality_summary(ev)}")
            preempted = watch.reached(done)
            if preempted or _checkpoint_due(cfg, done, log_step, last_save_time):
                checkpoint.save(manager, done, state, train_iter, dict(meta, step=done))
                last_save_time = time.monotonic()
            bar.update(1)
            if preempted:
                preempted_at = done
                break
    except BaseException:
        train_iter.close()
        raise
    finally:
        watch.close()
        bar.close()
    manager.wait_until_finished()
    train_iter.close()  # after the saves have read its state

    if preempted_at is not None:
        where = checkpoint.step_path(manager, preempted_at)
        log(f"omni: SIGTERM received: saved step {preempted_at} to {where}; run the same command to resume")
        writer.close()
        manager.close()
        return {"step": preempted_at, "preempted": True, "checkpoint": str(where)}

    final = evaluate(eval_step, state["params"], eval_data, mesh, rules)
    writer.write(cfg.train.steps, {f"eval/{k}": v for k, v in final.items()})
    log(f"omni: step {cfg.train.steps} held-out loss {modality_summary(final)}")
    tasks = {}
    if cfg.train.demo_eval_examples and cfg.data.dataset in data.DEMOS:
        with sharding.activate(mesh, rules):
            tasks = demo_eval.run(cfg, graphdef, state["params"], cfg.train.demo_eval_examples, log=log)
    result = {"step": cfg.train.steps, "eval": final, "demo_tasks": tasks}
    if is_main:
        (workdir / "eval.json").write_text(json.dumps(result, indent=2) + "\n")
    writer.close()
    manager.close()
    return result


def check_packed_rows(cfg: Config, batch: dict) -> None:
    """cuDNN's packed attention is set up for at most model.max_segments runs per row (omni.model.packed_runs);
    a host batch with a longer row is refused here rather than attended wrongly."""
    m = cfg.model
    if attention_implementation(m) != "cudnn" or m.fusion == "cross":
        return
    runs = runs_per_row(batch["segment_ids"])
    what = "packed segments (trailing padding counting as one)"
    if m.fusion == "late" and m.late_layers:  # late layers attend within modality spans: more, shorter runs
        runs = runs_per_row(batch["segment_ids"], batch["modality"])
        what = "modality spans (late fusion; trailing padding counting as one)"
    row = int(np.argmax(runs))
    if runs[row] > m.max_segments:
        raise config_lib.ConfigError(
            f"batch row {row} holds {runs[row]} {what}, more than 'model.max_segments' ({m.max_segments}) that cuDNN "
            f"attention is set up for; rerun with --set model.max_segments={2 ** int(np.ceil(np.log2(runs[row])))}")


def _checkpoint_due(cfg: Config, done: int, log_step: bool, last_save_time: float) -> bool:
    """Same answer on every host: the step rules are deterministic, the time rule is process 0's call."""
    tc = cfg.train
    if done == tc.steps or (tc.checkpoint_every and done % tc.checkpoint_every == 0):
        return True
    if tc.checkpoint_minutes > 0 and log_step:
        from omni import checkpoint

        return checkpoint.agree(time.monotonic() - last_save_time >= 60 * tc.checkpoint_minutes)
    return False


def modality_summary(ev: dict) -> str:
    return (f"text {ev['loss/text']:.3f} (acc {ev['acc/text']:.1%}), "
            f"audio {ev['loss/audio']:.3f} (acc {ev['acc/audio']:.1%})")


def _check_batch_fits_mesh(cfg: Config, mesh) -> None:
    spec = sharding.logical_to_spec(("batch",), cfg.mesh.rules)[0]
    axes = spec if isinstance(spec, tuple) else (spec,) if spec else ()
    shards = int(np.prod([mesh.shape[a] for a in axes])) if axes else 1
    micro = cfg.train.batch_size // cfg.train.grad_accum
    if micro % shards:
        raise config_lib.ConfigError(
            f"'train.batch_size' / 'train.grad_accum' = {micro} sequences per micro-batch cannot be split over "
            f"{shards} batch shards (mesh axes {axes}); use a multiple of {shards}")


def _save_resolved_config(cfg: Config, workdir: Path, log) -> None:
    path = workdir / "config.json"
    if path.exists():
        previous = json.loads(path.read_text())
        now = config_lib.to_dict(cfg)
        changed = config_lib.changed_keys(previous, now)
        if changed:
            log(f"omni: config differs from the saved {path} in {', '.join(changed)}; saving the new one")
    if jax.process_index() == 0:
        config_lib.save_config(cfg, path)

