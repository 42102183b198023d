import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from omni.batch import IMAGE, TEXT
from omni.config import ModelConfig
from omni.model.counting import flops_per_token, matmul_params, param_count
from omni.model.transformer import OmniTransformer
from omni.tokens import IMAGE_PATCH

V, PD, L = 128, 12, 10


def _cfg(**kw):
    return ModelConfig(**dict(dict(d=32, layers=2, heads=4, kv_heads=2, dtype="float32"), **kw))


def _batch(seed=0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(16, 100, (2, L))
    modality = np.full((2, L), TEXT)
    tokens[:, 2:4], modality[:, 2:4] = IMAGE_PATCH, IMAGE
    return {"tokens": jnp.array(tokens, jnp.int32),
            "patches": jnp.array(rng.integers(0, 256, (2, 3, PD)), jnp.uint8),  # slot 2 unused (position L)
            "patch_positions": jnp.array([[2, 3, L]] * 2, jnp.int32),
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
    moved = dict(batch, patches=batch["patches"].at[:, 0].add(1))  # the patch at position 2
    assert not np.allclose(model(moved)[:, 2:], logits[:, 2:])
    np.testing.assert_allclose(model(moved)[:, :2], logits[:, :2], atol=1e-6)
    unused = dict(batch, patches=batch["patches"].at[:, 2].add(1))  # an unused slot's pixels go nowhere
    np.testing.assert_allclose(model(unused), logits, atol=1e-6)
    text_slot = dict(unused, patch_positions=batch["patch_positions"].at[:, 2].set(5))  # names a text position
    np.testing.assert_allclose(model(text_slot), logits, atol=1e-6)


@pytest.mark.parametrize("remat", ["full", "dots", "dots_no_batch", "dots_attn"])
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


# ------------------------------------------------------------------------------------------- attention kernels

PACKED_ROWS = np.array([[1, 1, 2, 2, 2, 3, 0, 0],    # three examples, then padding
                        [1, 1, 1, 1, 1, 1, 1, 1],    # one example fills the row
                        [1, 2, 3, 4, 5, 6, 7, 8],    # one token per example
                        [0, 0, 0, 0, 0, 0, 0, 0]])   # all padding


def _mask_from_runs(lengths_BxM, starts_BxM1, length):
    """The causal-free visibility cuDNN's packed attention reads off (lengths, offsets): same run, both in it."""
    t = np.arange(length)
    valid_BxM = lengths_BxM >= 0
    start, end = starts_BxM1[:, :-1, None], starts_BxM1[:, :-1, None] + lengths_BxM[..., None]
    in_run_BxMxL = valid_BxM[..., None] & (t >= start) & (t < end)
    return np.any(in_run_BxMxL[:, :, :, None] & in_run_BxMxL[:, :, None, :], axis=1)[:, None]


def test_packed_runs_describe_exactly_the_segment_mask():
    from omni.model.attention import packed_runs, same_ids_mask

    lengths, starts = map(np.asarray, packed_runs(jnp.asarray(PACKED_ROWS), 8))
    np.testing.assert_array_equal(lengths[0], [2, 3, 1, 2, -1, -1, -1, -1])
    np.testing.assert_array_equal(starts[0], [0, 2, 5, 6, -1, -1, -1, -1, -1])
    np.testing.assert_array_equal(lengths[1], [8] + [-1] * 7)
    np.testing.assert_array_equal(starts[2], list(range(8)) + [-1])
    np.testing.assert_array_equal(lengths[3], [8] + [-1] * 7)
    # Every position lies in exactly one run, so no position is left out of attention (no garbage rows).
    assert np.all(np.where(lengths >= 0, lengths, 0).sum(axis=1) == PACKED_ROWS.shape[1])
    np.testing.assert_array_equal(_mask_from_runs(lengths, starts, 8), np.asarray(same_ids_mask(jnp.asarray(PACKED_ROWS))))
    tight_lengths, tight_starts = map(np.asarray, packed_runs(jnp.asarray(PACKED_ROWS[:1]), 4))  # exactly 4 runs
    np.testing.assert_array_equal(tight_lengths[0], [2, 3, 1, 2])
    np.testing.assert_array_equal(tight_starts[0], [0, 2, 5, 6, -1])


def test_late_fusion_spans_as_runs_match_the_span_mask():
    from omni.model.attention import packed_runs, same_ids_mask
    from omni.model.transformer import span_ids

    modality = np.array([[1, 2, 2, 1, 3, 3, 1, 0]] * 4)
    spans = span_ids(jnp.asarray(PACKED_ROWS), jnp.asarray(modality))
    lengths, starts = map(np.asarray, packed_runs(spans, 8))
    np.testing.assert_array_equal(_mask_from_runs(lengths, starts, 8), np.asarray(same_ids_mask(spans)))


def test_attention_kernel_choice():
    from omni.model.attention import attention_implementation

    assert attention_implementation(_cfg(attention="auto")) == ("cudnn" if jax.default_backend() == "gpu" else "xla")
    assert attention_implementation(_cfg(attention="auto", dtype="float32")) == "xla"  # cuDNN has no fp32 kernels
    assert attention_implementation(_cfg(attention="xla")) == "xla"
    assert attention_implementation(_cfg(attention="cudnn")) == "cudnn"


def test_rows_with_more_runs_than_cudnn_is_set_up_for_are_refused():
    from omni import config as config_lib
    from omni.batch import padding_rows
    from omni.config import Config, ConfigError
    from omni.train.step import check_host_batch

    cfg = Config()
    config_lib.apply_overrides(cfg, ["model.attention=cudnn", "model.max_segments=8", "data.seq_len=8"])
    batch = padding_rows(4, 8, 8, 8 * 8 * 3)
    batch.update(segment_ids=PACKED_ROWS.astype(np.int32),
                 modality=np.array([[1, 2, 2, 1, 3, 3, 1, 0]] * 4, np.int32))
    with pytest.raises(ValueError, match=r"batch field positions: expected int32\[4, 8\], got int64\[4, 8\]"):
        check_host_batch(cfg, dict(batch, positions=np.zeros((4, 8), np.int64)))  # the layout is checked first
    check_host_batch(cfg, batch)  # row 2 holds 8 runs: fits
    cfg.model.max_segments = 7
    with pytest.raises(ConfigError, match=r"batch row 2 holds 8 packed segments.*'model.max_segments' \(7\).*"
                                          r"--set model.max_segments=8"):
        check_host_batch(cfg, batch)
    cfg.model.fusion, cfg.model.late_layers = "late", 1
    with pytest.raises(ConfigError, match=r"batch row 0 holds 8 modality spans"):
        check_host_batch(cfg, batch)  # row 0: a span starts wherever the segment or the modality changes
    cfg.model.attention = "xla"  # XLA builds the dense mask: no limit
    check_host_batch(cfg, batch)


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN attention needs an NVIDIA GPU")
@pytest.mark.parametrize("kv_heads", [4, 2])
def test_cudnn_packed_attention_equals_xla_with_the_segment_mask(kv_heads):
    from omni.model.attention import attend

    rng = np.random.default_rng(0)
    b, l, n, h = 4, 256, 4, 64
    ids = np.repeat(PACKED_ROWS, l // 8, axis=1)
    q, k, v = (jnp.asarray(rng.normal(size=(b, l, heads, h)), jnp.bfloat16) for heads in (n, kv_heads, kv_heads))
    cotangent = jnp.asarray(rng.normal(size=(b, l, n, h)), jnp.float32)
    valid = jnp.asarray(ids > 0)[..., None, None]  # padding rows' outputs are never used; compare real tokens

    def loss(q, k, v, attention):
        out = attend(q, k, v, jnp.asarray(ids), True, ModelConfig(attention=attention, max_segments=8))
        return jnp.sum(jnp.where(valid, out.astype(jnp.float32) * cotangent, 0.0)), out

    (_, out_cudnn), grads_cudnn = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v, "cudnn")
    (_, out_xla), grads_xla = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v, "xla")
    np.testing.assert_allclose(np.where(valid, out_cudnn, 0).astype(np.float32),
                               np.where(valid, out_xla, 0).astype(np.float32), atol=2e-2)
    for g_cudnn, g_xla in zip(grads_cudnn, grads_xla):
        np.testing.assert_allclose(np.asarray(g_cudnn, np.float32), np.asarray(g_xla, np.float32), atol=5e-2)
    assert "cudnn" in jax.jit(loss, static_argnums=3).lower(q, k, v, "cudnn").as_text().lower()


def test_dots_attn_remat_saves_the_fused_attention_kernel_and_weight_matmuls_only():
    from jax.extend.core import Primitive

    from omni.model.transformer import REMAT_POLICIES

    policy = REMAT_POLICIES["dots_attn"]
    assert policy(Primitive("dot_product_attention_fwd_wrapper"))
    assert not policy(Primitive("exp"))
    x = jnp.ones((2, 8, 4))
    jaxpr = jax.make_jaxpr(lambda a, b: (jnp.einsum("bld,de->ble", a, b), jnp.einsum("bld,bmd->blm", a, a)))(
        x, jnp.ones((4, 3))).jaxpr
    weight_matmul, batched_scores = [e for e in jaxpr.eqns if e.primitive.name == "dot_general"]
    assert policy(weight_matmul.primitive, *[v.aval for v in weight_matmul.invars], **weight_matmul.params)
    assert not policy(batched_scores.primitive, *[v.aval for v in batched_scores.invars], **batched_scores.params)


@pytest.mark.parametrize("kv_heads", [4, 2, 1])
def test_packed_attention_hands_the_kernel_whole_heads_and_equals_xla(monkeypatch, kv_heads):
    """The cuDNN call on CPU, with a stand-in kernel that computes what cuDNN's packed PADDING_CAUSAL attention
    computes from (lengths, offsets): GQA reaches the kernel as full heads (jax before PR #39521 reads wrong keys
    for packed GQA) and the result equals XLA's attention under the segment mask."""
    from jax._src.cudnn import fused_attention_stablehlo as cudnn

    from omni.model.attention import attend, runs_of, same_ids_mask

    def kernel(q, k, v, *, q_seqlen, kv_seqlen, q_offsets, kv_offsets, scale, mask_type, qkv_layout):
        assert k.shape[2] == v.shape[2] == q.shape[2]  # no grouped heads reach the packed kernel
        assert mask_type == cudnn.MaskType.PADDING_CAUSAL and qkv_layout == "BTNH"
        visible = jnp.asarray(_mask_from_runs(np.asarray(q_seqlen), np.asarray(q_offsets), q.shape[1]))
        return jax.nn.dot_product_attention(q, k, v, mask=visible, is_causal=True, scale=scale)

    monkeypatch.setattr(cudnn, "dot_product_attention", kernel)
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.normal(size=(4, 8, 4, 8)), jnp.float32)
    k, v = (jnp.asarray(rng.normal(size=(4, 8, kv_heads, 8)), jnp.float32) for _ in range(2))
    ids = jnp.asarray(PACKED_ROWS)
    cfg = _cfg(attention="cudnn", max_segments=8)
    want = jax.nn.dot_product_attention(q, k, v, mask=same_ids_mask(ids), is_causal=True)
    for visible in (runs_of(ids, cfg), ids):  # the runs computed once per pass, or from the ids in the layer
        got = attend(q, k, v, visible, True, cfg)
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5)


