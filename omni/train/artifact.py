"""A trained model, wherever it lives: one type, ModelArtifact, and one way to read each place it can come from.

    artifact.load(location, step=None)        an `omni export` folder or a training workdir, whichever it is
    artifact.from_export(folder)              an export (omni.tools.export writes it)
    artifact.from_checkpoint(workdir, step)   a workdir's checkpoint (the latest complete one by default)
    artifact.live(cfg, graphdef, params, ...) the parameters of a run still in memory (end-of-run scoring)
    artifact.open_checkpoint(workdir, step)   what a checkpoint was trained with, before its tensors are read
    artifact.checkpoint_params(workdir, step, target=None)   the one way parameters leave a workdir

Every location may be a local folder or a gs:// URL (omni.storage). Reading an export needs neither Orbax nor the
data pipeline (an inference host may lack both): those are imported only to read a checkpoint or a dataset. eval, generate, export (both formats), the
task scorer and model.init_from all read models through here, so a model reads the same wherever it is used.

An artifact holds the config, the vocabulary, the text tokenizer, the audio codec and the image tokenizer the model
was trained with (None when it had no audio / no image codes), the image size its image answers have by default,
and the nnx graphdef + parameters (`.model()`: batch -> logits [B, L, V]).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from omni import config as config_lib
from omni import storage, tokens
from omni.config import Config
from omni.data import image_tokenizer as image_tokenizer_lib
from omni.data.codec import ToneCodec, codec_from_identity, codec_identity, load_codec
from omni.data.text_tokenizer import ByteTokenizer, load_tokenizer
from omni.errors import CodecError, DatasetError, ExportError, NoUsableCheckpointError, StorageError, TokenizerError
from omni.model.tensor_names import name_order, params_from_tensors, tensor_shapes, tensors_from_params
from omni.tokens import Vocab
from omni.train.step import build_model

# The files of an `omni export` folder (omni.tools.export documents them).
EXPORT_FORMAT = "omni-export"
EXPORT_FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
TOKENIZER_DIR = "tokenizer"
CODEC_DIR = "codec"
CODEC_FILE = "codec.json"
IMAGE_TOKENIZER_DIR = "image_tokenizer"


@dataclass
class ModelArtifact:
    source: str                 # the export folder or workdir it was read from ("" for a live run)
    config: Config
    vocab: Vocab
    graphdef: Any
    params: dict                # nnx.to_pure_dict layout of the model, jax arrays (sharded for a live run)
    tokenizer: Any
    codec: Any | None = None    # None when the model was trained without audio
    image_tokenizer: Any | None = None  # None when the model was trained without image codes
    image_size: tuple[int, int] | None = None  # (H, W) the images it learned as codes mostly had (None: unknown)
    info: dict = field(default_factory=dict)  # step, dtype, checkpoint; an export's whole "export" block

    def model(self):
        """A ready nnx OmniTransformer: model(batch) -> logits [B, L, V] (omni.batch for the batch)."""
        return nnx.merge(self.graphdef, self.params)


def abstract_model(cfg: Config, vocab: Vocab):
    """(graphdef, pure param dict of ShapeDtypeStructs) of the model `cfg` builds, without allocating it."""
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: build_model(cfg, vocab)), nnx.Param)
    return graphdef, nnx.to_pure_dict(abstract)


# ----------------------------------------------------------------------------------------------------------
# The vocabulary block (an export's config.json, an HF export's "omni" block).


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
# A workdir's checkpoint.


@dataclass
class Checkpoint:
    """What a checkpoint was trained with, read from its metadata (no tensor read yet)."""
    workdir: Any        # storage path
    step: int
    meta: dict          # the run metadata saved with it (omni.train.checkpoint.read_meta)
    config: Config
    tokenizer: Any
    codec: Any | None
    image_tokenizer: Any | None
    vocab: Vocab
    read: dict | None = None   # its tensors once read (open_checkpoint reads them under the step's read lease)

    @property
    def path(self):
        return self.workdir / "checkpoints" / str(self.step)

    @property
    def image_size(self) -> tuple[int, int] | None:
        """(H, W): the most common size of the images the model learned as codes, as its dataset recorded it."""
        size = (self.meta.get("image_tokenizer") or {}).get("image_size")
        return tuple(size) if size else None

    def tensors(self) -> dict[str, np.ndarray]:
        """The checkpoint's tensors by export name (omni.model.tensor_names), numpy on the host, checked against
        the model its own config builds."""
        if self.read is not None:
            return self.read
        tensors = tensors_from_params(checkpoint_params(self.workdir, self.step), self.config.model.scan_layers)
        _, abstract = abstract_model(self.config, self.vocab)
        wanted = tensor_shapes(abstract, self.config.model.scan_layers)
        got = {name: tuple(t.shape) for name, t in tensors.items()}
        if got != wanted:
            first = sorted(set(got.items()) ^ set(wanted.items()), key=lambda item: name_order(item[0]))[0]
            raise ExportError(f"checkpoint {self.path} does not match the model its own config builds (tensor "
                              f"'{first[0]}': checkpoint {got.get(first[0])}, model {wanted.get(first[0])}); it "
                              f"cannot be read")
        return tensors


def pick_step(workdir, step: int | None) -> int:
    """`step`, or the workdir's latest complete checkpoint; ExportError when there is none (or not that one)."""
    from omni.train import checkpoint

    try:
        return checkpoint.pick_step(workdir, step)
    except NoUsableCheckpointError as e:
        raise ExportError(str(e)) from None


