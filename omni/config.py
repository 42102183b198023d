"""The one typed config schema, config-file loading and dotted `--set key=value` overrides.

A config file is a Python file with `get_config() -> Config` (the big_vision / ml_collections habit), or a
`config.json` written by a previous run. Every field below has a default and a line of doc; `omni train
--help-config` prints them all. Overrides are type checked against the schema: an unknown key or a bad value
fails at once with a `ConfigError` that names the key and what is allowed.
"""

from __future__ import annotations

import ast
import copy
import dataclasses
import difflib
import json
import math
import re
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

from omni.errors import ConfigError  # noqa: F401  (raised below; callers import it from here too)


def doc(default: Any, text: str, **kwargs):
    """A dataclass field carrying its one-line documentation (`metadata['doc']`)."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: copy.deepcopy(default), metadata={"doc": text}, **kwargs)
    return field(default=default, metadata={"doc": text}, **kwargs)


@dataclass
class ModelConfig:
    d: int = doc(256, "model width (residual stream size)")
    layers: int = doc(4, "number of transformer blocks")
    heads: int = doc(4, "query heads")
    kv_heads: int = doc(2, "key/value heads (grouped-query attention); must divide `heads`")
    head_dim: int = doc(0, "size of one head; 0 means d // heads")
    mlp: int = doc(0, "SwiGLU hidden size; 0 means the multiple of 64 nearest 8/3 * d")
    rope_theta: float = doc(10_000.0, "RoPE base frequency")
    norm_eps: float = doc(1e-6, "RMSNorm epsilon")
    dtype: Literal["bfloat16", "float32"] = doc("bfloat16", "compute dtype of activations and matmuls")
    param_dtype: Literal["float32", "bfloat16"] = doc("float32", "dtype parameters are stored and updated in")
    remat: Literal["none", "full", "dots", "dots_no_batch", "dots_attn"] = doc(
        "none", "what each block keeps for the backward pass: none = keep all, full = recompute all, "
        "dots = save matmul outputs, dots_no_batch = save matmuls without batch dims, dots_attn = dots_no_batch "
        "and the fused (cuDNN) attention kernel's outputs, so its forward is not re-run in the backward pass")
    scan_layers: bool = doc(True, "stack blocks with nnx.scan so compile time does not grow with depth")
    attention: Literal["auto", "xla", "cudnn"] = doc(
        "auto", "attention kernel: cudnn = cuDNN flash attention, packed segments given as offsets (no [L, L] "
                "mask); xla = XLA's with a dense segment mask; auto = cudnn on GPU for bf16 compute, else xla")
    max_segments: int = doc(
        64, "cuDNN attention: the most runs one row of a batch may hold (packed examples, trailing padding counting "
            "as one; with late fusion every modality span counts). A batch with a longer row is refused, naming it")
    init_std: float = doc(0.02, "std of the normal init of embeddings and projections")
    fusion: Literal["early", "late", "mot", "cross"] = doc(
        "early", "early: every token shares every layer; late: the first model.late_layers layers are "
                 "modality-specific (own weights per modality, attention within the token's own span); mot: "
                 "Mixture-of-Transformers, every layer's weights per modality, attention global over the example "
                 "as early; cross: a text/audio decoder with gated cross-attention into a separate image encoder "
                 "(Flamingo-style)")
    late_layers: int = doc(0, "late fusion: how many of the model.layers layers are modality-specific (0 = early)")
    modality_matmul: Literal["tiles", "ragged_dot", "masked"] = doc(
        "tiles", "late and mot: how per-modality weights are applied (omni.model.routing): tiles = tokens grouped "
                 "by modality into tiles, one slice per token (pure XLA, any backend); ragged_dot = "
                 "jax.lax.ragged_dot (a grouped matmul on TPU; dense over every slice on CPU and, by default, GPU); "
                 "masked = every slice for every token, two masked away (3x FLOPs; the reference)")
    encoder_layers: int = doc(2, "cross fusion: depth of the image encoder (bidirectional within each image)")
    cross_every: int = doc(1, "cross fusion: a gated cross-attention block before every N-th decoder layer")
    init_from: str = doc(
        "", "start a new run from these weights instead of random ones: a Hugging Face Llama folder (config.json, "
            "*.safetensors, tokenizer.json) or an omni export. Tensors are matched by name and must fit model.* "
            "(d, layers, heads, ...); vocabulary rows are matched by token string, the rest (specials, audio codes, "
            "and the patch projection unless the folder has one) keep their normal init. With data.tokenizer='' a "
            "Llama folder's tokenizer.json becomes the text tokenizer. Ignored when the workdir has a checkpoint")


@dataclass
class DataConfig:
    dataset: str = doc("demo", "a dataset folder made by `omni data build`, or 'demo' for the generated demo "
                               "corpus (written as PNG/WAV + manifest and built once into data.cache_dir)")
    cache_dir: str = doc("", "where the demo corpus is built; '' means $OMNI_CACHE or ~/.cache/omni")
    tokenizer: str = doc("", "text tokenizer: 'bytes', a tokenizer.json (or its folder), a SentencePiece .model; "
                             "'' means the dataset's own (bytes unless it was built with --tokenizer)")
    seq_len: int = doc(256, "tokens per packed sequence")
    overlong: Literal["split", "truncate", "error"] = doc(
        "split", "an example longer than seq_len: 'split' into seq_len chunks (each its own segment; only the "
                 "first token of each later chunk loses its left context), 'truncate' to the first seq_len tokens "
                 "(logged with a warning), or 'error'")
    patch_size: int = doc(8, "image patch side P; an image becomes (H/P) x (W/P) patches of P*P*3 pixels")
    max_image_patches: int = doc(256, "patch budget per image: larger images are resized down keeping their "
                                      "aspect ratio, every side is rounded to a multiple of patch_size")
    row_patches: int = doc(0, "patch slots per packed row (the batch carries only image positions' pixels, uint8): "
                              "a row takes examples while their patches fit; 0 means seq_len (never limits packing). "
                              "Set it near the most patches a row holds to send fewer bytes per step")
    audio_layout: Literal["flat", "delay"] = doc("flat", "audio codes [T, K] as tokens: 'flat' frame-major, or "
                                                         "'delay' (MusicGen delay pattern, omni.tokens)")
    shuffle_seed: int = doc(0, "seed of the per-epoch shuffle and of bin shuffling in the packer")
    packing_bins: int = doc(0, "first-fit packing bins; 0 means the per-process batch size")
    worker_threads: int = doc(2, "threads decoding and tokenising examples in each reading process")
    num_workers: int = doc(0, "grain worker processes per host (0: read in the training process); the data "
                              "order depends on it, so resume with the same value")
    prefetch: int = doc(2, "batches read, checked and put on the devices ahead of the step, on a background thread, "
                           "so the devices do not wait for the host; 0 = in the training loop")
    shards: int = doc(0, "reading shards (examples [s::shards], each packed on its own); 0 means one per process. "
                         "A multiple of every process count you use (e.g. 8) makes the batches and their order "
                         "the same for any number of processes, so a run resumes on another process count")


@dataclass
class TrainConfig:
    steps: int = doc(300, "optimizer steps to run")
    batch_size: int = doc(16, "global batch, in packed sequences, per optimizer step")
    grad_accum: int = doc(1, "micro-batches per step; batch_size must divide by it")
    lr: float = doc(3e-3, "peak learning rate")
    warmup_steps: int = doc(30, "linear warmup steps from 0 to lr")
    min_lr_ratio: float = doc(0.1, "cosine decay ends at lr * min_lr_ratio")
    weight_decay: float = doc(0.1, "AdamW weight decay (not applied to norms and biases)")
    b1: float = doc(0.9, "Adam beta1")
    b2: float = doc(0.95, "Adam beta2")
    eps: float = doc(1e-8, "Adam epsilon")
    clip_norm: float = doc(1.0, "global gradient norm clip; 0 disables")
    loss_chunk: int = doc(1024, "positions per chunk of the fused unembedding + cross-entropy (omni.loss."
                                "fused_loss_sums): no [B, L, V] logits are held and the gradient is made in the "
                                "same pass; 0 = the plain loss over the full logits")
    seed: int = doc(0, "parameter init seed")
    trainable: list = doc([".*"], "regular expressions over parameter paths ('embed', 'patch_proj', "
                                  "'blocks/attn/wq', ...; each must match a whole path) of the parameters that "
                                  "train; the others get no update and no optimizer state (omni.train.trainable)")
    frozen: list = doc([], "regular expressions of parameter paths that never train, even when 'trainable' "
                           "matches them")
    freeze_loaded_rows: bool = doc(False, "with model.init_from: the embedding and unembedding rows it filled (the "
                                          "pretrained vocabulary) get no update, while the new rows (specials, "
                                          "audio and image codes) train: LLaVA-style stage 1 "
                                          "(configs/llava_stage1.py)")
    log_every: int = doc(10, "steps between metric lines (metrics.jsonl, TensorBoard, progress bar)")
    eval_every: int = doc(100, "steps between held-out evals; 0 only evaluates at the end")
    eval_batches: int = doc(0, "eval batches per eval; 0 means the whole eval split")
    checkpoint_every: int = doc(100, "steps between Orbax checkpoints (the last step is always saved); 0: none "
                                     "by steps")
    checkpoint_minutes: float = doc(0.0, "also save when this many minutes passed since the last save (checked "
                                         "at logging steps, decided by process 0); 0 disables")
    keep_checkpoints: int = doc(3, "checkpoints kept; older ones are deleted after a newer one is complete")
    async_checkpoint: bool = doc(True, "write checkpoints in the background while training goes on")
    profile_steps: str = doc("", "trace these steps with jax.profiler, 'START:STOP' (steps START..STOP-1 as "
                                 "metrics number them), into <workdir>/profile: TensorBoard's profile plugin and "
                                 "Perfetto read it (omni.train.profile); '' traces nothing")
    profile_process: int = doc(0, "the process that records train.profile_steps")
    phase_timeout_s: float = doc(1800.0, "multi-process jobs: an eval, the demo scoring or the last save that takes "
                                         "longer ends the job with a message naming it (a collective waiting for a "
                                         "process that never joins), instead of hanging; 0 disables")


@dataclass
class DemoConfig:
    """The generated demo corpora (data.dataset = 'demo', 'demo-speech' or 'demo-draw'); ignored for any other dataset."""

    image_size: int = doc(32, "side of the demo corpus images, pixels (multiple of data.patch_size)")
    train_examples: int = doc(6000, "examples in the generated demo train split")
    eval_examples: int = doc(300, "examples in the generated demo eval split (disjoint draws)")
    seed: int = doc(0, "seed of the demo corpus generator")
    scored_examples: int = doc(64, "held-out examples greedily decoded and scored on the demo tasks at the end of "
                                   "`omni train` and by `omni eval`; 0 skips the scoring")


@dataclass
class MeshConfig:
    data: int = doc(-1, "data-parallel axis size; -1 means the devices left over")
    fsdp: int = doc(1, "fully-sharded data-parallel axis size (params sharded, batch split); -1 as above")
    tensor: int = doc(1, "tensor-parallel axis size (heads, MLP, vocab split); -1 as above")
    dcn_data: int = doc(1, "multislice: how many slices (or hosts, on devices without slices) the data axis spans "
                           "over the data-centre network; mesh.data is the total, mesh.data / dcn_data lies in one slice")
    dcn_fsdp: int = doc(1, "multislice: as dcn_data, for the fsdp axis")
    dcn_tensor: int = doc(1, "multislice: as dcn_data, for the tensor axis (rarely worth it: tensor traffic is heavy)")
    rules: list = doc(
        [
            ["batch", ["data", "fsdp"]],
            ["length", None],
            ["embed", "fsdp"],
            ["act_embed", None],
            ["heads", "tensor"],
            ["kv_heads", "tensor"],
            ["head_dim", None],
            ["mlp", "tensor"],
            ["vocab", "tensor"],
            ["patch", None],
            ["layers", None],
            ["modality", None],
        ],
        "logical axis -> mesh axes table; every parameter and main activation is named with these logical axes",
    )


@dataclass
class AblateConfig:
    variants: list = doc(["early", "late:1", "late:2", "cross"],
                         "fusion variants `omni ablate` trains: 'early', 'late:K' (K modality-specific layers), "
                         "'mot' (every layer modality-specific, global attention), 'cross'; the first one is the "
                         "reference that 'match' adjusts the others to")
    seeds: int = doc(1, "runs per variant, with train.seed, train.seed+1, ... (data order is the same for all)")
    match: Literal["none", "params", "flops", "both"] = doc(
        "none", "adjust each variant's width (model.d, SwiGLU size in proportion) to the reference's total "
                "parameters or training FLOPs per token; 'both' plans every other variant twice, once matched each "
                "way (labelled 'late:1 @flops', 'late:1 @params'); 'none' keeps the config's width for all")
    sweep: dict = doc({}, "scaling sweep: dotted config key -> list of values, e.g. {'model.d': [64, 96, 128, 192]} "
                          "(or --sweep model.d=64,96,128,192); every variant x seed is trained at each point (several "
                          "keys move together, i-th values at point i) and the report fits L = E + A*C^-alpha per "
                          "variant and modality")
    budget: Literal["fixed", "tokens_per_param"] = doc(
        "fixed", "training tokens of each run: 'fixed' = train.steps x batch x seq_len at every size; "
                 "'tokens_per_param' = ablate.tokens_per_param x the reference variant's parameters at that size "
                 "(rounded up to whole steps), the same for every variant at a size")
    tokens_per_param: float = doc(20.0, "with ablate.budget=tokens_per_param: training tokens per parameter "
                                        "(Chinchilla's compute-optimal rule is about 20)")
    task_examples: int = doc(64, "held-out examples each run generates and scores at its end (the task scores of "
                                 "`omni eval --generate`: exact, CER, ...) on datasets other than the demo corpora, "
                                 "which score demo.scored_examples per demo task; 0 skips")


@dataclass
class Config:
    name: str = doc("omni", "run name, shown in logs")
    compile_cache: str = doc("auto", "JAX's persistent compilation cache (train, eval, generate): 'auto' = "
                                     "<$OMNI_CACHE or ~/.cache/omni>/jax-compile, 'off', or a folder; the "
                                     "environment's OMNI_COMPILE_CACHE overrides it")
    model: ModelConfig = field(default_factory=ModelConfig, metadata={"doc": "the transformer"})
    data: DataConfig = field(default_factory=DataConfig, metadata={"doc": "the corpus and pipeline"})
    train: TrainConfig = field(default_factory=TrainConfig, metadata={"doc": "optimisation and loop"})
    mesh: MeshConfig = field(default_factory=MeshConfig, metadata={"doc": "device mesh and sharding rules"})
    demo: DemoConfig = field(default_factory=DemoConfig, metadata={"doc": "the generated demo corpus"})
    ablate: AblateConfig = field(default_factory=AblateConfig, metadata={"doc": "the plan of `omni ablate`"})


# ----------------------------------------------------------------------------------------------------------
# Loading, overriding, validating, saving.


# Keys a saved config.json may still hold from before they moved: read into their new place.
MOVED_KEYS = {"data.image_size": "demo.image_size", "data.train_examples": "demo.train_examples",
              "data.eval_examples": "demo.eval_examples", "data.corpus_seed": "demo.seed",
              "train.demo_eval_examples": "demo.scored_examples"}


def load_config(path) -> Config:
    """Reads a `configs/*.py` file (calls its `get_config()`) or a saved `config.json`, checked as `--set` is:
    every mistake is a ConfigError naming the file (and line, where there is one) and the key. `path` may be a
    gs:// URL (omni.storage), e.g. the config.json a run saved in its bucket workdir."""
    import omni.storage as storage

    try:
        path = storage.path(path)
    except storage.StorageError as e:
        raise ConfigError(f"--config: {e}") from None
    if not path.exists():
        raise ConfigError(f"config file {path} does not exist")
    if not path.is_file():
        raise ConfigError(f"config {path} is a directory; give a configs/*.py file or a saved config.json")
    if path.suffix not in (".py", ".json"):
        raise ConfigError(f"config {path} is neither a .py config file nor a saved config.json")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 (byte 0x{e.object[e.start]:02x} at offset {e.start})") from None
    if path.suffix == ".json":
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}:{e.lineno}: not valid JSON: {e.msg}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: a config.json holds one object of sections, not a {type(raw).__name__}")
        return from_dict(raw, source=str(path))
    try:
        code = compile(text, str(path), "exec")
    except SyntaxError as e:
        raise ConfigError(f"{path}:{e.lineno}: syntax error: {e.msg}") from None
    module = {"__name__": f"omni_config_{path.stem}", "__file__": str(path)}
    try:
        exec(code, module)  # noqa: S102 - a config file is the user's own Python, as in big_vision
        if "get_config" not in module:
            raise ConfigError(f"{path} defines no get_config(); a config file returns its Config from get_config()")
        config = module["get_config"]()
    except ConfigError:
        raise
    except Exception as e:  # noqa: BLE001 - any error of the user's file becomes one line naming it
        raise ConfigError(f"{_where_in(path, e)}: {type(e).__name__}: {e}") from None
    if not isinstance(config, Config):
        raise ConfigError(f"{path}: get_config() returned {type(config).__name__}, expected omni.config.Config")
    check_tree(config, path, text)
    return config


