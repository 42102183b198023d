"""A minimal plain-JAX decoder train step of the same size as an omni config: what `omni bench --reference`
times and compiles beside omni's own step, in the same process.

    omni bench --config configs/bench/omni_cpu.py --reference [--compile-only]

Straightforward and unfused, in the style of the plain-JAX step MaxText-class numbers are usually compared
with: token embedding lookup, then per layer RMSNorm, one matmul for q, k and v, RoPE, causal attention with
jax.nn.dot_product_attention (GQA by its kv heads; cuDNN where omni's attention is cuDNN, XLA otherwise), one
output matmul, RMSNorm, one matmul for gate and up, SwiGLU, the down matmul; a final RMSNorm, the
unembedding, float32 logits and optax's mean softmax cross-entropy over every position (labels rolled by
one); AdamW through optax with omni's hyperparameters (and its global-norm clip when train.clip_norm > 0).
Same d, layers, heads, kv_heads, head_dim, mlp, vocabulary, seq_len, batch, compute and parameter dtype,
remat policy (omni.model.transformer.REMAT_POLICIES) and layer scan as the config. Text tokens only: no
image patches, no modality routing, no packed segments. Parameters and optimizer state are replicated and
the batch split over every device of the mesh (plain data parallelism), so on one device it is just the
plain step.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec

from omni.config import Config, derived_head_dim, derived_mlp
from omni.model.attention import attention_implementation
from omni.model.transformer import REMAT_POLICIES

LAYER_KEYS = ("norm1", "qkv", "o", "norm2", "gate_up", "down")


def init_params(cfg: Config, vocab_size: int, key) -> dict:
    """The weights, stacked over layers ([layers, ...]) in model.param_dtype; norms start at one."""
    m = cfg.model
    d, layers, n, k, h, f = m.d, m.layers, m.heads, m.kv_heads, derived_head_dim(m), derived_mlp(m)
    dtype = jnp.dtype(m.param_dtype)
    keys = jax.random.split(key, 6)

    def normal(key, shape):
        return (jax.random.normal(key, shape, jnp.float32) * m.init_std).astype(dtype)

    return {"embed": normal(keys[0], (vocab_size, d)), "qkv": normal(keys[1], (layers, d, (n + 2 * k) * h)),
            "o": normal(keys[2], (layers, n * h, d)), "gate_up": normal(keys[3], (layers, d, 2 * f)),
            "down": normal(keys[4], (layers, f, d)), "norm1": jnp.ones((layers, d), dtype),
            "norm2": jnp.ones((layers, d), dtype), "final_norm": jnp.ones((d,), dtype),
            "unembed": normal(keys[5], (d, vocab_size))}


def matmul_params(cfg: Config, vocab_size: int) -> int:
    """Weights in matmuls (the embedding lookup excluded): the same count as omni.model.counting's."""
    m = cfg.model
    d, n, k, h, f = m.d, m.heads, m.kv_heads, derived_head_dim(m), derived_mlp(m)
    return m.layers * (d * (n + 2 * k) * h + n * h * d + 3 * d * f) + d * vocab_size


def loss_fn(cfg: Config, params: dict, tokens, platform: str | None = None):
    """Mean next-token cross-entropy of tokens [B, T] (the last position predicts the first: rolled labels);
    `platform` (default: the host's backend) decides model.attention=auto as omni's model decides it."""
    m = cfg.model
    dtype = jnp.dtype(m.dtype)
    n, k, h = m.heads, m.kv_heads, derived_head_dim(m)
    batch, seq = tokens.shape
    impl = "cudnn" if attention_implementation(m, platform) == "cudnn" else "xla"
    half = h // 2
    angles = jnp.arange(seq, dtype=jnp.float32)[:, None] * m.rope_theta ** (-jnp.arange(half, dtype=jnp.float32) / half)
    sin, cos = jnp.sin(angles)[None, :, None, :], jnp.cos(angles)[None, :, None, :]

    def rms(x, scale):
        x32 = x.astype(jnp.float32)
        return (x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, -1, keepdims=True) + m.norm_eps) * scale).astype(dtype)

    def rope(x):
        x1, x2 = x[..., :half].astype(jnp.float32), x[..., half:].astype(jnp.float32)
        return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1).astype(dtype)

    def block(x, lp):
        w = {name: lp[name].astype(dtype) for name in ("qkv", "o", "gate_up", "down")}
        qkv = rms(x, lp["norm1"]) @ w["qkv"]
        q, kk, v = jnp.split(qkv, [n * h, (n + k) * h], axis=-1)
        q, kk, v = q.reshape(batch, seq, n, h), kk.reshape(batch, seq, k, h), v.reshape(batch, seq, k, h)
        att = jax.nn.dot_product_attention(rope(q), rope(kk), v, is_causal=True, implementation=impl)
        x = x + att.reshape(batch, seq, n * h) @ w["o"]
        gate, up = jnp.split(rms(x, lp["norm2"]) @ w["gate_up"], 2, axis=-1)
        return x + (jax.nn.silu(gate) * up) @ w["down"], None

    if m.remat != "none":
        block = jax.checkpoint(block, policy=REMAT_POLICIES[m.remat])
    x = params["embed"].astype(dtype)[tokens]
    layers = {name: params[name] for name in LAYER_KEYS}
    if m.scan_layers:
        x, _ = jax.lax.scan(block, x, layers)
    else:
        for i in range(m.layers):
            x, _ = block(x, {name: w[i] for name, w in layers.items()})
    logits = (rms(x, params["final_norm"]) @ params["unembed"].astype(dtype)).astype(jnp.float32)
    return optax.softmax_cross_entropy_with_integer_labels(logits, jnp.roll(tokens, -1, axis=1)).mean()


def build_optimizer(cfg: Config):
    tc = cfg.train
    tx = optax.adamw(tc.lr, b1=tc.b1, b2=tc.b2, eps=tc.eps, weight_decay=tc.weight_decay,
                     mask=lambda params: jax.tree.map(lambda p: p.ndim >= 2, params))
    return optax.chain(optax.clip_by_global_norm(tc.clip_norm), tx) if tc.clip_norm > 0 else tx


def make_step(cfg: Config, vocab_size: int, mesh):
    """(step, init, state_sharding, tokens_sharding): step(state, tokens) -> (state, loss), jitted with the
    state donated; init(key) -> state {"params", "opt_state"} created replicated on the mesh."""
    tx = build_optimizer(cfg)
    platform = mesh.devices.flat[0].platform
    replicated = NamedSharding(mesh, PartitionSpec())
    axes = tuple(mesh.axis_names)
    data = NamedSharding(mesh, PartitionSpec(axes) if cfg.train.batch_size % mesh.devices.size == 0
                         else PartitionSpec())

    def step(state, tokens):
        loss, grads = jax.value_and_grad(lambda p: loss_fn(cfg, p, tokens, platform))(state["params"])
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        return {"params": optax.apply_updates(state["params"], updates), "opt_state": opt_state}, loss

    def create(key):
        params = init_params(cfg, vocab_size, key)
        return {"params": params, "opt_state": tx.init(params)}

    jitted = jax.jit(step, in_shardings=(replicated, data), out_shardings=(replicated, replicated),
                     donate_argnums=0)
    return jitted, jax.jit(create, out_shardings=replicated), replicated, data


def synthetic_tokens(cfg: Config, vocab_size: int, seed: int = 0) -> np.ndarray:
    """Random token ids [batch, seq_len] over the whole vocabulary."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, vocab_size, (cfg.train.batch_size, cfg.data.seq_len), dtype=np.int32)
