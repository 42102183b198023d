"""Fusion variants (model.fusion): late k=0 is early, late's first layers are per modality and per span, mot with equal
modality slices is early, cross with closed gates is its decoder alone, the parameter / FLOP counts match a hand
count, and the per-modality layers compute one weight slice per token (omni.model.routing)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from omni.batch import AUDIO, IMAGE, TEXT
from omni.config import Config, ConfigError, ModelConfig, apply_overrides, parse_variant
from omni.model.attention import same_ids_mask
from omni.model.counting import flops_per_token, matmul_params, param_count, param_total
from omni.model.transformer import OmniTransformer, span_ids
from omni.tokens import IMAGE_PATCH

V, PD, L = 128, 12, 12


def _cfg(**kw):
    return ModelConfig(**dict(dict(d=32, layers=2, heads=4, kv_heads=2, dtype="float32"), **kw))


def _batch(seed=0):
    """Two rows: [text x2, image x4, text x3, audio x3]; row 1 holds two segments (split after position 5)."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(16, 100, (2, L))
    modality = np.array([[TEXT] * 2 + [IMAGE] * 4 + [TEXT] * 3 + [AUDIO] * 3] * 2)
    tokens[modality == IMAGE] = IMAGE_PATCH
    segments = np.ones((2, L), np.int32)
    segments[1, 6:] = 2
    positions = np.stack([np.arange(L), np.r_[np.arange(6), np.arange(6)]])
    return {"tokens": jnp.array(tokens, jnp.int32), "patches": jnp.array(rng.integers(0, 256, (2, 4, PD)), jnp.uint8),
            "patch_positions": jnp.array([[2, 3, 4, 5]] * 2, jnp.int32),
            "modality": jnp.array(modality, jnp.int32), "segment_ids": jnp.array(segments),
            "positions": jnp.array(positions, jnp.int32)}


def _params(model):
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def test_span_ids_change_with_modality_and_segment():
    batch = _batch()
    np.testing.assert_array_equal(span_ids(batch["segment_ids"], batch["modality"]),
                                  [[1, 1, 2, 2, 2, 2, 3, 3, 3, 4, 4, 4], [1, 1, 2, 2, 2, 2, 3, 3, 3, 4, 4, 4]])
    mod = batch["modality"].at[1, 6].set(IMAGE)  # same modality across a segment boundary is still a new span
    assert span_ids(batch["segment_ids"], mod)[1].tolist() == [1, 1, 2, 2, 2, 2, 3, 4, 4, 5, 5, 5]


@pytest.mark.parametrize("scan", [True, False])
def test_late_with_zero_layers_is_early(scan):
    early = OmniTransformer(_cfg(scan_layers=scan), V, PD, rngs=nnx.Rngs(0))
    late = OmniTransformer(_cfg(scan_layers=scan, fusion="late", late_layers=0), V, PD, rngs=nnx.Rngs(0))
    jax.tree.map(np.testing.assert_array_equal, _params(early), _params(late))
    np.testing.assert_array_equal(early(_batch()), late(_batch()))


@pytest.mark.parametrize("scan", [True, False])
def test_late_layers_are_per_modality_and_per_span(scan):
    """With every layer modality-specific, a text position's logits depend on nothing outside its own span,
    and changing the audio weights changes only audio positions."""
    model = OmniTransformer(_cfg(scan_layers=scan, fusion="late", late_layers=2), V, PD, rngs=nnx.Rngs(0))
    batch = _batch()
    logits = model(batch)
    other_spans = dict(batch, patches=batch["patches"] + 1, tokens=batch["tokens"].at[:, 0].set(7))
    changed = model(other_spans)
    np.testing.assert_allclose(changed[:, 6:9], logits[:, 6:9], atol=1e-6)  # the caption span: untouched
    assert not np.allclose(changed[:, 2:6], logits[:, 2:6])  # the image span read its new pixels

    wq = model.modality_blocks.attn.wq if scan else model.modality_blocks[0].attn.wq
    wq[...] = wq[...].at[..., 2, :, :, :].add(0.3) if scan else wq[...].at[2].add(0.3)  # the audio slice
    moved = model(batch)
    audio = np.asarray(batch["modality"]) == AUDIO
    assert not np.allclose(np.asarray(moved)[audio], np.asarray(logits)[audio])
    np.testing.assert_allclose(np.asarray(moved)[~audio], np.asarray(logits)[~audio], atol=1e-6)


def test_late_with_shared_layers_fuses_modalities():
    model = OmniTransformer(_cfg(layers=3, fusion="late", late_layers=1), V, PD, rngs=nnx.Rngs(0))
    batch = _batch()
    moved = dict(batch, patches=batch["patches"] + 1)
    assert not np.allclose(model(moved)[0, 6:9], model(batch)[0, 6:9])  # the shared layers see the image
    assert model.blocks.attn.wq.shape[0] == 2 and model.modality_blocks.attn.wq.shape[:2] == (1, 3)