def _where_in(path, error: BaseException) -> str:
    """path:line of the innermost frame of `error` inside the config file."""
    line = None
    tb = error.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_filename == str(path):
            line = tb.tb_lineno
        tb = tb.tb_next
    return f"{path}:{line}" if line else str(path)


def check_tree(config: Config, path="config", text: str = "") -> None:
    """Checks a Config built in Python as overrides are checked: an attribute the schema lacks, a section replaced by
    a value, a wrong type or a value outside its Literal is a ConfigError naming the key, the file and, when the
    file assigns it on one line, that line."""
    def where(key: str) -> str:
        attr = key.rsplit(".", 1)[-1]
        for number, line in enumerate(text.splitlines(), 1):
            if re.search(rf"\.{re.escape(attr)}\s*=[^=]", line):
                return f"{path}:{number}"
        return str(path)

    def walk(node, prefix: str) -> None:
        fields = {f.name: f for f in dataclasses.fields(node)}
        for attr in vars(node):
            key = prefix + attr
            if attr not in fields:
                raise ConfigError(f"{where(key)}: unknown config key '{key}'.{_suggestion(key, prefix, fields)}")
        for name, f in fields.items():
            key, value = prefix + name, getattr(node, name)
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            if dataclasses.is_dataclass(default):
                if type(value) is not type(default):
                    raise ConfigError(f"{where(key)}: config key '{key}' is a section ({type(default).__name__}), "
                                      f"got {value!r}")
                walk(value, key + ".")
                continue
            try:
                setattr(node, name, _coerce(key, value, _hints(type(node))[name], ""))
            except ConfigError as e:
                raise ConfigError(f"{where(key)}: {e}") from None

    walk(config, "")
    try:
        validate(config)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


