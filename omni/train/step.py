"""The model, its optimizer and sharded state, and the jitted train and eval steps.

    state = {"step": int32 [], "params": the model's nnx.Param tree as a pure dict, "opt_state": optax state}

The train step takes a global batch (omni.batch) and returns the new state and the step's metrics (omni.loss:
loss and accuracy per modality, token counts, grad_norm, lr); gradients are exact means over every target token
of the global step, also under gradient accumulation (sums of micro-batches, one divide).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from omni import sharding
from omni.batch import FIELDS, check_batch, padding_rows, patch_dim, row_patches, runs_per_row
from omni.config import Config
from omni.errors import ConfigError
from omni.loss import LOSS_MODALITIES, fused_loss_sums, loss_sums, mark_absent, metrics_from_sums, target_count
from omni.model.attention import attention_implementation
from omni.model.transformer import OmniTransformer
from omni.tokens import Vocab
from omni.train import trainable


def build_model(cfg: Config, vocab: Vocab, seed: int | None = None) -> OmniTransformer:
    """The model for `cfg` over `vocab` (the dataset's: omni.data.pipeline.vocab_for), seeded by train.seed."""
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
        # The train step clips with the norm it logs (one pass over the gradients, not two). identity() holds the
        # place (and the empty state) optax.clip_by_global_norm had, so checkpoints keep their optimizer layout.
        tx = optax.chain(optax.identity(), tx)
    if trainable.freezes_anything(tc):
        labels = lambda params: jax.tree.map(lambda t: "train" if t else "frozen", trainable.trainable_mask(tc, params))
        tx = optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, labels)
    return tx, schedule


def clip_by_norm(grads, norm, max_norm: float):
    """optax.clip_by_global_norm's rule, given the norm already computed: scaled to max_norm when above it."""
    if max_norm <= 0:
        return grads
    return jax.tree.map(lambda g: jnp.where(norm < max_norm, g, (g / norm.astype(g.dtype)) * max_norm), grads)


def init_state(cfg: Config, mesh, tx, vocab: Vocab):
    """(graphdef, state, shardings): the initial train state, created directly in its shardings (no full copy on
    one device)."""
    graphdef, shardings, create = _state_factory(cfg, mesh, tx, vocab)
    return graphdef, jax.jit(create, out_shardings=shardings)(), shardings


def abstract_state(cfg: Config, mesh, tx, vocab: Vocab):
    """(graphdef, state, shardings) as init_state gives them, the state as shapes with their shardings
    (jax.ShapeDtypeStruct): nothing is allocated, enough to lower and compile the step."""
    graphdef, shardings, create = _state_factory(cfg, mesh, tx, vocab)
    state = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                         jax.eval_shape(create), shardings)
    return graphdef, state, shardings


def abstract_params(cfg: Config, vocab: Vocab):
    """(graphdef, nnx.State of the params as shapes, with their logical axis names): nothing is allocated."""
    return nnx.split(nnx.eval_shape(lambda: build_model(cfg, vocab)), nnx.Param)


def _state_factory(cfg: Config, mesh, tx, vocab: Vocab):
    """(graphdef, shardings of the state, create() -> the initial state) for cfg's model on mesh."""
    graphdef, param_shapes = abstract_params(cfg, vocab)
    shardings = sharding.state_shardings(cfg, mesh, param_shapes, tx)

    def create():
        params = nnx.to_pure_dict(nnx.state(build_model(cfg, vocab), nnx.Param))
        return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params)}

    return graphdef, shardings, create


