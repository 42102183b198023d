"""Which part of omni may import which: the architecture as a test.

Every `import` and `from ... import` in omni/ counts, at module level or inside a function, and so does every
module reached through them (the rules hold for the transitive closure, so a forbidden dependency cannot hide
behind a third module).
"""

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "omni"

# (importer prefix, prefixes it must never reach). A prefix matches a module and its submodules.
FORBIDDEN = [
    ("omni.model", ("omni.data", "omni.train", "omni.tools", "omni.demo", "omni.launch", "omni.cli")),
    ("omni.data", ("omni.model", "omni.train", "omni.tools", "omni.demo", "omni.launch", "omni.cli")),
    ("omni.train", ("omni.tools", "omni.demo", "omni.launch", "omni.cli")),
    ("omni.demo", ("omni.launch", "omni.cli")),
    ("omni.tools", ("omni.launch", "omni.cli")),
    ("omni.launch", ("omni.tools", "omni.demo", "omni.cli")),
    # The shared core below every subpackage.
    ("omni.config", ("omni.",)), ("omni.errors", ("omni.",)), ("omni.batch", ("omni.",)),
    ("omni.progress", ("omni.",)),  # how long work shows progress: given to the layers below the CLI, knows none
    ("omni.storage", ("omni.",)),   # how locations are opened (local paths, gs:// URLs): below everything
]
ALLOWED_ONLY = {  # importer -> the only omni modules it may reach
    "omni.loss": {"omni.batch", "omni.tokens"},
    "omni.tokens": {"omni.batch"},
    "omni.sharding": {"omni.config", "omni.errors", "omni.batch", "omni.storage"},  # it places the batch fields: knows their layout
}
# the config raises ConfigError and reads config files from any location; storage raises StorageError
CORE_EXCEPTIONS = {"omni.config": {"omni.errors", "omni.storage"}, "omni.storage": {"omni.errors"}}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, known: set[str]) -> set[str]:
    """omni modules `path` imports anywhere in its code (a `from pkg import sub` names the submodule)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in known}
    # importing omni.a.b runs omni/a/__init__.py first
    parents = {".".join(m.split(".")[:i]) for m in found for i in range(2, m.count(".") + 1)}
    return {m for m in found | parents if m in known}


def import_graph() -> dict[str, set[str]]:
    files = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    known = set(files)
    return {name: imports_of(path, known) - {name} for name, path in files.items()}


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), list(graph.get(start, ()))
    while todo:
        module = todo.pop()
        if module not in seen:
            seen.add(module)
            todo += graph.get(module, ())
    return seen - {start}


def _under(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix.rstrip(".") + ".") or (prefix.endswith(".") and
                                                                               module.startswith(prefix))


def violations(graph: dict[str, set[str]]) -> list[str]:
    found = []
    for module in sorted(graph):
        reach = reachable(graph, module)
        for importer, banned in FORBIDDEN:
            if not _under(module, importer):
                continue
            allowed = CORE_EXCEPTIONS.get(module, set())
            for target in sorted(reach - allowed):
                if any(_under(target, b) for b in banned) and not _under(target, importer):
                    found.append(f"{module} reaches {target}")
        for importer, only in ALLOWED_ONLY.items():
            if module == importer:
                found += [f"{module} reaches {target}" for target in sorted(reach - only)]
    return found


def test_the_package_keeps_its_layers():
    graph = import_graph()
    assert {"omni.model.transformer", "omni.data.pipeline", "omni.train.loop", "omni.tools.generate",
            "omni.demo.corpus", "omni.launch.runners", "omni.cli"} <= set(graph)  # the walk sees the package
    assert violations(graph) == []


def test_a_forbidden_import_is_caught_directly_and_through_a_third_module():
    graph = import_graph()
    # The plain cases, one rule each:
    for importer, target in [("omni.model.layers", "omni.data.pipeline"), ("omni.data.pipeline", "omni.train.step"),
                             ("omni.train.loop", "omni.demo.scorer"), ("omni.train.loop", "omni.tools.export"),
                             ("omni.loss", "omni.config")]:
        bad = {**graph, importer: graph[importer] | {target}}
        assert f"{importer} reaches {target}" in violations(bad), (importer, target)
    # Indirect: the data pipeline importing a tool that imports the trainer.
    bad = {**graph, "omni.data.images": graph["omni.data.images"] | {"omni.tools.evaluate"}}
    assert "omni.data.images reaches omni.train.step" in violations(bad)


def test_the_import_walk_sees_imports_inside_functions(tmp_path):
    source = tmp_path / "m.py"
    source.write_text("def f():\n    from omni.data import pipeline\n    import omni.tools.export\n")
    assert imports_of(source, {"omni.data", "omni.data.pipeline", "omni.tools", "omni.tools.export"}) == {
        "omni.data", "omni.data.pipeline", "omni.tools", "omni.tools.export"}


def test_no_module_opens_paths_with_pathlib():
    """Every location goes through omni.storage (etils.epath): pathlib.Path(str(url)) would turn gs://b/x into a
    local folder gs:/b/x, so omni never imports pathlib."""
    users = sorted(module_name(p) for p in PACKAGE.rglob("*.py")
                   if any(isinstance(n, ast.Import) and "pathlib" in [a.name for a in n.names] or
                          isinstance(n, ast.ImportFrom) and n.module == "pathlib"
                          for n in ast.walk(ast.parse(p.read_text()))))
    assert users == []


def test_only_the_cli_parses_arguments():
    users = sorted(module_name(p) for p in PACKAGE.rglob("*.py")
                   if any(isinstance(n, (ast.Import, ast.ImportFrom)) and
                          ("argparse" in [a.name for a in n.names] if isinstance(n, ast.Import) else n.module == "argparse")
                          for n in ast.walk(ast.parse(p.read_text()))))
    assert users == ["omni.cli"]


# Inference hosts may lack the training data stack: generation must import and run without it.
_GENERATE_WITHOUT_DATA_STACK = """
import sys
BLOCKED = ("grain", "tensorflow_datasets", "tensorflow", "tensorboardX", "array_record", "orbax")
class Blocked:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"{name} is not installed on this host")
sys.meta_path.insert(0, Blocked())
from flax import nnx
from omni.config import ModelConfig
from omni.data.text_tokenizer import ByteTokenizer
from omni.model.transformer import OmniTransformer
from omni.tokens import Vocab
from omni.tools import generate
cfg = ModelConfig(d=32, layers=1, heads=2, kv_heads=1, dtype="float32")
vocab = Vocab(text_size=256, codebook_sizes=(8,))
graphdef, params = nnx.split(OmniTransformer(cfg, vocab.size, 8 * 8 * 3, rngs=nnx.Rngs(0)), nnx.Param)
prompt = generate.prompt_arrays(generate.parse_prompt("hello"), vocab, ByteTokenizer(), 8, "flat", "text")
result = generate.generate(graphdef, params, cfg, vocab, [prompt], target="text", max_new_tokens=3)
print("generated", len(result.tokens[0]), sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED))
"""


def test_generation_runs_without_grain_tfds_or_orbax():
    result = subprocess.run([sys.executable, "-c", _GENERATE_WITHOUT_DATA_STACK], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split("\n")[-2].startswith("generated ") and result.stdout.strip().endswith("[]")


@pytest.mark.parametrize("module", ["omni.tools.generate", "omni.data.images", "omni.train.step", "omni.model"])
def test_light_modules_import_without_the_data_stack(module):
    code = _GENERATE_WITHOUT_DATA_STACK.split("from flax import nnx")[0] + f"import {module}\n"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]


def test_no_module_asks_for_a_class_by_its_name():
    """`type(codec).__name__ != "PrecomputedCodec"` broke silently on a rename; omni.data.precomputed.is_precomputed
    is how code asks."""
    users = sorted(module_name(p) for p in PACKAGE.rglob("*.py") if re.search(r"type\([^)]*\)\.__name__ *[!=]=",
                                                                            p.read_text()))
    assert users == []


def test_precomputed_codecs_and_image_tokenizers_share_one_base_and_refuse_to_run():
    import pytest

    from omni.data.codec import PrecomputedCodec
    from omni.data.image_tokenizer import ImageTokenizerError, PrecomputedImageTokenizer
    from omni.data.precomputed import is_precomputed
    from omni.errors import CodecError

    codec = PrecomputedCodec("encodec-24khz", 75.0, [1024] * 8, 24000)
    images = PrecomputedImageTokenizer("vqgan", [16384], 16)
    assert is_precomputed(codec) and is_precomputed(images) and not is_precomputed(object())
    with pytest.raises(CodecError, match=r"precompute the codes \[frames, 8\] with the original encodec-24khz"):
        codec.encode(None)
    with pytest.raises(ImageTokenizerError, match=r"precompute the codes \[rows, cols, 1\] with the original vqgan"):
        images.encode(None)
    with pytest.raises(ImageTokenizerError, match="a precomputed image tokenizer needs a name"):
        PrecomputedImageTokenizer("", [4])
    with pytest.raises(CodecError, match="codebook_sizes must be one or more positive sizes"):
        PrecomputedCodec("x", 50.0, [0])


def test_generate_prompt_is_one_task_of_the_prompts_code():
    """`omni generate --prompt` went through parse_prompt, prompt_arrays, fit_to_context and generate by hand in
    the CLI beside the --prompts path; it is now one task of generate.answer_tasks, as --prompts and eval are."""
    cli_source = (PACKAGE / "cli.py").read_text()
    for by_hand in ("generate.generate(", "generate.prompt_arrays(", "generate.fit_to_context(",
                    "generate.decode_output("):
        assert by_hand not in cli_source, by_hand
    assert "generate.answer_tasks(" in cli_source