def to_dict(config: Config) -> dict:
    return dataclasses.asdict(config)


def from_dict(raw: dict, source: str = "dict") -> Config:
    config = Config()
    for key, value in _flatten(raw):
        set_value(config, MOVED_KEYS.get(key, key), value, source=source)
    validate(config)
    return config


def _flatten(raw: dict, prefix: str = ""):
    for key, value in raw.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and not _is_dict_field(dotted):
            yield from _flatten(value, dotted + ".")
        else:
            yield dotted, value


def _is_dict_field(dotted: str) -> bool:
    """Whether `dotted` is a config field holding a dict (ablate.sweep), not a section to descend into."""
    try:
        node, f = _resolve(Config(), dotted)
    except ConfigError:
        return False
    return _hints(type(node))[f.name] is dict


def save_config(config: Config, path) -> None:
    import omni.storage as storage

    storage.write_text(path, json.dumps(to_dict(config), indent=2) + "\n")


def all_keys(config: Config | None = None) -> list[str]:
    """Every dotted key of the schema, in order."""
    keys = []
    node = config or Config()
    for f in dataclasses.fields(node):
        value = getattr(node, f.name)
        if dataclasses.is_dataclass(value):
            keys += [f"{f.name}.{k}" for k in all_keys(value)]
        else:
            keys.append(f.name)
    return keys


