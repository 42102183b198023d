"""The omni model: one decoder-only transformer over the interleaved text / image-patch / audio-code sequence.

    tokens, patches --embed--> x_BxLxD --(scan over layers: RMSNorm, GQA attention with RoPE, RMSNorm, SwiGLU)-->
    RMSNorm --unembed--> logits_BxLxV

Text and audio tokens are looked up in one embedding table; image positions instead take a linear projection
of their P*P*3 pixels (Fuyu-style). Attention is causal and stays inside each packed segment. Parameters are
stored in `param_dtype` (fp32) and cast to `dtype` (bf16) for compute. Every parameter carries logical axis
names (see omni.sharding) so the same code shards on any mesh.

Fusion variants (model.fusion; the same embedding, final norm and unembedding, one code path):

    early   the stack above: every token goes through every shared layer.
    late    the first k = model.late_layers layers are modality-specific: each weight has a leading [modality]
            axis (text, image, audio; padding takes text's), every token is multiplied by its own modality's
            slice, and attention stays inside the token's span (a run of one modality inside one segment).
            The remaining layers - k are shared over the fused sequence. k = 0 is exactly early.
            (On XLA each token's product with the other modalities' weights is computed and masked away:
            those k layers cost 3x their FLOPs in time; flops_per_token counts the model's FLOPs, one slice.)
    cross   Flamingo-style: an image encoder (model.encoder_layers blocks, bidirectional inside each image)
            reads the image spans; the decoder blocks never attend to image positions, but before every
            model.cross_every-th decoder layer a gated cross-attention block lets every position attend to the
            encoded image positions earlier in its segment:
                x += tanh(attn_gate) * CrossAttn(norm(x), encoded);  x += tanh(mlp_gate) * MLP(norm(x))
            with both gates initialised to 0, so at init the model is its decoder alone. The encoder runs over
            every position and the decoder too (image positions see only themselves), to keep one layout.

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

FUSED_ATTENTION_PRIMITIVES = ("dot_product_attention_fwd", "dot_product_attention_fwd_wrapper")  # cuDNN's kernel


def _dots_and_fused_attention_saveable(prim, *args, **params) -> bool:
    """Save the weight matmuls' outputs and the fused attention kernel's (output and softmax statistics): the
    backward pass then re-runs only elementwise work, never the attention forward kernel."""
    return (prim.name in FUSED_ATTENTION_PRIMITIVES
            or jax.checkpoint_policies.dots_with_no_batch_dims_saveable(prim, *args, **params))


REMAT_POLICIES = {
    "full": None,  # jax.checkpoint's default: save nothing, recompute everything
    "dots": jax.checkpoint_policies.dots_saveable,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "dots_attn": _dots_and_fused_attention_saveable,
}


def _param(rngs: nnx.Rngs, shape, names, std: float, dtype) -> nnx.Param:
    init = nnx.with_partitioning(nnx.initializers.normal(std), names)
    return nnx.Param(init(rngs.params(), shape, jnp.dtype(dtype)))


def _ones(shape, names, dtype) -> nnx.Param:
    return nnx.Param(nnx.with_partitioning(nnx.initializers.ones, names)(jax.random.key(0), shape, jnp.dtype(dtype)))


class RMSNorm(nnx.Module):
    def __init__(self, d: int, eps: float, param_dtype, modalities: int = 0):
        self.scale = (_ones((modalities, d), ("modality", "embed"), param_dtype) if modalities
                      else _ones((d,), ("embed",), param_dtype))
        self.eps = eps

    def __call__(self, x_BxLxD, route_BxLxM=None):
        x = x_BxLxD.astype(jnp.float32)
        x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + self.eps)
        scale = self.scale[...].astype(jnp.float32)
        if route_BxLxM is not None:  # each token's own modality's scale
            scale = jnp.einsum("blm,md->bld", route_BxLxM.astype(jnp.float32), scale)
        return (x * scale).astype(x_BxLxD.dtype)


def rope(x_BxLxNxH, positions_BxL, theta: float):
    """Rotary position embedding (rotate-half form) at each token's position inside its segment."""
    half = x_BxLxNxH.shape[-1] // 2
    freqs = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)
    angles_BxLxH = positions_BxL[..., None].astype(jnp.float32) * freqs
    sin, cos = jnp.sin(angles_BxLxH)[:, :, None, :], jnp.cos(angles_BxLxH)[:, :, None, :]
    x1, x2 = jnp.split(x_BxLxNxH.astype(jnp.float32), 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x_BxLxNxH.dtype)


