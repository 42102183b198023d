"""The same batch and init give the same loss and gradients on 1 device and on 8 devices under several meshes."""

import jax
import numpy as np
import pytest

from omni import sharding
from omni.config import ConfigError, MeshConfig
from omni.data import pipeline as data
from omni.train.step import build_optimizer, init_state, make_train_step
from tests.conftest import tiny_config


def _loss_and_grads(cfg, devices):
    mesh = sharding.make_mesh(cfg.mesh, devices)
    tx, schedule = build_optimizer(cfg)
    graphdef, state, shardings = init_state(cfg, mesh, tx, data.vocab_for(cfg))
    step = make_train_step(cfg, graphdef, tx, schedule, mesh, shardings)
    batch = next(iter(data.train_dataset(cfg)))
    params_before = jax.device_get(state["params"])
    new_state, metrics = step(state, sharding.global_batch(batch, mesh, cfg.mesh.rules))
    params_after = jax.device_get(new_state["params"])
    # Adam's first step moves every weight by ~lr * sign(grad): the update carries the gradient's direction.
    update = jax.tree.map(lambda a, b: a - b, params_after, params_before)
    return jax.device_get(metrics), params_before, update, new_state


@pytest.fixture(scope="module")
def single_device():
    return _loss_and_grads(tiny_config(data=1, fsdp=1, tensor=1), jax.devices()[:1])


@pytest.mark.parametrize("shape", [(8, 1, 1), (2, 2, 2), (1, 2, 4)])
def test_eight_devices_match_one(single_device, shape):
    assert len(jax.devices()) == 8
    cfg = tiny_config(data=shape[0], fsdp=shape[1], tensor=shape[2])
    metrics, params, update, state = _loss_and_grads(cfg, jax.devices())
    ref_metrics, ref_params, ref_update, _ = single_device
    for key in ("loss", "loss/text", "loss/audio", "grad_norm", "tokens/text"):
        assert metrics[key] == pytest.approx(ref_metrics[key], rel=2e-5), key
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ref_params)):
        np.testing.assert_array_equal(a, b)  # same init whatever the mesh
    for a, b in zip(jax.tree.leaves(update), jax.tree.leaves(ref_update)):
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-6)
    # Parameters really are split: the embedding table's 'embed' axis goes to fsdp, 'vocab' to tensor.
    embed = state["params"]["embed"]
    assert embed.sharding.shard_shape(embed.shape) == (embed.shape[0] // shape[2], embed.shape[1] // shape[1])


def test_gradient_accumulation_matches_one_big_batch(single_device):
    cfg = tiny_config(data=1, fsdp=1, tensor=1)
    cfg.train.grad_accum = 4
    metrics, _, update, _ = _loss_and_grads(cfg, jax.devices()[:1])
    ref_metrics, _, ref_update, _ = single_device
    assert metrics["loss"] == pytest.approx(ref_metrics["loss"], rel=1e-5)
    assert metrics["grad_norm"] == pytest.approx(ref_metrics["grad_norm"], rel=1e-4)
    for a, b in zip(jax.tree.leaves(update), jax.tree.leaves(ref_update)):
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-6)


def test_mesh_that_does_not_fit_says_what_would():
    with pytest.raises(sharding.MeshError) as e:
        sharding.make_mesh(MeshConfig(data=3, fsdp=1, tensor=1))
    message = str(e.value)
    assert "needs 3 devices but 8 are available" in message and "data=2 fsdp=2 tensor=2" in message
    with pytest.raises(sharding.MeshError, match="do not divide|does not divide"):
        sharding.make_mesh(MeshConfig(data=-1, fsdp=3, tensor=1))
    assert sharding.mesh_shape(MeshConfig(data=-1, fsdp=2, tensor=2), 8) == (2, 2, 2)


def test_batch_that_does_not_split_over_the_mesh_is_refused():
    cfg = tiny_config(data=8, fsdp=1, tensor=1)
    cfg.train.batch_size = 4
    with pytest.raises(ConfigError, match="batch_size"):
        sharding.check_batch_fits_mesh(cfg, sharding.make_mesh(cfg.mesh))


@pytest.mark.slow
@pytest.mark.parametrize("fusion", [["model.fusion=late", "model.late_layers=1"], ["model.fusion=mot"],
                                    ["model.fusion=cross", "model.encoder_layers=1"]])