def get_key(tree: dict, dotted: str):
    """The value at a dotted key of a config dict (to_dict form); None where the dict lacks it."""
    for part in dotted.split("."):
        tree = tree.get(part) if isinstance(tree, dict) else None
    return tree


# Keys that say how a command runs on this machine, not what a run computes: a run resumed or re-planned with
# another value of them (or saved before they existed) is the same run.
MACHINE_KEYS = ("compile_cache",)


def changed_keys(before: dict, after: dict) -> list[str]:
    """Dotted keys whose values differ between two config dicts (to_dict form), MACHINE_KEYS left out."""
    return [k for k in all_keys() if k not in MACHINE_KEYS and get_key(before, k) != get_key(after, k)]


def describe() -> str:
    """The schema as text: key, type, default, doc."""
    lines = []
    for key in all_keys():
        node, f = _resolve(Config(), key)
        lines.append(f"{key:28s} {_type_name(_hints(type(node))[f.name]):28s} "
                     f"default={getattr(node, f.name)!r:14}  {f.metadata.get('doc', '')}")
    return "\n".join(lines)


def apply_overrides(config: Config, overrides: list[str]) -> Config:
    """Applies `key=value` strings (the CLI's `--set`), then validates the whole config."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value (for example train.steps=200)")
        key, text = item.split("=", 1)
        set_value(config, key.strip(), parse_value(text.strip()), source="--set")
    validate(config)
    return config


def parse_value(text: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text  # bare words are strings: model.remat=full


@typing.no_type_check
def _hints(cls) -> dict:
    return typing.get_type_hints(cls)


def _resolve(config: Config, key: str):
    """Returns (the dataclass holding `key`, its field), or raises ConfigError naming what exists."""
    node = config
    parts = key.split(".")
    for depth, part in enumerate(parts):
        fields = {f.name: f for f in dataclasses.fields(node)}
        here = ".".join(parts[:depth])
        if part not in fields:
            valid = [f"{here}.{n}" if here else n for n in fields]
            hint = _suggestion(key, f"{here}." if here else "", fields)
            raise ConfigError(f"unknown config key '{key}'.{hint} Keys {'under ' + here if here else 'at the top'}: "
                              f"{', '.join(valid)}")
        value = getattr(node, part)
        if depth == len(parts) - 1:
            if dataclasses.is_dataclass(value):
                raise ConfigError(f"config key '{key}' is a section; set one of its fields, e.g. "
                                  f"'{key}.{dataclasses.fields(value)[0].name}'")
            return node, fields[part]
        if not dataclasses.is_dataclass(value):
            raise ConfigError(f"unknown config key '{key}': '{'.'.join(parts[:depth + 1])}' is a value, not a section")
        node = value
    raise AssertionError("unreachable")


def _suggestion(key: str, prefix: str, siblings) -> str:
    """" Did you mean 'x'?" for the closest key: among the misspelt part's siblings first, then anywhere."""
    if key in MOVED_KEYS:
        return f" It moved to '{MOVED_KEYS[key]}'."
    close = (difflib.get_close_matches(key, [prefix + name for name in siblings], n=1)
             or difflib.get_close_matches(key, all_keys(), n=1))
    return f" Did you mean '{close[0]}'?" if close else ""


