"""Masked next-token loss, with loss / accuracy / token count per target modality.

The prediction at position t is scored against token t+1 only where

    is_target[t+1]                              the next token is a target of its example (omni.batch)
    and segment_ids[t] == segment_ids[t+1] > 0  both positions are in the same real (non-padding) example

so nothing is learned across packed examples, on padding, or for image patches.

Normalisation (a documented choice): the loss is the mean cross-entropy over all target tokens of the global
batch, every token weighing the same whichever example it came from. `loss_sums` returns sums and counts so
that gradient accumulation divides once by the token count of the whole step, not per micro-batch.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from omni.batch import AUDIO, MODALITY_NAMES, TEXT

LOSS_MODALITIES = {MODALITY_NAMES[TEXT]: TEXT, MODALITY_NAMES[AUDIO]: AUDIO}


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
    next_modality = batch["modality"][:, 1:]
    sums = {"ce": jnp.sum(jnp.where(mask, ce_BxL1, 0.0)), "count": jnp.sum(mask, dtype=jnp.float32),
            "correct": jnp.sum(mask & correct_BxL1, dtype=jnp.float32)}
    for name, modality_id in LOSS_MODALITIES.items():
        m = mask & (next_modality == modality_id)
        sums[f"ce/{name}"] = jnp.sum(jnp.where(m, ce_BxL1, 0.0))
        sums[f"correct/{name}"] = jnp.sum(m & correct_BxL1, dtype=jnp.float32)
        sums[f"count/{name}"] = jnp.sum(m, dtype=jnp.float32)
    return sums


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


def masked_next_token_loss(logits_BxLxV, batch) -> tuple[jax.Array, dict]:
    """Mean cross-entropy over target tokens, and the metrics dict."""
    metrics = metrics_from_sums(loss_sums(logits_BxLxV, batch))
    return metrics["loss"], metrics
