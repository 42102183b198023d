"""A trained checkpoint as plain files any framework reads: safetensors weights, config, tokenizer, codec.

    omni export --workdir runs/demo [--step N] --out exported/demo [--dtype bfloat16]

writes

    OUT/model.safetensors   the parameters only (no optimizer state), cast to --dtype, one tensor per name below
    OUT/config.json         the omni config that trained the checkpoint, plus an "export" block: format version,
                            step, dtype, the vocabulary layout (id ranges, special token ids), tokenizer and
                            codec identities, and every tensor name -> shape
    OUT/tokenizer/          the text tokenizer (omni.data.text_tokenizer.save_tokenizer; load_tokenizer reads it)
    OUT/codec/              the audio codec: a fitted MelRVQCodec's codec.json + codec.npz, or for the tone
                            codec and precomputed (external) codecs a codec.json holding just the identity;
                            absent when the dataset had no audio
    OUT/image_tokenizer/    the image tokenizer: a fitted PatchRVQTokenizer's image_tokenizer.json + .npz, or for
                            an external one an image_tokenizer.json holding just its identity; absent when the
                            dataset had none (image codes in the vocabulary come with it)
    OUT/README.md           what the folder holds, where it came from, the tensor table, how to read it with numpy

Tensor names are the dotted paths of the model's nnx parameter tree (omni/model/transformer.py) with the layer stack
unstacked, so they are the same whether the run used model.scan_layers or not (a scanned run stores every
block parameter with a leading [layers] axis; a list of blocks stores them under 0, 1, ...):

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
H = the head size, F = the SwiGLU hidden size. A model.fusion=mot export has the same names, every blocks.{i}.*
tensor with a leading [3] axis of modality slices (text, image, audio). `load_export` turns the folder back into a
runnable model, a Vocab, the tokenizer, the codec and the image tokenizer without the training dataset. Export
runs in one process: it reads every
parameter in full onto the host, whatever mesh the checkpoint was saved on.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors.numpy import load_file, save_file

from omni import config as config_lib
from omni import tokens
from omni.config import Config, derived_head_dim, derived_mlp
from omni.data import pipeline
from omni.data import image_tokenizer as image_tokenizer_lib
from omni.data.codec import ToneCodec, codec_from_identity, codec_identity, load_codec
from omni.data.text_tokenizer import ByteTokenizer, load_tokenizer, save_tokenizer
from omni.errors import CodecError, DatasetError, ExportError, TokenizerError
from omni.model.routing import MODALITIES
from omni.progress import silent
from omni.tokens import Vocab
from omni.train import checkpoint
from omni.train.step import build_model

FORMAT = "omni-export"
FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
TOKENIZER_DIR = "tokenizer"
CODEC_DIR = "codec"
CODEC_FILE = "codec.json"
IMAGE_TOKENIZER_DIR = "image_tokenizer"
DTYPES = {"bfloat16": np.dtype(jnp.bfloat16), "float32": np.dtype(np.float32), "float16": np.dtype(np.float16)}

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




# ----------------------------------------------------------------------------------------------------------
# Tensor names <-> the nnx parameter tree.


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


def _name_order(name: str):
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
    return {name: out[name] for name in sorted(out, key=_name_order)}


def tensor_shapes(abstract_params: dict, scan_layers: bool) -> dict[str, tuple[int, ...]]:
    """{export name: shape} of a param tree of ShapeDtypeStructs (or arrays), in model order."""
    shapes = {name: tuple(_get(abstract_params, path).shape[1 if i is not None else 0:])
              for name, path, i in _entries(abstract_params, scan_layers)}
    return {name: shapes[name] for name in sorted(shapes, key=_name_order)}


def params_from_tensors(tensors: dict, abstract_params: dict, scan_layers: bool, dtype) -> dict:
    """{export name: array} -> the model's param tree (abstract_params' layout, jax arrays of `dtype`).

    Raises ExportError naming a tensor that is missing, has the wrong shape, or that the model does not have.
    """
    wanted = tensor_shapes(abstract_params, scan_layers)
    for name, shape in wanted.items():
        if name not in tensors:
            raise ExportError(f"tensor '{name}' (shape {list(shape)}) is missing from {WEIGHTS_FILE}")
        if tuple(tensors[name].shape) != shape:
            raise ExportError(f"tensor '{name}' has shape {list(tensors[name].shape)} in {WEIGHTS_FILE} but the "
                              f"model of config.json needs {list(shape)}")
    extra = sorted(set(tensors) - set(wanted), key=_name_order)
    if extra:
        raise ExportError(f"{WEIGHTS_FILE} has tensor '{extra[0]}' that the model of config.json does not have")

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


def abstract_model(cfg: Config, vocab: Vocab):
    """(graphdef, pure param dict of ShapeDtypeStructs) of the model `cfg` builds, without allocating it."""
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: build_model(cfg, vocab)), nnx.Param)
    return graphdef, nnx.to_pure_dict(abstract)


# ----------------------------------------------------------------------------------------------------------
# The vocabulary block of config.json.


def vocab_block(vocab: Vocab, audio_layout: str) -> dict:
    """Everything a reader needs to map ids without omni: sizes, offsets, special token ids."""
    return {
        "size": vocab.size,
        "used_size": vocab.used_size,
        "pad_to": vocab.pad_to,
        "text_size": vocab.text_size,
        "text_offset": vocab.text_offset,
        "codebook_sizes": list(vocab.codebook_sizes),
        "audio_offsets": [vocab.audio_offset(k) for k in range(len(vocab.codebook_sizes))],
        "audio_layout": audio_layout,
        "image_codebook_sizes": list(vocab.image_codebook_sizes),
        "image_offsets": [vocab.image_offset(k) for k in range(len(vocab.image_codebook_sizes))],
        "num_special": tokens.NUM_SPECIAL,
        "special_tokens": {name: token_id for token_id, name in sorted(tokens.SPECIAL_NAMES.items())},
    }


def vocab_from_block(block: dict) -> Vocab:
    vocab = Vocab(text_size=int(block["text_size"]), codebook_sizes=tuple(int(s) for s in block["codebook_sizes"]),
                  pad_to=int(block.get("pad_to", 128)),
                  image_codebook_sizes=tuple(int(s) for s in block.get("image_codebook_sizes", ())))
    if vocab.size != block["size"]:
        raise ExportError(f"vocab block says size {block['size']} but text_size {vocab.text_size} and codebook "
                          f"sizes {list(vocab.codebook_sizes)} give {vocab.size}; the export is inconsistent")
    return vocab


# ----------------------------------------------------------------------------------------------------------
# Reading the checkpoint.


def pick_step(workdir: Path, step: int | None) -> int:
    try:
        return checkpoint.pick_step(workdir, step)
    except checkpoint.NoUsableCheckpointError as e:
        raise ExportError(str(e)) from None


def _tokenizer_of(cfg: Config, meta: dict):
    """The tokenizer the checkpoint was trained with, checked against the identity the checkpoint recorded."""
    recorded = meta.get("tokenizer") or {}
    if recorded.get("kind") == ByteTokenizer.kind or cfg.data.tokenizer.strip().lower() in ("bytes", "byte"):
        return ByteTokenizer()  # needs no file, so no dataset either
    # The dataset path the run recorded, so a demo corpus resolves the same whatever $OMNI_CACHE is now.
    run_cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, dataset=meta.get("dataset") or cfg.data.dataset))
    try:
        tokenizer = pipeline.tokenizer_for(run_cfg)
    except (DatasetError, TokenizerError, OSError) as e:
        raise ExportError(f"cannot load the tokenizer the checkpoint was trained with (data.tokenizer="
                          f"{cfg.data.tokenizer!r}, dataset {run_cfg.data.dataset}): {e}. The dataset folder (or the "
                          f"tokenizer file) must still exist to export; restore it there") from e
    if recorded.get("sha256") and tokenizer.identity().get("sha256") != recorded["sha256"]:
        raise ExportError(f"the tokenizer found now ({tokenizer.identity()}) is not the one the checkpoint was "
                          f"trained with ({recorded}); put the original tokenizer files back")
    return tokenizer


def _codec_of(meta: dict):
    """The codec the dataset was built with, from the identity in the checkpoint meta; None without audio."""
    return _built_with(meta, "codec", "codec", lambda where: load_codec(str(where)), codec_from_identity)


def _built_with(meta: dict, key: str, what: str, load, from_identity):
    """The codec or image tokenizer meta[key] names: a fitted one loaded from the dataset folder (which must still
    exist), an external one from its identity alone; None when the meta names none."""
    identity = meta.get(key)
    if not identity:
        return None
    if identity.get("path"):  # fitted, saved inside the dataset folder
        where = Path(meta.get("dataset") or ".") / identity["path"]
        try:
            return load(where)
        except CodecError as e:
            raise ExportError(f"cannot load {what} {identity['name']} from the dataset folder {where}: {e}. The "
                              f"dataset folder must still exist to export; restore it there") from e
    return from_identity(identity)


def _image_size_of(meta: dict) -> list[int] | None:
    """[H, W]: the most common size of the images the model learned as codes, as its dataset recorded it (the
    size `omni generate --target image` draws by default); None when not recorded."""
    return (meta.get("image_tokenizer") or {}).get("image_size")


def _image_tokenizer_of(meta: dict):
    """The image tokenizer the dataset was built with, from the checkpoint meta; None without one."""
    return _built_with(meta, "image_tokenizer", "image tokenizer", image_tokenizer_lib.load_image_tokenizer,
                       image_tokenizer_lib.from_identity)


# ----------------------------------------------------------------------------------------------------------
# Writing.


def export(workdir, out, step: int | None = None, dtype: str = "bfloat16", progress=silent) -> Path:
    """Exports a checkpoint of `workdir` (the latest complete one, or `step`) to the folder `out`; returns it.

    The folder appears whole or not at all: everything is written into `<out>.tmp-*` and renamed at the end.
    progress (omni.progress) counts the tensors as they are checked and cast, then the file written, with MiB.
    """


    workdir, out = Path(workdir), Path(out)
    if dtype not in DTYPES:
        raise ExportError(f"unknown --dtype {dtype!r}; allowed: {', '.join(DTYPES)}")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ExportError(f"{out} already exists and is not empty; pass a new --out or delete it")
    step = pick_step(workdir, step)
    step_dir = workdir / "checkpoints" / str(step)
    meta = checkpoint.read_meta(workdir, step)
    cfg = config_lib.from_dict(meta["config"], source=f"{step_dir}/meta")
    if cfg.model.fusion not in ("early", "mot"):
        raise ExportError(f"{step_dir} is a model.fusion='{cfg.model.fusion}' run; omni export writes early-fusion "
                          "and mot models only (late and cross are ablation variants: score them with `omni eval`)")
    tokenizer = _tokenizer_of(cfg, meta)
    codec = _codec_of(meta)
    image_tokenizer = _image_tokenizer_of(meta)
    vocab = _vocab_of(meta, tokenizer, codec, image_tokenizer)
    checked = _checked_tensors(workdir, step, cfg, vocab)
    with progress("export", total=len(checked) + 1, unit="tensor") as bar:
        return _write_export(workdir, out, step, dtype, cfg, tokenizer, (codec, image_tokenizer), vocab, checked,
                             bar, meta)


def _write_export(workdir: Path, out: Path, step: int, dtype: str, cfg, tokenizer, codecs, vocab, checked,
                  bar, meta: dict) -> Path:
    """The rest of export(): cast the checked tensors, write everything into a temporary folder, rename it."""
    step_dir = workdir / "checkpoints" / str(step)
    tensors = cast_tensors(checked, dtype, bar)
    codec, image_tokenizer = codecs

    info = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "step": step, "dtype": dtype,
        "checkpoint": str(step_dir.absolute()),
        "vocab": vocab_block(vocab, cfg.data.audio_layout),
        "tokenizer": tokenizer.identity(),
        "codec": None if codec is None else codec_identity(codec),
        "image_tokenizer": None if image_tokenizer is None else dict(
            image_tokenizer_lib.identity(image_tokenizer), image_size=_image_size_of(meta)),
        "tensors": {name: list(t.shape) for name, t in tensors.items()},
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f"{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        save_file(tensors, tmp / WEIGHTS_FILE, metadata={"format": FORMAT, "format_version": str(FORMAT_VERSION),
                                                         "step": str(step), "dtype": dtype})
        bar.update(1, MiB=round((tmp / WEIGHTS_FILE).stat().st_size / 2**20, 1))  # the file, written
        save_tokenizer(tokenizer, tmp / TOKENIZER_DIR)
        if codec is not None:
            _save_codec(codec, tmp / CODEC_DIR)
        if image_tokenizer is not None:
            _save_image_tokenizer(image_tokenizer, tmp / IMAGE_TOKENIZER_DIR)
        (tmp / "README.md").write_text(readme(cfg, info))
        (tmp / CONFIG_FILE).write_text(json.dumps(dict(config_lib.to_dict(cfg), export=info), indent=2) + "\n")
        tmp.rename(out)  # rename(2) also replaces an empty folder the user made, in one step
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _vocab_of(meta: dict, tokenizer, codec, image_tokenizer=None) -> Vocab:
    """The vocabulary the checkpoint recorded (rebuilt from its tokenizer and codecs for a meta without one)."""
    codebook_sizes = tuple(codec.codebook_sizes) if codec is not None else ()
    image_sizes = tuple(image_tokenizer.codebook_sizes) if image_tokenizer is not None else ()
    if "vocab" not in meta:
        return Vocab(text_size=tokenizer.vocab_size, codebook_sizes=codebook_sizes, image_codebook_sizes=image_sizes)
    vocab = vocab_from_block(meta["vocab"])
    if (vocab.text_size, vocab.codebook_sizes, vocab.image_codebook_sizes) != (tokenizer.vocab_size, codebook_sizes,
                                                                               image_sizes):
        raise ExportError(f"the checkpoint's vocabulary (text {vocab.text_size}, codebooks "
                          f"{list(vocab.codebook_sizes)}, image codebooks {list(vocab.image_codebook_sizes)}) does "
                          f"not fit its tokenizer ({tokenizer.vocab_size} ids), codec (codebooks "
                          f"{list(codebook_sizes)}) and image tokenizer (codebooks {list(image_sizes)}); the dataset "
                          f"changed after training")
    return vocab


def _checked_tensors(workdir: Path, step: int, cfg: Config, vocab: Vocab) -> dict[str, np.ndarray]:
    """The checkpoint's tensors by export name, checked against the model its own config builds."""
    step_dir = workdir / "checkpoints" / str(step)
    tensors = tensors_from_params(checkpoint.restore_params(workdir, step), cfg.model.scan_layers)
    _, abstract = abstract_model(cfg, vocab)
    wanted = tensor_shapes(abstract, cfg.model.scan_layers)
    got = {name: tuple(t.shape) for name, t in tensors.items()}
    if got != wanted:
        first = sorted(set(got.items()) ^ set(wanted.items()), key=lambda item: _name_order(item[0]))[0]
        raise ExportError(f"checkpoint {step_dir} does not match the model its own config builds (tensor "
                          f"'{first[0]}': checkpoint {got.get(first[0])}, model {wanted.get(first[0])}); it "
                          f"cannot be exported")
    return tensors


