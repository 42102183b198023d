import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from omni.config import ModelConfig
from omni.model import OmniTransformer, flops_per_token, matmul_params, param_count
from omni.tokens import IMAGE, IMAGE_PATCH, TEXT

V, PD, L = 128, 12, 10


def _cfg(**kw):
    return ModelConfig(**dict(dict(d=32, layers=2, heads=4, kv_heads=2, dtype="float32"), **kw))


def _batch(seed=0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(16, 100, (2, L))
    modality = np.full((2, L), TEXT)
    tokens[:, 2:4], modality[:, 2:4] = IMAGE_PATCH, IMAGE
    return {"tokens": jnp.array(tokens, jnp.int32), "patches": jnp.array(rng.normal(size=(2, L, PD)), jnp.float32),
            "modality": jnp.array(modality, jnp.int32), "segment_ids": jnp.ones((2, L), jnp.int32),
            "positions": jnp.tile(jnp.arange(L, dtype=jnp.int32), (2, 1))}


def test_shapes_and_causality():
    model = OmniTransformer(_cfg(), V, PD, rngs=nnx.Rngs(0))
    batch = _batch()
    logits = model(batch)
    assert logits.shape == (2, L, V) and logits.dtype == jnp.float32
    later = dict(batch, tokens=batch["tokens"].at[:, 7].set(5))
    np.testing.assert_allclose(model(later)[:, :7], logits[:, :7], atol=1e-6)
    assert not np.allclose(model(later)[:, 7:], logits[:, 7:])


def test_image_positions_read_pixels_not_the_embedding_table():
    model = OmniTransformer(_cfg(), V, PD, rngs=nnx.Rngs(0))
    batch = _batch()
    logits = model(batch)
    moved = dict(batch, patches=batch["patches"].at[:, 2].add(1.0))
    assert not np.allclose(model(moved)[:, 2:], logits[:, 2:])
    text_pixels = dict(batch, patches=batch["patches"].at[:, 5].add(1.0))  # pixels at a text position are ignored
    np.testing.assert_allclose(model(text_pixels), logits, atol=1e-6)


@pytest.mark.parametrize("remat", ["full", "dots", "dots_no_batch"])
def test_remat_changes_memory_not_results(remat):
    base = OmniTransformer(_cfg(), V, PD, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(OmniTransformer(_cfg(remat=remat), V, PD, rngs=nnx.Rngs(0)), nnx.Param)
    batch = _batch()

    def loss(model_or_params, gd=None):
        model = nnx.merge(gd, model_or_params) if gd else model_or_params
        return jnp.mean(model(batch) ** 2)

    _, base_params = nnx.split(base, nnx.Param)
    g_base = jax.grad(lambda p: loss(p, nnx.graphdef(base)))(base_params)
    g_remat = jax.grad(lambda p: loss(p, graphdef))(params)
    for a, b in zip(jax.tree.leaves(g_base), jax.tree.leaves(g_remat)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_scanned_and_unrolled_layers_compute_the_same_function():
    scanned = OmniTransformer(_cfg(), V, PD, rngs=nnx.Rngs(0))
    unrolled = OmniTransformer(_cfg(scan_layers=False), V, PD, rngs=nnx.Rngs(1))
    stacked = nnx.to_pure_dict(nnx.state(scanned, nnx.Param))
    per_layer = dict(stacked)
    per_layer["blocks"] = {i: jax.tree.map(lambda x: x[i], stacked["blocks"]) for i in range(2)}
    state = nnx.state(unrolled, nnx.Param)
    nnx.replace_by_pure_dict(state, per_layer)
    nnx.update(unrolled, state)
    np.testing.assert_allclose(unrolled(_batch()), scanned(_batch()), rtol=1e-5, atol=1e-6)


def test_parameter_and_flop_counts_match_a_hand_count():
    cfg = _cfg()  # d 32, 2 layers, 4 heads of 8, 2 kv heads, SwiGLU 64
    per_layer = 32 * 32 * 2 + 32 * 16 * 2 + 3 * 32 * 64  # q, o; k, v; gate, up, down
    assert matmul_params(cfg, V) == 2 * per_layer + 32 * V
    norms = 2 * 2 * 32 + 32
    model = OmniTransformer(cfg, V, PD, rngs=nnx.Rngs(0))
    assert param_count(nnx.state(model, nnx.Param)) == matmul_params(cfg, V) + V * 32 + PD * 32 + 32 + norms
    assert flops_per_token(cfg, V, seq_len=16) == 6 * (2 * per_layer + 32 * V) + 6 * 2 * 16 * 32


def test_bf16_compute_keeps_fp32_params_and_tracks_fp32_logits():
    fp32 = OmniTransformer(_cfg(), V, PD, rngs=nnx.Rngs(0))
    bf16 = OmniTransformer(_cfg(dtype="bfloat16"), V, PD, rngs=nnx.Rngs(0))
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(nnx.state(bf16, nnx.Param)))
    low, high = bf16(_batch()), fp32(_batch())
    assert low.dtype == jnp.float32  # the unembedding accumulates in fp32 for the loss
    np.testing.assert_allclose(low, high, atol=0.05)