def _modality_param(rngs, shape, names, std, dtype, modalities: int) -> nnx.Param:
    """A parameter, or with modalities > 0 one per modality stacked on a leading [modality] axis."""
    if modalities:
        return _param(rngs, (modalities,) + shape, ("modality",) + names, std, dtype)
    return _param(rngs, shape, names, std, dtype)


def dense(spec: str, x, w, dtype, route_BxLxM=None):
    """einsum(spec, x, w) in `dtype`; with route_BxLxM (one-hot [B, L, M]) w has a leading [modality] axis
    and each token is multiplied by its own modality's slice. Specs have the form 'bl..,...->bl..'."""
    w = w.astype(dtype)
    if route_BxLxM is None:
        return jnp.einsum(spec, x, w)
    inputs, out = spec.split("->")
    x_axes, w_axes = inputs.split(",")
    per_modality = jnp.einsum(f"{x_axes},m{w_axes}->blm{out[2:]}", x, w)
    return jnp.einsum(f"blm{out[2:]},blm->{out}", per_modality, route_BxLxM.astype(dtype))


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

    def __call__(self, x_BxLxD, visible, positions_BxL, cache=None, layer=None, decode=False,
                 route_BxLxM=None, context_BxSxD=None):
        """Attention output [B, L, D]; with a cache (module docstring) returns (output, updated cache).

        visible says which keys each query sees (causal attention also requires s <= t): run ids int [B, L]
        (a query sees the keys of its own run of equal ids, see attend), or a bool mask [B, 1, L, S] (key s
        visible to query t). Ignored when decoding. With context_BxSxD keys and values come from it
        (cross-attention, a mask [B, 1, L, S]).
        """
        dt = jnp.dtype(self.cfg.dtype)
        context = x_BxLxD if context_BxSxD is None else context_BxSxD
        q_BxLxNxH = dense("bld,dnh->blnh", x_BxLxD, self.wq[...], dt, route_BxLxM)
        k_BxLxKxH = dense("bld,dkh->blkh", context, self.wk[...], dt, route_BxLxM)
        v_BxLxKxH = dense("bld,dkh->blkh", context, self.wv[...], dt, route_BxLxM)
        if self.rotary:
            q_BxLxNxH = rope(q_BxLxNxH, positions_BxL, self.cfg.rope_theta)
            k_BxLxKxH = rope(k_BxLxKxH, positions_BxL, self.cfg.rope_theta)
        q_BxLxNxH = sharding.constrain(q_BxLxNxH, "batch", "length", "heads", "head_dim")
        if decode:
            return self._decode(q_BxLxNxH, k_BxLxKxH, v_BxLxKxH, positions_BxL[:, 0], cache, layer)
        if cache is not None:  # prefill: the block attends as in training; its keys/values fill slots 0..L-1
            cache = {name: jax.lax.dynamic_update_slice(cache[name], new[None].astype(cache[name].dtype),
                                                        (layer, 0, 0, 0, 0))
                     for name, new in (("k", k_BxLxKxH), ("v", v_BxLxKxH))}
        out_BxLxNxH = attend(q_BxLxNxH, k_BxLxKxH, v_BxLxKxH, visible, self.causal, self.cfg)
        out_BxLxD = dense("blnh,nhd->bld", out_BxLxNxH, self.wo[...], dt, route_BxLxM)
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


