"""train.trainable / train.frozen: frozen tensors stay bitwise unchanged, hold no optimizer state, and leave the
gradient norm; a typo is an error, not a silently frozen (or trained) model."""

import jax
import numpy as np
import optax
import pytest

from omni import sharding
from omni.config import apply_overrides
from omni.data import pipeline as data
from omni.errors import ConfigError
from omni.train import trainable
from omni.train.step import build_optimizer, init_state, make_train_step
from tests.conftest import tiny_config


def _state_and_step(cfg):
    mesh = sharding.make_mesh(cfg.mesh, jax.devices()[:1])
    tx, schedule = build_optimizer(cfg)
    graphdef, state, shardings = init_state(cfg, mesh, tx, data.vocab_for(cfg))
    step = make_train_step(cfg, graphdef, tx, schedule, mesh, shardings)
    batch = sharding.global_batch(next(iter(data.train_dataset(cfg))), mesh, cfg.mesh.rules)
    return state, step, batch


def _flat(tree):
    return {"/".join(str(getattr(k, "key", k)) for k in path): leaf
            for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def _moment_bytes(opt_state) -> int:
    return sum(leaf.nbytes for leaf in jax.tree.leaves(opt_state) if getattr(leaf, "ndim", 0) >= 1)


def test_stage_one_trains_only_the_projector_and_embeddings():
    cfg = apply_overrides(tiny_config(data=1, fsdp=1, tensor=1),
                          ['train.trainable=["patch_.*", "embed", "unembed"]', "train.steps=3"])
    state, step, batch = _state_and_step(cfg)
    before = {k: np.asarray(v) for k, v in _flat(state["params"]).items()}
    for _ in range(3):
        state, metrics = step(state, batch)
    after = {k: np.asarray(v) for k, v in _flat(state["params"]).items()}
    trained = {"patch_proj", "patch_bias", "embed", "unembed"}
    for name in before:
        if name in trained:
            assert not np.array_equal(before[name], after[name]), name
        else:
            assert np.array_equal(before[name], after[name]), f"{name} changed while frozen"
    assert np.isfinite(float(metrics["loss"]))

    # Adam's two moments exist only for the trained tensors.
    trained_bytes = sum(before[n].nbytes for n in trained)
    assert _moment_bytes(state["opt_state"]) == 2 * trained_bytes
    masked = [leaf for leaf in jax.tree.leaves(state["opt_state"], is_leaf=lambda x: isinstance(x, optax.MaskedNode))
              if isinstance(leaf, optax.MaskedNode)]
    assert masked, "frozen tensors should hold optax.MaskedNode, not zeros"


def test_frozen_gradients_leave_the_norm_and_the_compiled_step():
    base = apply_overrides(tiny_config(data=1, fsdp=1, tensor=1), ["model.d=128"])  # layers outweigh the vocab
    full_state, full_step, batch = _state_and_step(base)
    frozen_cfg = apply_overrides(base, ['train.frozen=["blocks/.*"]'])
    frozen_state, frozen_step, _ = _state_and_step(frozen_cfg)
    _, full_metrics = full_step(full_state, batch)
    _, frozen_metrics = frozen_step(frozen_state, batch)
    # Same init (same seed), so the norm over what still trains is strictly smaller than over everything.
    assert float(frozen_metrics["grad_norm"]) < float(full_metrics["grad_norm"])
    assert float(frozen_metrics["loss"]) == pytest.approx(float(full_metrics["loss"]), rel=1e-6)

    def flops(step, state):
        return step.lower(state, batch).compile().cost_analysis()["flops"]
    # The layers' weight-gradient matmuls are gone (their input gradients still flow to the embedding), and with
    # only the unembedding training nothing flows back through the layers at all (compiled FLOPs at d=128:
    # 1.71 G everything, 1.35 G blocks frozen, 0.69 G unembedding only).
    full = flops(full_step, full_state)
    assert flops(frozen_step, frozen_state) < 0.85 * full
    head_cfg = apply_overrides(base, ['train.trainable=["unembed"]'])
    head_state, head_step, _ = _state_and_step(head_cfg)
    assert flops(head_step, head_state) < 0.5 * full


def test_default_optimizer_layout_is_unchanged():
    cfg = tiny_config(data=1, fsdp=1, tensor=1)
    assert not trainable.freezes_anything(cfg.train)
    tx, _ = build_optimizer(cfg)
    assert not isinstance(tx.init({"w": np.zeros((2, 2))}), optax.MultiTransformState)


@pytest.mark.parametrize("override, message", [
    ('train.trainable=["blocks/atn/.*"]', "'train.trainable' entry 'blocks/atn/.*' matches no parameter"),
    ('train.frozen=["emb"]', "'train.frozen' entry 'emb' matches no parameter"),
    ('train.frozen=["(unclosed"]', "is not a regular expression"),
    ('train.frozen=[".*"]', "leave no parameter to train"),
])
def test_bad_patterns_name_the_entry(override, message):
    cfg = apply_overrides(tiny_config(data=1, fsdp=1, tensor=1), [override])
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("*", r"\*").replace(".", r"\.")):
        _state_and_step(cfg)


