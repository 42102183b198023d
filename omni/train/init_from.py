"""model.init_from: a new run starts from a Hugging Face Llama folder (or an omni export) instead of random weights.

    omni train --config configs/demo.py --workdir runs/x --set model.init_from=/models/tiny-llama \\
        --set model.d=... --set model.layers=...      # the folder's sizes: a mismatch is an error listing them

What is read, with `safetensors` and `tokenizers` only (no torch, no transformers):

    config.json                          model_type "llama", the sizes (checked against model.*: a size that
                                         differs is an error naming the tensor and the settings to use)
    model.safetensors, or the shards of model.safetensors.index.json    the weights (omni.model.hf_llama names)
    tokenizer.json                       the token string of every embedding row
    patch_projection.safetensors         the image patch projection, when the folder has one (omni export --format hf)

The vocabulary is matched by token string (omni.tokens.token_names): omni id r takes row HF id s of the embedding
and of lm_head when the folder's tokenizer spells a token exactly as omni names id r. Text tokens are named by
omni's text tokenizer (so with the folder's own tokenizer as data.tokenizer every text row is found), specials
<bos>..., audio codes <audio_K_C>, image codes <image_K_C> and padding rows <unused_ID> are found only in folders
omni wrote; whatever is
not found keeps the model's normal init, as does the patch projection of a folder without one. A folder with
tied embeddings (tie_word_embeddings, no lm_head.weight) gives its embedding to omni's unembedding too.

An omni export (the `omni export` format) is read the same way after its tensors are put in HF names and
layouts. An omni run's workdir (a folder with checkpoints/) gives the parameters of its latest checkpoint as they
are, no optimizer state: the next stage of a staged recipe (configs/llava_stage2.py) starts from the one before;
every tensor must have this model's shape (same sizes, same vocabulary), else the error names the first that
differs. The trainer calls `load` only when the workdir has no checkpoint: resuming always wins.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from omni import config as config_lib
from omni import storage, tokens
from omni.config import Config
from omni.data.text_tokenizer import HF_FILE, token_strings
from omni.errors import InitFromError, OmniError, StorageError
from omni.model import hf_llama, tensor_names
from omni.tokens import Vocab
from omni.train import artifact, safetensors_file

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
ROW_KINDS = ("text", "special", "audio", "image", "padding")  # the vocabulary ranges the log counts


@dataclass
class Source:
    """What model.init_from names, in HF terms whatever the folder's format."""

    folder: storage.Path
    kind: str                    # "Hugging Face Llama", "omni export --format hf" or "omni export"
    config: dict                 # a Llama config.json (for an omni export: the one it stands for)
    tensors: Tensors             # by HF name
    rows: dict[str, int]         # token string -> row of the embedding / lm_head
    patch: dict | None           # {"weight": [d, P], "bias": [d]} or None
    has_tokenizer_for_text: bool  # a plain Llama folder's tokenizer.json, fit to be omni's text tokenizer


# ----------------------------------------------------------------------------------------------------------
# Reading a folder.


def read_source(path) -> Source:
    try:
        folder = storage.path(path)
        storage.check_reachable(folder, "model.init_from")
    except StorageError as e:
        raise InitFromError(str(e)) from None
    if not folder.is_dir():
        what = "a file, not a folder" if folder.exists() else "no such folder"
        raise InitFromError(f"model.init_from={path}: {what}; give a Hugging Face Llama folder "
                            f"(config.json, model.safetensors, tokenizer.json) or an omni export")
    config = _json(folder / CONFIG_FILE, f"model.init_from={path}")
    export = config.get("export")
    if isinstance(export, dict) and export.get("format") == artifact.EXPORT_FORMAT:
        return _omni_export_source(folder, config)
    if config.get("model_type") != "llama":
        raise InitFromError(f"{folder / CONFIG_FILE} has model_type {config.get('model_type')!r}; model.init_from "
                            f"reads Llama models (model_type 'llama') and omni exports only")
    check_llama_config(config, folder / CONFIG_FILE)
    for key, ok, want in (("hidden_act", config.get("hidden_act", "silu") == "silu", "silu"),
                          ("attention_bias", not config.get("attention_bias", False), "false"),
                          ("mlp_bias", not config.get("mlp_bias", False), "false"),
                          ("rope_parameters.rope_type", hf_llama.rope_type_of(config) == "default", "default")):
        if not ok:
            raise InitFromError(f"{folder / CONFIG_FILE}: {key} must be {want} for omni's blocks (SwiGLU, no "
                                f"biases, plain RoPE); this Llama variant cannot start an omni model")
    omni = config.get("omni") or {}
    rows = _token_rows(folder)
    patch = None
    if (folder / hf_llama.PATCH_FILE).is_file():
        patch = artifact.read_safetensors(folder / hf_llama.PATCH_FILE, InitFromError)
    kind = "omni export --format hf" if omni else "Hugging Face Llama"
    # omni's own whole-vocabulary tokenizer.json (its specials at ids 0..15) is never a text tokenizer, also when
    # the config.json lost its "omni" block
    return Source(folder, kind, config, _tensors_of(folder), rows, patch,
                  has_tokenizer_for_text=not omni and (folder / HF_FILE).is_file() and not is_omni_vocabulary(rows))