def make_train_step(cfg: Config, graphdef, tx, schedule, mesh, shardings, frozen_rows: dict | None = None):
    """The jitted train step. `frozen_rows` ({parameter path: bool array broadcasting against it, True where
    frozen}, e.g. {"embed": loaded[:, None]}) keeps parts of trainable tensors fixed: their gradient is zeroed
    before the norm and their update (weight decay included) dropped; the tensor keeps its optimizer state."""
    accum = cfg.train.grad_accum
    rules = cfg.mesh.rules

    trains, treedef = jax.tree.flatten(trainable.trainable_mask(cfg.train, shardings["params"]))
    paths = trainable.param_paths(shardings["params"])
    frozen_rows = frozen_rows or {}
    unknown = sorted(set(frozen_rows) - {p for p, t in zip(paths, trains) if t})
    if unknown:
        raise ValueError(f"frozen_rows names {unknown}, which are not trainable parameters")
    keep = [None if p not in frozen_rows else ~np.asarray(frozen_rows[p]) for p in paths]  # per leaf
    trained_keep = [k for k, t in zip(keep, trains) if t]

    def sums_and_grads(params, batch, count):
        """The gradient of the mean loss over the step's `count` target tokens with respect to the trainable
        parameters (a list, in tree order), and this batch's sums. Frozen parameters enter as constants, so no
        gradient is ever computed for them."""
        leaves = jax.tree.leaves(params)
        frozen = [leaf for leaf, t in zip(leaves, trains) if not t]

        def mean_ce(trained):
            it_trained, it_frozen = iter(trained), iter(frozen)
            p = treedef.unflatten([next(it_trained) if t else next(it_frozen) for t in trains])
            model = nnx.merge(graphdef, p)
            if cfg.train.loss_chunk:
                sums = fused_loss_sums(model.hidden(batch), model.unembed[...], batch, cfg.train.loss_chunk)
            else:
                sums = loss_sums(model(batch), batch)
            return sums["ce"] / count, sums

        return jax.grad(mean_ce, has_aux=True)([leaf for leaf, t in zip(leaves, trains) if t])

    def step_fn(state, batch):
        params = state["params"]
        # Mean over every target token of the global step (loss.py documents this normalisation), known from the
        # batch before the model runs: the gradient comes out divided, also summed over micro-batches.
        count = jnp.maximum(target_count(batch), 1.0)
        if accum == 1:
            trained_grads, sums = sums_and_grads(params, batch, count)
        else:
            # Row i of micro-batch j is global row i * accum + j: every data shard holds part of every micro-batch.
            micro = jax.tree.map(lambda x: jnp.swapaxes(x.reshape((-1, accum) + x.shape[1:]), 0, 1), batch)

            def body(carry, mb):
                mb = {k: sharding.constrain(v, "batch", "length", *([None] * (v.ndim - 2))) for k, v in mb.items()}
                return jax.tree.map(jnp.add, carry, sums_and_grads(params, mb, count)), None

            zeros = jax.eval_shape(sums_and_grads, params, jax.tree.map(lambda x: x[0], micro), count)
            zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), zeros)
            (trained_grads, sums), _ = jax.lax.scan(body, zeros, micro)
        trained_grads = [g if k is None else jnp.where(k, g, 0) for g, k in zip(trained_grads, trained_keep)]
        grad_norm = optax.tree.norm(trained_grads)  # of what trains: frozen tensors have no gradient
        trained_grads = clip_by_norm(trained_grads, grad_norm, cfg.train.clip_norm)
        # Zeros stand in for the frozen gradients: optax.multi_transform's set_to_zero never reads them.
        it = iter(trained_grads)
        grads = treedef.unflatten([next(it) if t else jnp.zeros_like(leaf)
                                   for leaf, t in zip(jax.tree.leaves(params), trains)])
        updates, opt_state = tx.update(grads, state["opt_state"], params)
        new_params = optax.apply_updates(params, updates)
        new_params = treedef.unflatten([  # frozen: the very same array; frozen rows: the very same values
            (new if k is None else jnp.where(k, new, old)) if t else old
            for new, old, t, k in zip(jax.tree.leaves(new_params), jax.tree.leaves(params), trains, keep)])
        new_state = {"step": state["step"] + 1, "params": new_params, "opt_state": opt_state}
        metrics = metrics_from_sums(sums)
        metrics["grad_norm"] = grad_norm  # before clipping
        metrics["lr"] = schedule(state["step"])
        return new_state, metrics

    batch_sh = {k: sharding.batch_sharding(mesh, rules, 3 if k == "patches" else 2, k) for k in FIELDS}
    replicated = NamedSharding(mesh, PartitionSpec())
    jitted = jax.jit(step_fn, in_shardings=(shardings, batch_sh), out_shardings=(shardings, replicated),
                     donate_argnums=0)

    def run(state, batch):
        with sharding.activate(mesh, rules):
            return jitted(state, batch)

    def lower(state, batch):  # run.lower(...).compile(): the compiled step's cost and memory, without running it
        with sharding.activate(mesh, rules):
            return jitted.lower(state, batch)

    run.lower = lower
    return run


