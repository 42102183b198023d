"""Attention: the GQA module with RoPE and a KV cache, and the kernels behind it (XLA's with a dense mask, cuDNN's
packed-sequence flash attention with segments given as offsets)."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from omni import sharding
from omni.config import ModelConfig, derived_head_dim
from omni.model.layers import _modality_param, apply_rope, dense

FUSED_ATTENTION_PRIMITIVES = ("dot_product_attention_fwd", "dot_product_attention_fwd_wrapper")  # cuDNN's kernel



class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, *, modalities: int = 0, causal: bool = True,
                 rotary: bool = True):
        d, n, k, h = cfg.d, cfg.heads, cfg.kv_heads, derived_head_dim(cfg)
        out_std = cfg.init_std / (2 * cfg.layers) ** 0.5
        m, pd = modalities, cfg.param_dtype
        self.wq = _modality_param(rngs, (d, n, h), ("embed", "heads", "head_dim"), cfg.init_std, pd, m)
        self.wk = _modality_param(rngs, (d, k, h), ("embed", "kv_heads", "head_dim"), cfg.init_std, pd, m)
        self.wv = _modality_param(rngs, (d, k, h), ("embed", "kv_heads", "head_dim"), cfg.init_std, pd, m)
        self.wo = _modality_param(rngs, (n, h, d), ("heads", "head_dim", "embed"), out_std, pd, m)
        self.cfg, self.causal, self.rotary = cfg, causal, rotary

    def __call__(self, x_BxLxD, visible, rope_tables=None, route=None, context_BxSxD=None):
        """Attention output [B, L, D].

        visible says which keys each query sees (causal attention also requires s <= t): run ids int [B, L]
        (a query sees the keys of its own run of equal ids, see attend), or a bool mask [B, 1, L, S] (key s
        visible to query t). rope_tables: omni.model.layers.rope_tables of the positions (None without rotary
        embeddings). With context_BxSxD keys and values come from it (cross-attention, a mask [B, 1, L, S]; no
        rotary embedding: keys and queries come from different sequences).
        """
        dt = jnp.dtype(self.cfg.dtype)
        if context_BxSxD is None:
            q_BxLxNxH, k_BxLxKxH, v_BxLxKxH = self._project_qkv(x_BxLxD, rope_tables, route)
        else:
            q_BxLxNxH = dense("bld,dnh->blnh", x_BxLxD, self.wq[...], dt, route)
            k_BxLxKxH = dense("bld,dkh->blkh", context_BxSxD, self.wk[...], dt, route)
            v_BxLxKxH = dense("bld,dkh->blkh", context_BxSxD, self.wv[...], dt, route)
        q_BxLxNxH = sharding.constrain(q_BxLxNxH, "batch", "length", "heads", "head_dim")
        out_BxLxNxH = attend(q_BxLxNxH, k_BxLxKxH, v_BxLxKxH, visible, self.causal, self.cfg)
        return dense("blnh,nhd->bld", out_BxLxNxH, self.wo[...], dt, route)

    def attend_cached(self, x_BxLxD, visible, rope_tables, cache, layer, slot_B=None, route=None):
        """(output [B, L, D], cache) against a KV cache {"k", "v"} [layers, B, S, kv_heads, head_dim].

        Without slot_B a prefill: the block attends as in training (`visible` as in __call__) and its keys and
        values fill slots 0..L-1 of cache[layer]. With slot_B (int [B]) one decode step: L == 1, the row's token
        is written at its slot and attends to slots 0..slot (`visible` is not read)."""
        q_BxLxNxH, k_BxLxKxH, v_BxLxKxH = self._project_qkv(x_BxLxD, rope_tables, route)
        q_BxLxNxH = sharding.constrain(q_BxLxNxH, "batch", "length", "heads", "head_dim")
        if slot_B is not None:
            return self._decode(q_BxLxNxH, k_BxLxKxH, v_BxLxKxH, slot_B, cache, layer, route)
        cache = {name: jax.lax.dynamic_update_slice(cache[name], new[None].astype(cache[name].dtype),
                                                    (layer, 0, 0, 0, 0))
                 for name, new in (("k", k_BxLxKxH), ("v", v_BxLxKxH))}
        out_BxLxNxH = attend(q_BxLxNxH, k_BxLxKxH, v_BxLxKxH, visible, self.causal, self.cfg)
        return dense("blnh,nhd->bld", out_BxLxNxH, self.wo[...], jnp.dtype(self.cfg.dtype), route), cache

    def _project_qkv(self, x_BxLxD, rope_tables, route):
        """q [B, L, N, H], k and v [B, L, K, H] from one matmul, RoPE applied to q and k in one pass.

        The weights stay three parameters (checkpoints and exports name them wq, wk, wv); for the matmul they are
        laid side by side per kv head, [D, K, G + 2, H] with G = N / K query heads per kv head: query head
        n = kv * G + g, the grouping GQA attention uses, and the K axis (sharded like heads) stays whole, so
        the concatenation is local to each device under tensor parallelism whenever heads and kv heads shard
        alike."""
        k, h = self.cfg.kv_heads, derived_head_dim(self.cfg)
        lead = self.wq.shape[:-3]  # (modalities,) for late fusion's per-modality weights, else ()
        groups = self.wq.shape[-2] // k
        w_DxKx_G2_xH = jnp.concatenate([self.wq[...].reshape(lead + (-1, k, groups, h)),
                                        self.wk[...][..., None, :], self.wv[...][..., None, :]], axis=-2)
        qkv_BxLxKx_G2_xH = dense("bld,dkgh->blkgh", x_BxLxD, w_DxKx_G2_xH, jnp.dtype(self.cfg.dtype), route)
        qk_BxLxKx_G1_xH, v_BxLxKxH = qkv_BxLxKx_G2_xH[:, :, :, :groups + 1], qkv_BxLxKx_G2_xH[:, :, :, groups + 1]
        if self.rotary:
            qk_BxLxKx_G1_xH = apply_rope(qk_BxLxKx_G1_xH, rope_tables)
        batch, length = x_BxLxD.shape[:2]
        q_BxLxNxH = qk_BxLxKx_G1_xH[:, :, :, :groups].reshape(batch, length, k * groups, h)
        return q_BxLxNxH, qk_BxLxKx_G1_xH[:, :, :, groups], v_BxLxKxH

    def _decode(self, q_Bx1xNxH, k_Bx1xKxH, v_Bx1xKxH, slot_B, cache, layer, route=None):
        """One new token per row: write its key/value at the row's slot, attend to slots 0..slot."""
        rows_B = jnp.arange(slot_B.shape[0])
        cache = {name: cache[name].at[layer, rows_B, slot_B].set(new[:, 0].astype(cache[name].dtype))
                 for name, new in (("k", k_Bx1xKxH), ("v", v_Bx1xKxH))}
        keys_BxSxKxH, values_BxSxKxH = cache["k"][layer], cache["v"][layer]
        out_Bx1xNxH = jax.nn.dot_product_attention(q_Bx1xNxH, keys_BxSxKxH.astype(q_Bx1xNxH.dtype),
                                                   values_BxSxKxH.astype(q_Bx1xNxH.dtype),
                                                   key_value_seq_lengths=(slot_B + 1).astype(jnp.int32))
        out_Bx1xD = dense("blnh,nhd->bld", out_Bx1xNxH, self.wo[...], jnp.dtype(self.cfg.dtype), route)
        return out_Bx1xD, cache