# config.json keys model.init_from reads: (key, what it must be, required)
_POSITIVE_INT, _POSITIVE, _BOOL, _TEXT, _OBJECT = "a positive integer", "a positive number", "true or false", \
    "a string", "an object"
LLAMA_KEYS = (("hidden_size", _POSITIVE_INT, True), ("num_hidden_layers", _POSITIVE_INT, True),
              ("num_attention_heads", _POSITIVE_INT, True), ("intermediate_size", _POSITIVE_INT, True),
              ("num_key_value_heads", _POSITIVE_INT, False), ("head_dim", _POSITIVE_INT, False),
              ("vocab_size", _POSITIVE_INT, False), ("max_position_embeddings", _POSITIVE_INT, False),
              ("rms_norm_eps", _POSITIVE, False), ("rope_theta", _POSITIVE, False),
              ("tie_word_embeddings", _BOOL, False), ("attention_bias", _BOOL, False), ("mlp_bias", _BOOL, False),
              ("hidden_act", _TEXT, False), ("rope_parameters", _OBJECT, False), ("rope_scaling", _OBJECT, False),
              ("omni", _OBJECT, False))


def _is(value, kind: str) -> bool:
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    return {_POSITIVE_INT: number and isinstance(value, int) and value > 0,
            _POSITIVE: number and math.isfinite(value) and value > 0,
            _BOOL: isinstance(value, bool), _TEXT: isinstance(value, str), _OBJECT: isinstance(value, dict)}[kind]


def check_llama_config(config: dict, where) -> None:
    """InitFromError naming config.json and the key when a field init_from reads is missing, null where it must
    be set, or of the wrong type (sizes positive integers, eps and theta positive numbers, flags booleans).
    Optional keys that are null are dropped from `config`: LlamaConfig's defaults apply."""
    for key, kind, required in LLAMA_KEYS:
        value = config.get(key)
        if value is None and not required:
            config.pop(key, None)  # absent or null: LlamaConfig's default (what .get(key, default) below gives)
            continue
        if not _is(value, kind):
            got = "missing" if key not in config else f"{json.dumps(value)[:60]}"
            raise InitFromError(f"{where}: {key} must be {kind}, got {got}; fix the file or export the model "
                                f"again (a Llama config.json as transformers writes it)")
    for block in ("rope_parameters", "rope_scaling"):
        theta = (config.get(block) or {}).get("rope_theta")
        if block == "rope_parameters" and theta is not None and not _is(theta, _POSITIVE):
            raise InitFromError(f"{where}: rope_parameters.rope_theta must be {_POSITIVE}, got {json.dumps(theta)}")
        kind = (config.get(block) or {}).get("rope_type", (config.get(block) or {}).get("type"))
        if kind is not None and not isinstance(kind, str):
            raise InitFromError(f"{where}: {block}.rope_type must be a string, got {json.dumps(kind)[:60]}")
    heads, kv = config["num_attention_heads"], config.get("num_key_value_heads") or config["num_attention_heads"]
    if heads % kv:
        raise InitFromError(f"{where}: num_attention_heads {heads} is not a multiple of num_key_value_heads {kv}")
    if config.get("head_dim") is None and config["hidden_size"] % heads:
        raise InitFromError(f"{where}: hidden_size {config['hidden_size']} is not a multiple of num_attention_heads "
                            f"{heads} and no head_dim is given")


