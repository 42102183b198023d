"""The model's tensors by name: the dotted paths of its nnx parameter tree, with the layer stack unstacked.

    embed                        [V, d]      token embedding table (special, text, audio- and image-code ids;
                                             omni.tokens)
    patch_proj                   [P, d]      image patch projection: P = patch_size * patch_size * 3 pixels in
                                             [-1, 1] (omni.tokens.patchify order) -> width d
    patch_bias                   [d]         bias of the patch projection
    blocks.{i}.attn_norm.scale   [d]         RMSNorm scale before attention, layer i = 0 .. layers-1
    blocks.{i}.attn.wq           [d, N, H]   query projection: N heads of size H
    blocks.{i}.attn.wk           [d, K, H]   key projection: K key/value heads (grouped-query attention)
    blocks.{i}.attn.wv           [d, K, H]   value projection
    blocks.{i}.attn.wo           [N, H, d]   attention output projection
    blocks.{i}.mlp_norm.scale    [d]         RMSNorm scale before the MLP
    blocks.{i}.mlp.w_gate        [d, F]      SwiGLU: (silu(x @ w_gate) * (x @ w_up)) @ w_down
    blocks.{i}.mlp.w_up          [d, F]
    blocks.{i}.mlp.w_down        [F, d]
    final_norm.scale             [d]         RMSNorm scale after the last block
    unembed                      [d, V]      logits = final_norm(x) @ unembed

d = model.d, V = the vocabulary size (padded to a multiple of 128), N = model.heads, K = model.kv_heads,
H = the head size, F = the SwiGLU hidden size. A model.fusion=mot model has the same names, every blocks.{i}.*
tensor with a leading [3] axis of modality slices (text, image, audio). The names are the same whether the run
used model.scan_layers or not (a scanned model stores every block parameter with a leading [layers] axis; a list
of blocks stores them under 0, 1, ...). `omni export` writes these names; omni.model.hf_llama maps them to
Hugging Face's.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np

from omni.errors import ExportError

# Generic tensor name -> (shape in the symbols of the module docstring, what it is). Order = file order.
TENSOR_DOCS = {
    "embed": ("[V, d]", "token embedding table: special, text, audio- and image-code ids (vocab block of config.json)"),
    "patch_proj": ("[P, d]", "image patch projection: a patch's P = patch_size² × 3 pixels in [-1, 1] -> width d"),
    "patch_bias": ("[d]", "bias of the patch projection"),
    "blocks.{i}.attn_norm.scale": ("[d]", "RMSNorm scale before attention"),
    "blocks.{i}.attn.wq": ("[d, N, H]", "query projection, N heads of size H"),
    "blocks.{i}.attn.wk": ("[d, K, H]", "key projection, K key/value heads (grouped-query attention)"),
    "blocks.{i}.attn.wv": ("[d, K, H]", "value projection"),
    "blocks.{i}.attn.wo": ("[N, H, d]", "attention output projection"),
    "blocks.{i}.mlp_norm.scale": ("[d]", "RMSNorm scale before the MLP"),
    "blocks.{i}.mlp.w_gate": ("[d, F]", "SwiGLU gate: (silu(x @ w_gate) * (x @ w_up)) @ w_down"),
    "blocks.{i}.mlp.w_up": ("[d, F]", "SwiGLU up projection"),
    "blocks.{i}.mlp.w_down": ("[F, d]", "SwiGLU down projection"),
    "final_norm.scale": ("[d]", "RMSNorm scale after the last block"),
    "unembed": ("[d, V]", "output projection: logits = final_norm(x) @ unembed"),
}
LAYER_NAME = re.compile(r"^blocks\.(\d+)\.(.+)$")




def _leaves(tree: dict, prefix: tuple = ()):
    """(path of str keys, leaf) of a nested dict; nnx.List keys are ints, Orbax gives them back as strs."""
    for key, value in tree.items():
        path = prefix + (str(key),)
        if isinstance(value, dict):
            yield from _leaves(value, path)
        else:
            yield path, value


def _entries(params: dict, scan_layers: bool):
    """(export name, leaf path, layer index or None) for every tensor; a scanned block leaf gives one per layer."""
    for path, leaf in _leaves(params):
        if scan_layers and path[0] == "blocks":
            for i in range(leaf.shape[0]):  # the leading [layers] axis of nnx.vmap'd blocks
                yield ".".join(("blocks", str(i)) + path[1:]), path, i
        else:
            yield ".".join(path), path, None


def name_order(name: str):
    """Model order: embeddings, then layer by layer, then the head; names TENSOR_DOCS lacks go last."""
    docs = list(TENSOR_DOCS)
    layer = LAYER_NAME.match(name)
    if layer:
        generic = f"blocks.{{i}}.{layer.group(2)}"
        first_block = docs.index("blocks.{i}.attn_norm.scale")
        return (first_block, int(layer.group(1)), docs.index(generic) if generic in docs else len(docs), name)
    return (docs.index(name) if name in docs else len(docs) + 1, 0, 0, name)


def tensors_from_params(params: dict, scan_layers: bool) -> dict[str, np.ndarray]:
    """The nested param tree (nnx.to_pure_dict layout, numpy leaves) -> {export name: array}, in model order."""
    out = {}
    for name, path, layer in _entries(params, scan_layers):
        leaf = np.asarray(_get(params, path))
        out[name] = leaf if layer is None else leaf[layer]
    return {name: out[name] for name in sorted(out, key=name_order)}


def tensor_shapes(abstract_params: dict, scan_layers: bool) -> dict[str, tuple[int, ...]]:
    """{export name: shape} of a param tree of ShapeDtypeStructs (or arrays), in model order."""
    shapes = {name: tuple(_get(abstract_params, path).shape[1 if i is not None else 0:])
              for name, path, i in _entries(abstract_params, scan_layers)}
    return {name: shapes[name] for name in sorted(shapes, key=name_order)}


def params_from_tensors(tensors: dict, abstract_params: dict, scan_layers: bool, dtype,
                        where: str = "model.safetensors") -> dict:
    """{export name: array} -> the model's param tree (abstract_params' layout, jax arrays of `dtype`).

    Raises ExportError naming a tensor that is missing, has the wrong shape, or that the model does not have
    (`where`: the file the tensors came from, for the message).
    """
    wanted = tensor_shapes(abstract_params, scan_layers)
    for name, shape in wanted.items():
        if name not in tensors:
            raise ExportError(f"tensor '{name}' (shape {list(shape)}) is missing from {where}")
        if tuple(tensors[name].shape) != shape:
            raise ExportError(f"tensor '{name}' has shape {list(tensors[name].shape)} in {where} but the "
                              f"model of config.json needs {list(shape)}")
    extra = sorted(set(tensors) - set(wanted), key=name_order)
    if extra:
        raise ExportError(f"{where} has tensor '{extra[0]}' that the model of config.json does not have")

    def build(path, leaf):
        name = jax.tree_util.keystr(path, simple=True, separator=".")
        keys = name.split(".")
        if scan_layers and keys[0] == "blocks":
            rest = ".".join(keys[1:])
            stacked = np.stack([np.asarray(tensors[f"blocks.{i}.{rest}"]) for i in range(leaf.shape[0])])
            return jnp.asarray(stacked, dtype)
        return jnp.asarray(np.asarray(tensors[name]), dtype)

    return jax.tree_util.tree_map_with_path(build, abstract_params)


def _get(tree: dict, path: tuple):
    for key in path:
        tree = tree[key] if key in tree else tree[int(key)]
    return tree