def set_value(config: Config, key: str, value: Any, source: str = "") -> None:
    node, f = _resolve(config, key)
    expected = _hints(type(node))[f.name]
    setattr(node, f.name, _coerce(key, value, expected, source))


def _type_name(tp) -> str:
    if typing.get_origin(tp) is Literal:
        return "one of " + "|".join(map(str, typing.get_args(tp)))
    return getattr(tp, "__name__", str(tp))


def _coerce(key: str, value: Any, expected, source: str) -> Any:
    where = f" (from {source})" if source else ""
    if typing.get_origin(expected) is Literal:
        allowed = typing.get_args(expected)
        if value not in allowed:
            raise ConfigError(f"bad value {value!r} for '{key}'{where}; allowed values: {', '.join(map(repr, allowed))}")
        return value
    if expected is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        raise ConfigError(f"bad value {value!r} for '{key}'{where}; expected true or false")
    if expected is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"bad value {value!r} for '{key}'{where}; expected an integer")
        return value
    if expected is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"bad value {value!r} for '{key}'{where}; expected a number")
        return float(value)
    if expected is str:
        if not isinstance(value, str):
            raise ConfigError(f"bad value {value!r} for '{key}'{where}; expected a string")
        return value
    if expected is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"bad value {value!r} for '{key}'{where}; expected a list")
        return [list(v) if isinstance(v, tuple) else v for v in value]
    if expected is dict:
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            raise ConfigError(f"bad value {value!r} for '{key}'{where}; expected a dict with string keys")
        return dict(value)
    raise AssertionError(f"schema type {expected} of {key} is not handled")