def _decoder_alone(model, batch):
    """The cross model without its encoder and gated blocks: embedding, decoder blocks, unembedding."""
    seg, mod = batch["segment_ids"], batch["modality"]
    is_image = mod == IMAGE
    mask = same_ids_mask(seg) & (~is_image[:, None, None, :] | jnp.eye(L, dtype=bool)[None, None])
    x = model._run_stack(model.blocks, model.embed_inputs(batch), lambda: mask, model.rope_tables(batch["positions"]))
    return model.vocab_logits(model.final_norm(x))


@pytest.mark.parametrize("scan", [True, False])
def test_cross_with_closed_gates_is_its_decoder_alone(scan):
    model = OmniTransformer(_cfg(layers=4, fusion="cross", encoder_layers=2, cross_every=2, scan_layers=scan), V, PD,
                            rngs=nnx.Rngs(0))
    batch = _batch()
    logits = model(batch)
    np.testing.assert_allclose(logits, _decoder_alone(model, batch), atol=1e-6)
    moved = dict(batch, patches=batch["patches"] + 1)
    np.testing.assert_allclose(model(moved)[:, 6:], logits[:, 6:], atol=1e-6)  # images do not reach the text yet

    cross = model.cross_blocks
    for gate in ((cross.attn_gate,) if scan else (cross[0].attn_gate, cross[1].attn_gate)):
        gate[...] = jnp.full_like(gate[...], 0.5)
    opened = model(batch)
    assert not np.allclose(model(moved)[0, 6:9], opened[0, 6:9])  # now the caption reads the image before it
    # row 1's second segment (positions 6..) holds no image: nothing reaches it through the cross blocks
    np.testing.assert_allclose(model(moved)[1, 6:], opened[1, 6:], atol=1e-6)
    np.testing.assert_allclose(opened[:, :2], logits[:, :2], atol=1e-6)  # text before the image sees no image


def test_cross_gates_get_gradients_at_init():
    model = OmniTransformer(_cfg(layers=2, fusion="cross", encoder_layers=1), V, PD, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model, nnx.Param)
    grads = jax.grad(lambda p: jnp.mean(nnx.merge(graphdef, p)(_batch()) ** 2))(params)
    assert np.all(np.abs(np.asarray(grads["cross_blocks"]["attn_gate"][...])) > 0)


@pytest.mark.parametrize("kw", [dict(), dict(fusion="late", late_layers=1), dict(fusion="late", late_layers=2),
                                dict(fusion="mot"), dict(fusion="cross", encoder_layers=1, cross_every=1),
                                dict(fusion="cross", encoder_layers=3, cross_every=2, layers=4)])
def test_parameter_and_flop_counts_match_a_hand_count(kw):
    cfg = _cfg(**kw)  # d 32, 4 heads of 8, 2 KV heads, SwiGLU 64 (the multiple of 64 nearest 8/3 * 32)
    block_mm = 32 * 32 * 2 + 32 * 16 * 2 + 3 * 32 * 64  # q, o; k, v; gate, up, down = 9216
    block = block_mm + 2 * 32  # + two norm scales
    layers, k = cfg.layers, {"late": cfg.late_layers, "mot": cfg.layers}.get(cfg.fusion, 0)  # per-modality blocks
    enc = cfg.encoder_layers if cfg.fusion == "cross" else 0
    cross = layers // cfg.cross_every if cfg.fusion == "cross" else 0
    outer = V * 32 + PD * 32 + 32 + 32 + 32 * V  # embed, patch proj, bias, final norm, unembed
    hand_params = outer + (layers - k + enc) * block + 3 * k * block + cross * (block + 2) + (32 if enc else 0)
    model = OmniTransformer(cfg, V, PD, rngs=nnx.Rngs(0))
    assert param_count(nnx.state(model, nnx.Param)) == hand_params == param_total(cfg, V, PD)
    hand_mm = (layers + enc + cross) * block_mm + 32 * V  # late, mot: each token through `layers` blocks of one slice
    assert matmul_params(cfg, V) == hand_mm
    causal = layers + cross + 2 * enc
    assert flops_per_token(cfg, V, seq_len=16) == 6 * hand_mm + 6 * causal * 16 * 32