def is_omni_vocabulary(rows: dict[str, int]) -> bool:
    """Whether a tokenizer.json's vocabulary is omni's whole id space (`omni export --format hf` wrote it)."""
    return bool(rows) and all(rows.get(tokens.SPECIAL_NAMES.get(i, f"<special_{i}>")) == i
                              for i in range(tokens.NUM_SPECIAL))


def _json(path, what: str) -> dict:
    if not path.is_file():
        raise InitFromError(f"{what}: {path} is missing; the folder must hold a model's config.json")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise InitFromError(f"{path}: not valid JSON ({str(e)[:120]})") from None
    except OSError as e:
        raise InitFromError(f"{path} cannot be read ({e.strerror or e})") from None
    if not isinstance(data, dict):
        raise InitFromError(f"{path}: holds a {type(data).__name__}, not a config object")
    return data


def _token_rows(folder) -> dict[str, int]:
    if not (folder / HF_FILE).is_file():
        return {}  # no tokenizer: no row can be matched, all of them keep their init (reported)
    try:
        import tokenizers
        return tokenizers.Tokenizer.from_str((folder / HF_FILE).read_text(encoding="utf-8")).get_vocab(
            with_added_tokens=True)
    except Exception as e:  # noqa: BLE001 - the Rust side raises a bare Exception for a bad file
        raise InitFromError(f"{folder / HF_FILE} cannot be read by `tokenizers`: {e}") from None


class Tensors:
    """A folder's tensors by HF name, read one at a time: names, shape(name), read(name) -> numpy array. Every file
    behind them had its header checked (omni.train.safetensors_file) before it was trusted."""

    def __init__(self, headers: dict | None = None, arrays: dict[str, np.ndarray] | None = None):
        self.headers, self.arrays = headers or {}, arrays or {}  # name -> safetensors_file.Header of its file
        self.names = set(self.headers) | set(self.arrays)

    def shape(self, name: str) -> tuple:
        if name in self.arrays:
            return tuple(self.arrays[name].shape)
        return self.headers[name].tensors[name].shape

    def dtype(self, name: str) -> np.dtype:
        if name in self.arrays:
            return self.arrays[name].dtype
        return safetensors_file.DTYPES[self.headers[name].tensors[name].dtype]

    def where(self, name: str) -> str:
        """The file a tensor is in (for messages)."""
        return self.headers[name].location if name in self.headers else "the folder"

    def read(self, name: str) -> np.ndarray | None:
        if name in self.arrays:
            return self.arrays[name]
        if name not in self.headers:
            return None
        return safetensors_file.read_tensor(self.headers[name], name)


def _tensors_of(folder) -> Tensors:
    """model.safetensors, or the shards model.safetensors.index.json names (each tensor in the file it says)."""
    index = folder / INDEX_FILE
    if index.is_file():
        files = safetensors_file.read_index(index, InitFromError)
        headers = {file: safetensors_file.read_header(file, InitFromError) for file in set(files.values())}
        for name, file in files.items():
            if name not in headers[file].tensors:
                raise InitFromError(f"{index} puts tensor {safetensors_file.quoted(name)} in {file.name}, which has no such tensor; "
                                    f"download or export the folder again")
        return Tensors(headers={name: headers[file] for name, file in files.items()})
    if (folder / WEIGHTS_FILE).is_file():
        header = safetensors_file.read_header(folder / WEIGHTS_FILE, InitFromError)
        return Tensors(headers={name: header for name in header.tensors})
    raise InitFromError(f"model.init_from={folder}: neither {WEIGHTS_FILE} nor {INDEX_FILE} is there")


