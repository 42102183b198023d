"""Counting from the config alone: parameters, matmul parameters and training FLOPs per token of every fusion
variant (what `omni ablate` matches widths by and what MFU is computed from)."""

from __future__ import annotations

import jax

from omni.config import ModelConfig, derived_head_dim, derived_mlp
from omni.model.routing import MODALITIES


def param_count(params) -> int:
    return sum(x.size for x in jax.tree.leaves(params))


def _layer_matmul_params(cfg: ModelConfig) -> int:
    """Attention (q, k, v, o) and SwiGLU weights of one block; a gated cross block has the same."""
    d, n, k, h, f = cfg.d, cfg.heads, cfg.kv_heads, derived_head_dim(cfg), derived_mlp(cfg)
    return d * n * h * 2 + d * k * h * 2 + 3 * d * f


def _layer_counts(cfg: ModelConfig) -> dict:
    """Blocks of each kind: shared/decoder, modality-specific (late fusion's first k, every mot layer), encoder,
    gated cross."""
    late = {"late": cfg.late_layers, "mot": cfg.layers}.get(cfg.fusion, 0)
    cross = cfg.fusion == "cross"
    return {"shared": cfg.layers - late, "modality": late, "encoder": cfg.encoder_layers if cross else 0,
            "cross": cfg.layers // cfg.cross_every if cross else 0}


def matmul_params(cfg: ModelConfig, vocab_size: int) -> int:
    """Parameters in the matmuls one token position goes through: attention and MLP weights of every block on
    its way plus the unembedding.

    The input embedding (a lookup) and the patch projection (an input embedding for image positions) are left
    out, as MaxText and the shared plain-JAX benchmark count. early, late and mot: model.layers blocks (late's
    first k and every mot block use one modality's slice per token, and omni.model.routing computes just
    that slice, up to its tile padding). cross: the decoder, the gated cross blocks and the image encoder,
    which this implementation runs over every position of the sequence.
    """
    n = _layer_counts(cfg)
    return (n["shared"] + n["modality"] + n["encoder"] + n["cross"]) * _layer_matmul_params(cfg) + cfg.d * vocab_size


def flops_per_token(cfg: ModelConfig, vocab_size: int, seq_len: int) -> float:
    """Training FLOPs per token: 6 x matmul params + attention, 6 x seq x (heads x head_dim) per causal layer.

    A causal layer's attention is 6 x seq^2 x heads x head_dim per sequence (forward + backward of QK^T and
    AV with the causal half skipped), divided by seq for a per-token figure; the decoder's, late fusion's and
    mot's layers are causal (late's are masked to spans, but the kernel runs the whole causal square), so are the
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