def cast_tensors(tensors: dict[str, np.ndarray], dtype: str, progress=None) -> dict[str, np.ndarray]:
    """Rounded to `dtype` (nearest even); a value float16 cannot hold is an error, not a silent inf. `progress`
    (an omni.progress bar) advances per tensor."""
    limit = float(jnp.finfo(DTYPES[dtype]).max)
    out = {}
    done = 0
    for name, tensor in tensors.items():
        if progress is not None:
            done += tensor.nbytes
            progress.update(1, MiB=round(done / 2**20, 1))
        peak = float(np.abs(tensor.astype(np.float32)).max(initial=0.0))
        if peak > limit:
            raise ExportError(f"tensor '{name}' holds {peak:g}, beyond the {dtype} range (±{limit:g}); export "
                              f"with --dtype bfloat16 or float32")
        out[name] = np.ascontiguousarray(tensor.astype(DTYPES[dtype]))
    return out


def _save_codec(codec, folder: Path) -> None:
    """A fitted codec saves its files; the tone codec and external codecs are their identity alone."""
    if hasattr(codec, "save"):
        codec.save(folder)
        return
    folder.mkdir(parents=True)
    kind = "builtin" if isinstance(codec, ToneCodec) else "precomputed"
    (folder / CODEC_FILE).write_text(json.dumps(dict(codec_identity(codec), kind=kind), indent=2) + "\n")


