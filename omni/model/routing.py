"""Per-modality weights: each token is multiplied by its own modality's slice of a [modality, ...] weight.

A Route is built once per forward pass from the batch's modality ids and read by every per-modality layer
(late fusion's first k, every layer of mot). model.modality_matmul picks how the products are computed:

    tiles       (default) the B*L tokens are laid out by modality in a slot buffer, each modality's run padded
                to a whole number of tiles of R rows, so every tile holds one modality; a loop over the tiles
                multiplies each by its modality's weight. The buffer is static: ceil(T / R) + M - 1 tiles
                (T = B*L tokens, M = 3 modalities), R = max(ceil(T / TILES), MIN_TILE_ROWS), so the matmul
                FLOPs are at most (TILES + M - 1) / TILES = 1.0625x one slice per token (plus at most M - 1
                tiles of MIN_TILE_ROWS rows when T is small), not 3x. Pure XLA: the same on CPU, GPU and TPU.
    ragged_dot  the same sorted tokens (no padding) through jax.lax.ragged_dot. On TPU that is XLA's native
                grouped matmul. On CPU jax lowers it to a dense dot over every group with the other groups'
                rows masked to zero (jax's _ragged_dot_general_impl: 3x FLOPs); on GPU (jaxlib 0.10.2) to
                chlo.ragged_dot, which XLA's ragged-dot rewriter expands to the same zero-padded dense batched
                dot unless its experimental cuDNN grouped-matmul fusion is switched on.
    masked      every token times every slice, the other slices' products masked away (3x FLOPs): the
                reference the other two are tested against.

The slot layout is over all B*L positions of the batch as the program sees it: under data parallelism XLA
gathers the batch's activations across its shards for the sort (correct, but communication a per-shard
shard_map would avoid).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import jax
import jax.numpy as jnp

MODALITIES = 3  # weight slices: text (and padding), image, audio
TILES = 32  # tiles the token buffer is cut into (the padding overhead is at most (MODALITIES - 1) / TILES)
MIN_TILE_ROWS = 8  # a decode step (one token per row) is a few tiles of a few rows, not B tiles of one


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class Route:
    """Which weight slice each of the B*L tokens uses, and where it sits in the slot buffer.

        index_BxL        int32 [B, L]  the slice: 0 text/padding, 1 image, 2 audio
        slot_T           int32 [T]     token t's row in the slot buffer (T = B * L, row-major)
        token_of_slot_C  int32 [C]     the token in each slot, T for an empty (padding) slot
        tile_group_K     int32 [K]     the slice of each tile of tile_rows slots (C = K * tile_rows)
        group_sizes_M    int32 [M]     tokens per slice (ragged_dot's group sizes)
    """
    index_BxL: jax.Array
    slot_T: jax.Array
    token_of_slot_C: jax.Array
    tile_group_K: jax.Array
    group_sizes_M: jax.Array
    method: str = field(metadata=dict(static=True))
    tile_rows: int = field(metadata=dict(static=True))


def route_index(modality_BxL):
    """Which modality slice a position uses: TEXT and PAD -> 0, IMAGE -> 1, AUDIO -> 2."""
    return jnp.clip(modality_BxL - 1, 0, MODALITIES - 1)


def tile_rows_for(tokens: int, method: str) -> int:
    """Rows per tile: ragged_dot and masked need no padding (1); tiles cut T tokens into about TILES tiles."""
    if method != "tiles":
        return 1
    return max(-(-tokens // TILES), MIN_TILE_ROWS)


def make_route(modality_BxL, method: str = "tiles") -> Route:
    """The Route of a batch's modality ids int [B, L] (omni.batch) under model.modality_matmul `method`."""
    index_BxL = route_index(modality_BxL).astype(jnp.int32)
    tokens = index_BxL.size
    rows = tile_rows_for(tokens, method)
    index_T = index_BxL.reshape(-1)
    onehot_TxM = jax.nn.one_hot(index_T, MODALITIES, dtype=jnp.int32)
    rank_T = jnp.take_along_axis(jnp.cumsum(onehot_TxM, axis=0), index_T[:, None], axis=1)[:, 0] - 1
    sizes_M = onehot_TxM.sum(axis=0)
    padded_M = -(-sizes_M // rows) * rows  # each slice's run rounded up to whole tiles
    start_M = jnp.cumsum(padded_M) - padded_M
    slot_T = start_M[index_T] + rank_T
    tiles = -(-tokens // rows) + (MODALITIES - 1 if rows > 1 else 0)  # the most sum(ceil(size / rows)) can be
    token_of_slot_C = jnp.full((tiles * rows,), tokens, jnp.int32).at[slot_T].set(jnp.arange(tokens, dtype=jnp.int32))
    tile_start_K = jnp.arange(tiles, dtype=jnp.int32) * rows
    tile_group_K = jnp.sum(tile_start_K[:, None] >= start_M[None, 1:], axis=1).astype(jnp.int32)
    return Route(index_BxL, slot_T, token_of_slot_C, tile_group_K, sizes_M.astype(jnp.int32), method, rows)


def to_slots(x_TxI, route: Route):
    """Tokens [T, I] -> the slot buffer [C, I] (empty slots zero)."""
    return jnp.take(x_TxI, route.token_of_slot_C, axis=0, mode="fill", fill_value=0)


def from_slots(y_CxO, route: Route):
    """The slot buffer [C, O] -> tokens [T, O]."""
    return jnp.take(y_CxO, route.slot_T, axis=0)


def grouped_matmul(x_CxI, w_MxIxO, route: Route):
    """Slot buffer [C, I] times each row's own slice of w [M, I, O] -> [C, O] (tiles or ragged_dot)."""
    if route.method == "ragged_dot":
        return jax.lax.ragged_dot(x_CxI, w_MxIxO, route.group_sizes_M)
    x_KxRxI = x_CxI.reshape(route.tile_group_K.shape[0], route.tile_rows, -1)

    def one_tile(tile):
        x_RxI, group = tile
        return x_RxI @ jax.lax.dynamic_index_in_dim(w_MxIxO, group, keepdims=False)

    return jax.lax.map(one_tile, (x_KxRxI, route.tile_group_K)).reshape(x_CxI.shape[0], -1)


def routed_einsum(spec: str, x, w, route: Route):
    """einsum(spec, x, w[slice of each token]) for specs 'bl<in>,<w>->bl<out>' whose x axes after b, l are all
    contracted; w has a leading [modality] axis that the spec does not name."""
    inputs, out = spec.split("->")
    x_axes, w_axes = inputs.split(",")
    if route.method == "masked":
        onehot_BxLxM = jax.nn.one_hot(route.index_BxL, MODALITIES, dtype=x.dtype)
        per_modality = jnp.einsum(f"{x_axes},m{w_axes}->blm{out[2:]}", x, w)
        return jnp.einsum(f"blm{out[2:]},blm->{out}", per_modality, onehot_BxLxM)
    contracted, kept = x_axes[2:], out[2:]
    batch, length = x.shape[:2]
    out_dims = tuple(w.shape[1 + w_axes.index(a)] for a in kept)
    w_MxIxO = jnp.einsum(f"m{w_axes}->m{contracted}{kept}", w).reshape(w.shape[0], -1, math.prod(out_dims))
    y_CxO = grouped_matmul(to_slots(x.reshape(batch * length, -1), route), w_MxIxO, route)
    return from_slots(y_CxO, route).reshape((batch, length) + out_dims)


def routed_scale(scale_MxD, route: Route):
    """Each token's own slice of a per-modality vector [M, D] -> [B, L, D] (an RMSNorm scale)."""
    return jnp.take(scale_MxD, route.index_BxL, axis=0)
