"""The building blocks: parameters with logical axis names, RMSNorm, RoPE, (per-modality) dense maps, SwiGLU.

Every parameter carries logical axis names (see omni.sharding) so the same code shards on any mesh; with
`modalities > 0` a weight has a leading [modality] axis and each token uses its own modality's slice (late
fusion's first layers, every layer of mot), as an omni.model.routing.Route says.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from omni import sharding
from omni.config import ModelConfig, derived_mlp
from omni.model.routing import Route, from_slots, grouped_matmul, routed_einsum, routed_scale, to_slots

# Logical names are resolved against the mesh rules by the trainer, not when a variable is created.
nnx.use_eager_sharding(False)

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

    def __call__(self, x_BxLxD, route: Route | None = None):
        x = x_BxLxD.astype(jnp.float32)
        x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + self.eps)
        scale = self.scale[...].astype(jnp.float32)
        if route is not None:  # each token's own modality's scale
            scale = routed_scale(scale, route)
        return (x * scale).astype(x_BxLxD.dtype)


def rope_tables(positions_BxL, head_dim: int, theta: float):
    """RoPE's rotation for every position, computed once per step and shared by all layers:

        cos_BxLx1x2xR  float32  cos(angle) for both halves of a head (R = head_dim / 2)
        sin_BxLx1x2xR  float32  -sin(angle) for the first half, +sin(angle) for the second

    (the rotate-half form, as HF Llama: x1' = x1 cos - x2 sin, x2' = x2 cos + x1 sin), at each token's position
    inside its segment. The sign is folded into the table so apply_rope needs no split or concatenate."""
    half = head_dim // 2
    freqs = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)
    angles_BxLx1x1xR = (positions_BxL[..., None].astype(jnp.float32) * freqs)[:, :, None, None, :]
    sin_BxLx1x1xR, cos_BxLx1x1xR = jnp.sin(angles_BxLx1x1xR), jnp.cos(angles_BxLx1x1xR)
    return (jnp.concatenate([cos_BxLx1x1xR, cos_BxLx1x1xR], axis=3),
            jnp.concatenate([-sin_BxLx1x1xR, sin_BxLx1x1xR], axis=3))


def apply_rope(x_BxLx___xH, tables):
    """x [B, L, ..., H] rotated by rope_tables; one elementwise pass (f32 inside, x's dtype out): the halves are
    viewed as an axis of 2 and swapped by a reverse, so XLA fuses it into a single kernel."""
    cos_BxLx1x2xR, sin_BxLx1x2xR = tables
    shape = x_BxLx___xH.shape
    halves = x_BxLx___xH.astype(jnp.float32).reshape(shape[:2] + (-1, 2, shape[-1] // 2))
    rotated = halves * cos_BxLx1x2xR + jnp.flip(halves, axis=3) * sin_BxLx1x2xR
    return rotated.reshape(shape).astype(x_BxLx___xH.dtype)


def _modality_param(rngs, shape, names, std, dtype, modalities: int) -> nnx.Param:
    """A parameter, or with modalities > 0 one per modality stacked on a leading [modality] axis."""
    if modalities:
        return _param(rngs, (modalities,) + shape, ("modality",) + names, std, dtype)
    return _param(rngs, shape, names, std, dtype)


def dense(spec: str, x, w, dtype, route: Route | None = None):
    """einsum(spec, x, w) in `dtype`; with a route w has a leading [modality] axis and each token is multiplied
    by its own modality's slice (omni.model.routing). Specs have the form 'bl..,...->bl..'."""
    w = w.astype(dtype)
    if route is None:
        return jnp.einsum(spec, x, w)
    return routed_einsum(spec, x.astype(dtype), w, route)


class SwiGLU(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, modalities: int = 0):
        d, f, m, pd = cfg.d, derived_mlp(cfg), modalities, cfg.param_dtype
        self.w_gate = _modality_param(rngs, (d, f), ("embed", "mlp"), cfg.init_std, pd, m)
        self.w_up = _modality_param(rngs, (d, f), ("embed", "mlp"), cfg.init_std, pd, m)
        self.w_down = _modality_param(rngs, (f, d), ("mlp", "embed"), cfg.init_std / (2 * cfg.layers) ** 0.5, pd, m)
        self.dtype = jnp.dtype(cfg.dtype)

    def __call__(self, x_BxLxD, route: Route | None = None):
        # One matmul for gate and up: the two weights (kept apart in checkpoints and exports) are stacked on an
        # axis of 2 that no mesh axis shards, so the stack is local to every device.
        w_Dx2xF = jnp.stack([self.w_gate[...], self.w_up[...]], axis=-2)
        if route is not None and route.method != "masked":
            return self._grouped(x_BxLxD, w_Dx2xF, route)
        gate_up_BxLx2xF = dense("bld,dtf->bltf", x_BxLxD, w_Dx2xF, self.dtype, route)
        gate_BxLxF, up_BxLxF = gate_up_BxLx2xF[:, :, 0], gate_up_BxLx2xF[:, :, 1]
        hidden_BxLxF = sharding.constrain(jax.nn.silu(gate_BxLxF) * up_BxLxF, "batch", "length", "mlp")
        return dense("blf,fd->bld", hidden_BxLxF, self.w_down[...], self.dtype, route)

    def _grouped(self, x_BxLxD, w_MxDx2xF, route: Route):
        """Per-modality SwiGLU with the tokens kept in the route's slot buffer between the two matmuls: one gather
        in and one out instead of one around each matmul (empty slots stay zero: silu(0) * 0 = 0)."""
        batch, length, d = x_BxLxD.shape
        modalities, f = w_MxDx2xF.shape[0], w_MxDx2xF.shape[-1]
        x_CxD = to_slots(x_BxLxD.reshape(batch * length, d).astype(self.dtype), route)
        gate_up_CxF2 = grouped_matmul(x_CxD, w_MxDx2xF.reshape(modalities, d, 2 * f).astype(self.dtype), route)
        gate_up_Cx2xF = gate_up_CxF2.reshape(-1, 2, f)
        hidden_CxF = jax.nn.silu(gate_up_Cx2xF[:, 0]) * gate_up_Cx2xF[:, 1]
        y_CxD = grouped_matmul(hidden_CxF, self.w_down[...].astype(self.dtype), route)
        return from_slots(y_CxD, route).reshape(batch, length, d)
