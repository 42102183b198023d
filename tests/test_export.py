"""omni.tools.export: a checkpoint -> safetensors + config + tokenizer + codec, read back by numpy alone and by omni."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

from omni.model import tensor_names
from omni.train import artifact
from omni import config as config_lib
from omni import sharding, storage
from omni.data import pipeline as data
from omni.data.codec import MelRVQCodec, PrecomputedCodec, ToneCodec, codec_identity
from omni.errors import ExportError
from omni.tokens import Vocab
from omni.tools import export
from omni.train import checkpoint, loop
from omni.train.step import build_model, build_optimizer, init_state
from tests.conftest import tiny_config

STEPS, EVERY = 4, 2


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny scanned model trained 4 steps, checkpoints at steps 2 and 4; and exports of step 4 in two dtypes."""
    root = tmp_path_factory.mktemp("export")
    cfg = tiny_config()
    cfg.train.steps, cfg.train.checkpoint_every, cfg.train.eval_batches = STEPS, EVERY, 1
    loop.train(cfg, root / "run", progress=False)
    exports = {dtype: export.export(root / "run", root / f"out-{dtype}", dtype=dtype)
               for dtype in ("float32", "bfloat16", "float16")}
    return cfg, root, exports


@pytest.fixture(scope="module")
def trainer(run):
    """What the trainer builds before it resumes: graphdef, the state's abstract shapes + shardings, the mesh."""
    cfg = run[0]
    mesh = sharding.make_mesh(cfg.mesh)
    tx, _ = build_optimizer(cfg)
    graphdef, state, _ = init_state(cfg, mesh, tx, data.vocab_for(cfg))
    return graphdef, checkpoint.abstract_like(state), mesh


def reference_params(run, trainer, step):
    """The checkpoint's params restored the way the trainer resumes (onto the train state's shardings)."""
    cfg, root, _ = run
    manager = checkpoint.make_manager(root / "run", cfg.train)
    restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(trainer[1])))
    manager.close()
    return restored["state"]["params"]


def names_of_scanned(params) -> dict:
    """{export name: numpy array} written out by hand from a scanned param tree (the documented scheme)."""
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(jax.device_get(params))[0]:
        keys = [str(p.key) for p in path]
        if keys[0] == "blocks":
            for i in range(leaf.shape[0]):
                out[".".join(["blocks", str(i)] + keys[1:])] = np.asarray(leaf[i])
        else:
            out[".".join(keys)] = np.asarray(leaf)
    return out


_forwards = {}  # id(graphdef) -> its jitted forward, so a graphdef used twice is compiled once


def logits_of(graphdef, params, batch, mesh=None, rules=None):
    if id(graphdef) not in _forwards:
        _forwards[id(graphdef)] = (graphdef, jax.jit(lambda p, b: nnx.merge(graphdef, p)(b)))
    forward = _forwards[id(graphdef)][1]
    if mesh is None:
        return np.asarray(forward(params, {k: jnp.asarray(v) for k, v in batch.items()}))
    with sharding.activate(mesh, rules):
        return np.asarray(forward(params, sharding.global_batch(batch, mesh, rules)))


# ------------------------------------------------------------------------------------------- plain readers

BLOCK_FRAMEWORKS = """
import sys
class Blocked:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {"jax", "jaxlib", "flax", "orbax", "omni", "tensorflow", "torch", "ml_dtypes"}:
            raise ImportError("blocked: " + name)
sys.meta_path.insert(0, Blocked())
"""

