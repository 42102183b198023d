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

Tensor names are the model's (omni/model/tensor_names.py has the table: embed, patch_proj, patch_bias,
blocks.{i}.attn.wq ..., final_norm.scale, unembed), the same whether the run used model.scan_layers or not.
`omni.train.artifact.from_export(OUT)` turns the folder back into a runnable model with its vocabulary, tokenizer,
codec and image tokenizer, without the training dataset. Export runs in one process: it reads every parameter in
full onto the host, whatever mesh the checkpoint was saved on. OUT and the workdir may be gs:// URLs: the folder
is written locally and uploaded, config.json last (what readers look for).
"""

from __future__ import annotations

import json
import re

import jax.numpy as jnp
import numpy as np
from safetensors.numpy import save_file

from omni import config as config_lib
from omni import storage
from omni.config import Config, derived_head_dim, derived_mlp
from omni.data import image_tokenizer as image_tokenizer_lib
from omni.data.codec import codec_identity
from omni.data.text_tokenizer import save_tokenizer
from omni.errors import ExportError, StorageError
from omni.model.routing import MODALITIES
from omni.model.tensor_names import TENSOR_DOCS
from omni.progress import silent
from omni.train import artifact
from omni.train.artifact import (CODEC_DIR, CONFIG_FILE, IMAGE_TOKENIZER_DIR, TOKENIZER_DIR, WEIGHTS_FILE,
                                 save_codec_folder, save_image_tokenizer_folder, vocab_block)

FORMAT = artifact.EXPORT_FORMAT
FORMAT_VERSION = artifact.EXPORT_FORMAT_VERSION
DTYPES = {"bfloat16": np.dtype(jnp.bfloat16), "float32": np.dtype(np.float32), "float16": np.dtype(np.float16)}


def check_new_folder(out):
    """The folder an export writes: it must not exist yet or be empty (an export never replaces files)."""
    try:
        out = storage.path(out)
        storage.check_writable(out, "--out")  # a read-only parent: one line now, not after reading the checkpoint
    except StorageError as e:
        raise ExportError(str(e)) from None
    if out.exists() and (not out.is_dir() or storage.listdir(out)):
        raise ExportError(f"{out} already exists and is not empty; pass a new --out or delete it")
    return out


def export(workdir, out, step: int | None = None, dtype: str = "bfloat16", progress=silent):
    """Exports a checkpoint of `workdir` (the latest complete one, or `step`) to the folder `out`; returns it.

    The folder appears whole or not at all (omni.storage.staged_folder: written into `<out>.tmp-*` and renamed;
    on a bucket uploaded with config.json last). progress (omni.progress) counts the tensors as they are checked
    and cast, then the file written, with MiB.
    """
    if dtype not in DTYPES:
        raise ExportError(f"unknown --dtype {dtype!r}; allowed: {', '.join(DTYPES)}")
    out = check_new_folder(out)
    def writable(ckpt):
        if ckpt.config.model.fusion not in ("early", "mot"):
            raise ExportError(f"{ckpt.path} is a model.fusion='{ckpt.config.model.fusion}' run; omni export writes "
                              "early-fusion and mot models only (late and cross are ablation variants: score them "
                              "with `omni eval`)")

    ckpt = artifact.open_checkpoint(workdir, step, check=writable)
    checked = ckpt.tensors()
    with progress("export", total=len(checked) + 1, unit="tensor") as bar:
        return _write_export(ckpt, out, dtype, checked, bar)


def _write_export(ckpt: artifact.Checkpoint, out, dtype: str, checked, bar):
    """The rest of export(): cast the checked tensors, write everything into a staged folder, publish it."""
    cfg, codec, image_tokenizer = ckpt.config, ckpt.codec, ckpt.image_tokenizer
    tensors = cast_tensors(checked, dtype, bar)
    info = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "step": ckpt.step, "dtype": dtype,
        "checkpoint": str(storage.absolute(ckpt.path)),
        "vocab": vocab_block(ckpt.vocab, cfg.data.audio_layout),
        "tokenizer": ckpt.tokenizer.identity(),
        "codec": None if codec is None else codec_identity(codec),
        "image_tokenizer": None if image_tokenizer is None else dict(
            image_tokenizer_lib.identity(image_tokenizer), image_size=ckpt.meta.get("image_tokenizer", {}).get(
                "image_size")),
        "tensors": {name: list(t.shape) for name, t in tensors.items()},
    }
    with storage.staged_folder(out, last=CONFIG_FILE) as tmp:
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": FORMAT, "format_version": str(FORMAT_VERSION),
                                                              "step": str(ckpt.step), "dtype": dtype})
        bar.update(1, MiB=round((tmp / WEIGHTS_FILE).stat().length / 2**20, 1))  # the file, written
        save_tokenizer(ckpt.tokenizer, tmp / TOKENIZER_DIR)
        if codec is not None:
            save_codec_folder(codec, tmp / CODEC_DIR)
        if image_tokenizer is not None:
            save_image_tokenizer_folder(image_tokenizer, tmp / IMAGE_TOKENIZER_DIR)
        (tmp / "README.md").write_text(readme(cfg, info))
        (tmp / CONFIG_FILE).write_text(json.dumps(dict(config_lib.to_dict(cfg), export=info), indent=2) + "\n")
    return out


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
                  f"{codec['codebook_sizes']}); omni.train.artifact.load_codec_folder reads it" if codec else
                  "no codec folder: the model was trained without audio")
    image_tok = info.get("image_tokenizer")
    image_line = (f"the image tokenizer {image_tok['name']} ({image_tok['patch_size'] or '?'} x "
                  f"{image_tok['patch_size'] or '?'} pixels a cell, codebook sizes {image_tok['codebook_sizes']}); "
                  f"omni.train.artifact.load_image_tokenizer_folder reads it" if image_tok else
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
arrays. In omni, `omni.train.artifact.from_export(this_folder)` gives back the config, the vocabulary, the tokenizer,
the codec, the image tokenizer and a runnable model (`.model()`: batch -> logits), without the checkpoint or the training data.
"""
