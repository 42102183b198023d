"""Lying and damaged weight files: every safetensors file omni opens from a user is checked before it is trusted.

Each case puts one lie into a tiny Llama folder (written here with numpy, safetensors and tokenizers: no torch) and
starts `omni train --set model.init_from=FOLDER` in process: exit code 2 and one line `omni: error: ...` naming
the file and the tensor, never a traceback (omni.train.safetensors_file, omni.train.init_from). The same reader
reads `omni export` folders (omni.train.artifact.read_safetensors), and `omni ablate` checks every run's
init_from before the first one trains. A hypothesis test then lies at random.
"""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from flax import nnx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.numpy import save_file

from omni import cli, tokens
from omni import config as config_lib
from omni.errors import ExportError, InitFromError, OmniError
from omni.train import artifact, init_from, safetensors_file
from omni.train.step import build_model
from tests.conftest import tiny_config

ROOT = Path(__file__).resolve().parents[1]
WORDS = ["[UNK]"] + "a red circle on blue square the quick brown fox jumps over lazy dog".split()
D, LAYERS, HEADS, KV, HEAD_DIM, MLP = 32, 2, 4, 2, 8, 64  # tiny_config's model


def hf_shapes(vocab: int = len(WORDS), layers: int = LAYERS) -> dict[str, tuple]:
    shapes = {"model.embed_tokens.weight": (vocab, D)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes.update({p + "input_layernorm.weight": (D,), p + "self_attn.q_proj.weight": (HEADS * HEAD_DIM, D),
                       p + "self_attn.k_proj.weight": (KV * HEAD_DIM, D),
                       p + "self_attn.v_proj.weight": (KV * HEAD_DIM, D),
                       p + "self_attn.o_proj.weight": (D, HEADS * HEAD_DIM),
                       p + "post_attention_layernorm.weight": (D,), p + "mlp.gate_proj.weight": (MLP, D),
                       p + "mlp.up_proj.weight": (MLP, D), p + "mlp.down_proj.weight": (D, MLP)})
    shapes.update({"model.norm.weight": (D,), "lm_head.weight": (vocab, D)})
    return shapes


def llama_config(**changes) -> dict:
    config = dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=D, intermediate_size=MLP,
                  num_hidden_layers=LAYERS, num_attention_heads=HEADS, num_key_value_heads=KV, head_dim=HEAD_DIM,
                  rms_norm_eps=1e-6, rope_theta=10_000.0, vocab_size=len(WORDS), tie_word_embeddings=False)
    config.update(changes)
    return config


def llama_folder(folder: Path, words=WORDS) -> Path:
    """A tiny Llama folder that init_from accepts for tiny_config's model: config.json, model.safetensors and a
    word-level tokenizer.json."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(words)}, unk_token=words[0]))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "config.json").write_text(json.dumps(llama_config(vocab_size=len(words))))
    rng = np.random.default_rng(0)
    save_file({name: rng.normal(0, 0.02, shape).astype(np.float32) for name, shape in hf_shapes(len(words)).items()},
              str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> Path:
    return llama_folder(tmp_path_factory.mktemp("hostile") / "good")


@pytest.fixture
def folder(good, tmp_path) -> Path:
    """A fresh copy of the good folder to lie in."""
    return Path(shutil.copytree(good, tmp_path / "llama"))


def header_of(file: Path) -> tuple[dict, bytes]:
    raw = file.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def write_raw(file: Path, header, data: bytes, length: int | None = None) -> None:
    """A safetensors file as given: header (a dict, or bytes as they are), data, and the length field."""
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    file.write_bytes((len(text) if length is None else length).to_bytes(8, "little") + text + data)


def omni_error(capsys, folder: Path, tmp_path: Path) -> str:
    """`omni train --set model.init_from=folder`: exit code 2, one `omni: error:` line and no traceback."""
    code = cli.main(["train", "--config", str(ROOT / "configs" / "demo.py"), "--workdir", str(tmp_path / "run"),
                     "--no-progress", "--set", f"model.init_from={folder}"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("omni: error: "), err
    return lines[0]


def abstract(**model):
    cfg = tiny_config()
    for key, value in model.items():
        setattr(cfg.model, key, value)
    return cfg, artifact.abstract_model(cfg, tokens.Vocab(text_size=len(WORDS), codebook_sizes=(8, 8)))[1]


def checked(folder: Path):
    """init_from.check of `folder` for tiny_config's model (headers and sizes, nothing allocated)."""
    cfg, params = abstract()
    cfg.model.init_from = str(folder)
    init_from.check(cfg, params)