def attention_implementation(cfg: ModelConfig, platform: str | None = None) -> str:
    """'cudnn' or 'xla': model.attention, where 'auto' means cuDNN's fused flash attention on GPUs for bf16/fp16
    compute (it has no float32 kernels) and XLA's everywhere else. The GPU is the one the program is for:
    `platform`, else that of the mesh being traced for (omni.sharding.active_platform: a compile-only H100 mesh
    on a CPU host gets cuDNN), else the host's default backend."""
    if cfg.attention != "auto":
        return cfg.attention
    platform = platform or sharding.active_platform() or jax.default_backend()
    return "cudnn" if platform == "gpu" and cfg.dtype != "float32" else "xla"


class Runs(NamedTuple):
    """What packed attention sees, computed once per forward pass (runs_of) and read by every layer: run ids
    int [B, L], and for cuDNN's kernel the same runs as packed_runs describes them (None with XLA). Built
    outside the layer scan, so neither the layers nor their remat recomputation in the backward pass redo the
    cumsum / scatter integer work of packed_runs."""
    ids_BxL: jax.Array
    lengths_BxM: jax.Array | None = None
    starts_BxM1: jax.Array | None = None


def runs_of(ids_BxL, cfg: ModelConfig) -> Runs:
    """Runs of ids_BxL for attend, with cuDNN's lengths and offsets when that is the kernel."""
    if attention_implementation(cfg) == "cudnn":
        return Runs(ids_BxL, *packed_runs(ids_BxL, cfg.max_segments))
    return Runs(ids_BxL)