PLAIN_READER = BLOCK_FRAMEWORKS + """
import json, os, re
import numpy as np
from safetensors import safe_open
from safetensors.numpy import load_file
folders, npz = json.loads(sys.argv[1]), sys.argv[2]
result, arrays = {}, {}
for dtype, folder in folders.items():
    os.chdir(folder)
    snippet = re.search(r"```python\\n(.*?)```", open("README.md").read(), re.S).group(1)
    scope = {}
    exec(snippet, scope)  # the README's own numpy-only reader
    weights = scope["weights"]
    with safe_open("model.safetensors", framework="numpy") as f:
        stored = {name: f.get_slice(name).get_dtype() for name in f.keys()}
    if dtype != "bfloat16":  # safetensors' numpy loader reads F32 and F16 without help (BF16 needs ml_dtypes)
        direct = load_file("model.safetensors")
        assert set(direct) == set(weights) and all(np.array_equal(direct[k], weights[k]) for k in direct)
    result[dtype] = {"shapes": {k: list(v.shape) for k, v in weights.items()}, "stored": stored,
                     "loaded": sorted(m for m in sys.modules if m.split(".")[0] in ("jax", "flax", "omni"))}
    arrays.update({f"{dtype}/{k}": v for k, v in weights.items()})
np.savez(npz, **arrays)
print(json.dumps(result))
"""


def test_export_reads_back_with_numpy_and_safetensors_alone(run, trainer, tmp_path):
    cfg, root, exports = run
    npz = tmp_path / "read.npz"
    done = subprocess.run([sys.executable, "-c", PLAIN_READER, json.dumps({k: str(v) for k, v in exports.items()}),
                           str(npz)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    read = np.load(npz)
    want = names_of_scanned(reference_params(run, trainer, STEPS))
    for dtype, stored_type in (("float32", "F32"), ("bfloat16", "BF16"), ("float16", "F16")):
        assert result[dtype]["loaded"] == []
        assert result[dtype]["shapes"] == {k: list(v.shape) for k, v in want.items()}
        assert set(result[dtype]["stored"].values()) == {stored_type}
    for name, value in want.items():
        assert np.array_equal(read[f"float32/{name}"], value), name
        # bf16 keeps 8 significant bits: round-to-nearest is within half a unit in the last place, 2^-9 relative
        np.testing.assert_allclose(read[f"bfloat16/{name}"], value, rtol=2.0**-8, atol=1e-30, err_msg=name)
        assert np.array_equal(read[f"bfloat16/{name}"], value.astype(jnp.bfloat16).astype(np.float32)), name
        assert np.array_equal(read[f"float16/{name}"], value.astype(np.float16)), name


def test_config_json_names_the_step_vocab_and_every_tensor(run):
    cfg, _, exports = run
    saved = json.loads((exports["bfloat16"] / "config.json").read_text())
    info = saved.pop("export")
    assert saved["model"] == json.loads(json.dumps(cfg.model.__dict__))  # the config that trained it
    vocab = data.vocab_for(cfg)
    assert info["step"] == STEPS and info["dtype"] == "bfloat16" and info["format_version"] == export.FORMAT_VERSION
    assert info["vocab"]["size"] == vocab.size and info["vocab"]["text_offset"] == vocab.text_offset
    assert info["vocab"]["audio_offsets"] == [vocab.audio_offset(k) for k in range(2)]
    assert info["vocab"]["special_tokens"]["<boa>"] == 6 and info["vocab"]["special_tokens"]["<eos>"] == 2
    assert info["codec"] == codec_identity(ToneCodec()) and info["tokenizer"]["kind"] == "bytes"
    with open(exports["bfloat16"] / "model.safetensors", "rb") as f:
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    assert header.pop("__metadata__")["step"] == str(STEPS)
    assert info["tensors"] == {k: v["shape"] for k, v in header.items()}
    readme = (exports["bfloat16"] / "README.md").read_text()
    assert "| `blocks.{i}.attn.wq` | [d, N, H] = [32, 4, 8] |" in readme and f"step {STEPS}" in readme


# ------------------------------------------------------------------------------------------- back into omni

def test_reloaded_export_gives_the_checkpoint_logits(run, trainer):
    cfg, _, exports = run
    graphdef, _, mesh = trainer
    params = reference_params(run, trainer, STEPS)
    batch = data.eval_batches(cfg)[0]
    want = logits_of(graphdef, params, batch, mesh, cfg.mesh.rules)

    f32 = artifact.from_export(exports["float32"])
    np.testing.assert_allclose(logits_of(f32.graphdef, f32.params, batch), want, atol=1e-6, rtol=1e-6)
    _, model_params = nnx.split(f32.model(), nnx.Param)  # the ready module holds those same params
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(nnx.to_pure_dict(model_params)),
                                                    jax.tree.leaves(f32.params)))

    # bf16: exactly the logits of the checkpoint's params rounded to bf16 (nothing else is lost) ...
    bf16 = artifact.from_export(exports["bfloat16"])
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(bf16.params))  # back in the model's param_dtype
    rounded = jax.tree.map(lambda p: p.astype(jnp.bfloat16).astype(jnp.float32), params)
    got = logits_of(bf16.graphdef, bf16.params, batch)
    np.testing.assert_allclose(got, logits_of(graphdef, rounded, batch, mesh, cfg.mesh.rules), atol=1e-5, rtol=1e-5)
    # ... and close to the fp32 logits: each weight moves by at most 2^-9 (0.2%) relative and ~7 matmuls and
    # norms sit in series, so the logits may move by ~1.4% of their spread at worst (measured: 0.2%).
    assert np.abs(got - want).max() <= 0.014 * np.ptp(want)