def _save_image_tokenizer(image_tokenizer, folder: Path) -> None:
    """A fitted image tokenizer saves its files; an external one is its identity alone."""
    if hasattr(image_tokenizer, "save"):
        image_tokenizer.save(folder)
        return
    folder.mkdir(parents=True)
    identity = dict(image_tokenizer_lib.identity(image_tokenizer), kind="precomputed")
    (folder / image_tokenizer_lib.CONFIG_FILE).write_text(json.dumps(identity, indent=2) + "\n")


def load_image_tokenizer_folder(folder: Path):
    """The image tokenizer an export's image_tokenizer/ folder holds (None when there is none)."""
    if not (folder / image_tokenizer_lib.CONFIG_FILE).is_file():
        return None
    try:
        if (folder / image_tokenizer_lib.ARRAYS_FILE).is_file():
            return image_tokenizer_lib.load_image_tokenizer(folder)
        return image_tokenizer_lib.from_identity(json.loads((folder / image_tokenizer_lib.CONFIG_FILE).read_text()))
    except (CodecError, ValueError, KeyError, TypeError) as e:
        raise ExportError(f"the image tokenizer of export {folder.parent} cannot be loaded ({e}); export the "
                          f"checkpoint again") from None


def load_codec_folder(folder: Path):
    """The codec an export's codec/ folder holds (None when there is none)."""
    if not (folder / CODEC_FILE).is_file():
        return None
    if (folder / "codec.npz").is_file():
        return load_codec(str(folder))
    return codec_from_identity(json.loads((folder / CODEC_FILE).read_text()))