# ----------------------------------------------------------------------------------------------------------
# One lie at a time, through the command.

FIRST = "model.embed_tokens.weight"
NORM0, NORM1 = "model.layers.0.input_layernorm.weight", "model.layers.0.post_attention_layernorm.weight"


def _lie(kind: str, file: Path) -> None:
    header, data = header_of(file)
    if kind == "header length 2^60":
        write_raw(file, header, data, length=2**60)
    elif kind == "header length 100 MB":
        write_raw(file, header, data, length=100_000_001)
    elif kind == "header length past the end":
        write_raw(file, header, data, length=len(json.dumps(header)) + len(data) + 1)
    elif kind == "truncated":
        file.write_bytes(file.read_bytes()[:-100])
    elif kind == "shorter than 8 bytes":
        file.write_bytes(b"\x01\x02")
    elif kind == "not JSON":
        write_raw(file, b"{not json at all", data)
    elif kind == "wrong shape":
        header[NORM0]["shape"] = [3, 3]
        write_raw(file, header, data)
    elif kind == "shape not integers":
        header[NORM0]["shape"] = [32.0]
        write_raw(file, header, data)
    elif kind == "unknown dtype":
        header[NORM0]["dtype"] = "F99"
        write_raw(file, header, data)
    elif kind == "wrong dtype size":
        header[NORM0]["dtype"] = "F16"
        write_raw(file, header, data)
    elif kind == "offsets out of range":
        last = max((n for n in header if n != "__metadata__"), key=lambda n: header[n]["data_offsets"][0])
        begin, end = header[last]["data_offsets"]
        header[last]["data_offsets"] = [begin + 64, end + 64]
        write_raw(file, header, data)
    elif kind == "offsets overlap":
        header[NORM1]["data_offsets"] = header[NORM0]["data_offsets"]
        write_raw(file, header, data)
    elif kind == "bytes after the last tensor":
        write_raw(file, header, data + b"\0" * 8)
    else:
        raise AssertionError(kind)


LIES = {  # the lie -> what the one line says (after 'omni: error: <file>: ')
    "header length 2^60": r"its header length says 1,152,921,504,606,846,976 bytes, beyond the 100,000,000-byte "
                          r"\(100 MB\) limit of safetensors headers",
    "header length 100 MB": r"its header length says 100,000,001 bytes, beyond the 100,000,000-byte \(100 MB\) limit",
    "header length past the end": r"truncated: its header length says [\d,]+ bytes but the file has only [\d,]+ after it",
    "truncated": r"tensor '[^']+' has data_offsets \[\d+, \d+\] but the data area holds only [\d,]+ bytes: the file is "
                 r"truncated or its header lies",
    "shorter than 8 bytes": r"not a safetensors file: 2 bytes, less than the 8-byte header length",
    "not JSON": r"its header is not valid JSON",
    "wrong shape": rf"tensor '{NORM0}' is F32 \[3, 3\], 36 bytes, but its data_offsets \[\d+, \d+\] span 128",
    "shape not integers": rf"tensor '{NORM0}' has shape \[32.0\]; a shape is a list of non-negative integers",
    "unknown dtype": rf"tensor '{NORM0}' has dtype 'F99', not one of BOOL, U8, ",
    "wrong dtype size": rf"tensor '{NORM0}' is F16 \[32\], 64 bytes, but its data_offsets \[\d+, \d+\] span 128",
    "offsets out of range": r"tensor '[^']+' has data_offsets \[\d+, \d+\] but the data area holds only [\d,]+ bytes",
    "offsets overlap": rf"tensors '[^']+' and '[^']+' overlap",
    "bytes after the last tensor": r"8 bytes of the data area after tensor '[^']+' belong to no tensor",
}


@pytest.mark.parametrize("kind", list(LIES))
def test_a_lying_safetensors_file_is_one_line_naming_file_and_tensor(kind, folder, tmp_path, capsys):
    _lie(kind, folder / "model.safetensors")
    line = omni_error(capsys, folder, tmp_path)
    assert line.startswith(f"omni: error: {folder / 'model.safetensors'}: "), line
    assert pytest.importorskip("re").search(LIES[kind], line), line
    if kind not in ("header length past the end", "shorter than 8 bytes") and "tensor" in LIES[kind]:
        assert "download or export it again" in line