def test_fusion_fields_are_checked():
    with pytest.raises(ConfigError, match="late_layers"):
        apply_overrides(Config(), ["model.late_layers=2"])  # fusion still early
    with pytest.raises(ConfigError, match="between 0 and"):
        apply_overrides(Config(), ["model.fusion=late", "model.late_layers=9"])
    with pytest.raises(ConfigError, match="cross_every"):
        apply_overrides(Config(), ["model.fusion=cross", "model.cross_every=3"])
    with pytest.raises(ConfigError, match="'late:K'"):
        apply_overrides(Config(), ["ablate.variants=['early', 'late']"])
    with pytest.raises(ConfigError, match="'mot'"):
        apply_overrides(Config(), ["ablate.variants=['mot:2']"])
    assert parse_variant("mot") == ("mot", 0)
    assert apply_overrides(Config(), ["model.fusion=mot"]).model.modality_matmul == "tiles"


# ------------------------------------------------------------------------------------------ mot (Mixture-of-Transformers)

def _as_mot(early, mot, scan: bool):
    """mot with early's weights: every modality slice of a block weight a copy of early's block weight."""
    weights = _params(early)
    weights["blocks"] = jax.tree.map(lambda x: np.repeat(np.expand_dims(x, int(scan)), 3, axis=int(scan)),
                                     weights["blocks"])
    state = nnx.state(mot, nnx.Param)
    nnx.replace_by_pure_dict(state, weights)
    nnx.update(mot, state)
    return mot


@pytest.mark.parametrize("scan", [True, False])
def test_mot_with_equal_modality_slices_is_early(scan):
    early = OmniTransformer(_cfg(scan_layers=scan), V, PD, rngs=nnx.Rngs(0))
    mot = _as_mot(early, OmniTransformer(_cfg(scan_layers=scan, fusion="mot"), V, PD, rngs=nnx.Rngs(1)), scan)
    wq = mot.blocks.attn.wq if scan else mot.blocks[0].attn.wq
    assert wq.shape == ((2, 3, 32, 4, 8) if scan else (3, 32, 4, 8))
    np.testing.assert_allclose(mot(_batch()), early(_batch()), rtol=1e-5, atol=1e-5)


def test_mot_attends_over_the_whole_example_and_routes_each_token_through_its_slice():
    model = OmniTransformer(_cfg(fusion="mot"), V, PD, rngs=nnx.Rngs(0))
    batch = _batch()
    logits = model(batch)
    moved = dict(batch, patches=batch["patches"] + 1)
    assert not np.allclose(model(moved)[0, 6:9], logits[0, 6:9])  # unlike late: the caption reads the image

    model.blocks.mlp.w_down[...] = model.blocks.mlp.w_down[...].at[:, 2].add(0.3)  # the audio slice of every layer
    changed = np.asarray(model(batch))
    audio = np.asarray(batch["modality"]) == AUDIO  # positions 9..11, the last of every row: nothing reads them
    assert not np.allclose(changed[audio], np.asarray(logits)[audio])
    np.testing.assert_allclose(changed[~audio], np.asarray(logits)[~audio], atol=1e-6)


def test_mot_trains_on_text_image_and_audio():
    """The real train step, overfitting one packed batch of image captions, speech and text: the text and audio
    losses fall, and every modality's slice of the weights (the image's too) moves."""
    from omni import sharding
    from omni.tools.bench import bench_vocab, synthetic_batch
    from omni.train.step import build_optimizer, init_state, make_train_step
    from tests.conftest import tiny_config

    cfg = tiny_config(data=1, fsdp=1, tensor=1)
    cfg.model.fusion, cfg.train.lr, cfg.train.warmup_steps, cfg.train.weight_decay = "mot", 1e-2, 5, 0.0
    cfg.data.patch_size, cfg.data.max_image_patches, cfg.train.batch_size = 8, 4, 4
    vocab = bench_vocab(1024, 2, 128)
    mesh = sharding.make_mesh(cfg.mesh, jax.devices()[:1])
    host = synthetic_batch(cfg, vocab, np.random.default_rng(4))  # seed 4: rows with audio targets too
    assert {int(m) for m in np.unique(host["modality"][host["is_target"]])} == {TEXT, AUDIO}
    assert np.any(host["modality"] == IMAGE)
    tx, schedule = build_optimizer(cfg)
    graphdef, state, shardings = init_state(cfg, mesh, tx, vocab)
    before = np.asarray(state["params"]["blocks"]["mlp"]["w_up"])
    step = make_train_step(cfg, graphdef, tx, schedule, mesh, shardings)
    batch = sharding.global_batch(host, mesh, cfg.mesh.rules)
    history = []
    for _ in range(30):
        state, metrics = step(state, batch)
        history.append({k: float(metrics[k]) for k in ("loss/text", "loss/audio")})
    for name in ("loss/text", "loss/audio"):
        assert history[-1][name] < 0.7 * history[0][name], (name, history[0], history[-1])
    after = np.asarray(state["params"]["blocks"]["mlp"]["w_up"])
    for modality in range(3):  # [layers, modality, d, mlp]: each slice was trained
        assert not np.allclose(after[:, modality], before[:, modality])