READ_SNIPPET = '''\
import json
import numpy as np

def read_safetensors(path):
    """{name: numpy array}; BF16 tensors come back as float32 (numpy has no bfloat16)."""
    raw = open(path, "rb").read()
    n = int.from_bytes(raw[:8], "little")                # 8-byte little-endian header length
    header = json.loads(raw[8:8 + n])                    # name -> {dtype, shape, data_offsets}
    header.pop("__metadata__", None)
    kinds = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16}
    out = {}
    for name, t in header.items():
        start, end = t["data_offsets"]
        x = np.frombuffer(raw[8 + n + start:8 + n + end], kinds[t["dtype"]])
        if t["dtype"] == "BF16":                         # bfloat16 = the top 16 bits of a float32
            x = (x.astype(np.uint32) << 16).view(np.float32)
        out[name] = x.reshape(t["shape"])
    return out

weights = read_safetensors("model.safetensors")
config = json.load(open("config.json"))
'''


_MOT_NOTE = """
Fusion mot (Mixture-of-Transformers): every `blocks.{i}.*` tensor has a leading axis of M = 3 modality slices,
0 text, 1 image, 2 audio (the positions of modality id 1, 2, 3 in omni/batch.py; padding, id 0, takes text's). Each
position goes through its own modality's slice; attention runs over all positions as above."""