def _check_train_numbers(t: TrainConfig) -> None:
    """The optimizer and checkpoint numbers that would train nonsense or lose checkpoints (NaN fails every check)."""
    if not (math.isfinite(t.lr) and t.lr > 0):
        raise ConfigError(f"'train.lr' must be a positive number, got {t.lr} (a negative rate climbs the loss; "
                          "to train nothing, list no parameters in 'train.trainable')")
    ranges = {"train.min_lr_ratio": (t.min_lr_ratio, 0, 1), "train.b1": (t.b1, 0, 1), "train.b2": (t.b2, 0, 1)}
    for key, (value, low, high) in ranges.items():
        if not low <= value <= high:
            raise ConfigError(f"'{key}' must be between {low} and {high}, got {value}")
    if not t.eps > 0:
        raise ConfigError(f"'train.eps' must be positive, got {t.eps}")
    at_least_zero = {"train.warmup_steps": t.warmup_steps, "train.weight_decay": t.weight_decay,
                     "train.clip_norm": t.clip_norm, "train.eval_every": t.eval_every,
                     "train.eval_batches": t.eval_batches, "train.checkpoint_every": t.checkpoint_every,
                     "train.checkpoint_minutes": t.checkpoint_minutes, "train.phase_timeout_s": t.phase_timeout_s}
    for key, value in at_least_zero.items():
        if not value >= 0:
            raise ConfigError(f"'{key}' must be >= 0, got {value}")
    if t.keep_checkpoints < 1:
        raise ConfigError(f"'train.keep_checkpoints' must be at least 1 (the last good checkpoint is always kept), "
                          f"got {t.keep_checkpoints}")


