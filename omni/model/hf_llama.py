"""omni's early-fusion decoder as a Hugging Face `LlamaForCausalLM`: tensor names, layouts and config.json keys.

The two are the same network: pre-norm blocks of RMSNorm -> GQA attention with RoPE -> RMSNorm -> SwiGLU, a final
RMSNorm and an untied output projection. What differs is only how the weights are written down:

    omni export name              omni shape    HF name                                        HF shape
    embed                         [V, d]        model.embed_tokens.weight                      [V, d]
    blocks.{i}.attn_norm.scale    [d]           model.layers.{i}.input_layernorm.weight        [d]
    blocks.{i}.attn.wq            [d, N, H]     model.layers.{i}.self_attn.q_proj.weight       [N*H, d]
    blocks.{i}.attn.wk            [d, K, H]     model.layers.{i}.self_attn.k_proj.weight       [K*H, d]
    blocks.{i}.attn.wv            [d, K, H]     model.layers.{i}.self_attn.v_proj.weight       [K*H, d]
    blocks.{i}.attn.wo            [N, H, d]     model.layers.{i}.self_attn.o_proj.weight       [d, N*H]
    blocks.{i}.mlp_norm.scale     [d]           model.layers.{i}.post_attention_layernorm.weight [d]
    blocks.{i}.mlp.w_gate         [d, F]        model.layers.{i}.mlp.gate_proj.weight          [F, d]
    blocks.{i}.mlp.w_up           [d, F]        model.layers.{i}.mlp.up_proj.weight            [F, d]
    blocks.{i}.mlp.w_down         [F, d]        model.layers.{i}.mlp.down_proj.weight          [d, F]
    final_norm.scale              [d]           model.norm.weight                              [d]
    unembed                       [d, V]        lm_head.weight                                 [V, d]
    patch_proj                    [P, d]        weight  (patch_projection.safetensors)         [d, P]
    patch_bias                    [d]           bias    (patch_projection.safetensors)         [d]

omni computes `x @ w` (Flax: [in, out]); torch's nn.Linear stores [out, in], hence the transposes. Head n of a
projection is rows n*H .. (n+1)*H - 1 on both sides, and query head n reads kv head n // (N / K) on both sides
(omni.model.attention; HF's repeat_kv), so no head is reordered. RoPE needs no permutation either: omni rotates
the halves of a head (omni.model.layers.rope_tables: x1' = x1 cos - x2 sin, x2' = x2 cos + x1 sin, frequency
theta^(-j / (H/2)) for pair j), exactly HF Llama's rotate_half, not interleaved pairs. Queries are not pre-scaled
(softmax scale 1/sqrt(H) on both sides). Pure numpy: the trainer (model.init_from) and `omni export --format hf`
both use it, neither needs torch.
"""

from __future__ import annotations

import numpy as np

from omni.config import ModelConfig, derived_head_dim, derived_mlp

# Generic omni export name -> HF name. Order = the order of the HF file.
HF_NAMES = {
    "embed": "model.embed_tokens.weight",
    "blocks.{i}.attn_norm.scale": "model.layers.{i}.input_layernorm.weight",
    "blocks.{i}.attn.wq": "model.layers.{i}.self_attn.q_proj.weight",
    "blocks.{i}.attn.wk": "model.layers.{i}.self_attn.k_proj.weight",
    "blocks.{i}.attn.wv": "model.layers.{i}.self_attn.v_proj.weight",
    "blocks.{i}.attn.wo": "model.layers.{i}.self_attn.o_proj.weight",
    "blocks.{i}.mlp_norm.scale": "model.layers.{i}.post_attention_layernorm.weight",
    "blocks.{i}.mlp.w_gate": "model.layers.{i}.mlp.gate_proj.weight",
    "blocks.{i}.mlp.w_up": "model.layers.{i}.mlp.up_proj.weight",
    "blocks.{i}.mlp.w_down": "model.layers.{i}.mlp.down_proj.weight",
    "final_norm.scale": "model.norm.weight",
    "unembed": "lm_head.weight",
}
# The image patch projection has no place in LlamaForCausalLM: it goes to its own file, as an nn.Linear(P, d).
PATCH_FILE = "patch_projection.safetensors"
PATCH_NAMES = {"patch_proj": "weight", "patch_bias": "bias"}

_HEADS_OUT = ("blocks.{i}.attn.wq", "blocks.{i}.attn.wk", "blocks.{i}.attn.wv")  # [d, heads, H] -> [heads*H, d]
_HEADS_IN = ("blocks.{i}.attn.wo",)                                               # [N, H, d] -> [d, N*H]
_TRANSPOSED = ("blocks.{i}.mlp.w_gate", "blocks.{i}.mlp.w_up", "blocks.{i}.mlp.w_down", "unembed", "patch_proj")


def generic_name(name: str) -> str:
    """'blocks.3.attn.wq' -> 'blocks.{i}.attn.wq'; other names as they are."""
    parts = name.split(".")
    if parts[0] == "blocks" and len(parts) > 2 and parts[1].isdigit():
        return ".".join(["blocks", "{i}"] + parts[2:])
    return name