def attention_implementation(cfg: ModelConfig) -> str:
    """'cudnn' or 'xla': model.attention, where 'auto' means cuDNN's fused flash attention on GPUs for bf16/fp16
    compute (it has no float32 kernels) and XLA's everywhere else."""
    if cfg.attention != "auto":
        return cfg.attention
    return "cudnn" if jax.default_backend() == "gpu" and cfg.dtype != "float32" else "xla"


def attend(q_BxLxNxH, k_BxSxKxH, v_BxSxKxH, visible, causal: bool, cfg: ModelConfig):
    """Softmax attention [B, L, N, H] under `visible`: run ids int [B, L] or a bool mask [B, 1, L, S].

    Run ids: a query sees the keys of its own run of equal consecutive ids (a packed segment, padding counting as
    one, or a modality span), causally. With cuDNN that is its packed-sequence flash attention: no [L, L] mask
    exists and the blocks outside every run are skipped. With XLA (and for explicit masks) the mask is built
    here, inside the layer, so it is neither held across the layer scan nor saved for the backward pass.
    """
    implementation = attention_implementation(cfg)
    if visible.ndim == 2:
        if implementation == "cudnn" and causal and q_BxLxNxH.shape[1] == k_BxSxKxH.shape[1]:
            return _cudnn_packed_attention(q_BxLxNxH, k_BxSxKxH, v_BxSxKxH, visible, cfg.max_segments)
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


def _cudnn_packed_attention(q_BxLxNxH, k_BxLxKxH, v_BxLxKxH, ids_BxL, max_runs: int):
    """cuDNN flash attention over packed rows: causal inside each run of equal ids (packed_runs)."""
    # JAX's public jax.nn.dot_product_attention has no packed-sequence arguments; this is the function it calls
    # for cuDNN (MaxText calls it the same way).
    from jax._src.cudnn.fused_attention_stablehlo import MaskType, dot_product_attention

    lengths_BxM, starts_BxM1 = packed_runs(ids_BxL, max_runs)
    return dot_product_attention(q_BxLxNxH, k_BxLxKxH, v_BxLxKxH, q_seqlen=lengths_BxM, kv_seqlen=lengths_BxM,
                                 q_offsets=starts_BxM1, kv_offsets=starts_BxM1,
                                 scale=1.0 / q_BxLxNxH.shape[-1] ** 0.5, mask_type=MaskType.PADDING_CAUSAL,
                                 qkv_layout="BTNH")


class SwiGLU(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, modalities: int = 0):
        d, f, m, pd = cfg.d, derived_mlp(cfg), modalities, cfg.param_dtype
        self.w_gate = _modality_param(rngs, (d, f), ("embed", "mlp"), cfg.init_std, pd, m)
        self.w_up = _modality_param(rngs, (d, f), ("embed", "mlp"), cfg.init_std, pd, m)
        self.w_down = _modality_param(rngs, (f, d), ("mlp", "embed"), cfg.init_std / (2 * cfg.layers) ** 0.5, pd, m)
        self.dtype = jnp.dtype(cfg.dtype)

    def __call__(self, x_BxLxD, route_BxLxM=None):
        gate_BxLxF = dense("bld,df->blf", x_BxLxD, self.w_gate[...], self.dtype, route_BxLxM)
        up_BxLxF = dense("bld,df->blf", x_BxLxD, self.w_up[...], self.dtype, route_BxLxM)
        hidden_BxLxF = sharding.constrain(jax.nn.silu(gate_BxLxF) * up_BxLxF, "batch", "length", "mlp")
        return dense("blf,fd->bld", hidden_BxLxF, self.w_down[...], self.dtype, route_BxLxM)