def open_checkpoint(workdir, step: int | None = None, log=print, check=None) -> Checkpoint:
    """A workdir's checkpoint (the newest readable one, or `step`) with the tokenizer, codec and image tokenizer
    its run recorded, and its tensors read (`.tensors()`); the dataset folder must still exist for a fitted codec or
    tokenizer. Read under a lease beside a run that trains there, falling back past a step deleted or damaged
    meanwhile with one line (omni.train.readers). `check(checkpoint)` runs before the tensors are read (a caller's
    one-line refusal of what its metadata says, e.g. a fusion variant it cannot write)."""
    from omni.train import readers

    workdir = storage.path(workdir)
    _reachable(workdir, "the workdir")

    def read(step):
        ckpt = _checkpoint_at(workdir, step)
        if check is not None:
            check(ckpt)
        ckpt.read = ckpt.tensors()
        return ckpt

    try:
        return readers.read_checkpoint(workdir, step, read, log)[1]
    except NoUsableCheckpointError as e:  # what export, generate and the hf export say of a model they cannot read
        raise ExportError(str(e)) from None


def _checkpoint_at(workdir, step: int) -> Checkpoint:
    from omni.train import checkpoint

    meta = checkpoint.read_meta(workdir, step)
    cfg = config_lib.from_dict(meta["config"], source=f"{workdir / 'checkpoints' / str(step)}/meta")
    tokenizer = _tokenizer_of(cfg, meta)
    codec = _built_with(meta, "codec", "codec", lambda where: load_codec(str(where)), codec_from_identity)
    image_tokenizer = _built_with(meta, "image_tokenizer", "image tokenizer",
                                  image_tokenizer_lib.load_image_tokenizer, image_tokenizer_lib.from_identity)
    vocab = _vocab_of(meta, tokenizer, codec, image_tokenizer)
    return Checkpoint(workdir, step, meta, cfg, tokenizer, codec, image_tokenizer, vocab)


def checkpoint_params(workdir, step: int, target=None):
    """A checkpoint's parameters: with `target` (ShapeDtypeStructs with shardings) each process reads its shards,
    without every array comes back whole on the host as numpy (omni.train.checkpoint.restore_params)."""
    from omni.train import checkpoint

    return checkpoint.restore_params(storage.path(workdir), step, target)


def _tokenizer_of(cfg: Config, meta: dict):
    """The tokenizer the checkpoint was trained with, checked against the identity the checkpoint recorded."""
    from omni.data import pipeline

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
                          f"tokenizer file) must still exist; restore it there") from e
    if recorded.get("sha256") and tokenizer.identity().get("sha256") != recorded["sha256"]:
        raise ExportError(f"the tokenizer found now ({tokenizer.identity()}) is not the one the checkpoint was "
                          f"trained with ({recorded}); put the original tokenizer files back")
    return tokenizer


def _built_with(meta: dict, key: str, what: str, load, from_identity):
    """The codec or image tokenizer meta[key] names: a fitted one loaded from the dataset folder (which must still
    exist), an external one from its identity alone; None when the meta names none."""
    identity = meta.get(key)
    if not identity:
        return None
    if identity.get("path"):  # fitted, saved inside the dataset folder
        where = storage.path(meta.get("dataset") or ".") / identity["path"]
        try:
            return load(where)
        except CodecError as e:
            raise ExportError(f"cannot load {what} {identity['name']} from the dataset folder {where}: {e}. The "
                              f"dataset folder must still exist; restore it there") from e
    return from_identity(identity)


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