def test_scanned_export_loads_into_an_unrolled_model(run):
    cfg, _, exports = run
    batch = data.eval_batches(cfg)[0]
    scanned = artifact.from_export(exports["float32"])
    unrolled = artifact.from_export(exports["float32"], scan_layers=False)
    assert not unrolled.config.model.scan_layers and sorted(unrolled.params["blocks"]) == [0, 1]
    np.testing.assert_allclose(logits_of(unrolled.graphdef, unrolled.params, batch),
                               logits_of(scanned.graphdef, scanned.params, batch), atol=1e-5, rtol=1e-5)


def test_tensor_names_do_not_depend_on_scan_layers():
    """Models initialised (with random numbers of their shapes, no training) with and without the layer scan."""
    cfg = tiny_config()
    vocab = Vocab(text_size=256, codebook_sizes=(64, 16))
    rng = np.random.default_rng(0)
    trees = {}
    for scan in (True, False):
        cfg.model.scan_layers = scan
        _, abstract = artifact.abstract_model(cfg, vocab)
        trees[scan] = jax.tree.map(lambda s: rng.normal(size=s.shape).astype(np.float32), abstract)
    scanned = tensor_names.tensors_from_params(trees[True], scan_layers=True)
    unrolled = tensor_names.tensors_from_params(trees[False], scan_layers=False)
    assert {k: v.shape for k, v in scanned.items()} == {k: v.shape for k, v in unrolled.items()}
    assert list(scanned) == list(unrolled) and "blocks.1.mlp.w_down" in scanned
    generic = {re.sub(r"^blocks\.\d+\.", "blocks.{i}.", name) for name in scanned}
    assert generic == set(tensor_names.TENSOR_DOCS)  # every tensor is documented, every documented name exists
    # the unrolled tree goes back into an unrolled model, values intact
    _, abstract = artifact.abstract_model(cfg, vocab)
    back = tensor_names.params_from_tensors(unrolled, abstract, False, jnp.float32)
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(trees[False])))