def readme(cfg: Config, info: dict) -> str:

    m = cfg.model
    symbols = {"V": info["vocab"]["size"], "d": m.d, "P": cfg.data.patch_size ** 2 * 3, "N": m.heads,
               "K": m.kv_heads, "H": derived_head_dim(m), "F": derived_mlp(m), "M": MODALITIES}
    rows = []
    for generic, (shape, what) in TENSOR_DOCS.items():
        if m.fusion == "mot" and generic.startswith("blocks."):  # one slice per modality: text, image, audio
            shape = "[M, " + shape[1:]
        concrete = re.sub(r"[A-Za-z]", lambda s: str(symbols[s.group()]), shape)
        rows.append(f"| `{generic}` | {shape} = {concrete} | {what} |")
    vocab = info["vocab"]
    codec = info["codec"]
    codec_line = (f"the audio codec {codec['name']} ({codec['frame_rate']:g} frames/s, codebook sizes "
                  f"{codec['codebook_sizes']}); omni.tools.export.load_codec_folder reads it" if codec else
                  "no codec folder: the model was trained without audio")
    image_tok = info.get("image_tokenizer")
    image_line = (f"the image tokenizer {image_tok['name']} ({image_tok['patch_size'] or '?'} x "
                  f"{image_tok['patch_size'] or '?'} pixels a cell, codebook sizes {image_tok['codebook_sizes']}); "
                  f"omni.tools.export.load_image_tokenizer_folder reads it" if image_tok else
                  "no image tokenizer folder: the model was trained without image codes")
    image_ids = (f" Image code c of codebook k = image_offsets[k] + c with image_offsets = {vocab['image_offsets']}; "
                 f"an image is `<boi>` then each row's cells (cell-major, then codebook) and `<row>`, then `<eoi>`."
                 if vocab["image_offsets"] else "")
    specials = ", ".join(f"`{name}` {token_id}" for name, token_id in vocab["special_tokens"].items())
    return f"""# {cfg.name}: omni export, step {info['step']}

Exported by `omni export` from `{info['checkpoint']}` (format {FORMAT} v{FORMAT_VERSION}).

| file | what |
| --- | --- |
| `model.safetensors` | the parameters, {info['dtype']}, {len(info['tensors'])} tensors (no optimizer state) |
| `config.json` | the run's omni config + `"export"`: step, dtype, vocabulary layout, tokenizer, codec, tensor shapes |
| `tokenizer/` | the text tokenizer ({info['tokenizer']['kind']}, {info['tokenizer']['vocab_size']} ids) |
| {'`codec/`' if codec else '-'} | {codec_line} |
| {'`image_tokenizer/`' if image_tok else '-'} | {image_line} |

`config.json` without its `"export"` key is the config that trained this checkpoint, as `omni train --config` reads it.

Model: {m.layers} layers, width d={m.d}, {m.heads} query heads and {m.kv_heads} key/value heads of size
{derived_head_dim(m)}, SwiGLU hidden size {derived_mlp(m)}, RMSNorm eps {m.norm_eps:g}, RoPE (rotate-half, theta
{m.rope_theta:g}) at each token's position inside its packed segment, causal attention, compute dtype {m.dtype}.{_MOT_NOTE if m.fusion == "mot" else ""}

Vocabulary ({vocab['size']} ids, the first {vocab['used_size']} used; omni/tokens.py): special ids below
{vocab['num_special']} ({specials}); text id = {vocab['text_offset']} + tokenizer id; audio code c of codebook k
= audio_offsets[k] + c with audio_offsets = {vocab['audio_offsets']}, laid out `{vocab['audio_layout']}`.{image_ids}

## Tensors

Layer i runs 0..{m.layers - 1}. Layouts are those of omni/model/transformer.py (`x @ w` with x on the left).

| name | shape | what |
| --- | --- | --- |
{chr(10).join(rows)}

## Reading it with numpy alone

```python
{READ_SNIPPET}```

`safetensors.numpy.load_file("model.safetensors")` reads float32 and float16 exports directly; it reads a
bfloat16 export only when `ml_dtypes` is installed (it comes with jax) and then returns `ml_dtypes.bfloat16`
arrays. In omni, `omni.tools.export.load_export(this_folder)` gives back the config, the vocabulary, the tokenizer,
the codec, the image tokenizer and a runnable model (`.model()`: batch -> logits), without the checkpoint or the training data.
"""