class Block(nnx.Module):
    """Pre-norm transformer block; with modalities > 0 every weight is per modality (late fusion's first layers)."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, *, modalities: int = 0, causal: bool = True):
        self.attn_norm = RMSNorm(cfg.d, cfg.norm_eps, cfg.param_dtype, modalities)
        self.attn = Attention(cfg, rngs, modalities=modalities, causal=causal)
        self.mlp_norm = RMSNorm(cfg.d, cfg.norm_eps, cfg.param_dtype, modalities)
        self.mlp = SwiGLU(cfg, rngs, modalities)

    def __call__(self, x_BxLxD, visible, positions_BxL, cache=None, layer=None, decode=False,
                 route_BxLxM=None):
        attended = self.attn(self.attn_norm(x_BxLxD, route_BxLxM), visible, positions_BxL, cache, layer,
                             decode, route_BxLxM)
        if cache is not None:
            attended, cache = attended
        x_BxLxD = x_BxLxD + attended
        x_BxLxD = x_BxLxD + self.mlp(self.mlp_norm(x_BxLxD, route_BxLxM), route_BxLxM)
        x_BxLxD = sharding.constrain(x_BxLxD, "batch", "length", "act_embed")
        return x_BxLxD if cache is None else (x_BxLxD, cache)


class GatedCrossBlock(nnx.Module):
    """Flamingo's GATED XATTN-DENSE: x += tanh(attn_gate) * CrossAttn(norm(x), context);
    x += tanh(mlp_gate) * MLP(norm(x)). Both gates start at 0: the block is the identity at init."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.attn_norm = RMSNorm(cfg.d, cfg.norm_eps, cfg.param_dtype)
        self.attn = Attention(cfg, rngs, causal=False, rotary=False)
        self.mlp_norm = RMSNorm(cfg.d, cfg.norm_eps, cfg.param_dtype)
        self.mlp = SwiGLU(cfg, rngs)
        zeros = nnx.with_partitioning(nnx.initializers.zeros, ())
        self.attn_gate = nnx.Param(zeros(rngs.params(), (), jnp.dtype(cfg.param_dtype)))
        self.mlp_gate = nnx.Param(zeros(rngs.params(), (), jnp.dtype(cfg.param_dtype)))

    def __call__(self, x_BxLxD, context_BxSxD, cross_mask_Bx1xLxS, positions_BxL):
        has_key_Bx1xLx1 = jnp.any(cross_mask_Bx1xLxS, axis=-1)[..., None]  # [B, 1, L, 1]
        attended = self.attn(self.attn_norm(x_BxLxD), cross_mask_Bx1xLxS, positions_BxL, context_BxSxD=context_BxSxD)
        attended = jnp.where(has_key_Bx1xLx1[:, 0], attended, 0)  # a position with no image before it gets nothing
        dt = x_BxLxD.dtype
        x_BxLxD = x_BxLxD + jnp.tanh(self.attn_gate[...]).astype(dt) * attended
        x_BxLxD = x_BxLxD + jnp.tanh(self.mlp_gate[...]).astype(dt) * self.mlp(self.mlp_norm(x_BxLxD))
        return sharding.constrain(x_BxLxD, "batch", "length", "act_embed")


MODALITIES = 3  # late fusion's weight slices: text (and padding), image, audio


def route_index(modality_BxL):
    """Which modality slice a position uses: TEXT and PAD -> 0, IMAGE -> 1, AUDIO -> 2."""
    return jnp.clip(modality_BxL - 1, 0, MODALITIES - 1)


def span_ids(segment_ids_BxL, modality_BxL):
    """1, 2, ... for each run of one modality inside one segment (a new span wherever either changes)."""
    change_BxL = jnp.concatenate(
        [jnp.ones_like(segment_ids_BxL[:, :1], dtype=bool),
         (segment_ids_BxL[:, 1:] != segment_ids_BxL[:, :-1]) | (modality_BxL[:, 1:] != modality_BxL[:, :-1])], axis=1)
    return jnp.cumsum(change_BxL, axis=1, dtype=jnp.int32)


def same_ids_mask(ids_BxL):
    """bool [B, 1, L, L]: query t may see key s when both carry the same id."""
    return ids_BxL[:, None, :, None] == ids_BxL[:, None, None, :]