def test_sharded_unscanned_bf16_checkpoint_exports_under_the_same_names(run, tmp_path):
    """A checkpoint saved by checkpoint.save from a model with a list of blocks, bf16 params sharded over
    fsdp x tensor as the trainer shards them (random values: no training needed) exports whole, with the names
    of the scanned run."""
    cfg = tiny_config(data=2, fsdp=2, tensor=2)
    cfg.model.scan_layers, cfg.model.param_dtype = False, "bfloat16"
    mesh = sharding.make_mesh(cfg.mesh)
    tx, _ = build_optimizer(cfg)
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: build_model(cfg, data.vocab_for(cfg))), nnx.Param)
    shardings = sharding.state_shardings(cfg, mesh, abstract, tx)["params"]
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda s, where: jax.device_put(rng.normal(size=s.shape).astype(s.dtype), where),
                          nnx.to_pure_dict(abstract), shardings)
    state = {"step": jnp.int32(7), "params": params, "opt_state": tx.init(params)}
    assert params["blocks"][0]["attn"]["wq"].sharding.spec[:2] == ("fsdp", "tensor")
    dataset, vocab = data.dataset_for(cfg), data.vocab_for(cfg)
    meta = {"config": config_lib.to_dict(cfg), "dataset": str(dataset.path), "step": 7,
            "tokenizer": data.tokenizer_for(cfg).identity(), "codec": dataset.meta.get("codec"),
            "vocab": {"size": vocab.size, "text_size": vocab.text_size, "codebook_sizes": list(vocab.codebook_sizes)}}
    manager = checkpoint.make_manager(tmp_path / "run", cfg.train)
    checkpoint.save(manager, 7, state, iter(data.train_dataset(cfg)), meta)
    manager.wait_until_finished()
    manager.close()

    out = load_file(export.export(tmp_path / "run", tmp_path / "out", dtype="float32") / "model.safetensors")
    scanned = load_file(run[2]["float32"] / "model.safetensors")
    assert {k: v.shape for k, v in out.items()} == {k: v.shape for k, v in scanned.items()}
    params = jax.device_get(state["params"])
    for i in range(cfg.model.layers):
        assert np.array_equal(out[f"blocks.{i}.mlp.w_up"], params["blocks"][i]["mlp"]["w_up"].astype(np.float32))
    assert np.array_equal(out["embed"], params["embed"].astype(np.float32))
    reloaded = artifact.from_export(tmp_path / "out")
    assert reloaded.params["unembed"].dtype == jnp.bfloat16  # back in the run's param_dtype