def _omni_export_source(folder, raw: dict) -> Source:
    """An `omni export` folder seen as a Llama: its tensors renamed and laid out as HF's, its vocabulary named."""
    try:
        raw, info = artifact.read_export_config(folder)
        cfg = config_lib.from_dict(raw, source=str(folder / CONFIG_FILE))
        vocab = artifact.vocab_from_block(info["vocab"])
        text = artifact.export_tokenizer(folder, info)
    except OmniError as e:
        raise InitFromError(f"model.init_from={folder}: {e}") from None
    except (KeyError, TypeError, ValueError, AttributeError) as e:  # a damaged "export" block: no check caught it
        raise InitFromError(f"{folder / CONFIG_FILE}: its \"export\" block is damaged ({type(e).__name__}: "
                            f"{str(e)[:100]}); export the checkpoint again") from None
    if cfg.model.fusion != "early":
        raise InitFromError(f"model.init_from={folder} is an export of a model.fusion='{cfg.model.fusion}' run; "
                            f"init_from starts from early-fusion models only (give that run's workdir instead)")
    tensors = artifact.read_safetensors(folder / WEIGHTS_FILE, InitFromError)
    wanted = tensor_names.tensor_shapes(artifact.abstract_model(cfg, vocab)[1], cfg.model.scan_layers)
    for name, x in tensors.items():  # the layouts below need the shapes of the model config.json describes
        if name not in wanted:
            raise InitFromError(f"{folder / WEIGHTS_FILE} has tensor '{name}', which the model of its config.json "
                                f"does not have; export the checkpoint again")
        if tuple(x.shape) != wanted[name]:
            raise InitFromError(f"tensor '{name}' in {folder / WEIGHTS_FILE} has shape {list(x.shape)} but the "
                                f"model of its config.json has {list(wanted[name])}; export the checkpoint again")
    hf = {hf_llama.hf_name(n): hf_llama.to_hf(n, x) for n, x in tensors.items()}
    patch = {hf_llama.PATCH_NAMES[n]: hf.pop(hf_llama.hf_name(n)) for n in hf_llama.PATCH_NAMES if n in tensors}
    special = {"bos": tokens.BOS, "eos": tokens.EOS, "pad": tokens.PAD_ID}
    config = hf_llama.llama_config(cfg.model, vocab.size, cfg.data.seq_len, info.get("dtype", "float32"), special)
    names = tokens.token_names(vocab, token_strings(text))
    return Source(folder, "omni export", config, Tensors(arrays=hf), {n: i for i, n in enumerate(names)},
                  patch or None, False)


# ----------------------------------------------------------------------------------------------------------
# The text tokenizer.


def is_run(path) -> bool:
    """Whether model.init_from names an omni run's workdir (its checkpoints) rather than a model folder."""
    try:
        return artifact.is_workdir(storage.path(path))
    except StorageError as e:
        raise InitFromError(f"model.init_from: {e}") from None


def with_source_tokenizer(cfg: Config, log=print) -> Config:
    """cfg, with data.tokenizer set to the init_from folder when that is a plain Llama folder with a tokenizer.json
    and data.tokenizer is '' (the dataset's own): the text vocabulary then is the checkpoint's. From a run's
    workdir, its own data.tokenizer (the tokenizer its rows were trained with)."""
    if not cfg.model.init_from or cfg.data.tokenizer:
        return cfg
    if is_run(cfg.model.init_from):
        earlier = config_lib.from_dict(_json(storage.path(cfg.model.init_from) / CONFIG_FILE,
                                             f"model.init_from={cfg.model.init_from}"))
        if earlier.data.tokenizer:
            log(f"omni: model.init_from: the text tokenizer is {earlier.data.tokenizer}, as in that run")
        return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, tokenizer=earlier.data.tokenizer))
    source = read_source(cfg.model.init_from)
    if not source.has_tokenizer_for_text:
        return cfg
    log(f"omni: model.init_from: the text tokenizer is {source.folder / HF_FILE} (data.tokenizer was '')")
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, tokenizer=str(source.folder)))


# ----------------------------------------------------------------------------------------------------------
# Building the params.


@dataclass
class Loaded:
    """The params init_from gives (numpy, the model's param tree layout; None = keep the fresh init) and counts."""

    params: dict
    from_source_rows: np.ndarray  # bool [V]: the embedding/unembedding rows that came from the source
    counts: dict


def _param_paths(tree: dict, prefix=()):
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from _param_paths(value, prefix + (str(key),))
        else:
            yield prefix + (str(key),), value


def _export_names(path: tuple, shape, scan_layers: bool) -> list[tuple[str, tuple]]:
    """(omni export name, per-layer shape) of the tensors one param leaf holds (a scanned block leaf: all layers)."""
    if path[0] != "blocks":
        return [(".".join(path), tuple(shape))]
    if scan_layers:
        return [(".".join(("blocks", str(i)) + path[1:]), tuple(shape[1:])) for i in range(shape[0])]
    return [(".".join(path), tuple(shape))]


def _fix(source: Source, m) -> str:
    differ = hf_llama.settings_that_differ(m, source.config)
    if not differ:
        return "the folder's config.json and its tensors disagree"
    return "set " + " ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in differ.items()) + \
        f" (the sizes of {source.folder / CONFIG_FILE})"


