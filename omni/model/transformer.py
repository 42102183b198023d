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
    mot     Mixture-of-Transformers (Liang et al. 2024): every layer is modality-specific as late's first k are
            (attention q/k/v/o, SwiGLU and both norms, per modality), but attention is global over the packed
            example, causal, as early. With every modality slice equal it is exactly early. The embedding,
            the final norm and the unembedding stay shared (the final norm is no layer's; MoT unties it too).
    cross   Flamingo-style: an image encoder (model.encoder_layers blocks, bidirectional inside each image)
            reads the image spans; the decoder blocks never attend to image positions, but before every
            model.cross_every-th decoder layer a gated cross-attention block lets every position attend to the
            encoded image positions earlier in its segment:
                x += tanh(attn_gate) * CrossAttn(norm(x), encoded);  x += tanh(mlp_gate) * MLP(norm(x))
            with both gates initialised to 0, so at init the model is its decoder alone. The encoder runs over
            every position and the decoder too (image positions see only themselves), to keep one layout.

Per-modality layers compute one weight slice per token, as flops_per_token counts: omni.model.routing lays the
batch's tokens out by modality in tiles and multiplies each tile by its modality's slice (model.modality_matmul:
tiles, the default; ragged_dot; or masked, every slice for every token with two masked away, 3x FLOPs). The
Route that says where each token goes is built once per call (OmniTransformer.route) and read by every layer.

The model's calls, one contract each (shapes: B rows, L positions, D model width, V vocabulary):

    model(batch)                          -> logits float32 [B, L, V]   (position t predicts token t+1)
    model.hidden(batch)                   -> hidden [B, L, D]           (after the final norm; the loss reads it)
    model.vocab_logits(hidden)            -> logits float32 [B, L, V]
    model.prefill(prompt_batch, cache, logits_at_B=None) -> (logits [B, P, V] or [B, 1, V], cache)
        the right-padded prompt block runs as in training (segment_ids 1 on tokens, 0 on padding) and fills
        cache slots 0..P-1; logits_at_B (int [B]) unembeds only that position of each row
    model.decode_step(step_batch, cache)  -> (logits [B, 1, V], cache)
        one token per row at slot positions[i, 0] (rows may differ), attending to slots <= that slot

Inference with a KV cache (omni.tools.generate; early and mot) uses prefill and decode_step on a cache from
init_cache, one example per row starting at slot 0, so a token's cache slot is also its RoPE position (mot: a
decode step routes each row's one token through its modality's slice).

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
from omni.batch import IMAGE
from omni.config import ModelConfig, derived_head_dim
from omni.model.attention import FUSED_ATTENTION_PRIMITIVES, Attention, runs_of, same_ids_mask
from omni.model.layers import RMSNorm, SwiGLU, _param, rope_tables
from omni.model.routing import MODALITIES, Route, make_route
from omni.tokens import IMAGE_PATCH, scale_pixels


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