def test_mot_checkpoint_exports_per_modality_blocks_and_reloads_to_the_same_logits(tmp_path):
    """A model.fusion=mot checkpoint (random values, saved by checkpoint.save): the export names of early, every
    block tensor with a leading [3] axis of modality slices, and load_export runs the same function."""
    cfg = tiny_config(data=1, fsdp=1, tensor=1)
    cfg.model.fusion = "mot"
    mesh = sharding.make_mesh(cfg.mesh, jax.devices()[:1])
    tx, _ = build_optimizer(cfg)
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: build_model(cfg, data.vocab_for(cfg))), nnx.Param)
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda s: jnp.asarray(0.05 * rng.normal(size=s.shape), s.dtype), nnx.to_pure_dict(abstract))
    state = {"step": jnp.int32(3), "params": params, "opt_state": tx.init(params)}
    dataset, vocab = data.dataset_for(cfg), data.vocab_for(cfg)
    meta = {"config": config_lib.to_dict(cfg), "dataset": str(dataset.path), "step": 3,
            "tokenizer": data.tokenizer_for(cfg).identity(), "codec": dataset.meta.get("codec"),
            "vocab": {"size": vocab.size, "text_size": vocab.text_size, "codebook_sizes": list(vocab.codebook_sizes)}}
    manager = checkpoint.make_manager(tmp_path / "run", cfg.train)
    checkpoint.save(manager, 3, state, iter(data.train_dataset(cfg)), meta)
    manager.wait_until_finished()
    manager.close()

    folder = export.export(tmp_path / "run", tmp_path / "out", dtype="float32")
    out = load_file(folder / "model.safetensors")
    generic = {re.sub(r"^blocks\.\d+\.", "blocks.{i}.", name) for name in out}
    assert generic == set(tensor_names.TENSOR_DOCS)
    assert out["blocks.1.attn.wq"].shape == (3, cfg.model.d, cfg.model.heads, cfg.model.d // cfg.model.heads)
    assert np.array_equal(out["blocks.1.mlp.w_up"], np.asarray(params["blocks"]["mlp"]["w_up"][1]))
    assert "[M, d, N, H] = [3, 32, 4, 8]" in (folder / "README.md").read_text()
    reloaded = artifact.from_export(folder)
    batch = data.eval_batches(cfg)[0]
    np.testing.assert_allclose(logits_of(reloaded.graphdef, reloaded.params, batch),
                               logits_of(graphdef, params, batch, mesh, cfg.mesh.rules), atol=1e-6, rtol=1e-6)


def test_step_picks_that_checkpoint(run, trainer, tmp_path):
    cfg, root, exports = run
    out = export.export(root / "run", tmp_path / "step2", step=EVERY, dtype="float32")
    assert json.loads((out / "config.json").read_text())["export"]["step"] == EVERY
    early, late = load_file(out / "model.safetensors"), load_file(exports["float32"] / "model.safetensors")
    assert not np.array_equal(early["blocks.0.attn.wq"], late["blocks.0.attn.wq"])
    want = names_of_scanned(reference_params(run, trainer, EVERY))
    assert all(np.array_equal(early[k], v) for k, v in want.items())


def test_export_loads_back_its_tokenizer_and_codec(run):
    cfg, _, exports = run
    loaded = artifact.from_export(exports["bfloat16"])
    assert loaded.tokenizer.identity() == data.tokenizer_for(cfg).identity()
    assert loaded.tokenizer.decode(loaded.tokenizer.encode("a red circle")) == "a red circle"
    assert loaded.vocab == data.vocab_for(cfg)
    assert isinstance(loaded.codec, ToneCodec)
    wave = ToneCodec().decode(np.array([[30, 10]] * 5))
    assert np.array_equal(loaded.codec.encode(wave), ToneCodec().encode(wave))


def test_bytes_tokenizer_export_needs_no_dataset(run, tmp_path):
    """A run whose dataset folder is gone still exports (bytes + tone need no file), and loads back."""
    _, root, _ = run
    workdir = _copy_run(root / "run", tmp_path / "run", dataset=str(tmp_path / "gone"))
    loaded = artifact.from_export(export.export(workdir, tmp_path / "out"))
    assert loaded.info["tokenizer"]["kind"] == "bytes" and isinstance(loaded.codec, ToneCodec)


def test_file_tokenizer_with_its_dataset_gone_fails_naming_the_dataset(run, tmp_path):
    _, root, _ = run
    gone = tmp_path / "gone-dataset"
    workdir = _copy_run(root / "run", tmp_path / "run", dataset=str(gone),
                        tokenizer={"kind": "tokenizer.json", "name": "bpe", "vocab_size": 256, "sha256": "0" * 64})
    with pytest.raises(ExportError, match=re.escape(str(gone))):
        export.export(workdir, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def _copy_run(src: Path, dst: Path, dataset: str, tokenizer: dict | None = None) -> Path:
    """A copy of the run whose latest checkpoint records another dataset path (and tokenizer)."""
    shutil.copytree(src, dst)
    meta_file = dst / "checkpoints" / str(STEPS) / "meta" / "metadata"
    meta = json.loads(meta_file.read_text())
    meta["dataset"] = dataset
    if tokenizer:
        meta["tokenizer"] = tokenizer
    meta_file.write_text(json.dumps(meta))
    return dst


# ------------------------------------------------------------------------------------------- errors

def test_errors_name_the_problem(run, tmp_path):
    _, root, _ = run
    with pytest.raises(ExportError, match="no complete checkpoint in .*; train first"):
        export.export(tmp_path / "empty", tmp_path / "a")
    with pytest.raises(ExportError, match="no checkpoint of step 3 .* the steps that exist are 2, 4"):
        export.export(root / "run", tmp_path / "a", step=3)
    with pytest.raises(ExportError, match="unknown --dtype 'int8'; allowed: bfloat16, float32, float16"):
        export.export(root / "run", tmp_path / "a", dtype="int8")
    with pytest.raises(ExportError, match=r"tensor 'w' holds 100000, beyond the float16 range \(±65504\)"):
        export.cast_tensors({"w": np.array([1e5], np.float32)}, "float16")  # not a silent inf
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    with pytest.raises(ExportError, match="already exists and is not empty; pass a new --out or delete it"):
        export.export(root / "run", busy)
    assert [p.name for p in busy.iterdir()] == ["keep.txt"]
    empty = tmp_path / "empty-out"
    empty.mkdir()
    assert (export.export(root / "run", empty) / "model.safetensors").is_file()  # an empty folder is fine
    assert not list(tmp_path.glob("*.tmp-*"))  # nothing half-written is left beside it


def test_a_failed_export_leaves_no_folder(run, tmp_path, monkeypatch):
    _, root, _ = run

    def crash(*args, **kwargs):
        raise KeyboardInterrupt  # as if the process were stopped half-way through writing

    monkeypatch.setattr(export, "save_codec_folder", crash)
    with pytest.raises(KeyboardInterrupt):
        export.export(root / "run", tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_load_export_errors_name_the_file_or_tensor(run, tmp_path):
    _, _, exports = run
    with pytest.raises(ExportError, match="not an omni export: config.json is missing"):
        artifact.from_export(tmp_path)
    tensors = load_file(exports["float32"] / "model.safetensors")
    for name, broken, message in (
            ("missing", {k: v for k, v in tensors.items() if k != "blocks.1.attn.wk"},
             r"tensor 'blocks.1.attn.wk' \(shape \[32, 2, 8\]\) is missing"),
            ("reshaped", dict(tensors, unembed=tensors["unembed"][:, :128].copy()),
             r"tensor 'unembed' has shape \[32, 128\] in model.safetensors but .* needs \[32, 384\]")):
        folder = tmp_path / name
        shutil.copytree(exports["float32"], folder)
        save_file(broken, folder / "model.safetensors")
        with pytest.raises(ExportError, match=message):
            artifact.from_export(folder)


# ------------------------------------------------------------------------------------------- codecs

def test_codec_folders_load_back_as_the_same_codec(tmp_path):
    external = PrecomputedCodec("mimi", 12.5, [2048] * 8, sample_rate=24_000)
    rng = np.random.default_rng(0)
    fitted = MelRVQCodec(rng.normal(size=(2, 8, 16)).astype(np.float32), rng.normal(size=16), 1.5)
    for name, codec in (("tone", ToneCodec()), ("external", external), ("fitted", fitted)):
        artifact.save_codec_folder(codec, tmp_path / name)
        back = artifact.load_codec_folder(tmp_path / name)
        assert type(back) is type(codec) and codec_identity(back) == codec_identity(codec), name
    assert np.array_equal(artifact.load_codec_folder(tmp_path / "fitted").codewords, fitted.codewords)
    assert artifact.load_codec_folder(tmp_path / "nothing") is None


def test_an_export_killed_half_way_leaves_nothing_the_next_export_keeps(run, tmp_path):
    """SIGKILL during export left OUT.tmp-XXXX (115 MB) beside OUT forever, even after the next export to OUT. The
    killed process here is a real one, killed by SIGKILL inside staged_folder with a weight file half written;
    a folder of a live process and a user's look-alike folder stay."""
    import signal
    import subprocess
    import sys

    _, root, _ = run
    out = tmp_path / "model"
    killed = subprocess.run([sys.executable, "-c", (
        "import os, signal, sys; from omni import storage\n"
        f"with storage.staged_folder({str(out)!r}) as work:\n"
        "    (work / 'model.safetensors').write_bytes(b'x' * 100_000)\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n")], capture_output=True)
    assert killed.returncode == -signal.SIGKILL
    (left,) = tmp_path.glob("model.tmp-*")
    assert (left / "model.safetensors").stat().st_size == 100_000 and not out.exists()
    live = tmp_path / f"model.tmp-{storage.host_name()}-{os.getpid()}-0123abcd"  # this process: alive
    users = tmp_path / "model.tmp-mine"
    live.mkdir()
    users.mkdir()
    export.export(root / "run", out)
    assert (out / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["model", live.name, users.name])
