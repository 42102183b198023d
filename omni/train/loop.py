"""The trainer, top to bottom: mesh -> data -> sharded init -> (resume) -> jitted steps -> eval -> checkpoints.

    omni train --config configs/demo.py --workdir runs/demo [--set train.steps=200 ...]

The workdir receives `config.json` (the resolved config), `metrics.jsonl`, `tensorboard/`, `checkpoints/`
and, at the end, `eval.json`. Running the same command on the same workdir resumes from the latest checkpoint.

The host never waits for a step just to log it: the metrics of a logging step N are fetched after step N+1 has
been dispatched (nanodo's order), so the devices always have the next step queued.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import time
from typing import Callable

import jax
from tqdm.auto import tqdm

from omni import config as config_lib
from omni import sharding, storage
from omni.config import Config, ConfigError
from omni.data import pipeline
from omni.data.prefetch import Prefetched
from omni.loss import mark_absent
from omni.model.counting import flops_per_token, param_count
from omni.train import checkpoint, compile_cache, distributed, init_from, preemption, trainable
from omni.train import workdir as workdir_lib
from omni.train.metrics import MetricWriter
from omni.train.profile import StepProfiler
from omni.train.perf import datasheet_peak, measure_matmul_peak, utilisation
from omni.train.step import (abstract_params, build_optimizer, check_host_batch, evaluate, init_state,
                             make_eval_step, make_train_step, modality_summary, same_batch_count)

# What a caller may run on the trained params at the end (the CLI passes the demo corpus's scorer):
# end_of_run(cfg, graphdef, params, log) -> dict of scores, written to eval.json under "demo_tasks".
EndOfRun = Callable[..., dict]


def train(cfg: Config, workdir, progress: bool = True, end_of_run: EndOfRun | None = None) -> dict:
    """Trains (or resumes) in `workdir`; returns the final eval metrics (and end_of_run's scores)."""
    workdir = storage.path(workdir)
    # Not in config.validate: a recipe file sets freeze_loaded_rows and --set gives init_from after it is loaded.
    if cfg.train.freeze_loaded_rows and not cfg.model.init_from:
        raise ConfigError("'train.freeze_loaded_rows' keeps the rows model.init_from loaded; set 'model.init_from' "
                          "to a Llama folder, an omni export or an earlier run, or train.freeze_loaded_rows=false")
    is_main = jax.process_index() == 0
    log = print if is_main else (lambda *a, **k: None)
    compile_cache.enable(cfg.compile_cache, log)  # before the first compile
    if is_main:  # before any compute: a workdir that cannot take the results, or another run in it, stops here
        workdir_lib.check_writable(workdir)
        workdir_lib.hold(workdir)
    try:
        return _train(cfg, workdir, progress, end_of_run, is_main, log)
    except Exception as e:
        full = checkpoint.disk_error(workdir, e)  # a full or read-only disk: one line, unfinished saves removed
        if full is None:
            raise
        raise full from None
    finally:
        workdir_lib.release(workdir)


def _train(cfg: Config, workdir, progress: bool, end_of_run: EndOfRun | None, is_main: bool, log) -> dict:
    workdir.mkdir(parents=True, exist_ok=True)
    cfg = init_from.with_source_tokenizer(cfg, log)  # a Llama folder's tokenizer.json, before the vocabulary
    mesh = sharding.make_mesh(cfg.mesh)
    rules = cfg.mesh.rules
    sharding.check_batch_fits_mesh(cfg, mesh)
    vocab = pipeline.vocab_for(cfg)
    tx, schedule = build_optimizer(cfg)
    graphdef, state, shardings = init_state(cfg, mesh, tx, vocab)
    n_params = param_count(state["params"])
    flops_tok = flops_per_token(cfg.model, vocab.size, cfg.data.seq_len)
    log(f"omni: {cfg.name}: {n_params / 1e6:.2f}M params, {flops_tok / 1e6:.1f} MFLOP/token, mesh "
        f"{dict(mesh.shape)} on {mesh.devices.size} {mesh.devices.flat[0].platform} devices")
    said = sharding.describe_undivided(
        sharding.undivided(cfg, mesh, abstract_params(cfg, vocab)[1]), mesh)
    if said:
        log(said)
    for note in config_lib.notes(cfg):
        log(f"omni: note: {note}")
    if trainable.freezes_anything(cfg.train):
        log(f"omni: {trainable.summary(trainable.trainable_mask(cfg.train, state['params']), state['params'])}")

    def put(host_batch):  # checked on the host, then placed on the devices
        check_host_batch(cfg, host_batch)
        return sharding.global_batch(host_batch, mesh, rules)

    train_iter = pipeline.train_dataset(cfg, jax.process_index(), jax.process_count())
    if cfg.data.prefetch:
        train_iter = Prefetched(train_iter, put, cfg.data.prefetch)
    eval_data = same_batch_count(pipeline.eval_batches(cfg, jax.process_index(), jax.process_count()))
    for batch in eval_data:
        check_host_batch(cfg, batch)
    manager = checkpoint.make_manager(workdir, cfg.train)
    with contextlib.ExitStack() as teardown:  # every exit (an error, a preemption, the end), in reverse order:
        teardown.push(lambda kind, error, tb: _close_manager(manager, error))  # last: Orbax's threads end
        teardown.callback(train_iter.close)  # on success after the last save has read its state
        start_step = 0
        restored = checkpoint.restore_latest(manager, checkpoint.abstract_like(state), train_iter,
                                             config=config_lib.to_dict(cfg), log=log)
        # A new run starts from model.init_from's weights; a checkpoint of the workdir always wins.
        loaded = (init_from.load(cfg, vocab, pipeline.tokenizer_for(cfg), state["params"], log)
                  if restored is None and cfg.model.init_from else None)
        _save_resolved_config(cfg, workdir, log)  # after the restore: a config that does not fit never replaces it
        if restored is not None:
            start_step, state, _ = restored
            log(f"omni: resumed from {checkpoint.step_path(manager, start_step)} (step {start_step})")
        elif loaded is not None:
            state = dict(state, params=init_from.place(state["params"], loaded))
            log(init_from.describe(loaded.counts))
        if start_step >= cfg.train.steps:
            log(f"omni: the run already reached train.steps={cfg.train.steps}; raise it to train further")

        train_step = make_train_step(cfg, graphdef, tx, schedule, mesh, shardings,
                                     frozen_rows=_frozen_rows(cfg, vocab, state["params"], log))
        eval_step = make_eval_step(cfg, graphdef, mesh)
        writer = teardown.enter_context(contextlib.closing(MetricWriter(workdir, resume_step=start_step)))
        peak = measure_matmul_peak(mesh, cfg.model.dtype)
        sheet = datasheet_peak(mesh)
        dataset = pipeline.dataset_for(cfg)
        meta = {"config": config_lib.to_dict(cfg), "dataset": str(dataset.path),
                "tokenizer": pipeline.tokenizer_for(cfg).identity(), "codec": dataset.meta.get("codec"),
                "image_tokenizer": dataset.meta.get("image_tokenizer"),
                "vocab": {"size": vocab.size, "text_size": vocab.text_size,
                          "codebook_sizes": list(vocab.codebook_sizes),
                          "image_codebook_sizes": list(vocab.image_codebook_sizes)}}

        bound = cfg.train.phase_timeout_s
        if start_step == 0:
            with distributed.bounded("the step-0 eval", bound):
                first_eval = evaluate(eval_step, state["params"], eval_data, mesh, rules)
            writer.write(0, {f"eval/{k}": v for k, v in first_eval.items()})
            log(f"omni: step 0 held-out loss {modality_summary(first_eval)}")

        tokens_per_step = cfg.train.batch_size * cfg.data.seq_len

        def write_log_row(pending: PendingRow) -> float:
            """Fetches a logging step's metrics (the step after it is already dispatched) and writes its row."""
            row = mark_absent({k: float(v) for k, v in jax.device_get(pending.metrics).items()})
            elapsed = time.perf_counter() - pending.interval_start  # up to the end of its step: its metrics are here
            step_time = elapsed / pending.interval_steps
            row.update(step_time_s=step_time, tokens_per_s=tokens_per_step / step_time,
                       mfu=utilisation(flops_tok * tokens_per_step, step_time, peak),
                       host_wait_frac=pending.wait_s / elapsed, matmul_peak_tflops=peak / 1e12)
            if sheet:
                row["mfu_datasheet"] = utilisation(flops_tok * tokens_per_step, step_time, sheet)
            writer.write(pending.step, row)
            shown = {k.replace("loss/", ""): f"{row[k]:.3f}" for k in ("loss", "loss/text", "loss/audio")
                     if row[k] is not None}  # a modality absent from these steps is left out, not shown as 0
            bar.set_postfix(**shown, tok_s=f"{row['tokens_per_s']:.0f}")
            return time.perf_counter()  # the next interval starts now: its first step is already running

        last_save_time, preempted_at = time.monotonic(), None
        interval_start, interval_steps, wait_s = time.perf_counter(), 0, 0.0
        pending = None  # a logging step whose metrics are fetched once the next step is dispatched
        with contextlib.ExitStack() as loop_only:  # what only the step loop uses, closed when it ends
            profiler = loop_only.enter_context(contextlib.closing(StepProfiler(
                cfg.train.profile_steps, workdir, jax.process_index() == cfg.train.profile_process, log)))
            watch = loop_only.enter_context(contextlib.closing(preemption.PreemptionWatch()))
            bar = loop_only.enter_context(contextlib.closing(tqdm(
                total=cfg.train.steps, initial=start_step, disable=not (progress and is_main), desc="train",
                dynamic_ncols=True)))
            for step in range(start_step, cfg.train.steps):
                t0 = time.perf_counter()
                batch = next(train_iter) if cfg.data.prefetch else put(next(train_iter))
                wait_s += time.perf_counter() - t0
                profiler.before(step + 1)
                state, metrics = train_step(state, batch)
                profiler.after(step + 1, metrics)
                if pending is not None:
                    interval_start, pending = write_log_row(pending), None
                interval_steps += 1
                done = step + 1
                log_step = done % cfg.train.log_every == 0 or done == cfg.train.steps
                if step == start_step:  # the first step includes compilation: time it apart, log its losses only
                    jax.block_until_ready(metrics)
                    row = {"compile_time_s": time.perf_counter() - interval_start}
                    if log_step:
                        row.update(mark_absent({k: float(v) for k, v in jax.device_get(metrics).items()}))
                    writer.write(done, row)
                    interval_start, interval_steps, wait_s = time.perf_counter(), 0, 0.0
                elif log_step:
                    pending = PendingRow(done, metrics, interval_start, interval_steps, wait_s)
                    interval_steps, wait_s = 0, 0.0  # interval_start: when the row is written
                evaluating = cfg.train.eval_every and done % cfg.train.eval_every == 0 and done != cfg.train.steps
                preempted = watch.reached(done)
                checkpointing = preempted or _checkpoint_due(cfg, done, log_step, last_save_time)
                if pending is not None and (evaluating or checkpointing or done == cfg.train.steps):
                    interval_start, pending = write_log_row(pending), None  # the host waits for this step anyway
                if evaluating:
                    with distributed.bounded(f"the step-{done} eval", bound):
                        ev = evaluate(eval_step, state["params"], eval_data, mesh, rules)
                    writer.write(done, {f"eval/{k}": v for k, v in ev.items()})
                    if is_main:
                        bar.write(f"step {done}: held-out loss {modality_summary(ev)}")
                if checkpointing:
                    if is_main:
                        workdir_lib.check_held(workdir)  # a bucket lock taken over: another run writes here now
                    checkpoint.save(manager, done, state, train_iter, dict(meta, step=done))
                    last_save_time = time.monotonic()
                bar.update(1)
                if preempted:
                    preempted_at = done
                    break
        with distributed.bounded("the last checkpoint save", bound):
            manager.wait_until_finished()  # before train_iter closes: the saves read its state

        if preempted_at is not None:
            where = checkpoint.step_path(manager, preempted_at)
            log(f"omni: SIGTERM received: saved step {preempted_at} to {where}; run the same command to resume")
            return {"step": preempted_at, "preempted": True, "checkpoint": str(where)}

        with distributed.bounded("the end-of-run eval", bound):
            final = evaluate(eval_step, state["params"], eval_data, mesh, rules)
        writer.write(cfg.train.steps, {f"eval/{k}": v for k, v in final.items()})
        log(f"omni: step {cfg.train.steps} held-out loss {modality_summary(final)}")
        log(f"omni: {compile_cache.summary()}")
        tasks = {}
        if end_of_run is not None:
            with sharding.activate(mesh, rules), distributed.bounded("the end-of-run scoring", bound):
                tasks = end_of_run(cfg, graphdef, state["params"], log=log)
        data = dict(pipeline.split_description(cfg), batches=len(eval_data), eval_batches=cfg.train.eval_batches)
        result = {"step": cfg.train.steps, "data": data, "eval": final, "demo_tasks": tasks}
        if is_main:
            workdir_lib.write_atomic(workdir / "eval.json", json.dumps(result, indent=2) + "\n")
        return result


@dataclasses.dataclass
class PendingRow:
    """A logging step whose metrics are fetched once the next step is dispatched (the host never waits for the
    step it logs), with the interval they are timed over."""
    step: int
    metrics: dict
    interval_start: float
    interval_steps: int
    wait_s: float


def _close_manager(manager, error) -> None:
    """At the end of training the manager's close may raise. After an error it lets Orbax's background save threads
    end (they hold files open) before the error reaches the user, and a second error from them (the same full
    disk) adds nothing."""
    if error is None:
        manager.close()
        return
    try:
        manager.close()
    except Exception:  # noqa: BLE001
        pass


def _frozen_rows(cfg: Config, vocab, params, log) -> dict | None:
    """train.freeze_loaded_rows: {"embed": rows [V, 1], "unembed": rows [1, V]} that model.init_from filled, for
    the tables that train (computed again on every start, so a resumed stage 1 keeps them fixed too)."""
    if not cfg.train.freeze_loaded_rows:
        return None
    rows = init_from.rows_from_source(cfg, vocab, pipeline.tokenizer_for(cfg))
    trains = trainable.trainable_mask(cfg.train, params)
    frozen = {name: rows[:, None] if name == "embed" else rows[None, :]
              for name in ("embed", "unembed") if trains.get(name)}
    log(f"omni: train.freeze_loaded_rows: {int(rows.sum())} of {vocab.size} vocabulary rows of "
        f"{' and '.join(frozen) or 'no trainable table'} stay as model.init_from loaded them")
    return frozen


def _checkpoint_due(cfg: Config, done: int, log_step: bool, last_save_time: float) -> bool:
    """Same answer on every host: the step rules are deterministic, the time rule is process 0's call."""
    tc = cfg.train
    if done == tc.steps or (tc.checkpoint_every and done % tc.checkpoint_every == 0):
        return True
    if tc.checkpoint_minutes > 0 and log_step:
        return checkpoint.agree(time.monotonic() - last_save_time >= 60 * tc.checkpoint_minutes)
    return False


def _save_resolved_config(cfg: Config, workdir, log) -> None:
    path = workdir / "config.json"
    if path.exists():
        previous = json.loads(path.read_text())
        now = config_lib.to_dict(cfg)
        changed = config_lib.changed_keys(previous, now)
        if changed:
            log(f"omni: config differs from the saved {path} in {', '.join(changed)}; saving the new one")
    if jax.process_index() == 0:
        workdir_lib.write_atomic(path, json.dumps(config_lib.to_dict(cfg), indent=2) + "\n")