def load(cfg: Config, vocab: Vocab, text_tokenizer, abstract_params: dict, log=print) -> Loaded:
    """The source's weights in the layout of `abstract_params` (nnx.to_pure_dict of the model, anything with
    .shape): every block tensor, the final norm, and the embedding / unembedding rows matched by token string."""
    m = cfg.model
    if is_run(m.init_from):
        return _load_run(storage.path(m.init_from), vocab, abstract_params, log)
    source, wanted = _checked(cfg, abstract_params)
    return _read(cfg, source, wanted, vocab, text_tokenizer, abstract_params)


def check(cfg: Config, abstract_params: dict) -> None:
    """InitFromError now, reading headers only (no weights), where `load` would fail on the folder model.init_from
    names: what cannot be read, sizes that do not fit this model. A run's workdir: that it has a checkpoint."""
    if is_run(cfg.model.init_from):
        artifact.pick_step(storage.path(cfg.model.init_from), None)
        return
    _checked(cfg, abstract_params)


def _checked(cfg: Config, abstract_params: dict) -> tuple[Source, dict]:
    """(the source, {omni export name: shape} of every tensor this model needs) once every check passed."""
    m = cfg.model
    if m.fusion != "early":
        raise InitFromError(f"model.init_from starts early-fusion models only (model.fusion is '{m.fusion}': its "
                            f"per-modality or cross-attention layers have no Llama counterpart)")
    source = read_source(m.init_from)
    wanted = {}
    for path, leaf in _param_paths(abstract_params):
        for name, shape in _export_names(path, leaf.shape, m.scan_layers):
            wanted[name] = shape
    wanted = dict(sorted(wanted.items(), key=lambda item: _file_order(item[0])))  # errors name the first in HF order
    for name, shape in wanted.items():  # every size first: the error names the first tensor that does not fit
        if name in hf_llama.PATCH_NAMES:
            x = (source.patch or {}).get(hf_llama.PATCH_NAMES[name])
            if x is not None and not jnp.issubdtype(x.dtype, jnp.floating):
                raise InitFromError(f"tensor '{hf_llama.PATCH_NAMES[name]}' in {source.folder / hf_llama.PATCH_FILE} "
                                    f"is {x.dtype}, not floating point; download or export the folder again")
            if x is not None and hf_llama.hf_shape(name, shape) != tuple(x.shape):
                raise InitFromError(f"tensor '{hf_llama.PATCH_NAMES[name]}' in {source.folder / hf_llama.PATCH_FILE} "
                                    f"has shape {list(x.shape)} but this model needs "
                                    f"{list(hf_llama.hf_shape(name, shape))} (data.patch_size, model.d)")
            continue
        hf = hf_llama.hf_name(name)
        if hf not in source.tensors.names:
            if name == "unembed" and source.config.get("tie_word_embeddings"):
                continue
            raise InitFromError(f"{source.folder} has no tensor '{hf}' (omni's {name}); {_fix(source, m)}")
        if not jnp.issubdtype(source.tensors.dtype(hf), jnp.floating):
            raise InitFromError(f"tensor '{hf}' in {source.tensors.where(hf)} is {source.tensors.dtype(hf)}, not "
                                f"floating point; model weights are float32, float16 or bfloat16: download or "
                                f"export the folder again")
        got = _shape_of(source, hf)
        need = hf_llama.hf_shape(name, shape)
        if name in ("embed", "unembed"):
            got, need = got[1:], need[1:]  # rows are matched by token string, the width must match
        if got != need:
            raise InitFromError(f"tensor '{hf}' in {source.folder} has shape {list(_shape_of(source, hf))} but this "
                                f"model needs {list(hf_llama.hf_shape(name, shape))}; {_fix(source, m)}")
    layers = {n.split(".")[2] for n in source.tensors.names if n.startswith("model.layers.")}
    if len(layers) != m.layers:
        raise InitFromError(f"{source.folder} holds {len(layers)} layers, model.layers is {m.layers}; "
                            f"{_fix(source, m)}")
    for key, theirs, ours in (("rope_theta", hf_llama.rope_theta_of(source.config) or 10_000.0, m.rope_theta),
                              ("rms_norm_eps", float(source.config.get("rms_norm_eps", 1e-6)), m.norm_eps)):
        if theirs != ours:
            omni_key = {"rope_theta": "model.rope_theta", "rms_norm_eps": "model.norm_eps"}[key]
            raise InitFromError(f"{source.folder / CONFIG_FILE} has {key} {theirs:g} but {omni_key} is {ours:g}; "
                                f"set {omni_key}={theirs:g}")

    return source, wanted