# ----------------------------------------------------------------------------------------------------------
# Loading an export back into omni.


@dataclass
class Exported:
    folder: Path
    config: Config
    vocab: Vocab
    graphdef: Any
    params: dict        # nnx.to_pure_dict layout of the model, jax arrays in config.model.param_dtype
    tokenizer: Any
    codec: Any | None   # None when the model was trained without audio
    info: dict          # the "export" block of config.json
    image_tokenizer: Any | None = None  # None when the model was trained without image codes
    image_size: tuple[int, int] | None = None  # (H, W) the images it learned as codes mostly had (None: unknown)

    def model(self):
        return model_from_export(self)


def model_from_export(exported: Exported):
    """A ready nnx OmniTransformer: model(batch) -> logits [B, L, V] (omni.batch for the batch)."""
    return nnx.merge(exported.graphdef, exported.params)


def load_export(folder, scan_layers: bool | None = None) -> Exported:
    """Reads an `omni export` folder; needs neither the checkpoint nor the training dataset.

    scan_layers (default: as trained) builds the model with or without the scanned layer stack; the tensor
    names are the same either way.
    """


    folder = Path(folder)
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        if not (folder / name).is_file():
            raise ExportError(f"{folder} is not an omni export: {name} is missing (make one with omni export "
                              f"--workdir RUN --out {folder})")
    raw = json.loads((folder / CONFIG_FILE).read_text())
    info = raw.pop("export", None)
    if not info or info.get("format") != FORMAT:
        raise ExportError(f"{folder / CONFIG_FILE} has no \"export\" block of format {FORMAT}; it is not an "
                          f"omni export")
    if info.get("format_version") != FORMAT_VERSION:
        raise ExportError(f"{folder} is export format version {info.get('format_version')}; this omni reads "
                          f"version {FORMAT_VERSION}")
    cfg = config_lib.from_dict(raw, source=str(folder / CONFIG_FILE))
    if scan_layers is not None:
        cfg.model.scan_layers = scan_layers
    vocab = vocab_from_block(info["vocab"])
    graphdef, abstract = abstract_model(cfg, vocab)
    params = params_from_tensors(load_file(folder / WEIGHTS_FILE), abstract, cfg.model.scan_layers,
                                 jnp.dtype(cfg.model.param_dtype))
    try:  # a bytes tokenizer has no file: its folder holds only tokenizer_identity.json
        tokenizer = load_tokenizer("bytes" if info["tokenizer"]["kind"] == "bytes" else str(folder / TOKENIZER_DIR))
    except TokenizerError as e:
        raise ExportError(f"the tokenizer of export {folder} cannot be loaded: {e}") from e
    image_tokenizer = load_image_tokenizer_folder(folder / IMAGE_TOKENIZER_DIR)  # generating images needs it
    size = (info.get("image_tokenizer") or {}).get("image_size")
    return Exported(folder=folder, config=cfg, vocab=vocab, graphdef=graphdef, params=params, tokenizer=tokenizer,
                    codec=load_codec_folder(folder / CODEC_DIR), info=info, image_tokenizer=image_tokenizer,
                    image_size=tuple(size) if size else None)