def hf_name(name: str) -> str:
    """The HF tensor name of an omni export name ('blocks.3.attn.wq' -> 'model.layers.3.self_attn.q_proj.weight')."""
    generic = generic_name(name)
    if generic in PATCH_NAMES:
        return PATCH_NAMES[generic]
    layer = name.split(".")[1] if generic != name else ""
    return HF_NAMES[generic].replace("{i}", layer)


def hf_shape(name: str, omni_shape) -> tuple[int, ...]:
    """The shape an omni tensor of `omni_shape` has in HF's layout."""
    generic, shape = generic_name(name), tuple(omni_shape)
    if generic in _HEADS_OUT:
        return (shape[1] * shape[2], shape[0])
    if generic in _HEADS_IN:
        return (shape[2], shape[0] * shape[1])
    if generic in _TRANSPOSED:
        return shape[::-1]
    return shape


def to_hf(name: str, x: np.ndarray) -> np.ndarray:
    """An omni tensor (export name, omni layout) in HF's layout, contiguous."""
    generic = generic_name(name)
    if generic in _HEADS_OUT:
        x = x.reshape(x.shape[0], -1).T
    elif generic in _HEADS_IN:
        x = x.reshape(-1, x.shape[-1]).T
    elif generic in _TRANSPOSED:
        x = x.T
    return np.ascontiguousarray(x)


def from_hf(name: str, x: np.ndarray, omni_shape) -> np.ndarray:
    """An HF tensor back in omni's layout, shape `omni_shape` (checked by the caller against hf_shape)."""
    generic = generic_name(name)
    if generic in _HEADS_OUT or generic in _HEADS_IN or generic in _TRANSPOSED:
        x = x.T
    return np.ascontiguousarray(x.reshape(tuple(omni_shape)))


# ----------------------------------------------------------------------------------------------------------
# config.json


def llama_config(m: ModelConfig, vocab_size: int, context: int, dtype: str, special_ids: dict) -> dict:
    """The LlamaConfig (as config.json) of an omni model. `special_ids`: {"bos", "eos", "pad"} token ids.

    rope_theta is written both flat (transformers 4.x reads it) and inside rope_parameters (5.x)."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": vocab_size,
        "hidden_size": m.d,
        "intermediate_size": derived_mlp(m),
        "num_hidden_layers": m.layers,
        "num_attention_heads": m.heads,
        "num_key_value_heads": m.kv_heads,
        "head_dim": derived_head_dim(m),
        "hidden_act": "silu",
        "max_position_embeddings": context,
        "rms_norm_eps": m.norm_eps,
        "rope_theta": m.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": m.rope_theta},
        "rope_scaling": None,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "tie_word_embeddings": False,  # omni's unembed is its own matrix
        "initializer_range": m.init_std,
        "bos_token_id": special_ids["bos"],
        "eos_token_id": special_ids["eos"],
        "pad_token_id": special_ids["pad"],
        "torch_dtype": dtype,
        "dtype": dtype,
        "use_cache": True,
    }


def rope_theta_of(config: dict) -> float | None:
    """rope_theta of a Llama config.json, from either place transformers writes it (None when absent)."""
    params = config.get("rope_parameters") or {}
    theta = params.get("rope_theta", config.get("rope_theta"))
    return None if theta is None else float(theta)


def rope_type_of(config: dict) -> str:
    params = config.get("rope_parameters") or config.get("rope_scaling") or {}
    return params.get("rope_type") or params.get("type") or "default"


def omni_keys_of(config: dict) -> dict:
    """The omni model.* settings a Llama config.json stands for ({key: value}); LlamaConfig's own defaults fill
    what the file leaves out (head_dim = hidden // heads, kv heads = heads, theta 10000, eps 1e-6)."""
    heads = int(config["num_attention_heads"])
    return {
        "model.d": int(config["hidden_size"]),
        "model.layers": int(config["num_hidden_layers"]),
        "model.heads": heads,
        "model.kv_heads": int(config.get("num_key_value_heads") or heads),
        "model.head_dim": int(config.get("head_dim") or int(config["hidden_size"]) // heads),
        "model.mlp": int(config["intermediate_size"]),
        "model.rope_theta": rope_theta_of(config) or 10_000.0,
        "model.norm_eps": float(config.get("rms_norm_eps", 1e-6)),
    }


def settings_that_differ(m: ModelConfig, config: dict) -> dict:
    """{omni key: the value config.json needs} for each model.* setting that does not match the file."""
    ours = {"model.d": m.d, "model.layers": m.layers, "model.heads": m.heads, "model.kv_heads": m.kv_heads,
            "model.head_dim": derived_head_dim(m), "model.mlp": derived_mlp(m), "model.rope_theta": m.rope_theta,
            "model.norm_eps": m.norm_eps}
    return {k: v for k, v in omni_keys_of(config).items() if ours[k] != v}
