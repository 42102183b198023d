import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from omni.batch import AUDIO, PAD, TEXT
from omni.loss import masked_next_token_loss, target_mask


def _batch(tokens, segment_ids, is_target, modality):
    return {"tokens": jnp.array([tokens], jnp.int32), "segment_ids": jnp.array([segment_ids], jnp.int32),
            "is_target": jnp.array([is_target], bool), "modality": jnp.array([modality], jnp.int32)}


LOGITS = np.log(np.array([[
    [0.1, 0.6, 0.2, 0.1],   # t=0 predicts token 1
    [0.25, 0.25, 0.4, 0.1],  # t=1 predicts token 2
    [0.7, 0.1, 0.1, 0.1],   # t=2 predicts token 3 (first of segment 2: must not count)
    [0.2, 0.2, 0.2, 0.4],   # t=3 predicts token 4
    [0.25, 0.25, 0.25, 0.25],  # t=4 predicts token 5 (padding: must not count)
    [0.25, 0.25, 0.25, 0.25],
]], np.float32))
T, A = TEXT, AUDIO
BASE = dict(tokens=[0, 1, 2, 0, 3, 0], segment_ids=[1, 1, 1, 2, 2, 0], is_target=[0, 1, 1, 1, 1, 1],
            modality=[T, T, T, T, A, PAD])


def test_loss_against_hand_computation():
    loss, metrics = masked_next_token_loss(jnp.array(LOGITS), _batch(**BASE))
    # Counted: t=0 -> token 1 (p=0.6, text), t=1 -> token 2 (p=0.4, text), t=3 -> token 4 = 3 (p=0.4, audio).
    expected = -(np.log(0.6) + np.log(0.4) + np.log(0.4)) / 3
    assert float(loss) == pytest.approx(expected, rel=1e-5)
    assert float(metrics["loss/text"]) == pytest.approx(-(np.log(0.6) + np.log(0.4)) / 2, rel=1e-5)
    assert float(metrics["loss/audio"]) == pytest.approx(-np.log(0.4), rel=1e-5)
    assert float(metrics["tokens/text"]) == 2 and float(metrics["tokens/audio"]) == 1
    assert float(metrics["acc/text"]) == 1.0 and float(metrics["acc/audio"]) == 1.0
    np.testing.assert_array_equal(target_mask(_batch(**BASE))[0], [True, True, False, True, False])


def test_non_target_labels_do_not_move_the_loss_and_targets_do():
    loss = masked_next_token_loss(jnp.array(LOGITS), _batch(**BASE))[0]
    for position in (0, 3, 5):  # first token (never predicted), first token of segment 2, padding
        changed = dict(BASE, tokens=list(BASE["tokens"]))
        changed["tokens"][position] = 2
        assert float(masked_next_token_loss(jnp.array(LOGITS), _batch(**changed))[0]) == float(loss)
    for position in (1, 2, 4):
        changed = dict(BASE, tokens=list(BASE["tokens"]))
        changed["tokens"][position] = 0
        assert float(masked_next_token_loss(jnp.array(LOGITS), _batch(**changed))[0]) != pytest.approx(float(loss))


def test_is_target_false_removes_a_position():
    changed = dict(BASE, is_target=[0, 1, 0, 1, 1, 1])
    loss = masked_next_token_loss(jnp.array(LOGITS), _batch(**changed))[0]
    assert float(loss) == pytest.approx(-(np.log(0.6) + np.log(0.4)) / 2, rel=1e-5)


