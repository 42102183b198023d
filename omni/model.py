"""The omni model: one decoder-only transformer over the interleaved text / image-patch / audio-code sequence.

    tokens, patches --embed--> x_BxLxD --(scan over layers: RMSNorm, GQA attention with RoPE, RMSNorm, SwiGLU)-->
    RMSNorm --unembed--> logits_BxLxV

Text and audio tokens are looked up in one embedding table; image positions instead take a linear projection
of their P*P*3 pixels (Fuyu-style). Attention is causal and stays inside each packed segment. Parameters are
stored in `param_dtype` (fp32) and cast to `dtype` (bf16) for compute. Every parameter carries logical axis
names (see omni.sharding) so the same code shards on any mesh.

Inference with a KV cache (omni.generate) calls the same model with `cache=init_cache(...)`, one example per
row starting at slot 0, so a token's cache slot is also its RoPE position:

    model(prompt_batch, cache=cache)                -> logits [B, P, V], cache with slots 0..P-1 written
        prefill: the right-padded prompt block runs as in training (segment_ids 1 on tokens, 0 on padding)
    model(step_batch, cache=cache, decode=True)     -> logits [B, 1, V], cache with one more slot per row
        decode: one token per row at slot positions[i, 0] (rows may differ), attending to slots <= that slot

The cache is {"k", "v"}: [layers, B, S, kv_heads, head_dim] in the compute dtype, S the longest total length.
It travels through the layers as part of the scan carry (or the Python loop), and each layer writes only its
new slots in place, so a decode step moves O(layers x B x kv_heads x head_dim) cache bytes, not the whole
cache. Remat is skipped on this path (it only saves memory for a backward pass).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from omni import sharding
from omni.config import ModelConfig, derived_head_dim, derived_mlp
from omni.tokens import IMAGE, IMAGE_PATCH

# Logical names are resolved against the mesh rules by the trainer, not when a variable is created.
nnx.use_eager_sharding(False)

REMAT_POLICIES = {
    "full": None,  # jax.checkpoint's default: save nothing, recompute everything
    "dots": jax.checkpoint_policies.dots_saveable,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def _param(rngs: nnx.Rngs, shape, names, std: float, dtype) -> nnx.Param:
    init = nnx.with_partitioning(nnx.initializers.normal(std), names)
    return nnx.Param(init(rngs.params(), shape, jnp.dtype(dtype)))


def _ones(shape, names, dtype) -> nnx.Param:
    return nnx.Param(nnx.with_partitioning(nnx.initializers.ones, names)(jax.random.key(0), shape, jnp.dtype(dtype)))


class RMSNorm(nnx.Module):
    def __init__(self, d: int, eps: float, param_dtype):
        self.scale = _ones((d,), ("embed",), param_dtype)
        self.eps = eps

    def __call__(self, x_BxLxD):
        x = x_BxLxD.astype(jnp.float32)
        x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + self.eps)
        return (x * self.scale[...].astype(jnp.float32)).astype(x_BxLxD.dtype)


def rope(x_BxLxNxH, positions_BxL, theta: float):
    """Rotary position embedding (rotate-half form) at each token's position inside its segment."""
    half = x_BxLxNxH.shape[-1] // 2
    freqs = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)
    angles_BxLxH = positions_BxL[..., None].astype(jnp.float32) * freqs
    sin, cos = jnp.sin(angles_BxLxH)[:, :, None, :], jnp.cos(angles_BxLxH)[:, :, None, :]
    x1, x2 = jnp.split(x_BxLxNxH.astype(jnp.float32), 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x_BxLxNxH.dtype)


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        d, n, k, h = cfg.d, cfg.heads, cfg.kv_heads, derived_head_dim(cfg)
        out_std = cfg.init_std / (2 * cfg.layers) ** 0.5
        self.wq = _param(rngs, (d, n, h), ("embed", "heads", "head_dim"), cfg.init_std, cfg.param_dtype)
        self.wk = _param(rngs, (d, k, h), ("embed", "kv_heads", "head_dim"), cfg.init_std, cfg.param_dtype)
        self.wv = _param(rngs, (d, k, h), ("embed", "kv_heads", "head_dim"), cfg.init_std, cfg.param_dtype)
        self.wo = _param(rngs, (n, h, d), ("heads", "head_dim", "embed"), out_std, cfg.param_dtype)
        self.cfg = cfg

    def __call__(self, x_BxLxD, segment_ids_BxL, positions_BxL, cache=None, layer=None, decode=False):
        """Attention output [B, L, D]; with a cache (module docstring) returns (output, updated cache)."""
        dt = jnp.dtype(self.cfg.dtype)
        q_BxLxNxH = jnp.einsum("bld,dnh->blnh", x_BxLxD, self.wq[...].astype(dt))
        k_BxLxKxH = jnp.einsum("bld,dkh->blkh", x_BxLxD, self.wk[...].astype(dt))
        v_BxLxKxH = jnp.einsum("bld,dkh->blkh", x_BxLxD, self.wv[...].astype(dt))
        q_BxLxNxH = sharding.constrain(rope(q_BxLxNxH, positions_BxL, self.cfg.rope_theta),
                                       "batch", "length", "heads", "head_dim")
        k_BxLxKxH = rope(k_BxLxKxH, positions_BxL, self.cfg.rope_theta)
        if decode:
            return self._decode(q_BxLxNxH, k_BxLxKxH, v_BxLxKxH, positions_BxL[:, 0], cache, layer)
        if cache is not None:  # prefill: the block attends as in training; its keys/values fill slots 0..L-1
            cache = {name: jax.lax.dynamic_update_slice(cache[name], new[None].astype(cache[name].dtype),
                                                        (layer, 0, 0, 0, 0))
                     for name, new in (("k", k_BxLxKxH), ("v", v_BxLxKxH))}
        same_segment_Bx1xLxL = (segment_ids_BxL[:, None, :, None] == segment_ids_BxL[:, None, None, :])
        implementation = None if self.cfg.attention == "auto" else self.cfg.attention
        out_BxLxNxH = jax.nn.dot_product_attention(q_BxLxNxH, k_BxLxKxH, v_BxLxKxH, mask=same_segment_Bx1xLxL,
                                                   is_causal=True, implementation=implementation)
        out_BxLxD = jnp.einsum("blnh,nhd->bld", out_BxLxNxH, self.wo[...].astype(dt))
        return out_BxLxD if cache is None else (out_BxLxD, cache)

    def _decode(self, q_Bx1xNxH, k_Bx1xKxH, v_Bx1xKxH, slot_B, cache, layer):
        """One new token per row: write its key/value at the row's slot, attend to slots 0..slot."""
        rows_B = jnp.arange(slot_B.shape[0])
        cache = {name: cache[name].at[layer, rows_B, slot_B].set(new[:, 0].astype(cache[name].dtype))
                 for name, new in (("k", k_Bx1xKxH), ("v", v_Bx1xKxH))}
        keys_BxSxKxH, values_BxSxKxH = cache["k"][layer], cache["v"][layer]
        out_Bx1xNxH = jax.nn.dot_product_attention(q_Bx1xNxH, keys_BxSxKxH.astype(q_Bx1xNxH.dtype),
                                                   values_BxSxKxH.astype(q_Bx1xNxH.dtype),
                                                   key_value_seq_lengths=(slot_B + 1).astype(jnp.int32))
        out_Bx1xD = jnp.einsum("blnh,nhd->bld", out_Bx1xNxH, self.wo[...].astype(jnp.dtype(self.cfg.dtype)))
        return out_Bx1xD, cache