@pytest.mark.parametrize("scan_layers", [True, False])
def test_packed_runs_are_computed_once_per_pass_not_per_layer(monkeypatch, scan_layers):
    """cuDNN's segment lengths and offsets come from the segment ids once per forward pass and reach every layer
    (and the remat recomputation) as inputs: no layer redoes the integer cumsum / scatter work."""
    from jax._src.cudnn import fused_attention_stablehlo as cudnn

    from omni.model import attention

    calls = []
    real = attention.packed_runs
    monkeypatch.setattr(attention, "packed_runs", lambda *a: calls.append(1) or real(*a))

    def kernel(q, k, v, *, q_seqlen, q_offsets, scale, **_):
        visible = jnp.asarray(_mask_from_runs(np.asarray(q_seqlen), np.asarray(q_offsets), q.shape[1]))
        return jax.nn.dot_product_attention(q, k, v, mask=visible, is_causal=True, scale=scale)

    monkeypatch.setattr(cudnn, "dot_product_attention", kernel)
    cfg = _cfg(layers=3, attention="cudnn", max_segments=8, scan_layers=scan_layers, remat="full")
    model = OmniTransformer(cfg, V, PD, rngs=nnx.Rngs(0))
    batch = dict(_batch(), segment_ids=jnp.asarray([[1] * 4 + [2] * 6, [1] * 10], jnp.int32))
    got = model(batch)
    assert len(calls) == 1
    want = OmniTransformer(_cfg(layers=3, scan_layers=scan_layers), V, PD, rngs=nnx.Rngs(0))(batch)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5)