# ------------------------------------------------------------------------ per-modality matmuls: one slice per token

def test_route_lays_tokens_out_one_modality_per_tile():
    from omni.model.routing import TILES, make_route

    modality = jnp.asarray(np.random.default_rng(0).choice([0, TEXT, IMAGE, AUDIO], size=(4, 80)), jnp.int32)
    route = make_route(modality, "tiles")
    tokens, rows, tiles = 320, route.tile_rows, route.tile_group_K.shape[0]
    assert rows == 10 and tiles == TILES + 2  # ceil(320 / 32) rows; at most 2 tiles of padding for 3 modalities
    token_of_slot = np.asarray(route.token_of_slot_C)
    np.testing.assert_array_equal(token_of_slot[np.asarray(route.slot_T)], np.arange(tokens))  # a permutation
    slice_of_token = np.r_[np.asarray(route.index_BxL).reshape(-1), -1]  # -1: an empty slot
    per_tile = slice_of_token[token_of_slot].reshape(tiles, rows)
    for tile, group in zip(per_tile, np.asarray(route.tile_group_K)):
        assert set(tile[tile >= 0]) <= {group}
    np.testing.assert_array_equal(route.group_sizes_M, np.bincount(slice_of_token[:-1], minlength=3))


@pytest.mark.parametrize("method", ["tiles", "ragged_dot"])
@pytest.mark.parametrize("kw", [dict(fusion="late", late_layers=2), dict(fusion="mot")])
def test_grouped_modality_matmuls_equal_the_masked_reference(kw, method):
    """The same weights, each token through its own slice: logits and gradients as the masked 3x path's."""
    def logits_and_grads(matmul):
        model = OmniTransformer(_cfg(modality_matmul=matmul, **kw), V, PD, rngs=nnx.Rngs(0))
        graphdef, params = nnx.split(model, nnx.Param)

        def loss(p):
            logits = nnx.merge(graphdef, p)(_batch())
            return jnp.mean(jax.nn.logsumexp(logits, axis=-1)), logits

        (_, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
        return logits, grads

    (want, want_grads), (got, got_grads) = logits_and_grads("masked"), logits_and_grads(method)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-6), got_grads, want_grads)


def _compiled_matmul_flops(**kw) -> float:
    """Matmul FLOPs of one compiled forward + backward pass (the train step's dots; loop bodies times their trip
    counts, omni.train.perf.hlo_step_counts) on 4 rows of 64 positions: text, an image, text, audio."""
    from omni.train.perf import hlo_step_counts

    rows, length = 4, 64
    modality = np.array([[TEXT] * 10 + [IMAGE] * 16 + [TEXT] * 14 + [AUDIO] * 24] * rows)
    tokens = np.where(modality == IMAGE, IMAGE_PATCH, 20)
    batch = {"tokens": jnp.array(tokens, jnp.int32), "modality": jnp.array(modality, jnp.int32),
             "patches": jnp.zeros((rows, 16, PD), jnp.uint8),
             "patch_positions": jnp.tile(jnp.arange(10, 26, dtype=jnp.int32), (rows, 1)),
             "segment_ids": jnp.ones((rows, length), jnp.int32),
             "positions": jnp.tile(jnp.arange(length, dtype=jnp.int32), (rows, 1))}
    model = OmniTransformer(_cfg(d=64, scan_layers=False, **kw), V, PD, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model, nnx.Param)
    loss = lambda p, b: jnp.mean(jax.nn.logsumexp(nnx.merge(graphdef, p)(b), axis=-1))  # noqa: E731
    return hlo_step_counts(jax.jit(jax.grad(loss)).lower(params, batch).compile().as_text())["flops"]


def test_late_and_mot_compile_to_the_matmul_flops_of_early():
    """At equal FLOPs per token (the count says so), the compiled step's matmul FLOPs stay within 10% of early's
    (the tile padding is at most 2 of 32 tiles in the per-modality layers); the masked path is ~3x there."""
    early = _compiled_matmul_flops()
    assert flops_per_token(_cfg(d=64, fusion="mot"), V, 64) == flops_per_token(_cfg(d=64), V, 64)
    assert _compiled_matmul_flops(fusion="late", late_layers=1) / early <= 1.10
    assert _compiled_matmul_flops(fusion="late", late_layers=2) / early <= 1.10
    assert _compiled_matmul_flops(fusion="mot") / early <= 1.10
    assert _compiled_matmul_flops(fusion="mot", modality_matmul="masked") / early > 2.0