class SwiGLU(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        d, f = cfg.d, derived_mlp(cfg)
        self.w_gate = _param(rngs, (d, f), ("embed", "mlp"), cfg.init_std, cfg.param_dtype)
        self.w_up = _param(rngs, (d, f), ("embed", "mlp"), cfg.init_std, cfg.param_dtype)
        self.w_down = _param(rngs, (f, d), ("mlp", "embed"), cfg.init_std / (2 * cfg.layers) ** 0.5, cfg.param_dtype)
        self.dtype = jnp.dtype(cfg.dtype)

    def __call__(self, x_BxLxD):
        gate_BxLxF = jnp.einsum("bld,df->blf", x_BxLxD, self.w_gate[...].astype(self.dtype))
        up_BxLxF = jnp.einsum("bld,df->blf", x_BxLxD, self.w_up[...].astype(self.dtype))
        hidden_BxLxF = sharding.constrain(jax.nn.silu(gate_BxLxF) * up_BxLxF, "batch", "length", "mlp")
        return jnp.einsum("blf,fd->bld", hidden_BxLxF, self.w_down[...].astype(self.dtype))


class Block(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.attn_norm = RMSNorm(cfg.d, cfg.norm_eps, cfg.param_dtype)
        self.attn = Attention(cfg, rngs)
        self.mlp_norm = RMSNorm(cfg.d, cfg.norm_eps, cfg.param_dtype)
        self.mlp = SwiGLU(cfg, rngs)

    def __call__(self, x_BxLxD, segment_ids_BxL, positions_BxL, cache=None, layer=None, decode=False):
        attended = self.attn(self.attn_norm(x_BxLxD), segment_ids_BxL, positions_BxL, cache, layer, decode)
        if cache is not None:
            attended, cache = attended
        x_BxLxD = x_BxLxD + attended
        x_BxLxD = x_BxLxD + self.mlp(self.mlp_norm(x_BxLxD))
        x_BxLxD = sharding.constrain(x_BxLxD, "batch", "length", "act_embed")
        return x_BxLxD if cache is None else (x_BxLxD, cache)


class OmniTransformer(nnx.Module):
    def __init__(self, cfg: ModelConfig, vocab_size: int, patch_dim: int, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.embed = _param(rngs, (vocab_size, cfg.d), ("vocab", "embed"), cfg.init_std, cfg.param_dtype)
        self.patch_proj = _param(rngs, (patch_dim, cfg.d), ("patch", "embed"), patch_dim**-0.5, cfg.param_dtype)
        self.patch_bias = nnx.Param(nnx.with_partitioning(nnx.initializers.zeros, ("embed",))(
            rngs.params(), (cfg.d,), jnp.dtype(cfg.param_dtype)))
        if cfg.scan_layers:
            @nnx.split_rngs(splits=cfg.layers)
            @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
            def make_blocks(rngs):
                return Block(cfg, rngs)

            self.blocks = make_blocks(rngs)
        else:
            self.blocks = nnx.List([Block(cfg, rngs) for _ in range(cfg.layers)])
        self.final_norm = RMSNorm(cfg.d, cfg.norm_eps, cfg.param_dtype)
        self.unembed = _param(rngs, (cfg.d, vocab_size), ("embed", "vocab"), cfg.d**-0.5, cfg.param_dtype)

    def embed_inputs(self, batch) -> jax.Array:
        """x_BxLxD: token embeddings, with image patch positions replaced by their pixel projection."""
        dt = jnp.dtype(self.cfg.dtype)
        tokens_BxL = batch["tokens"]
        x_BxLxD = jnp.take(self.embed[...], tokens_BxL, axis=0).astype(dt)
        patches_BxLxD = (jnp.einsum("blp,pd->bld", batch["patches"].astype(dt), self.patch_proj[...].astype(dt))
                         + self.patch_bias[...].astype(dt))
        is_patch_BxL = (batch["modality"] == IMAGE) & (tokens_BxL == IMAGE_PATCH)
        x_BxLxD = jnp.where(is_patch_BxL[..., None], patches_BxLxD, x_BxLxD)
        return sharding.constrain(x_BxLxD, "batch", "length", "act_embed")

    def __call__(self, batch, cache=None, decode=False, logits_at=None):
        """The batch of omni.batch -> logits float32 [B, L, V] (position t predicts token t+1).

        With `cache` (init_cache) returns (logits, updated cache): a prefill of the prompt block, or with
        `decode=True` one token per row at slot positions[:, 0] (module docstring). `logits_at` (int [B], cache
        path only) unembeds just that position of each row: logits [B, 1, V], e.g. a prompt's last token.
        """
        if cache is not None:
            return self._cached_call(batch, cache, decode, logits_at)
        if decode or logits_at is not None:
            raise ValueError("decode and logits_at need a cache (omni.model.init_cache)")
        segment_ids_BxL, positions_BxL = batch["segment_ids"], batch["positions"]
        x_BxLxD = self.embed_inputs(batch)

        def run_block(block, x):
            return block(x, segment_ids_BxL, positions_BxL)

        if self.cfg.remat != "none":
            run_block = nnx.remat(run_block, policy=REMAT_POLICIES[self.cfg.remat])

        if self.cfg.scan_layers:
            @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry, transform_metadata={nnx.PARTITION_NAME: "layers"})
            def scan_blocks(x, block):
                return run_block(block, x)

            x_BxLxD = scan_blocks(x_BxLxD, self.blocks)
        else:
            for block in self.blocks:
                x_BxLxD = run_block(block, x_BxLxD)

        return self.logits(x_BxLxD)

    def logits(self, x_BxLxD) -> jax.Array:
        x_BxLxD = self.final_norm(x_BxLxD)
        logits_BxLxV = jnp.einsum("bld,dv->blv", x_BxLxD, self.unembed[...].astype(x_BxLxD.dtype),
                                  preferred_element_type=jnp.float32)
        return sharding.constrain(logits_BxLxV, "batch", "length", "vocab")

    def _cached_call(self, batch, cache, decode: bool, logits_at=None):
        """The KV-cache path: the stacked cache rides in the layer carry; layer i reads/writes cache[:, i]."""
        segment_ids_BxL, positions_BxL = batch["segment_ids"], batch["positions"]
        x_BxLxD = self.embed_inputs(batch)
        if self.cfg.scan_layers:
            @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry, transform_metadata={nnx.PARTITION_NAME: "layers"})
            def scan_blocks(carry, block):
                x, cache, layer = carry
                x, cache = block(x, segment_ids_BxL, positions_BxL, cache, layer, decode)
                return x, cache, layer + 1

            x_BxLxD, cache, _ = scan_blocks((x_BxLxD, cache, jnp.zeros((), jnp.int32)), self.blocks)
        else:
            for layer, block in enumerate(self.blocks):
                x_BxLxD, cache = block(x_BxLxD, segment_ids_BxL, positions_BxL, cache, layer, decode)
        if logits_at is not None:
            x_BxLxD = jnp.take_along_axis(x_BxLxD, logits_at[:, None, None], axis=1)
        return self.logits(x_BxLxD), cache


def init_cache(cfg: ModelConfig, batch_size: int, max_len: int) -> dict:
    """An empty KV cache {"k", "v"}: zeros [layers, batch_size, max_len, kv_heads, head_dim] in cfg.dtype."""
    shape = (cfg.layers, batch_size, max_len, cfg.kv_heads, derived_head_dim(cfg))
    return {name: sharding.constrain(jnp.zeros(shape, jnp.dtype(cfg.dtype)),
                                     "layers", "batch", "length", "kv_heads", "head_dim") for name in ("k", "v")}


def param_count(params) -> int:
    return sum(x.size for x in jax.tree.leaves(params))


def matmul_params(cfg: ModelConfig, vocab_size: int) -> int:
    """Parameters used in matmuls per token: attention and MLP weights of every layer plus the unembedding.

    The input embedding (a lookup) and the patch projection (an input embedding for image positions) are left
    out, as MaxText and the shared plain-JAX benchmark count.
    """
    d, n, k, h, f = cfg.d, cfg.heads, cfg.kv_heads, derived_head_dim(cfg), derived_mlp(cfg)
    per_layer = d * n * h * 2 + d * k * h * 2 + 3 * d * f
    return cfg.layers * per_layer + d * vocab_size


def flops_per_token(cfg: ModelConfig, vocab_size: int, seq_len: int) -> float:
    """Training FLOPs per token: 6 x matmul params + causal attention 6 x layers x seq x (heads x head_dim).

    The attention term is 6 x layers x seq^2 x d per sequence (forward + backward of QK^T and AV with the causal
    half skipped), divided by seq for a per-token figure.
    """
    return 6.0 * matmul_params(cfg, vocab_size) + 6.0 * cfg.layers * seq_len * cfg.heads * derived_head_dim(cfg)