@pytest.mark.parametrize("kv_heads,modalities", [(2, 0), (4, 0), (1, 0), (2, 3)])
def test_fused_projections_equal_the_per_weight_textbook_block(kv_heads, modalities):
    """q/k/v and gate/up run as one matmul each with RoPE applied once: the result must be the block written
    out weight by weight (separate einsums, RoPE by split and concatenate), for GQA, MHA, MQA and late fusion's
    per-modality weights."""
    from omni.model.attention import Attention, attend
    from omni.model.layers import SwiGLU, apply_rope, rope_tables

    cfg = ModelConfig(d=32, layers=2, heads=4, kv_heads=kv_heads, mlp=64, dtype="float32")
    attn, mlp = Attention(cfg, nnx.Rngs(1), modalities=modalities), SwiGLU(cfg, nnx.Rngs(2), modalities)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(2, 12, 32)), jnp.float32)
    positions = jnp.asarray(np.concatenate([np.arange(7), np.arange(5)])[None].repeat(2, 0), jnp.int32)
    ids = jnp.asarray([[1] * 7 + [2] * 5] * 2, jnp.int32)
    from omni.model.routing import make_route

    slice_ids = jnp.asarray(rng.integers(0, 3, size=(2, 12)))
    onehot = jax.nn.one_hot(slice_ids, 3)
    route = make_route(slice_ids + 1) if modalities else None  # modality ids: TEXT 1, IMAGE 2, AUDIO 3

    def w(param, m):  # token-wise weight: per-modality slice or the shared weight
        return param[...] if not modalities else param[...][m]

    def textbook_rope(x_):
        half = x_.shape[-1] // 2
        angles = positions[..., None] * cfg.rope_theta ** (-jnp.arange(half) / half)
        sin, cos = jnp.sin(angles)[:, :, None], jnp.cos(angles)[:, :, None]
        x1, x2 = x_[..., :half], x_[..., half:]
        return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)

    def per_token(fn):  # with modalities: each token through its own modality's weights
        if not modalities:
            return fn(0)
        return sum(fn(m) * onehot[..., m].reshape(onehot.shape[:2] + (1,) * (fn(m).ndim - 2)) for m in range(3))

    q = per_token(lambda m: jnp.einsum("bld,dnh->blnh", x, w(attn.wq, m)))
    k = per_token(lambda m: jnp.einsum("bld,dkh->blkh", x, w(attn.wk, m)))
    v = per_token(lambda m: jnp.einsum("bld,dkh->blkh", x, w(attn.wv, m)))
    out = attend(textbook_rope(q), textbook_rope(k), v, ids, True, cfg)
    expected = per_token(lambda m: jnp.einsum("blnh,nhd->bld", out, w(attn.wo, m)))
    got = attn(x, ids, rope_tables(positions, cfg.d // cfg.heads, cfg.rope_theta), route=route)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(apply_rope(q, rope_tables(positions, 8, cfg.rope_theta)), textbook_rope(q),
                               rtol=1e-6, atol=1e-6)

    hidden = per_token(lambda m: jax.nn.silu(x @ w(mlp.w_gate, m)) * (x @ w(mlp.w_up, m)))
    expected_mlp = per_token(lambda m: hidden @ w(mlp.w_down, m))
    np.testing.assert_allclose(mlp(x, route), expected_mlp, rtol=1e-5, atol=1e-5)