class Block(nnx.Module):
    """Pre-norm transformer block; with modalities > 0 every weight is per modality (late fusion's first layers,
    every mot layer) and the block needs a Route (omni.model.routing) to say which slice each token uses."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, *, modalities: int = 0, causal: bool = True):
        self.attn_norm = RMSNorm(cfg.d, cfg.norm_eps, cfg.param_dtype, modalities)
        self.attn = Attention(cfg, rngs, modalities=modalities, causal=causal)
        self.mlp_norm = RMSNorm(cfg.d, cfg.norm_eps, cfg.param_dtype, modalities)
        self.mlp = SwiGLU(cfg, rngs, modalities)

    def __call__(self, x_BxLxD, visible, rope_tables, route: Route | None = None):
        """x [B, L, D] -> x [B, L, D]."""
        x_BxLxD = x_BxLxD + self.attn(self.attn_norm(x_BxLxD, route), visible, rope_tables, route)
        return self._mlp(x_BxLxD, route)

    def cached(self, x_BxLxD, visible, rope_tables, cache, layer, slot_B=None, route: Route | None = None):
        """(x, cache): the block against a KV cache, a prefill or with slot_B one decode step
        (Attention.attend_cached)."""
        attended, cache = self.attn.attend_cached(self.attn_norm(x_BxLxD, route), visible, rope_tables, cache, layer,
                                                  slot_B, route)
        return self._mlp(x_BxLxD + attended, route), cache

    def _mlp(self, x_BxLxD, route):
        x_BxLxD = x_BxLxD + self.mlp(self.mlp_norm(x_BxLxD, route), route)
        return sharding.constrain(x_BxLxD, "batch", "length", "act_embed")


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

    def __call__(self, x_BxLxD, context_BxSxD, cross_mask_Bx1xLxS):
        has_key_Bx1xLx1 = jnp.any(cross_mask_Bx1xLxS, axis=-1)[..., None]  # [B, 1, L, 1]
        attended = self.attn(self.attn_norm(x_BxLxD), cross_mask_Bx1xLxS, context_BxSxD=context_BxSxD)
        attended = jnp.where(has_key_Bx1xLx1[:, 0], attended, 0)  # a position with no image before it gets nothing
        dt = x_BxLxD.dtype
        x_BxLxD = x_BxLxD + jnp.tanh(self.attn_gate[...]).astype(dt) * attended
        x_BxLxD = x_BxLxD + jnp.tanh(self.mlp_gate[...]).astype(dt) * self.mlp(self.mlp_norm(x_BxLxD))
        return sharding.constrain(x_BxLxD, "batch", "length", "act_embed")

def span_ids(segment_ids_BxL, modality_BxL):
    """1, 2, ... for each run of one modality inside one segment (a new span wherever either changes)."""
    change_BxL = jnp.concatenate(
        [jnp.ones_like(segment_ids_BxL[:, :1], dtype=bool),
         (segment_ids_BxL[:, 1:] != segment_ids_BxL[:, :-1]) | (modality_BxL[:, 1:] != modality_BxL[:, :-1])], axis=1)
    return jnp.cumsum(change_BxL, axis=1, dtype=jnp.int32)


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
        per_modality = MODALITIES if cfg.fusion == "mot" else 0
        # shared (the decoder for cross; per modality for mot)
        self.blocks = _stack(cfg, cfg.layers - late, rngs, lambda r: Block(cfg, r, modalities=per_modality))
        self.final_norm = RMSNorm(cfg.d, cfg.norm_eps, cfg.param_dtype)
        self.unembed = _param(rngs, (cfg.d, vocab_size), ("embed", "vocab"), cfg.d**-0.5, cfg.param_dtype)
        if late:
            self.modality_blocks = _stack(cfg, late, rngs, lambda r: Block(cfg, r, modalities=MODALITIES))
        if cfg.fusion == "cross":
            self.encoder = _stack(cfg, cfg.encoder_layers, rngs, lambda r: Block(cfg, r, causal=False))
            self.encoder_norm = RMSNorm(cfg.d, cfg.norm_eps, cfg.param_dtype)
            self.cross_blocks = _stack(cfg, cfg.layers // cfg.cross_every, rngs, lambda r: GatedCrossBlock(cfg, r))

    def embed_inputs(self, batch) -> jax.Array:
        """x_BxLxD: token embeddings, with image patch positions replaced by their pixel projection.

        Only the patch slots are projected ([B, M] of them, omni.batch), then scattered to their row positions
        (an unused slot's position L falls outside and is dropped)."""
        dt = jnp.dtype(self.cfg.dtype)
        tokens_BxL = batch["tokens"]
        x_BxLxD = jnp.take(self.embed[...], tokens_BxL, axis=0).astype(dt)
        pixels_BxMxP = scale_pixels(batch["patches"]).astype(dt)
        projected_BxMxD = (jnp.einsum("bmp,pd->bmd", pixels_BxMxP, self.patch_proj[...].astype(dt))
                           + self.patch_bias[...].astype(dt))
        placed_BxLxD = jax.vmap(lambda x, at, rows: x.at[at].set(rows, mode="drop"))(
            jnp.zeros_like(x_BxLxD), batch["patch_positions"], projected_BxMxD)
        is_patch_BxL = (batch["modality"] == IMAGE) & (tokens_BxL == IMAGE_PATCH)
        x_BxLxD = jnp.where(is_patch_BxL[..., None], placed_BxLxD, x_BxLxD)
        return sharding.constrain(x_BxLxD, "batch", "length", "act_embed")

    def __call__(self, batch) -> jax.Array:
        """The batch of omni.batch -> logits float32 [B, L, V] (position t predicts token t+1)."""
        return self.vocab_logits(self.hidden(batch))

    def hidden(self, batch) -> jax.Array:
        """hidden [B, L, D]: the last layer's output after the final norm, what vocab_logits unembeds. The
        trainer's loss takes it with the unembedding weight (omni.loss.fused_loss_sums) so that no [B, L, V]
        array is ever held whole."""
        segment_ids_BxL = batch["segment_ids"]
        x_BxLxD = self.embed_inputs(batch)
        tables = self.rope_tables(batch["positions"])
        if self.cfg.fusion == "cross":
            return self.final_norm(self._cross_decoder(x_BxLxD, batch, tables))
        route = self.route(batch)
        if self.cfg.fusion == "late" and self.cfg.late_layers:
            spans = runs_of(span_ids(segment_ids_BxL, batch["modality"]), self.cfg)
            x_BxLxD = self._run_stack(self.modality_blocks, x_BxLxD, lambda: spans, tables, route)
        segments = runs_of(segment_ids_BxL, self.cfg)  # once per pass, not per layer (attention.Runs)
        x_BxLxD = self._run_stack(self.blocks, x_BxLxD, lambda: segments, tables,
                                  route if self.cfg.fusion == "mot" else None)
        return self.final_norm(x_BxLxD)

    def route(self, batch) -> Route | None:
        """Which weight slice each position uses, built once per call for every per-modality layer (None when
        no layer has per-modality weights)."""
        if self.cfg.fusion == "mot" or (self.cfg.fusion == "late" and self.cfg.late_layers):
            return make_route(batch["modality"], self.cfg.modality_matmul)
        return None

    def rope_tables(self, positions_BxL):
        """RoPE's cos/sin for these positions (omni.model.layers.rope_tables), computed once per call and read
        by every layer, so no layer (nor its backward pass) recomputes them."""
        return rope_tables(positions_BxL, derived_head_dim(self.cfg), self.cfg.rope_theta)

    def _run_stack(self, stack, x_BxLxD, visible_fn, tables, route=None):
        """x through every block of a stack (scanned or a list), each under the configured remat policy.

        visible_fn() gives each block what its attention sees (run ids [B, L] or a mask, see attend), inside
        the block: a [B, 1, L, L] mask built once outside and closed over is held across the scan (and kept
        for the backward pass), measured ~20% slower on the CPU bench (configs/bench/omni_cpu.py: 2.1-2.5 s
        per step against 1.8-1.9 s).
        """
        if stack is None:
            return x_BxLxD

        def run_block(block, x):
            return block(x, visible_fn(), tables, route=route)

        if self.cfg.remat != "none":
            run_block = nnx.remat(run_block, policy=REMAT_POLICIES[self.cfg.remat])
        return _over_blocks(stack, lambda x, block: run_block(block, x), x_BxLxD)

    def _cross_decoder(self, x_BxLxD, batch, tables):
        """Cross fusion (module docstring): encode the image spans, then decoder groups of model.cross_every
        layers, each after a gated cross-attention block into the encoded images earlier in the segment."""
        segment_ids_BxL = batch["segment_ids"]
        length = segment_ids_BxL.shape[1]
        is_image_BxL = batch["modality"] == IMAGE
        # Encoder: bidirectional inside each image span; any other position sees only itself (output unused).
        encoder_ids_BxL = jnp.where(is_image_BxL, span_ids(segment_ids_BxL, batch["modality"]),
                                    -1 - jnp.arange(length, dtype=jnp.int32)[None])
        encoded_BxLxD = self.encoder_norm(self._run_stack(
            self.encoder, x_BxLxD, lambda: same_ids_mask(encoder_ids_BxL), tables))
        image_key_Bx1x1xL = is_image_BxL[:, None, None, :]

        def decoder_mask():  # text and audio never see image positions (which see only themselves)
            itself_1x1xLxL = jnp.eye(length, dtype=bool)[None, None]
            return same_ids_mask(segment_ids_BxL) & (~image_key_Bx1x1xL | itself_1x1xLxL)

        earlier_1x1xLxL = jnp.tril(jnp.ones((length, length), bool))[None, None]
        cross_mask = same_ids_mask(segment_ids_BxL) & image_key_Bx1x1xL & earlier_1x1xLxL
        groups, per_group = self.cfg.layers // self.cfg.cross_every, self.cfg.cross_every
        for g in range(groups):
            x_BxLxD = _stack_item(self.cross_blocks, g)(x_BxLxD, encoded_BxLxD, cross_mask)
            x_BxLxD = self._run_stack(_stack_slice(self.blocks, g * per_group, (g + 1) * per_group), x_BxLxD,
                                      decoder_mask, tables)
        return x_BxLxD

    def vocab_logits(self, hidden_BxLxD) -> jax.Array:
        """hidden [B, L, D] (after the final norm: `hidden`) -> logits float32 [B, L, V]."""
        logits_BxLxV = jnp.einsum("bld,dv->blv", hidden_BxLxD, self.unembed[...].astype(hidden_BxLxD.dtype),
                                  preferred_element_type=jnp.float32)
        return sharding.constrain(logits_BxLxV, "batch", "length", "vocab")

    def prefill(self, batch, cache, logits_at_B=None):
        """(logits, cache): the right-padded prompt block [B, P] runs as in training (segment_ids 1 on tokens, 0
        on padding) and fills cache slots 0..P-1. logits float32 [B, P, V], or with logits_at_B (int [B]) only
        that position of each row, [B, 1, V] (a prompt's last token)."""
        return self._cached(batch, cache, None, logits_at_B)

    def decode_step(self, batch, cache):
        """(logits float32 [B, 1, V], cache): one token per row ([B, 1] fields, omni.tools.generate.step_batch)
        at slot positions[:, 0] (rows may differ), attending to slots <= that slot; the cache gains that slot."""
        return self._cached(batch, cache, batch["positions"][:, 0], None)

    def _cached(self, batch, cache, slot_B, logits_at_B):
        """The KV-cache path: the stacked cache rides in the layer carry; layer i reads/writes cache[:, i]. A
        token's cache slot is its position."""
        if self.cfg.fusion not in ("early", "mot"):
            raise ValueError(f"the KV cache serves model.fusion='early' and 'mot', not '{self.cfg.fusion}' "
                             "(omni.tools.generate recomputes the prefix for the other variants)")
        visible = None if slot_B is not None else runs_of(batch["segment_ids"], self.cfg)
        x_BxLxD = self.embed_inputs(batch)
        tables = self.rope_tables(batch["positions"])
        route = self.route(batch)  # mot: a decode step routes each row's one token by its modality

        def run_block(carry, block):
            x, cache, layer = carry
            x, cache = block.cached(x, visible, tables, cache, layer, slot_B, route)
            return x, cache, layer + 1

        x_BxLxD, cache, _ = _over_blocks(self.blocks, run_block, (x_BxLxD, cache, jnp.zeros((), jnp.int32)))
        if logits_at_B is not None:
            x_BxLxD = jnp.take_along_axis(x_BxLxD, logits_at_B[:, None, None], axis=1)
        return self.vocab_logits(self.final_norm(x_BxLxD)), cache


def _over_blocks(stack, body, carry):
    """carry = body(carry, block) for every block of a stack, in order: nnx.scan over a stacked one, a Python loop
    over an nnx.List (model.scan_layers=false)."""
    if isinstance(stack, nnx.List):
        for block in stack:
            carry = body(carry, block)
        return carry

    @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def scan_blocks(carry, block):
        return body(carry, block)

    return scan_blocks(carry, stack)


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