def _read(cfg: Config, source: Source, wanted: dict, vocab: Vocab, text_tokenizer, abstract_params: dict) -> Loaded:
    m = cfg.model
    row_of = _source_row_of(source, vocab, text_tokenizer)
    found = row_of >= 0
    embed = source.tensors.read("model.embed_tokens.weight")
    lm_head = source.tensors.read("lm_head.weight")
    if lm_head is None:  # tied embeddings
        lm_head = embed
    by_name = {}
    for name, shape in wanted.items():
        if name == "embed":
            by_name[name] = _rows(embed, row_of, shape)
        elif name == "unembed":
            by_name[name] = _rows(lm_head, row_of, shape[::-1]).T
        elif name in hf_llama.PATCH_NAMES:
            x = (source.patch or {}).get(hf_llama.PATCH_NAMES[name])
            by_name[name] = None if x is None else hf_llama.from_hf(name, x, shape)
        else:
            by_name[name] = hf_llama.from_hf(name, source.tensors.read(hf_llama.hf_name(name)), shape)

    params = {}
    for path, leaf in _param_paths(abstract_params):
        parts = [by_name[name] for name, _ in _export_names(path, leaf.shape, m.scan_layers)]
        value = None if parts[0] is None else (np.stack(parts) if m.scan_layers and path[0] == "blocks" else parts[0])
        _set(params, path, value)
    counts = _counts(vocab, found)
    counts.update(kind=source.kind, folder=str(source.folder), tensors=sum(v is not None for v in by_name.values()),
                  patch_projection=source.patch is not None)
    return Loaded(params=params, from_source_rows=found, counts=counts)


def _load_run(workdir, vocab: Vocab, abstract_params: dict, log=print) -> Loaded:
    """The newest readable checkpoint's parameters of an omni run (read under a lease, so a run still training
    there does not delete it mid-read; a damaged one is skipped in one line: omni.train.readers), every tensor
    of this model's shape."""
    from omni.train import readers

    step, params = readers.read_checkpoint(workdir, None, lambda step: artifact.checkpoint_params(workdir, step),
                                           log)
    saved = dict(_param_paths(params))
    for path, leaf in _param_paths(abstract_params):
        name = "/".join(path)
        if path not in saved:
            raise InitFromError(f"model.init_from={workdir}: its step {step} checkpoint has no parameter '{name}' "
                                f"(another model.fusion?); start from a run of the same model")
        if tuple(saved[path].shape) != tuple(leaf.shape):
            raise InitFromError(f"model.init_from={workdir}: parameter '{name}' of its step {step} checkpoint has "
                                f"shape {list(saved[path].shape)} but this model needs {list(leaf.shape)}; the "
                                f"sizes (model.*) and the vocabulary (dataset, tokenizer) must be that run's")
    counts = _counts(vocab, np.ones(vocab.size, bool))
    counts.update(kind=f"omni run, step {step}", folder=str(workdir), tensors=len(saved), patch_projection=True)
    return Loaded(params=params, from_source_rows=np.ones(vocab.size, bool), counts=counts)


def _source_row_of(source: Source, vocab: Vocab, text_tokenizer) -> np.ndarray:
    """int [V]: for each row of this model's vocabulary, the source's row of the same token string, or -1."""
    names = tokens.token_names(vocab, token_strings(text_tokenizer))
    embed = "model.embed_tokens.weight"
    if embed not in source.tensors.names or len(_shape_of(source, embed)) != 2:
        what = "has no tensor" if embed not in source.tensors.names else \
            f"has a {len(_shape_of(source, embed))}-dimensional tensor"
        raise InitFromError(f"{source.folder} {what} '{embed}' (the [vocabulary, d] embedding); download or "
                            f"export the folder again")
    source_rows = _shape_of(source, embed)[0]
    row_of = np.array([source.rows.get(name, -1) for name in names])
    row_of[row_of >= source_rows] = -1
    return row_of


