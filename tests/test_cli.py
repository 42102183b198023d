"""The command line, run as a user runs it: a subprocess, its exit code and what it prints."""

import os
import subprocess
import sys

import pytest


def omni(*args, cwd=None):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, "-m", "omni.cli", *args], capture_output=True, text=True, env=env,
                          cwd=cwd, timeout=300)


def test_bad_config_key_names_it(tmp_path):
    run = omni("train", "--config", "configs/demo.py", "--workdir", str(tmp_path), "--set", "train.stepz=5")
    assert run.returncode == 2
    assert "unknown config key 'train.stepz'" in run.stderr and "Did you mean 'train.steps'" in run.stderr
    assert "Traceback" not in run.stderr
    assert not (tmp_path / "config.json").exists()  # nothing ran


def test_bad_override_value_names_key_and_allowed_values(tmp_path):
    run = omni("train", "--config", "configs/demo.py", "--workdir", str(tmp_path), "--set", "model.dtype=float8")
    assert run.returncode == 2
    assert "bad value 'float8' for 'model.dtype'" in run.stderr and "'bfloat16', 'float32'" in run.stderr


def test_mesh_device_mismatch_says_what_fits(tmp_path):
    run = omni("train", "--config", "configs/demo.py", "--workdir", str(tmp_path),
               "--set", "mesh.data=4", "--set", "mesh.tensor=4")
    assert run.returncode == 2, run.stderr
    assert "mesh data=4 fsdp=1 tensor=4 does not fit: it needs 16 devices but 8 are available" in run.stderr
    assert "Shapes that fit 8 devices" in run.stderr and "Traceback" not in run.stderr


def test_config_verb_prints_resolved_config_and_schema():
    run = omni("config", "--config", "configs/demo.py", "--set", "train.steps=9")
    assert run.returncode == 0 and '"steps": 9' in run.stdout
    schema = omni("config", "--schema")
    assert "model.remat" in schema.stdout and "recompute" in schema.stdout


@pytest.mark.slow
def test_demo_command_trains_and_resumes(tmp_path):
    """The README's first command, shortened: trains, shows progress and demo metrics, then resumes."""
    workdir = tmp_path / "demo"
    args = ("train", "--config", "configs/demo.py", "--workdir", str(workdir), "--set", "train.steps=30",
            "--set", "train.eval_every=0", "--set", "train.checkpoint_every=15", "--set", "demo.scored_examples=4")
    run = omni(*args)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "held-out loss" in run.stdout and "demo caption" in run.stdout
    again = omni(*args[:-4], "--set", "train.steps=40", "--set", "demo.scored_examples=4")
    assert again.returncode == 0, again.stderr[-2000:]
    assert "resumed from" in again.stdout and "(step 30)" in again.stdout


CONFIG_FILE_MISTAKES = [  # line 6 of a config file (inside get_config()), what the message must name
    ("    c.model.dd = 5", ["bad.py:6", "unknown config key 'model.dd'", "Did you mean 'model.d'"]),
    ("    c.trian = 3", ["bad.py:6", "unknown config key 'trian'", "Did you mean 'train"]),
    ("    c.model.dtype = 'float8'", ["bad.py:6", "bad value 'float8' for 'model.dtype'", "'bfloat16', 'float32'"]),
    ("    c.train.steps = 'many'", ["bad.py:6", "bad value 'many' for 'train.steps'", "integer"]),
    ("    c.model = 5", ["bad.py:6", "'model' is a section"]),
    ("    c.model.heads = 3", ["bad.py", "'model.heads' (3) must be a multiple of 'model.kv_heads' (2)"]),
    ("    c.train.steps = (", ["bad.py:6", "syntax error"]),
    ("    import not_a_module_anywhere", ["bad.py:6", "ModuleNotFoundError", "not_a_module_anywhere"]),
]


@pytest.mark.parametrize("line,expected", CONFIG_FILE_MISTAKES, ids=[m[0].strip() for m in CONFIG_FILE_MISTAKES])
def test_config_file_mistakes_are_one_line_errors(tmp_path, line, expected):
    bad = tmp_path / "bad.py"
    bad.write_text("from omni.config import Config\n\n\ndef get_config():\n    c = Config()\n" + line + "\n    return c\n")
    run = omni("config", "--config", str(bad))
    assert run.returncode == 2, run.stdout + run.stderr
    assert "Traceback" not in run.stderr and run.stderr.count("\n") == 1, run.stderr
    for text in expected:
        assert text in run.stderr, (text, run.stderr)


def test_config_paths_that_are_not_config_files(tmp_path):
    (tmp_path / "list.json").write_text("[1, 2]")
    (tmp_path / "latin1.json").write_bytes(b'{"name": "caf\xe9"}')
    (tmp_path / "README.md").write_text("# not a config\n")
    cases = {str(tmp_path): "is a directory", str(tmp_path / "list.json"): "not a list",
             str(tmp_path / "latin1.json"): "not UTF-8 (byte 0xe9", str(tmp_path / "README.md"): "neither a .py"}
    for path, expected in cases.items():
        run = omni("config", "--config", path)
        assert run.returncode == 2 and expected in run.stderr and path in run.stderr, (path, run.stderr)
        assert "Traceback" not in run.stderr


def test_config_schema_lists_every_key_with_its_doc():
    from omni import config as config_lib

    run = omni("config", "--schema")
    assert run.returncode == 0
    for key in config_lib.all_keys():
        assert key in run.stdout, key
    assert "demo.scored_examples" in run.stdout and "data.image_size" not in run.stdout


def test_every_verb_and_option_says_what_it_is_for():
    """`omni VERB --help` is where a user looks first; 41 options had no help text."""
    import argparse

    from omni import cli

    missing = []

    def walk(parser, verbs):
        assert "usage:" in parser.format_help()  # renders (a stray % in a help text would raise here)
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                helps = {a.dest: a.help for a in action._choices_actions}
                for name, sub in action.choices.items():
                    if not helps.get(name):
                        missing.append(" ".join(verbs + [name]))
                    walk(sub, verbs + [name])
            elif action.dest != "help" and not action.help:
                missing.append(" ".join(verbs + [action.option_strings[0] if action.option_strings else action.dest]))

    walk(cli._parser(), ["omni"])
    assert missing == [], f"no help text: {missing}"