def test_summary_counts_what_trains():
    params = {"embed": np.zeros((10, 4)), "blocks": {"w": np.zeros((2, 4, 4))}}
    cfg = tiny_config()
    cfg.train.trainable = ["embed"]
    mask = trainable.trainable_mask(cfg.train, params)
    assert mask == {"embed": True, "blocks": {"w": False}}
    assert trainable.summary(mask, params) == "4e-05M of 7.2e-05M parameters train (1 of 2 tensors; frozen: blocks/w)"


@pytest.mark.slow
def test_a_frozen_run_logs_what_trains_and_resumes(tmp_path, capsys):
    from omni.train import checkpoint, loop

    cfg = apply_overrides(tiny_config(data=4, fsdp=2, tensor=1),  # moments sharded like their parameters
                          ['train.frozen=["blocks/.*", "final_norm/scale"]', "train.steps=4",
                           "train.checkpoint_every=2", "train.async_checkpoint=False"])
    loop.train(cfg, tmp_path, progress=False)
    out = capsys.readouterr().out
    assert "of " in out and "parameters train (4 of 14 tensors; frozen: blocks/" in out
    first = checkpoint.restore_params(tmp_path, 4)
    cfg.train.steps = 6
    loop.train(cfg, tmp_path, progress=False)
    assert "resumed from" in capsys.readouterr().out
    last = checkpoint.restore_params(tmp_path, 6)
    for name, leaf in _flat(first).items():
        same = np.array_equal(np.asarray(leaf), np.asarray(_flat(last)[name]))
        assert same == (name.startswith("blocks/") or name == "final_norm/scale"), name


def test_frozen_rows_keep_their_values_while_the_rest_of_the_table_trains():
    cfg = apply_overrides(tiny_config(data=1, fsdp=1, tensor=1), ['train.trainable=["embed", "unembed"]'])
    mesh = sharding.make_mesh(cfg.mesh, jax.devices()[:1])
    tx, schedule = build_optimizer(cfg)
    vocab = data.vocab_for(cfg)
    graphdef, state, shardings = init_state(cfg, mesh, tx, vocab)
    frozen = np.zeros(vocab.size, bool)
    frozen[: vocab.size // 2] = True  # e.g. the rows a pretrained model brought (model.init_from)
    step = make_train_step(cfg, graphdef, tx, schedule, mesh, shardings,
                           frozen_rows={"embed": frozen[:, None], "unembed": frozen[None, :]})
    batch = sharding.global_batch(next(iter(data.train_dataset(cfg))), mesh, cfg.mesh.rules)
    embed, unembed = np.asarray(state["params"]["embed"]), np.asarray(state["params"]["unembed"])
    for _ in range(3):
        state, _ = step(state, batch)
    new_embed, new_unembed = np.asarray(state["params"]["embed"]), np.asarray(state["params"]["unembed"])
    assert np.array_equal(new_embed[frozen], embed[frozen])  # weight decay included: not one bit moved
    assert np.array_equal(new_unembed[:, frozen], unembed[:, frozen])
    assert not np.array_equal(new_embed[~frozen], embed[~frozen])
    assert not np.array_equal(new_unembed[:, ~frozen], unembed[:, ~frozen])
    with pytest.raises(ValueError, match="not trainable"):
        make_train_step(cfg, graphdef, tx, schedule, mesh, shardings, frozen_rows={"patch_proj": frozen[:, None]})