def from_checkpoint(workdir, step: int | None = None, log=print) -> ModelArtifact:
    """A training workdir's checkpoint (the newest readable one, or `step`) as a ModelArtifact."""
    ckpt = open_checkpoint(workdir, step, log)
    cfg = ckpt.config
    graphdef, abstract = abstract_model(cfg, ckpt.vocab)
    params = params_from_tensors(ckpt.tensors(), abstract, cfg.model.scan_layers, jnp.dtype(cfg.model.param_dtype),
                                 where=str(ckpt.path))
    info = {"step": ckpt.step, "dtype": cfg.model.param_dtype, "checkpoint": str(ckpt.path)}
    return ModelArtifact(source=str(ckpt.workdir), config=cfg, vocab=ckpt.vocab, graphdef=graphdef, params=params,
                         tokenizer=ckpt.tokenizer, codec=ckpt.codec, image_tokenizer=ckpt.image_tokenizer,
                         image_size=ckpt.image_size, info=info)


# ----------------------------------------------------------------------------------------------------------
# An export folder.


def read_export_config(folder) -> tuple[dict, dict]:
    """(the run's config dict, the "export" block) of an export's config.json; ExportError when it is not one."""
    folder = storage.path(folder)
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        if not (folder / name).is_file():
            raise ExportError(f"{folder} is not an omni export: {name} is missing (make one with omni export "
                              f"--workdir RUN --out {folder})")
    try:
        raw = json.loads((folder / CONFIG_FILE).read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise ExportError(f"{folder / CONFIG_FILE} is not valid JSON ({e}); export the checkpoint again") from None
    info = raw.pop("export", None) if isinstance(raw, dict) else None
    if not info or info.get("format") != EXPORT_FORMAT:
        raise ExportError(f"{folder / CONFIG_FILE} has no \"export\" block of format {EXPORT_FORMAT}; it is not an "
                          f"omni export")
    if info.get("format_version") != EXPORT_FORMAT_VERSION:
        raise ExportError(f"{folder} is export format version {info.get('format_version')}; this omni reads "
                          f"version {EXPORT_FORMAT_VERSION}")
    return raw, info


def read_safetensors(location, error: type = ExportError) -> dict[str, np.ndarray]:
    """Every tensor of a safetensors file (a local path or a URL), as numpy; its header checked first
    (omni.train.safetensors_file): a damaged or lying file is `error` naming the file and the tensor."""
    from omni.train import safetensors_file

    return safetensors_file.read_file(location, error)


def export_tokenizer(folder, info: dict):
    """The text tokenizer of an export folder (a bytes tokenizer has no file: its folder holds only its identity)."""
    try:
        return load_tokenizer("bytes" if info["tokenizer"]["kind"] == "bytes" else
                              str(storage.path(folder) / TOKENIZER_DIR))
    except TokenizerError as e:
        raise ExportError(f"the tokenizer of export {folder} cannot be loaded: {e}") from e


def from_export(folder, scan_layers: bool | None = None) -> ModelArtifact:
    """Reads an `omni export` folder; needs neither the checkpoint nor the training dataset.

    scan_layers (default: as trained) builds the model with or without the scanned layer stack; the tensor
    names are the same either way.
    """
    folder = storage.path(folder)
    _reachable(folder, "the export")
    raw, info = read_export_config(folder)
    cfg = config_lib.from_dict(raw, source=str(folder / CONFIG_FILE))
    if scan_layers is not None:
        cfg.model.scan_layers = scan_layers
    vocab = vocab_from_block(info["vocab"])
    graphdef, abstract = abstract_model(cfg, vocab)
    params = params_from_tensors(read_safetensors(folder / WEIGHTS_FILE), abstract, cfg.model.scan_layers,
                                 jnp.dtype(cfg.model.param_dtype), where=WEIGHTS_FILE)
    size = (info.get("image_tokenizer") or {}).get("image_size")
    return ModelArtifact(source=str(folder), config=cfg, vocab=vocab, graphdef=graphdef, params=params,
                         tokenizer=export_tokenizer(folder, info), codec=load_codec_folder(folder / CODEC_DIR),
                         image_tokenizer=load_image_tokenizer_folder(folder / IMAGE_TOKENIZER_DIR),
                         image_size=tuple(size) if size else None, info=info)


def is_export(location) -> bool:
    folder = storage.path(location)
    return (folder / CONFIG_FILE).is_file() and (folder / WEIGHTS_FILE).is_file()


def is_workdir(location) -> bool:
    """Whether `location` is a training workdir with at least one complete checkpoint."""
    from omni.train import checkpoint

    return bool(checkpoint.checkpoint_steps(location))


def load(location, step: int | None = None) -> ModelArtifact:
    """An `omni export` folder or a training workdir (its latest checkpoint, or `step`), whichever it is."""
    try:
        folder = storage.path(location)
    except StorageError as e:
        raise ExportError(str(e)) from None
    _reachable(folder, "the model")
    if is_export(folder):
        return from_export(folder)
    if (folder / "checkpoints").is_dir():
        return from_checkpoint(folder, step)
    raise ExportError(f"{folder} is not an omni export ({CONFIG_FILE} and {WEIGHTS_FILE}) nor a training workdir "
                      f"(checkpoints/); give a folder written by `omni export` or by `omni train`")


def live(cfg: Config, graphdef, params) -> ModelArtifact:
    """The model of a run still in memory (its sharded parameters), with the vocabulary, tokenizer, codec and image
    tokenizer of cfg's dataset: the end-of-run task scores, `omni eval --generate`."""
    from omni.data import pipeline

    ds = pipeline.dataset_for(cfg)
    size = (ds.meta.get("image_tokenizer") or {}).get("image_size")
    return ModelArtifact(source="", config=cfg, vocab=pipeline.vocab_for(cfg), graphdef=graphdef, params=params,
                         tokenizer=pipeline.tokenizer_for(cfg), codec=ds.codec(),
                         image_tokenizer=pipeline.image_tokenizer_for(cfg), image_size=tuple(size) if size else None)


def _reachable(location, what: str) -> None:
    try:
        storage.check_reachable(location, what)
    except StorageError as e:
        raise ExportError(str(e)) from None


# ----------------------------------------------------------------------------------------------------------
# The codec and image tokenizer folders an export (or an HF export) carries.


def save_codec_folder(codec, folder) -> None:
    """A fitted codec saves its files; the tone codec and external codecs are their identity alone."""
    if hasattr(codec, "save"):
        codec.save(folder)
        return
    kind = "builtin" if isinstance(codec, ToneCodec) else "precomputed"
    folder = storage.path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    storage.write_text(folder / CODEC_FILE, json.dumps(dict(codec_identity(codec), kind=kind), indent=2) + "\n")


def save_image_tokenizer_folder(image_tokenizer, folder) -> None:
    """A fitted image tokenizer saves its files; an external one is its identity alone."""
    if hasattr(image_tokenizer, "save"):
        image_tokenizer.save(folder)
        return
    folder = storage.path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    identity = dict(image_tokenizer_lib.identity(image_tokenizer), kind="precomputed")
    storage.write_text(folder / image_tokenizer_lib.CONFIG_FILE, json.dumps(identity, indent=2) + "\n")


def load_image_tokenizer_folder(folder):
    """The image tokenizer an export's image_tokenizer/ folder holds (None when there is none)."""
    folder = storage.path(folder)
    if not (folder / image_tokenizer_lib.CONFIG_FILE).is_file():
        return None
    try:
        if (folder / image_tokenizer_lib.ARRAYS_FILE).is_file():
            return image_tokenizer_lib.load_image_tokenizer(folder)
        return image_tokenizer_lib.from_identity(json.loads((folder / image_tokenizer_lib.CONFIG_FILE).read_text()))
    except (CodecError, ValueError, KeyError, TypeError) as e:
        raise ExportError(f"the image tokenizer of export {folder.parent} cannot be loaded ({e}); export the "
                          f"checkpoint again") from None


def load_codec_folder(folder):
    """The codec an export's codec/ folder holds (None when there is none)."""
    folder = storage.path(folder)
    if not (folder / CODEC_FILE).is_file():
        return None
    if (folder / "codec.npz").is_file():
        return load_codec(str(folder))
    return codec_from_identity(json.loads((folder / CODEC_FILE).read_text()))