def _stack(cfg: ModelConfig, n: int, rngs: nnx.Rngs, make):
    """n blocks made by make(rngs): stacked on a leading [layers] axis for nnx.scan, or an nnx.List."""
    if not n:
        return None
    if cfg.scan_layers:
        @nnx.split_rngs(splits=n)
        @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
        def make_all(rngs):
            return make(rngs)

        return make_all(rngs)
    return nnx.List([make(rngs) for _ in range(n)])


def _stack_slice(stack, start: int, stop: int):
    """Blocks start..stop-1 of a stack, as a stack of the same kind (values sliced, gradients flow back)."""
    if isinstance(stack, nnx.List):
        return nnx.List(list(stack)[start:stop])
    graphdef, state = nnx.split(stack)
    return nnx.merge(graphdef, jax.tree.map(lambda a: a[start:stop], state))


class OmniTransformer(nnx.Module):
    def __init__(self, cfg: ModelConfig, vocab_size: int, patch_dim: int, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.embed = _param(rngs, (vocab_size, cfg.d), ("vocab", "embed"), cfg.init_std, cfg.param_dtype)
        self.patch_proj = _param(rngs, (patch_dim, cfg.d), ("patch", "embed"), patch_dim**-0.5, cfg.param_dtype)
        self.patch_bias = nnx.Param(nnx.with_partitioning(nnx.initializers.zeros, ("embed",))(
            rngs.params(), (cfg.d,), jnp.dtype(cfg.param_dtype)))
        late = cfg.late_layers if cfg.fusion == "late" else 0
        self.blocks = _stack(cfg, cfg.layers - late, rngs, lambda r: Block(cfg, r))  # shared (the decoder for cross)
        self.final_norm = RMSNorm(cfg.d, cfg.norm_eps, cfg.param_dtype)
        self.unembed = _param(rngs, (cfg.d, vocab_size), ("embed", "vocab"), cfg.d**-0.5, cfg.param_dtype)
        if late:
            self.modality_blocks = _stack(cfg, late, rngs, lambda r: Block(cfg, r, modalities=MODALITIES))
        if cfg.fusion == "cross":
            self.encoder = _stack(cfg, cfg.encoder_layers, rngs, lambda r: Block(cfg, r, causal=False))
            self.encoder_norm = RMSNorm(cfg.d, cfg.norm_eps, cfg.param_dtype)
            self.cross_blocks = _stack(cfg, cfg.layers // cfg.cross_every, rngs, lambda r: GatedCrossBlock(cfg, r))

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
        if self.cfg.fusion == "cross":
            return self.logits(self._cross_decoder(x_BxLxD, batch))
        if self.cfg.fusion == "late" and self.cfg.late_layers:
            spans_BxL = span_ids(segment_ids_BxL, batch["modality"])
            route_BxLxM = jax.nn.one_hot(route_index(batch["modality"]), MODALITIES, dtype=x_BxLxD.dtype)
            x_BxLxD = self._run_stack(self.modality_blocks, x_BxLxD, lambda: spans_BxL, positions_BxL, route_BxLxM)
        x_BxLxD = self._run_stack(self.blocks, x_BxLxD, lambda: segment_ids_BxL, positions_BxL)
        return self.logits(x_BxLxD)

    def _run_stack(self, stack, x_BxLxD, visible_fn, positions_BxL, route_BxLxM=None):
        """x through every block of a stack (scanned or a list), each under the configured remat policy.

        visible_fn() gives each block what its attention sees (run ids [B, L] or a mask, see attend), inside
        the block: a [B, 1, L, L] mask built once outside and closed over is held across the scan (and kept
        for the backward pass), measured ~20% slower on the CPU bench (configs/bench/omni_cpu.py: 2.1-2.5 s
        per step against 1.8-1.9 s).
        """
        if stack is None:
            return x_BxLxD

        def run_block(block, x):
            return block(x, visible_fn(), positions_BxL, route_BxLxM=route_BxLxM)

        if self.cfg.remat != "none":
            run_block = nnx.remat(run_block, policy=REMAT_POLICIES[self.cfg.remat])
        if isinstance(stack, nnx.List):
            for block in stack:
                x_BxLxD = run_block(block, x_BxLxD)
            return x_BxLxD

        @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry, transform_metadata={nnx.PARTITION_NAME: "layers"})
        def scan_blocks(x, block):
            return run_block(block, x)

        return scan_blocks(x_BxLxD, stack)

    def _cross_decoder(self, x_BxLxD, batch):
        """Cross fusion (module docstring): encode the image spans, then decoder groups of model.cross_every
        layers, each after a gated cross-attention block into the encoded images earlier in the segment."""
        segment_ids_BxL, positions_BxL = batch["segment_ids"], batch["positions"]
        length = segment_ids_BxL.shape[1]
        is_image_BxL = batch["modality"] == IMAGE
        # Encoder: bidirectional inside each image span; any other position sees only itself (output unused).
        encoder_ids_BxL = jnp.where(is_image_BxL, span_ids(segment_ids_BxL, batch["modality"]),
                                    -1 - jnp.arange(length, dtype=jnp.int32)[None])
        encoded_BxLxD = self.encoder_norm(self._run_stack(
            self.encoder, x_BxLxD, lambda: same_ids_mask(encoder_ids_BxL), positions_BxL))
        image_key_Bx1x1xL = is_image_BxL[:, None, None, :]

        def decoder_mask():  # text and audio never see image positions (which see only themselves)
            itself_1x1xLxL = jnp.eye(length, dtype=bool)[None, None]
            return same_ids_mask(segment_ids_BxL) & (~image_key_Bx1x1xL | itself_1x1xLxL)

        earlier_1x1xLxL = jnp.tril(jnp.ones((length, length), bool))[None, None]
        cross_mask = same_ids_mask(segment_ids_BxL) & image_key_Bx1x1xL & earlier_1x1xLxL
        groups, per_group = self.cfg.layers // self.cfg.cross_every, self.cfg.cross_every
        for g in range(groups):
            x_BxLxD = _stack_item(self.cross_blocks, g)(x_BxLxD, encoded_BxLxD, cross_mask, positions_BxL)
            x_BxLxD = self._run_stack(_stack_slice(self.blocks, g * per_group, (g + 1) * per_group), x_BxLxD,
                                      decoder_mask, positions_BxL)
        return x_BxLxD

    def logits(self, x_BxLxD) -> jax.Array:
        x_BxLxD = self.final_norm(x_BxLxD)
        logits_BxLxV = jnp.einsum("bld,dv->blv", x_BxLxD, self.unembed[...].astype(x_BxLxD.dtype),
                                  preferred_element_type=jnp.float32)
        return sharding.constrain(logits_BxLxV, "batch", "length", "vocab")

    def _cached_call(self, batch, cache, decode: bool, logits_at=None):
        """The KV-cache path: the stacked cache rides in the layer carry; layer i reads/writes cache[:, i]."""
        if self.cfg.fusion != "early":
            raise ValueError(f"the KV cache serves model.fusion='early', not '{self.cfg.fusion}' "
                             "(omni.generate recomputes the prefix for the other variants)")
        segment_ids_BxL, positions_BxL = batch["segment_ids"], batch["positions"]
        visible = None if decode else segment_ids_BxL
        x_BxLxD = self.embed_inputs(batch)
        if self.cfg.scan_layers:
            @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry, transform_metadata={nnx.PARTITION_NAME: "layers"})
            def scan_blocks(carry, block):
                x, cache, layer = carry
                x, cache = block(x, visible, positions_BxL, cache, layer, decode)
                return x, cache, layer + 1

            x_BxLxD, cache, _ = scan_blocks((x_BxLxD, cache, jnp.zeros((), jnp.int32)), self.blocks)
        else:
            for layer, block in enumerate(self.blocks):
                x_BxLxD, cache = block(x_BxLxD, visible, positions_BxL, cache, layer, decode)
        if logits_at is not None:
            x_BxLxD = jnp.take_along_axis(x_BxLxD, logits_at[:, None, None], axis=1)
        return self.logits(x_BxLxD), cache