def test_no_leak_across_packed_segments_through_the_model():
    """Logits of one packed example do not depend on the other example's tokens, in either direction."""
    from omni.config import ModelConfig
    from omni.model.transformer import OmniTransformer

    cfg = ModelConfig(d=32, layers=2, heads=4, kv_heads=2, dtype="float32")
    model = OmniTransformer(cfg, 128, 12, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    L = 12
    batch = {"tokens": jnp.array(rng.integers(16, 100, (1, L)), jnp.int32), "patches": jnp.zeros((1, 1, 12), jnp.uint8),
             "patch_positions": jnp.full((1, 1), L, jnp.int32),
             "modality": jnp.full((1, L), TEXT, jnp.int32),
             "segment_ids": jnp.array([[1] * 5 + [2] * 5 + [0] * 2], jnp.int32),
             "positions": jnp.array([list(range(5)) * 2 + [0, 0]], jnp.int32)}
    logits = model(batch)
    first = dict(batch, tokens=batch["tokens"].at[0, 1].set(7))   # change inside segment 1
    second = dict(batch, tokens=batch["tokens"].at[0, 6].set(7))  # change inside segment 2
    np.testing.assert_allclose(model(first)[0, 5:10], logits[0, 5:10], atol=1e-6)
    np.testing.assert_allclose(model(second)[0, :5], logits[0, :5], atol=1e-6)
    assert not np.allclose(model(first)[0, 1:5], logits[0, 1:5])  # the change is seen inside its own segment
    # Segment 2 at positions 0..4 gives the same logits as segment 1 with the same tokens: no position leak.
    same = dict(batch, tokens=batch["tokens"].at[0, 5:10].set(batch["tokens"][0, :5]))
    np.testing.assert_allclose(model(same)[0, 5:10], model(same)[0, :5], atol=1e-5)


def test_gradient_only_from_targets():
    logits = jnp.array(LOGITS)
    grads = jax.grad(lambda lg: masked_next_token_loss(lg, _batch(**BASE))[0])(logits)
    nonzero_rows = np.flatnonzero(np.abs(np.asarray(grads[0])).sum(-1) > 0)
    np.testing.assert_array_equal(nonzero_rows, [0, 1, 3])


def _random_case(seed=0, b=4, length=12, d=8, v=24, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    segment_ids = np.sort(rng.integers(0, 3, (b, length)), axis=1)[:, ::-1].copy()  # segments then padding
    batch = {"tokens": jnp.asarray(rng.integers(0, v, (b, length)), jnp.int32),
             "segment_ids": jnp.asarray(segment_ids, jnp.int32),
             "is_target": jnp.asarray(rng.random((b, length)) < 0.7),
             "modality": jnp.asarray(rng.choice([PAD, TEXT, AUDIO, 2], (b, length)), jnp.int32)}
    hidden = jnp.asarray(rng.normal(size=(b, length, d)), dtype)
    unembed = jnp.asarray(rng.normal(size=(d, v)) / d**0.5, jnp.float32)
    return hidden, unembed, batch


@pytest.mark.parametrize("chunk", [1, 4, 5, 12, 64])
def test_fused_loss_gives_the_sums_and_gradients_of_the_plain_loss(chunk):
    """Any chunk size (5 does not divide 12: the largest divisor under it is used) gives what the full logits give."""
    from omni.loss import fused_loss_sums, loss_sums

    hidden, unembed, batch = _random_case()
    plain = loss_sums(jnp.einsum("bld,dv->blv", hidden, unembed), batch)
    fused = fused_loss_sums(hidden, unembed, batch, chunk)
    assert set(fused) == set(plain)
    for key in plain:
        np.testing.assert_allclose(float(fused[key]), float(plain[key]), rtol=1e-5, err_msg=key)

    def plain_ce(h, w):
        return loss_sums(jnp.einsum("bld,dv->blv", h, w), batch)["ce"]

    want = jax.grad(plain_ce, argnums=(0, 1))(hidden, unembed)
    got = jax.grad(lambda h, w: fused_loss_sums(h, w, batch, chunk)["ce"], argnums=(0, 1))(hidden, unembed)
    for g, w in zip(got, want):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-4, atol=1e-6)
    # A cotangent other than 1 scales both gradients (the backward only scales what the forward made).
    got3 = jax.grad(lambda h, w: 3.0 * fused_loss_sums(h, w, batch, chunk)["ce"], argnums=(0, 1))(hidden, unembed)
    np.testing.assert_allclose(np.asarray(got3[1]), 3.0 * np.asarray(want[1]), rtol=1e-4, atol=1e-6)


def test_fused_loss_holds_no_full_vocabulary_buffer():
    """Compiled on CPU, value and gradient: no temporary the size of [B, L, V] float32 beyond one chunk's."""
    from omni.loss import fused_loss_sums, loss_sums

    hidden, unembed, batch = _random_case(b=2, length=256, d=16, v=4096)

    def temps(fn):
        compiled = jax.jit(jax.grad(fn, argnums=(0, 1))).lower(hidden, unembed).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    full = 2 * 256 * 4096 * 4  # one [B, L, V] float32
    plain = temps(lambda h, w: loss_sums(jnp.einsum("bld,dv->blv", h, w), batch)["ce"])
    fused = temps(lambda h, w: fused_loss_sums(h, w, batch, 32)["ce"])
    assert plain >= full and fused < full / 2, (plain, fused)


def test_mark_absent_and_the_summary_leave_out_a_modality_without_targets():
    from omni.loss import mark_absent
    from omni.train.step import modality_summary

    fetched = {"loss": 2.0, "acc": 0.5, "tokens/target": 10.0, "loss/text": 2.0, "acc/text": 0.5,
               "tokens/text": 10.0, "loss/audio": 0.0, "acc/audio": 0.0, "tokens/audio": 0.0}
    marked = mark_absent(fetched)
    assert marked["loss/audio"] is None and marked["acc/audio"] is None and marked["tokens/audio"] == 0.0
    assert marked["loss/text"] == 2.0 and fetched["loss/audio"] == 0.0  # the input is left as it was
    assert modality_summary(marked) == "text 2.000 (acc 50.0%)"
    nothing = mark_absent(dict(fetched, **{"tokens/target": 0.0, "tokens/text": 0.0}))
    assert nothing["loss"] is None and nothing["loss/text"] is None
    assert modality_summary(nothing) == "none (no target tokens)"


def test_image_codes_are_scored_as_image_only_where_they_are_targets():
    """A packed row: [text prompt | learned image codes] [image codes as input | text answer] [padding]."""
    from omni.batch import IMAGE
    from omni.loss import fused_loss_sums, loss_sums, metrics_from_sums

    I = IMAGE
    batch = dict(tokens=[0, 5, 9, 10, 11, 0, 12, 13, 6, 7, 0],
                 segment_ids=[1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 0],
                 is_target=[0, 0, 1, 1, 1, 0, 0, 0, 1, 1, 0],
                 modality=[T, T, I, I, I, T, I, I, T, T, PAD])
    logits = jnp.array(np.random.default_rng(0).normal(size=(1, 11, 16)), jnp.float32)
    loss, metrics = masked_next_token_loss(logits, _batch(**batch))
    assert float(metrics["tokens/image"]) == 3 and float(metrics["tokens/text"]) == 2
    log_p = jax.nn.log_softmax(logits[0], axis=-1)
    image_ce = -np.mean([float(log_p[t, batch["tokens"][t + 1]]) for t in (1, 2, 3)])
    assert float(metrics["loss/image"]) == pytest.approx(image_ce, rel=1e-5)
    # label change: a code that is not a target (segment 2's input image) leaves every number as it was ...
    for position in (6, 7):
        changed = dict(batch, tokens=list(batch["tokens"]))
        changed["tokens"][position] = 15
        changed_metrics = masked_next_token_loss(logits, _batch(**changed))[1]
        for key in ("loss", "loss/image", "loss/text"):
            assert float(changed_metrics[key]) == float(metrics[key])
    # ... and a learned one moves loss/image
    changed = dict(batch, tokens=list(batch["tokens"]))
    changed["tokens"][3] = 15
    assert float(masked_next_token_loss(logits, _batch(**changed))[1]["loss/image"]) != pytest.approx(
        float(metrics["loss/image"]))
    # the trainer's fused loss gives the same per-modality sums
    full = _batch(**batch)
    hidden, unembed = logits, jnp.eye(16, dtype=jnp.float32)
    plain, fused = loss_sums(logits, full), fused_loss_sums(hidden, unembed, full, chunk=4)
    for key in ("ce/image", "count/image", "correct/image"):
        assert float(fused[key]) == pytest.approx(float(plain[key]), rel=1e-5)
    assert set(metrics_from_sums(plain)) >= {"loss/image", "acc/image", "tokens/image"}