def test_late_mot_and_cross_fusion_shard_like_early(fusion):
    """The per-modality weights ([modality] axis unsharded) and the cross blocks split over fsdp and tensor, and
    one step on 8 devices equals one step on 1 (the per-modality layers' tokens grouped over the whole batch)."""
    from omni.config import apply_overrides

    one = apply_overrides(tiny_config(data=1, fsdp=1, tensor=1), fusion)
    ref_metrics, _, ref_update, _ = _loss_and_grads(one, jax.devices()[:1])
    metrics, _, update, state = _loss_and_grads(apply_overrides(tiny_config(data=2, fsdp=2, tensor=2), fusion),
                                                jax.devices())
    for key in ("loss", "grad_norm"):
        assert metrics[key] == pytest.approx(ref_metrics[key], rel=2e-5), key
    for a, b in zip(jax.tree.leaves(update), jax.tree.leaves(ref_update)):
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-6)
    stack = state["params"][{"late": "modality_blocks", "mot": "blocks"}.get(fusion[0].split("=")[1], "cross_blocks")]
    wq = stack["attn"]["wq"]  # [layers, (modality,) d, heads, head_dim]: d over fsdp, heads over tensor
    assert wq.sharding.shard_shape(wq.shape)[-3:] == (wq.shape[-3] // 2, wq.shape[-2] // 2, wq.shape[-1])


def test_dcn_sizes_must_match_the_slices_or_processes():
    cfg = MeshConfig(data=8, dcn_data=2)  # one process here: one granule
    with pytest.raises(sharding.MeshError, match="= 2 but the job has 1 processes"):
        sharding.make_mesh(cfg)
    with pytest.raises(sharding.MeshError, match="mesh.fsdp = 2 does not divide into mesh.dcn_fsdp = 4"):
        sharding.make_mesh(MeshConfig(data=4, fsdp=2, dcn_fsdp=4))
    mesh = sharding.make_mesh(MeshConfig(data=4, fsdp=2, dcn_data=1))
    assert dict(mesh.shape) == {"data": 4, "fsdp": 2, "tensor": 1}


@pytest.mark.parametrize("loss_chunk", [0, 32])
def test_the_fused_loss_trains_like_the_full_logits(single_device, loss_chunk):
    """train.loss_chunk (default: fused, one chunk of 128 here) against 0 (the plain loss over full logits) and
    a chunk of 32 (4 chunks): the same step."""
    cfg = tiny_config(data=1, fsdp=1, tensor=1)
    cfg.train.loss_chunk = loss_chunk
    metrics, _, update, _ = _loss_and_grads(cfg, jax.devices()[:1])
    ref_metrics, _, ref_update, _ = single_device
    for key in ("loss", "loss/text", "loss/audio", "acc", "grad_norm"):
        assert metrics[key] == pytest.approx(ref_metrics[key], rel=1e-5), key
    for a, b in zip(jax.tree.leaves(update), jax.tree.leaves(ref_update)):
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-6)


def test_parameters_the_mesh_cannot_divide_are_said_at_the_start_of_train(tmp_path, capsys):
    """kv_heads=2 on a tensor axis of 4: wk and wv stay whole there; that went to a logger nobody configured."""
    from omni.train import loop
    from tests.conftest import tiny_config

    cfg = tiny_config(data=2, tensor=4)
    cfg.train.steps, cfg.train.checkpoint_every, cfg.train.eval_batches = 1, 0, 1
    loop.train(cfg, tmp_path / "run", progress=False)
    (line,) = [l for l in capsys.readouterr().out.splitlines() if "stay whole along a mesh axis" in l]
    assert line.startswith("omni: 2 parameter(s) stay whole along a mesh axis that does not divide them (mesh "
                           "{'data': 2, 'fsdp': 1, 'tensor': 4}"), line
    assert "blocks.attn.wk [2, 32, 2, 8]: wanted (" in line and "blocks.attn.wv [2, 32, 2, 8]" in line
    capsys.readouterr()
    cfg = tiny_config()  # data 8: everything divides
    cfg.train.steps, cfg.train.checkpoint_every, cfg.train.eval_batches = 1, 0, 1
    loop.train(cfg, tmp_path / "run2", progress=False)
    assert "stay whole" not in capsys.readouterr().out