def _stack_item(stack, i: int):
    """Block i of a stack (scanned: its values without the leading [layers] axis)."""
    if isinstance(stack, nnx.List):
        return stack[i]
    graphdef, state = nnx.split(stack)
    return nnx.merge(graphdef, jax.tree.map(lambda a: a[i], state))


def init_cache(cfg: ModelConfig, batch_size: int, max_len: int) -> dict:
    """An empty KV cache {"k", "v"}: zeros [layers, batch_size, max_len, kv_heads, head_dim] in cfg.dtype."""
    shape = (cfg.layers, batch_size, max_len, cfg.kv_heads, derived_head_dim(cfg))
    return {name: sharding.constrain(jnp.zeros(shape, jnp.dtype(cfg.dtype)),
                                     "layers", "batch", "length", "kv_heads", "head_dim") for name in ("k", "v")}


def param_count(params) -> int:
    return sum(x.size for x in jax.tree.leaves(params))


def _layer_matmul_params(cfg: ModelConfig) -> int:
    """Attention (q, k, v, o) and SwiGLU weights of one block; a gated cross block has the same."""
    d, n, k, h, f = cfg.d, cfg.heads, cfg.kv_heads, derived_head_dim(cfg), derived_mlp(cfg)
    return d * n * h * 2 + d * k * h * 2 + 3 * d * f