def _index(folder: Path, weight_map, shards: bool = True) -> None:
    """model.safetensors split into two shards and an index with `weight_map` (None: the true one)."""
    tensors = artifact.read_safetensors(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    names = list(tensors)
    true_map = {}
    for i, part in enumerate((names[:10], names[10:]), 1):
        file = f"model-0000{i}-of-00002.safetensors"
        if shards:
            save_file({n: tensors[n] for n in part}, str(folder / file))
        true_map.update({n: file for n in part})
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": true_map if weight_map is None else weight_map(true_map)}))


INDEX_LIES = {
    "weight_map a list": (lambda m: list(m.items()),
                          r"\"weight_map\" must be a non-empty object of tensor name -> file name, got \[\["),
    "weight_map names a missing file": (lambda m: dict(m, **{FIRST: "model-00003-of-00002.safetensors"}),
                                        r"names model-00003-of-00002.safetensors, which is missing from "),
    "a file outside the folder": (lambda m: dict(m, **{FIRST: "../good/model.safetensors"}),
                                  rf"puts tensor '{FIRST}' in '../good/model.safetensors', not the name of a file in"),
    "a tensor its file lacks": (lambda m: dict(m, **{FIRST: "model-00002-of-00002.safetensors"}),
                                rf"puts tensor '{FIRST}' in model-00002-of-00002.safetensors, which has no such tensor"),
    "a file name that is a number": (lambda m: dict(m, **{FIRST: 3}), rf"puts tensor '{FIRST}' in 3, not the name"),
}


@pytest.mark.parametrize("kind", list(INDEX_LIES))
def test_a_lying_index_is_one_line(kind, folder, tmp_path, capsys):
    change, message = INDEX_LIES[kind]
    _index(folder, change)
    line = omni_error(capsys, folder, tmp_path)
    assert f"{folder / 'model.safetensors.index.json'}" in line
    assert pytest.importorskip("re").search(message, line), line


def test_a_true_index_loads_every_tensor_from_its_shard(folder):
    want = artifact.read_safetensors(folder / "model.safetensors")
    _index(folder, None)
    source = init_from.read_source(folder)
    assert source.tensors.names == set(want)
    for name in (FIRST, "lm_head.weight", NORM1):
        np.testing.assert_array_equal(source.tensors.read(name), want[name])


def test_a_lying_shard_is_named(folder, tmp_path, capsys):
    _index(folder, None)
    shard = folder / "model-00002-of-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[:-4])
    line = omni_error(capsys, folder, tmp_path)
    assert f"omni: error: {shard}: tensor '" in line and "truncated" in line


CONFIG_LIES = {
    "hidden_size null": (dict(hidden_size=None), r"config.json: hidden_size must be a positive integer, got null"),
    "hidden_size missing": ("hidden_size", r"config.json: hidden_size must be a positive integer, got missing"),
    "layers a string": (dict(num_hidden_layers="2"), r"num_hidden_layers must be a positive integer, got \"2\""),
    "heads zero": (dict(num_attention_heads=0), r"num_attention_heads must be a positive integer, got 0"),
    "eps negative": (dict(rms_norm_eps=-1), r"rms_norm_eps must be a positive number, got -1"),
    "tie a string": (dict(tie_word_embeddings="no"), r"tie_word_embeddings must be true or false, got \"no\""),
    "rope_parameters a list": (dict(rope_parameters=[1]), r"rope_parameters must be an object, got \[1\]"),
    "kv heads do not divide": (dict(num_key_value_heads=3), r"num_attention_heads 4 is not a multiple of "
                                                            r"num_key_value_heads 3"),
}


@pytest.mark.parametrize("kind", list(CONFIG_LIES))
def test_a_lying_config_json_names_the_field(kind, folder, tmp_path, capsys):
    change, message = CONFIG_LIES[kind]
    config = llama_config()
    if isinstance(change, str):
        del config[change]
    else:
        config.update(change)
    (folder / "config.json").write_text(json.dumps(config))
    line = omni_error(capsys, folder, tmp_path)
    assert line.startswith(f"omni: error: {folder / 'config.json'}: "), line
    assert pytest.importorskip("re").search(message, line), line


def test_an_export_tokenizer_without_its_omni_block_is_not_a_text_tokenizer(tmp_path):
    """docs/hf.md: an omni export's tokenizer.json covers omni's whole vocabulary and is never taken as the text
    tokenizer, also when the config.json lost its "omni" block (so it reads as a plain Llama)."""
    specials = [tokens.SPECIAL_NAMES.get(i, f"<special_{i}>") for i in range(tokens.NUM_SPECIAL)]
    folder = llama_folder(tmp_path / "export-like", words=specials + WORDS)
    cfg = tiny_config()
    cfg.model.init_from = str(folder)
    assert init_from.read_source(folder).kind == "Hugging Face Llama"
    assert init_from.with_source_tokenizer(cfg).data.tokenizer == ""  # the dataset's, not the export's
    plain = llama_folder(tmp_path / "plain")
    cfg.model.init_from = str(plain)
    assert init_from.with_source_tokenizer(cfg).data.tokenizer == str(plain)


def test_a_whole_int_tensor_is_refused_by_name(folder):
    tensors = artifact.read_safetensors(folder / "model.safetensors")
    tensors[NORM0] = np.zeros(D, np.int32)
    save_file(tensors, str(folder / "model.safetensors"))
    with pytest.raises(InitFromError, match=rf"tensor '{NORM0}' in .*model.safetensors is int32, not floating point"):
        checked(folder)


def test_the_good_folder_passes_and_loads(good):
    checked(good)
    cfg, params = abstract()
    cfg.model.init_from = str(good)
    text = __import__("omni.data.text_tokenizer", fromlist=["load_tokenizer"]).load_tokenizer(str(good))
    loaded = init_from.load(cfg, tokens.Vocab(text_size=text.vocab_size, codebook_sizes=(8, 8)), text, params)
    assert loaded.counts["text"] == (len(WORDS), len(WORDS))


# ----------------------------------------------------------------------------------------------------------
# The same reader for exports and single files.


def test_read_safetensors_reads_what_safetensors_writes(tmp_path):
    import ml_dtypes

    arrays = {"a": np.arange(6, dtype=np.float32).reshape(2, 3).astype(ml_dtypes.bfloat16),
              "empty": np.zeros((0, 3), np.float16), "scalar": np.array(3.5, np.float64),
              "flags": np.array([True, False]), "ids": np.arange(5, dtype=np.int64)}
    save_file(arrays, str(tmp_path / "x.safetensors"))
    got = artifact.read_safetensors(tmp_path / "x.safetensors")
    assert set(got) == set(arrays)
    for name, x in arrays.items():
        assert got[name].dtype == x.dtype and got[name].shape == x.shape and got[name].flags.writeable
        np.testing.assert_array_equal(got[name], x)


def test_an_export_with_a_lying_weights_file_is_an_export_error(tmp_path):
    file = tmp_path / "model.safetensors"
    write_raw(file, {"embed": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}}, b"\0" * 8)
    with pytest.raises(ExportError, match=rf"{file}: tensor 'embed' has data_offsets \[0, 16\] but the data area "
                                          rf"holds only 8 bytes"):
        artifact.read_safetensors(file)
    write_raw(file, {"__metadata__": {"format": 1}}, b"")
    with pytest.raises(ExportError, match=r"__metadata__ must map strings to strings"):
        artifact.read_safetensors(file)
    write_raw(file, b'{"a": {"dtype": "F32", "shape": [], "data_offsets": [0, 4]}, "a": {}}', b"\0" * 4)
    with pytest.raises(ExportError, match=r"its header names 'a' twice"):
        artifact.read_safetensors(file)


