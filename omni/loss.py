"""Masked next-token loss, with loss / accuracy / token count per target modality.

The prediction at position t is scored against token t+1 only where

    is_target[t+1]                              the next token is a target of its example (omni.batch)
    and segment_ids[t] == segment_ids[t+1] > 0  both positions are in the same real (non-padding) example

so nothing is learned across packed examples, on padding, or for image patches. Image codes (omni.batch) are
scored like text and audio, under modality IMAGE: loss/image, acc/image, tokens/image.

Normalisation (a documented choice): the loss is the mean cross-entropy over all target tokens of the global
batch, every token weighing the same whichever example it came from. The sums functions return sums and counts
so that gradient accumulation divides once by the token count of the whole step, not per micro-batch.

Two ways to the same sums:

    loss_sums(logits_BxLxV, batch)                   from the model's logits (eval, tests, small vocabularies)
    fused_loss_sums(hidden_BxLxD, unembed_DxV, batch, chunk)
                                                     the trainer's: the unembedding and the cross-entropy run
                                                     chunk positions at a time, and the gradient of the summed
                                                     cross-entropy is made in the same pass (a custom VJP), so no
                                                     [B, L, V] array is held whole and the output projection is
                                                     not computed twice. Labels are shifted, logits never sliced.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from omni.batch import AUDIO, IMAGE, MODALITY_NAMES, TEXT

LOSS_MODALITIES = {MODALITY_NAMES[TEXT]: TEXT, MODALITY_NAMES[AUDIO]: AUDIO, MODALITY_NAMES[IMAGE]: IMAGE}


def target_mask(batch) -> jax.Array:
    """bool [B, L-1]: which next-token predictions count (see module docstring)."""
    segment_ids = batch["segment_ids"]
    same_segment = (segment_ids[:, :-1] == segment_ids[:, 1:]) & (segment_ids[:, 1:] > 0)
    return batch["is_target"][:, 1:] & same_segment


def loss_sums(logits_BxLxV, batch) -> dict:
    """Sums of cross-entropy and correct predictions, and target counts: overall and per modality."""
    logits = logits_BxLxV[:, :-1].astype(jnp.float32)
    labels_BxL1 = batch["tokens"][:, 1:]
    mask = target_mask(batch)
    log_z = jax.nn.logsumexp(logits, axis=-1)
    label_logit = jnp.take_along_axis(logits, labels_BxL1[..., None], axis=-1)[..., 0]
    ce_BxL1 = log_z - label_logit
    correct_BxL1 = jnp.argmax(logits, axis=-1) == labels_BxL1
    return _sums(ce_BxL1, correct_BxL1, mask, batch["modality"][:, 1:])


def _sums(ce_BxT, correct_BxT, mask_BxT, next_modality_BxT) -> dict:
    """The sums both losses return, from per-prediction cross-entropy and correctness and which ones count."""
    sums = {"ce": jnp.sum(jnp.where(mask_BxT, ce_BxT, 0.0)), "count": jnp.sum(mask_BxT, dtype=jnp.float32),
            "correct": jnp.sum(mask_BxT & correct_BxT, dtype=jnp.float32)}
    for name, modality_id in LOSS_MODALITIES.items():
        m = mask_BxT & (next_modality_BxT == modality_id)
        sums[f"ce/{name}"] = jnp.sum(jnp.where(m, ce_BxT, 0.0))
        sums[f"correct/{name}"] = jnp.sum(m & correct_BxT, dtype=jnp.float32)
        sums[f"count/{name}"] = jnp.sum(m, dtype=jnp.float32)
    return sums


def fused_loss_sums(hidden_BxLxD, unembed_DxV, batch, chunk: int) -> dict:
    """The sums of loss_sums, from the final hidden states and the unembedding weight, `chunk` positions at a time.

    Only "ce" carries a gradient (into hidden and unembed); the other sums are statistics. Position t is scored
    against token t+1 as in loss_sums; the last position of each row has no label and is masked.
    """
    labels_BxL, mask_BxL, next_modality_BxL = _shifted(batch)
    length = hidden_BxLxD.shape[1]
    size = max(c for c in range(1, min(chunk, length) + 1) if length % c == 0)
    ce_sum, ce_BxL, correct_BxL = _fused_ce(hidden_BxLxD, unembed_DxV, labels_BxL, mask_BxL, size)
    sums = _sums(jax.lax.stop_gradient(ce_BxL), correct_BxL, mask_BxL, next_modality_BxL)
    sums["ce"] = ce_sum  # the same value, through the custom VJP: the one sum that carries the gradient
    return sums


def target_count(batch) -> jax.Array:
    """float32 []: how many predictions count in `batch` (the divisor of the mean loss), known before the model
    runs, so the gradient can be of the mean directly."""
    return jnp.sum(target_mask(batch), dtype=jnp.float32)


def _shifted(batch):
    """labels, mask and next modality [B, L]: at position t those of token t+1; the last column is masked."""
    def shift(x):
        return jnp.concatenate([x[:, 1:], jnp.zeros_like(x[:, :1])], axis=1)

    mask = jnp.concatenate([target_mask(batch), jnp.zeros_like(batch["is_target"][:, :1])], axis=1)
    return shift(batch["tokens"]), mask, shift(batch["modality"])


def _chunks(x_BxL, size: int):
    """[B, L, ...] -> [L / size, B, size, ...]: the scan runs over chunks of positions, rows stay whole."""
    b, length = x_BxL.shape[:2]
    return jnp.swapaxes(x_BxL.reshape((b, length // size, size) + x_BxL.shape[2:]), 0, 1)


def _unchunk(x_NxBxC):
    x = jnp.swapaxes(x_NxBxC, 0, 1)
    return x.reshape((x.shape[0], x.shape[1] * x.shape[2]) + x.shape[3:])


def _chunk_logits(h_BxCxD, w_DxV):
    return jnp.einsum("bcd,dv->bcv", h_BxCxD, w_DxV.astype(h_BxCxD.dtype), preferred_element_type=jnp.float32)


def _ce_and_correct(logits_BxCxV, labels_BxC):
    log_z = jax.nn.logsumexp(logits_BxCxV, axis=-1)
    label_logit = jnp.take_along_axis(logits_BxCxV, labels_BxC[..., None], axis=-1)[..., 0]
    return log_z - label_logit, jnp.argmax(logits_BxCxV, axis=-1) == labels_BxC


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _fused_ce(h_BxLxD, w_DxV, labels_BxL, mask_BxL, size: int):
    """(sum of masked cross-entropy, per-position cross-entropy [B, L], correct [B, L]); forward only."""
    def step(_, chunk):
        h, labels = chunk
        return None, _ce_and_correct(_chunk_logits(h, w_DxV), labels)

    _, (ce, correct) = jax.lax.scan(step, None, (_chunks(h_BxLxD, size), _chunks(labels_BxL, size)))
    ce_BxL, correct_BxL = _unchunk(ce), _unchunk(correct)
    return jnp.sum(jnp.where(mask_BxL, ce_BxL, 0.0)), ce_BxL, correct_BxL


def _fused_ce_fwd(h_BxLxD, w_DxV, labels_BxL, mask_BxL, size: int):
    """The forward pass that also makes the gradient of the summed cross-entropy: per chunk, softmax - onehot
    (masked) goes straight into d hidden = g W^T and d W += h^T g; the backward only scales them."""
    def step(dw_DxV, chunk):
        h, labels, mask = chunk
        logits = _chunk_logits(h, w_DxV)
        ce, correct = _ce_and_correct(logits, labels)
        g_BxCxV = (jax.nn.softmax(logits, axis=-1) - jax.nn.one_hot(labels, logits.shape[-1])) * mask[..., None]
        g_BxCxV = g_BxCxV.astype(h.dtype)
        dh = jnp.einsum("bcv,dv->bcd", g_BxCxV, w_DxV.astype(h.dtype), preferred_element_type=jnp.float32)
        dw_DxV = dw_DxV + jnp.einsum("bcd,bcv->dv", h, g_BxCxV, preferred_element_type=jnp.float32)
        return dw_DxV, (ce, correct, dh.astype(h.dtype))

    dw, (ce, correct, dh) = jax.lax.scan(step, jnp.zeros(w_DxV.shape, jnp.float32),
                                         (_chunks(h_BxLxD, size), _chunks(labels_BxL, size), _chunks(mask_BxL, size)))
    ce_BxL, correct_BxL = _unchunk(ce), _unchunk(correct)
    out = (jnp.sum(jnp.where(mask_BxL, ce_BxL, 0.0)), ce_BxL, correct_BxL)
    return out, (_unchunk(dh), dw.astype(w_DxV.dtype), labels_BxL, mask_BxL)


def _fused_ce_bwd(size, residuals, cotangents):
    dh_BxLxD, dw_DxV, labels_BxL, mask_BxL = residuals
    ct = cotangents[0]  # only the summed cross-entropy is differentiated (fused_loss_sums stops the others)
    return ((ct * dh_BxLxD).astype(dh_BxLxD.dtype), (ct * dw_DxV).astype(dw_DxV.dtype),
            None, None)


_fused_ce.defvjp(_fused_ce_fwd, _fused_ce_bwd)


def metrics_from_sums(sums: dict) -> dict:
    """loss, accuracy and token counts, overall and per modality ('loss/text', 'acc/audio', 'tokens/text'...)."""
    out = {"loss": sums["ce"] / jnp.maximum(sums["count"], 1.0),
           "acc": sums["correct"] / jnp.maximum(sums["count"], 1.0),
           "tokens/target": sums["count"]}
    for name in LOSS_MODALITIES:
        count = sums[f"count/{name}"]
        out[f"loss/{name}"] = sums[f"ce/{name}"] / jnp.maximum(count, 1.0)
        out[f"acc/{name}"] = sums[f"correct/{name}"] / jnp.maximum(count, 1.0)
        out[f"tokens/{name}"] = count
    return out


def mark_absent(metrics: dict) -> dict:
    """Host side, on fetched metrics: the loss and accuracy of a modality with no target tokens are None (absent),
    not the 0 that metrics_from_sums divides out; likewise the overall loss and accuracy when nothing was a target.
    Consumers leave None out: the console line omits it, metrics.jsonl and eval JSON hold null, TensorBoard gets
    no point. Token counts stay numbers (0 target tokens is a true count)."""
    out = dict(metrics)
    for name, count_key in [(name, f"tokens/{name}") for name in LOSS_MODALITIES] + [("", "tokens/target")]:
        if count_key in out and out[count_key] is not None and float(out[count_key]) == 0:
            for key in ((f"loss/{name}", f"acc/{name}") if name else ("loss", "acc")):
                if key in out:
                    out[key] = None
    return out


def masked_next_token_loss(logits_BxLxV, batch) -> tuple[jax.Array, dict]:
    """Mean cross-entropy over target tokens, and the metrics dict."""
    metrics = metrics_from_sums(loss_sums(logits_BxLxV, batch))
    return metrics["loss"], metrics