def _layer_counts(cfg: ModelConfig) -> dict:
    """Blocks of each kind: shared/decoder, late fusion's modality-specific, encoder, gated cross."""
    late = cfg.late_layers if cfg.fusion == "late" else 0
    cross = cfg.fusion == "cross"
    return {"shared": cfg.layers - late, "modality": late, "encoder": cfg.encoder_layers if cross else 0,
            "cross": cfg.layers // cfg.cross_every if cross else 0}


def matmul_params(cfg: ModelConfig, vocab_size: int) -> int:
    """Parameters in the matmuls one token position goes through: attention and MLP weights of every block on
    its way plus the unembedding.

    The input embedding (a lookup) and the patch projection (an input embedding for image positions) are left
    out, as MaxText and the shared plain-JAX benchmark count. early and late: model.layers blocks (late's
    first k use one modality's slice each). cross: the decoder, the gated cross blocks and the image encoder,
    which this implementation runs over every position of the sequence.
    """
    n = _layer_counts(cfg)
    return (n["shared"] + n["modality"] + n["encoder"] + n["cross"]) * _layer_matmul_params(cfg) + cfg.d * vocab_size


def flops_per_token(cfg: ModelConfig, vocab_size: int, seq_len: int) -> float:
    """Training FLOPs per token: 6 x matmul params + attention, 6 x seq x (heads x head_dim) per causal layer.

    A causal layer's attention is 6 x seq^2 x heads x head_dim per sequence (forward + backward of QK^T and
    AV with the causal half skipped), divided by seq for a per-token figure; the decoder's and late fusion's
    layers are causal (late's are masked to spans, but the kernel runs the whole causal square), so are the
    gated cross blocks (keys up to the query), and the cross variant's bidirectional encoder counts twice.
    """
    n = _layer_counts(cfg)
    causal_layers = n["shared"] + n["modality"] + n["cross"] + 2 * n["encoder"]
    return (6.0 * matmul_params(cfg, vocab_size)
            + 6.0 * causal_layers * seq_len * cfg.heads * derived_head_dim(cfg))


def param_total(cfg: ModelConfig, vocab_size: int, patch_dim: int) -> int:
    """Every parameter of the model, counted from the config (equals param_count of the built model)."""
    d, n = cfg.d, _layer_counts(cfg)
    block = _layer_matmul_params(cfg) + 2 * d  # + the two RMSNorm scales
    total = vocab_size * d + patch_dim * d + d + d + d * vocab_size  # embed, patch proj + bias, final norm, unembed
    total += (n["shared"] + n["encoder"]) * block + n["modality"] * MODALITIES * block
    total += n["cross"] * (block + 2) + (d if n["encoder"] else 0)  # cross gates; encoder_norm
    return total
