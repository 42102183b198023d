"""The building blocks: parameters with logical axis names, RMSNorm, RoPE, (per-modality) dense maps, SwiGLU.

Every parameter carries logical axis names (see omni.sharding) so the same code shards on any mesh; with
`modalities > 0` a weight has a leading [modality] axis and each token uses its own modality's slice (late
fusion's first layers).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from omni import sharding
from omni.config import ModelConfig, derived_mlp

# Logical names are resolved against the mesh rules by the trainer, not when a variable is created.
nnx.use_eager_sharding(False)

MODALITIES = 3  # late fusion's weight slices: text (and padding), image, audio


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