def rows_from_source(cfg: Config, vocab: Vocab, text_tokenizer) -> np.ndarray:
    """bool [V]: the embedding / unembedding rows model.init_from fills from its folder (what `load` matches),
    known without reading the weights: train.freeze_loaded_rows keeps them fixed, also after a resume."""
    if is_run(cfg.model.init_from):
        return np.ones(vocab.size, bool)
    return _source_row_of(read_source(cfg.model.init_from), vocab, text_tokenizer) >= 0


def _file_order(name: str) -> tuple:
    """The embedding, then layer by layer, then the head (the patch projection last)."""
    generic = hf_llama.generic_name(name)
    if generic in hf_llama.PATCH_NAMES:
        return (3, 0, 0)
    order = list(hf_llama.HF_NAMES).index(generic)
    if generic == name:
        return (0 if name == "embed" else 2, 0, order)
    return (1, int(name.split(".")[1]), order)


def _shape_of(source: Source, name: str) -> tuple:
    return source.tensors.shape(name)


def _rows(table_SxD: np.ndarray, row_of_V: np.ndarray, shape_VxD) -> np.ndarray:
    """[V, d]: row r = table[row_of[r]] where row_of[r] >= 0, zeros elsewhere (those rows keep the fresh init)."""
    out = np.zeros(shape_VxD, table_SxD.dtype)
    found = row_of_V >= 0
    out[found] = table_SxD[row_of_V[found]]
    return out


def _set(tree: dict, path: tuple, value) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def _counts(vocab: Vocab, found: np.ndarray) -> dict:
    ranges = {"special": (0, tokens.NUM_SPECIAL),
              "text": (vocab.text_offset, vocab.text_offset + vocab.text_size),
              "audio": (vocab.audio_offset(0), vocab.image_offset(0)),
              "image": (vocab.image_offset(0), vocab.used_size),
              "padding": (vocab.used_size, vocab.size)}
    return {name: (int(found[start:stop].sum()), stop - start) for name, (start, stop) in ranges.items()}


def describe(counts: dict) -> str:
    rows = ", ".join(f"{name} {got}/{total}" for name in ROW_KINDS
                     for got, total in [counts[name]] if total)
    new = sum(total - got for got, total in (counts[k] for k in ROW_KINDS))
    patch = "loaded" if counts["patch_projection"] else "newly initialised"
    if counts["kind"].startswith("omni run"):
        return (f"omni: model.init_from={counts['folder']} ({counts['kind']}): all {counts['tensors']} tensors "
                f"loaded as saved (no optimizer state)")
    line = (f"omni: model.init_from={counts['folder']} ({counts['kind']}): {counts['tensors']} tensors loaded; "
            f"vocabulary rows matched by token string: {rows}; {new} rows newly initialised; patch projection "
            f"{patch}")
    found, total = counts["text"]
    if found < total / 2:  # most text rows random: almost surely the wrong tokenizer (or a folder without one)
        line += (f"\nomni: warning: only {found} of the {total} text tokens of data.tokenizer are in "
                 f"{counts['folder']}/tokenizer.json; set data.tokenizer to the tokenizer that checkpoint was "
                 f"trained with")
    return line


# ----------------------------------------------------------------------------------------------------------
# Into the train state.


def place(fresh_params: dict, loaded: Loaded) -> dict:
    """The fresh (sharded) params with the loaded values put in, in the same shardings and dtypes. Embedding and
    unembedding rows the source did not have keep their fresh values; so does any leaf loaded as None."""
    found_V = loaded.from_source_rows

    def merge(path, fresh):
        keys = tuple(str(getattr(p, "key", getattr(p, "idx", p))) for p in path)
        value = _get(loaded.params, keys)
        if value is None:
            return fresh
        value = np.asarray(value)
        array = jax.make_array_from_callback(fresh.shape, fresh.sharding,
                                             lambda index: value[index].astype(fresh.dtype))
        if keys == ("embed",):
            keep = found_V[:, None]
        elif keys == ("unembed",):
            keep = found_V[None, :]
        else:
            return array
        return jax.jit(lambda f, a: jnp.where(keep, a, f), out_shardings=fresh.sharding)(fresh, array)

    return jax.tree_util.tree_map_with_path(merge, fresh_params)


def _get(tree: dict, keys: tuple):
    for key in keys:
        tree = tree[key] if key in tree else tree[int(key)]
    return tree