def notes(config: Config) -> list[str]:
    """What a valid config will do that its author may not expect: one line each, logged when a run starts."""
    t = config.train
    out = []
    if t.warmup_steps > t.steps:
        out.append(f"'train.warmup_steps' ({t.warmup_steps}) is more than 'train.steps' ({t.steps}): the learning "
                   f"rate rises to {t.steps / t.warmup_steps:.0%} of train.lr={t.lr:g} and never decays; lower "
                   "train.warmup_steps for a full schedule")
    return out


def validate(config: Config) -> None:
    """Checks the fields that must fit together; raises ConfigError naming them."""
    m, d, t = config.model, config.data, config.train
    positive = {"model.d": m.d, "model.layers": m.layers, "model.heads": m.heads, "model.kv_heads": m.kv_heads,
                "data.seq_len": d.seq_len, "data.patch_size": d.patch_size, "train.steps": t.steps,
                "train.batch_size": t.batch_size, "train.grad_accum": t.grad_accum, "train.log_every": t.log_every,
                "data.max_image_patches": d.max_image_patches, "model.max_segments": m.max_segments}
    for key, value in positive.items():
        if value <= 0:
            raise ConfigError(f"'{key}' must be positive, got {value}")
    _check_train_numbers(t)
    if not 0 <= d.row_patches <= d.seq_len:
        raise ConfigError(f"'data.row_patches' ({d.row_patches}) must be between 0 (= seq_len) and 'data.seq_len' "
                          f"({d.seq_len})")
    if d.row_patches and d.row_patches < min(d.max_image_patches, d.seq_len):
        raise ConfigError(f"'data.row_patches' ({d.row_patches}) is below 'data.max_image_patches' "
                          f"({d.max_image_patches}): an image of the full budget would fit no row; raise it or "
                          "lower data.max_image_patches")
    if not 0 <= m.late_layers <= m.layers:
        raise ConfigError(f"'model.late_layers' ({m.late_layers}) must be between 0 and 'model.layers' ({m.layers})")
    if m.late_layers and m.fusion != "late":
        raise ConfigError(f"'model.late_layers' is {m.late_layers} but 'model.fusion' is '{m.fusion}'; set "
                          "model.fusion=late or model.late_layers=0")
    if m.fusion == "cross" and (m.cross_every <= 0 or m.layers % m.cross_every or m.encoder_layers <= 0):
        raise ConfigError(f"cross fusion needs 'model.encoder_layers' > 0 and 'model.layers' ({m.layers}) to be a "
                          f"multiple of 'model.cross_every' ({m.cross_every})")
    for variant in config.ablate.variants:
        parse_variant(variant)
    if not config.ablate.variants or config.ablate.seeds <= 0:
        raise ConfigError("'ablate.variants' must name at least one variant and 'ablate.seeds' must be positive")
    if m.heads % m.kv_heads:
        raise ConfigError(f"'model.heads' ({m.heads}) must be a multiple of 'model.kv_heads' ({m.kv_heads})")
    if m.head_dim == 0 and m.d % m.heads:
        raise ConfigError(f"'model.d' ({m.d}) must divide by 'model.heads' ({m.heads}), or set 'model.head_dim'")
    if m.head_dim % 2 or (m.head_dim == 0 and (m.d // m.heads) % 2):
        raise ConfigError("the head dimension must be even for RoPE; change 'model.d', 'model.heads' or 'model.head_dim'")
    if config.demo.image_size % d.patch_size:
        raise ConfigError(f"'demo.image_size' ({config.demo.image_size}) must be a multiple of 'data.patch_size' "
                          f"({d.patch_size})")
    if d.shards < 0 or (d.shards and t.batch_size % d.shards):
        raise ConfigError(f"'data.shards' ({d.shards}) must be 0 or divide 'train.batch_size' ({t.batch_size})")
    if t.loss_chunk < 0:
        raise ConfigError(f"'train.loss_chunk' must be >= 0 (0: unfused), got {t.loss_chunk}")
    if d.num_workers < 0 or d.worker_threads < 0 or d.prefetch < 0:
        raise ConfigError("'data.num_workers', 'data.worker_threads' and 'data.prefetch' must be >= 0")
    if t.profile_steps:
        profile_range(t.profile_steps)
    if t.batch_size % t.grad_accum:
        raise ConfigError(f"'train.batch_size' ({t.batch_size}) must divide by 'train.grad_accum' ({t.grad_accum})")
    for key in ("data", "fsdp", "tensor"):
        size = getattr(config.mesh, key)
        if size == 0 or size < -1:
            raise ConfigError(f"'mesh.{key}' must be a positive size or -1 (the devices left over), got {size}")
    for key in ("dcn_data", "dcn_fsdp", "dcn_tensor"):
        if getattr(config.mesh, key) < 1:
            raise ConfigError(f"'mesh.{key}' must be >= 1, got {getattr(config.mesh, key)}")
    if sum(getattr(config.mesh, k) == -1 for k in ("data", "fsdp", "tensor")) > 1:
        raise ConfigError("at most one of 'mesh.data', 'mesh.fsdp', 'mesh.tensor' may be -1")
    for rule in config.mesh.rules:
        if not (isinstance(rule, (list, tuple)) and len(rule) == 2 and isinstance(rule[0], str)):
            raise ConfigError(f"'mesh.rules' entry {rule!r} is not [logical_axis, mesh_axes]")
        axes = rule[1] if isinstance(rule[1], (list, tuple)) else [rule[1]]
        for axis in axes:
            if axis not in (None, "data", "fsdp", "tensor"):
                raise ConfigError(f"'mesh.rules' maps '{rule[0]}' to unknown mesh axis {axis!r}; "
                                  "mesh axes are 'data', 'fsdp', 'tensor' (or None)")


def parse_variant(variant) -> tuple[str, int]:
    """'early' -> ("early", 0); 'late:2' -> ("late", 2); 'mot' -> ("mot", 0); 'cross' -> ("cross", 0).
    Raises ConfigError otherwise."""
    text = str(variant)
    fusion, _, k = text.partition(":")
    if fusion in ("early", "mot", "cross") and not k:
        return fusion, 0
    if fusion == "late" and k.isdigit():
        return fusion, int(k)
    raise ConfigError(f"'ablate.variants' entry {variant!r} is not 'early', 'late:K' (K an integer), 'mot' or 'cross'")


def profile_range(text: str) -> tuple[int, int] | None:
    """train.profile_steps 'START:STOP' -> (START, STOP), steps START..STOP-1; '' -> None."""
    if not text:
        return None
    try:
        start, stop = (int(x) for x in str(text).split(":"))
    except ValueError:
        raise ConfigError(f"'train.profile_steps' = {text!r} is not START:STOP (e.g. 10:13 traces steps 10, 11 "
                          "and 12)") from None
    if not 1 <= start < stop:
        raise ConfigError(f"'train.profile_steps' = {text!r}: need 1 <= START < STOP (steps are numbered from 1)")
    return start, stop


def derived_head_dim(m: ModelConfig) -> int:
    return m.head_dim or m.d // m.heads


def derived_mlp(m: ModelConfig) -> int:
    return m.mlp or max(64, int(round(8 * m.d / 3 / 64)) * 64)