def attend(q_BxLxNxH, k_BxSxKxH, v_BxSxKxH, visible, causal: bool, cfg: ModelConfig):
    """Softmax attention [B, L, N, H] under `visible`: Runs (runs_of), run ids int [B, L] or a bool mask
    [B, 1, L, S].

    Run ids: a query sees the keys of its own run of equal consecutive ids (a packed segment, padding counting as
    one, or a modality span), causally. With cuDNN that is its packed-sequence flash attention: no [L, L] mask
    exists and the blocks outside every run are skipped. With XLA (and for explicit masks) the mask is built
    here, inside the layer, so it is neither held across the layer scan nor saved for the backward pass.
    """
    implementation = attention_implementation(cfg)
    if isinstance(visible, Runs):
        packed = visible.lengths_BxM is not None
        if packed and implementation == "cudnn" and causal and q_BxLxNxH.shape[1] == k_BxSxKxH.shape[1]:
            return _cudnn_packed_attention(q_BxLxNxH, k_BxSxKxH, v_BxSxKxH, visible.lengths_BxM,
                                           visible.starts_BxM1)
        visible = visible.ids_BxL
    if visible.ndim == 2:
        if implementation == "cudnn" and causal and q_BxLxNxH.shape[1] == k_BxSxKxH.shape[1]:
            return _cudnn_packed_attention(q_BxLxNxH, k_BxSxKxH, v_BxSxKxH,
                                           *packed_runs(visible, cfg.max_segments))
        visible = same_ids_mask(visible)
    return jax.nn.dot_product_attention(q_BxLxNxH, k_BxSxKxH, v_BxSxKxH, mask=visible, is_causal=causal,
                                        implementation=implementation)


def packed_runs(ids_BxL, max_runs: int):
    """The runs of equal consecutive ids in each row, as cuDNN's packed-sequence attention describes them:

        lengths_BxM   int32 [B, M]     length of run m of the row, -1 past the row's last run
        starts_BxM1   int32 [B, M+1]   offset of run m inside the row, -1 past the row's last run

    M = max_runs. Runs past the M-th are dropped (their positions would attend to nothing): the trainer checks
    every batch on the host first (omni.batch.runs_per_row) and refuses one with a longer row.
    """
    batch, length = ids_BxL.shape
    new_run_BxL = jnp.concatenate([jnp.ones((batch, 1), bool), ids_BxL[:, 1:] != ids_BxL[:, :-1]], axis=1)
    run_BxL = jnp.cumsum(new_run_BxL, axis=1, dtype=jnp.int32) - 1
    rows_Bx1 = jnp.arange(batch)[:, None]
    lengths_BxM = jnp.zeros((batch, max_runs), jnp.int32).at[rows_Bx1, run_BxL].add(1, mode="drop")
    runs_Bx1 = run_BxL[:, -1:] + 1
    lengths_BxM = jnp.where(jnp.arange(max_runs)[None] < runs_Bx1, lengths_BxM, -1)
    slot_BxL = jnp.where(new_run_BxL, run_BxL, max_runs + 1)  # only a run's first position writes its start
    starts_BxM1 = jnp.full((batch, max_runs + 1), -1, jnp.int32).at[rows_Bx1, slot_BxL].set(
        jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length)), mode="drop")
    return lengths_BxM, starts_BxM1


def _cudnn_packed_attention(q_BxLxNxH, k_BxLxKxH, v_BxLxKxH, lengths_BxM, starts_BxM1):
    """cuDNN flash attention over packed rows: causal inside each run (packed_runs' lengths and offsets)."""
    # JAX's public jax.nn.dot_product_attention has no packed-sequence arguments; this is the function it calls
    # for cuDNN (MaxText calls it the same way).
    from jax._src.cudnn.fused_attention_stablehlo import MaskType, dot_product_attention

    # Packed GQA/MQA reads the wrong keys in jax releases without PR #39521 (kv offsets taken with the query
    # stride, silently): give the kernel as many key/value heads as query heads. Query head n uses kv head
    # n // (N / K), the grouping XLA's attention and the KV cache use.
    groups = q_BxLxNxH.shape[2] // k_BxLxKxH.shape[2]
    if groups > 1:
        k_BxLxKxH, v_BxLxKxH = (jnp.repeat(x, groups, axis=2) for x in (k_BxLxKxH, v_BxLxKxH))
    return dot_product_attention(q_BxLxNxH, k_BxLxKxH, v_BxLxKxH, q_seqlen=lengths_BxM, kv_seqlen=lengths_BxM,
                                 q_offsets=starts_BxM1, kv_offsets=starts_BxM1,
                                 scale=1.0 / q_BxLxNxH.shape[-1] ** 0.5, mask_type=MaskType.PADDING_CAUSAL,
                                 qkv_layout="BTNH")


def same_ids_mask(ids_BxL):
    """bool [B, 1, L, L]: query t may see key s when both carry the same id."""
    return ids_BxL[:, None, :, None] == ids_BxL[:, None, None, :]