def make_eval_step(cfg: Config, graphdef, mesh):
    @jax.jit
    def eval_fn(params, batch):
        return loss_sums(nnx.merge(graphdef, params)(batch), batch)

    def run(params, batch):
        with sharding.activate(mesh, cfg.mesh.rules):
            return eval_fn(params, batch)

    def lower(params, batch):
        with sharding.activate(mesh, cfg.mesh.rules):
            return eval_fn.lower(params, batch)

    run.lower = lower
    return run


def same_batch_count(batches: list[dict]) -> list[dict]:
    """This process's eval batches, padded with all-padding batches to the largest count any process holds: each
    process packs its own share of the eval split, so the counts can differ, and every eval step is a collective
    that all processes must run the same number of times (or the job hangs). Padding rows add nothing to the
    sums (segment 0 is never a target)."""
    if jax.process_count() == 1 or not batches:
        return batches
    from jax.experimental import multihost_utils

    most = int(np.max(multihost_utils.process_allgather(np.int32(len(batches)))))
    first = batches[0]
    empty = padding_rows(len(first["tokens"]), first["tokens"].shape[1], first["patches"].shape[1],
                         first["patches"].shape[2])
    return batches + [empty] * (most - len(batches))


def evaluate(eval_step, params, batches, mesh, rules, progress=None) -> dict:
    """Per-modality held-out loss / accuracy over the given (process-local) eval batches; a modality with no
    target tokens in them has None for its loss and accuracy (omni.loss.mark_absent), not 0. `progress` (an
    omni.progress bar) advances per batch once it is computed, showing the target tokens counted so far."""
    totals = None
    for batch in batches:
        sums = eval_step(params, sharding.global_batch(batch, mesh, rules))
        totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
        if progress is not None:
            progress.update(1, tokens=int(totals["count"]))  # waits for the batch: the count is its result
    return mark_absent({k: float(v) for k, v in metrics_from_sums(totals).items()})


def check_host_batch(cfg: Config, batch: dict) -> None:
    """A host batch at the data -> step boundary: the layout of omni.batch (fields, dtypes, shapes), and at most
    model.max_segments runs per row where cuDNN's packed attention is set up for that many
    (omni.model.attention.packed_runs): a longer row is refused here rather than attended wrongly."""
    check_batch(batch, cfg.data.seq_len, patch_dim(cfg.data), row_patches(cfg.data))
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
        raise ConfigError(
            f"batch row {row} holds {runs[row]} {what}, more than 'model.max_segments' ({m.max_segments}) that cuDNN "
            f"attention is set up for; rerun with --set model.max_segments={2 ** int(np.ceil(np.log2(runs[row])))}")


def modality_summary(ev: dict) -> str:
    """'text 1.234 (acc 56.7%), audio ...' for the modalities with target tokens; an absent one (None, see
    omni.loss.mark_absent) is left out, never shown as 0."""
    parts = [f"{name} {ev[f'loss/{name}']:.3f} (acc {ev[f'acc/{name}']:.1%})" for name in LOSS_MODALITIES
             if ev.get(f"loss/{name}") is not None]
    return ", ".join(parts) or "none (no target tokens)"