def load_workdir(workdir, step: int | None = None) -> Exported:
    """A training workdir's checkpoint (the latest, or `step`) loaded like an export: the same Exported, with
    the tokenizer and codec the run recorded (the dataset folder must still exist for a fitted codec)."""
    workdir = Path(workdir)
    step = pick_step(workdir, step)
    meta = checkpoint.read_meta(workdir, step)
    cfg = config_lib.from_dict(meta["config"], source=f"{workdir / 'checkpoints' / str(step)}/meta")
    tokenizer = _tokenizer_of(cfg, meta)
    codec = _codec_of(meta)
    image_tokenizer = _image_tokenizer_of(meta)
    vocab = _vocab_of(meta, tokenizer, codec, image_tokenizer)
    graphdef, abstract = abstract_model(cfg, vocab)
    params = params_from_tensors(_checked_tensors(workdir, step, cfg, vocab), abstract, cfg.model.scan_layers,
                                 jnp.dtype(cfg.model.param_dtype))
    info = {"step": step, "dtype": cfg.model.param_dtype, "checkpoint": str(workdir / "checkpoints" / str(step))}
    size = _image_size_of(meta)
    return Exported(folder=workdir, config=cfg, vocab=vocab, graphdef=graphdef, params=params, tokenizer=tokenizer,
                    codec=codec, info=info, image_tokenizer=image_tokenizer, image_size=tuple(size) if size else None)


def load_model(path, step: int | None = None) -> Exported:
    """An `omni export` folder or a training workdir (its latest checkpoint, or `step`), whichever `path` is."""
    path = Path(path)
    if (path / CONFIG_FILE).is_file() and (path / WEIGHTS_FILE).is_file():
        return load_export(path)
    if (path / "checkpoints").is_dir():
        return load_workdir(path, step)
    raise ExportError(f"{path} is not an omni export ({CONFIG_FILE} and {WEIGHTS_FILE}) nor a training workdir "
                      f"(checkpoints/); give a folder written by `omni export` or by `omni train`")