def test_the_header_cap_is_safetensors_own():
    assert safetensors_file.MAX_HEADER_BYTES == 100_000_000


def test_a_lying_patch_projection_is_named(folder, tmp_path, capsys):
    write_raw(folder / "patch_projection.safetensors", {"weight": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 0]}},
              b"")
    line = omni_error(capsys, folder, tmp_path)
    assert f"{folder / 'patch_projection.safetensors'}: tensor 'weight' has shape [-1]" in line


# ----------------------------------------------------------------------------------------------------------
# omni ablate: every run's init_from before the first trains.


def test_ablate_sweeping_init_from_checks_every_folder_before_training(good, folder, tmp_path, capsys):
    _lie("truncated", folder / "model.safetensors")
    cfg = tiny_config()
    cfg.ablate.variants = ["early"]
    config_lib.save_config(cfg, tmp_path / "ablate.json")
    workdir = tmp_path / "ablate"
    code = cli.main(["ablate", "--config", str(tmp_path / "ablate.json"), "--workdir", str(workdir), "--seeds", "1",
                     "--no-progress", "--sweep", f"model.init_from={good},{folder}"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err, err
    line = err.strip()
    assert "\n" not in line and line.startswith("omni: error: ablate.sweep point init_from="), line
    assert f"{folder / 'model.safetensors'}: tensor '" in line and "truncated" in line
    assert not (workdir / "runs").exists()  # nothing trained: the good folder's run did not start first


def test_ablate_refuses_init_from_for_a_late_variant_up_front(good, tmp_path, capsys):
    cfg = tiny_config()
    cfg.ablate.variants = ["early", "late:1"]
    cfg.model.init_from = str(good)
    config_lib.save_config(cfg, tmp_path / "ablate.json")
    code = cli.main(["ablate", "--config", str(tmp_path / "ablate.json"), "--workdir", str(tmp_path / "a"),
                     "--seeds", "1", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err, err
    assert "run late1-s0: model.init_from starts early-fusion models only" in err


# ----------------------------------------------------------------------------------------------------------
# Random lies: init_from works or raises an OmniError, nothing else.

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-3, 2**65) | st.floats() | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=6)
CONFIG_KEYS = list(llama_config()) + ["rope_parameters", "rope_scaling", "omni", "export", "hidden_act"]
ENTRY_KEYS = ["dtype", "shape", "data_offsets"]


@st.composite
def lying_folders(draw):
    """What to do to the good folder, drawn: an index (true or lying), config.json fields, header entries (random
    values or plausible ones a little off), bytes overwritten, the file cut short."""
    edits = []
    if draw(st.integers(0, 3)) == 0:
        edits.append(("index", draw(st.just("true") | json_values), None, None))
    for _ in range(draw(st.integers(0, 2))):
        edits.append(("config", draw(st.sampled_from(CONFIG_KEYS)),
                      draw(st.none() | json_values | st.integers(1, 64) | st.just("missing")), None))
    for _ in range(draw(st.integers(0, 2))):
        edits.append(("entry", draw(st.sampled_from(sorted(hf_shapes())) | st.text(max_size=4)),
                      draw(st.sampled_from(ENTRY_KEYS + ["whole"])),
                      draw(st.just("plausible") | json_values | st.integers(0, 300))))
    if draw(st.booleans()):
        edits.append(("bytes", draw(st.integers(0, 2**16)), draw(st.binary(min_size=1, max_size=8)), None))
    if draw(st.integers(0, 4)) == 0:
        edits.append(("cut", draw(st.integers(0, 2**16)), None, None))
    return edits


def _apply(folder: Path, edits: list) -> None:
    config = llama_config()
    file = folder / "model.safetensors"
    for kind, a, b, c in edits:
        if kind == "index":
            if a == "true":
                _index(folder, None)
                file = folder / "model-00001-of-00002.safetensors"
            else:
                (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": a}))
        elif kind == "config":
            if b == "missing":
                config.pop(a, None)
            else:
                config[a] = b
        elif kind == "entry" and file.is_file():
            header, data = header_of(file)
            if b == "whole":
                header[a] = c
            else:
                entry = header[a] if isinstance(header.get(a), dict) else {}
                entry[b] = _plausible(b, entry) if c == "plausible" else c
                header[a] = entry
            write_raw(file, header, data)
        elif kind in ("bytes", "cut") and file.is_file():
            raw = bytearray(file.read_bytes())
            at = a % len(raw)
            raw = raw[:at] if kind == "cut" else raw[:at] + b + raw[at + len(b):]
            file.write_bytes(bytes(raw))
    (folder / "config.json").write_text(json.dumps(config))


def _plausible(key: str, entry: dict):
    """The right kind of value for a header field, a little off."""
    if key == "dtype":
        return "F16" if entry.get("dtype") == "F32" else "BF16"
    if key == "shape":
        shape = entry.get("shape")
        return (list(shape)[::-1] if isinstance(shape, list) else []) + [1]
    offsets = entry.get("data_offsets")
    return [offsets[0], offsets[1] + 4] if isinstance(offsets, list) and len(offsets) == 2 else [0, 4]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.too_slow])
@given(edits=lying_folders())
def test_random_lying_folders_load_or_raise_an_omni_error(good, tmp_path_factory, edits):
    folder = Path(shutil.copytree(good, tmp_path_factory.mktemp("fuzz") / "llama"))
    _apply(folder, edits)
    cfg, params = abstract()
    cfg.model.init_from = str(folder)
    try:
        cfg = init_from.with_source_tokenizer(cfg, log=lambda *_: None)
        init_from.check(cfg, params)
        source = init_from.read_source(folder)
        for name in sorted(source.tensors.names)[:3]:
            source.tensors.read(name)
    except OmniError as e:
        assert "\n" not in str(e) and str(e)
