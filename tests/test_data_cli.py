"""The data verbs as a user runs them: build a manifest with a tokenizer and a fitted codec, show, train on it."""

import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from omni.data.audio import read_wav, write_wav
from tests.conftest import tiny_config
from tests.test_cli import omni

WORDS = "red green blue small large circle square bird song chirp whistle low high".split()


def _user_corpus(root, n=60):
    """A user-style folder: PNGs of two sizes, WAV clips at two sample rates, captions and transcripts."""
    rng = np.random.default_rng(0)
    (root / "img").mkdir(parents=True)
    (root / "wav").mkdir()
    lines = []
    for i in range(n):
        words = " ".join(rng.choice(WORDS, size=4))
        if i % 2 == 0:
            size = (24, 40) if i % 4 == 0 else (48, 48)
            Image.fromarray(rng.integers(0, 255, size + (3,), dtype=np.uint8)).save(root / "img" / f"{i}.png")
            lines.append({"segments": [{"image": f"img/{i}.png"}, {"text": words}], "targets": ["text"]})
        else:
            rate = 16000 if i % 3 else 22050
            t = np.arange(int(0.4 * rate)) / rate
            hz = 200 + 40 * (i % 9)
            write_wav(root / "wav" / f"{i}.wav", 0.3 * np.sin(2 * np.pi * hz * t) + 0.01 * rng.normal(size=t.size), rate)
            lines.append({"segments": [{"audio": f"wav/{i}.wav"}, {"text": words}], "targets": ["text"],
                          "split": "eval" if i % 10 == 1 else "train"})
    manifest = root / "manifest.jsonl"
    manifest.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return manifest


def test_tokenizer_codec_build_show_and_train_on_user_data(tmp_path):
    manifest = _user_corpus(tmp_path / "corpus")
    run = omni("tokenizer", "train", "--manifest", str(manifest), "--vocab-size", "300", "--out", str(tmp_path / "tok"))
    assert run.returncode == 0, run.stderr[-2000:]
    assert (tmp_path / "tok" / "tokenizer.json").exists()

    run = omni("codec", "fit", "--manifest", str(manifest), "--out", str(tmp_path / "codec"),
               "--codebooks", "2", "--codebook-size", "16")
    assert run.returncode == 0, run.stderr[-2000:]
    # not a terminal: progress is one line per phase at its end (and one every 10 s on longer work), on stdout
    assert re.search(r"^codec fit: read: 30/30 clip in [\d.]+ s \([\d.]+ clip/s, seconds [\d.]+\)$", run.stdout, re.M)
    done = re.search(r"^codec fit: k-means: 40/40 step in [\d.]+ s \([\d.]+ step/s, codebook 2/2, error ([\d.]+)\)$",
                     run.stdout, re.M)
    assert done, run.stderr[-2000:]
    errors = json.loads((tmp_path / "codec" / "codec.json").read_text())["fit"]["relative_error"]
    assert len(errors) == 2 and 0 < errors[1] < errors[0] < 1 and float(done.group(1)) == pytest.approx(errors[1], rel=1e-3)
    assert f"reconstruction error (normalised log-mel, relative to the mean frame) {errors[0]:.3f} -> " in run.stdout
    clip = tmp_path / "corpus" / "wav" / "1.wav"
    run = omni("codec", "encode", "--codec", str(tmp_path / "codec"), "--wav", str(clip), "--out", str(tmp_path / "c.npy"))
    assert run.returncode == 0, run.stderr[-2000:]
    codes = np.load(tmp_path / "c.npy")
    assert codes.ndim == 2 and codes.shape[1] == 2 and codes.max() < 16
    run = omni("codec", "decode", "--codec", str(tmp_path / "codec"), "--codes", str(tmp_path / "c.npy"),
               "--out", str(tmp_path / "back.wav"))
    assert run.returncode == 0, run.stderr[-2000:]
    wave, rate = read_wav(tmp_path / "back.wav")
    assert abs(len(wave) / rate - 0.4) < 0.1

    out = tmp_path / "ds"
    run = omni("data", "build", "--manifest", str(manifest), "--out", str(out), "--codec", str(tmp_path / "codec"),
               "--tokenizer", str(tmp_path / "tok"))
    assert run.returncode == 0, run.stderr[-2000:]
    assert "train: 54 examples, eval: 6 examples" in run.stdout
    assert re.search(r"^data build: train: 54/54 line in [\d.]+ s \([\d.]+ line/s\)$", run.stdout, re.M)
    assert re.search(r"^data build: eval: 6/6 line in [\d.]+ s \([\d.]+ line/s\)$", run.stdout, re.M)
    meta = json.loads((out / "omni_dataset.json").read_text())
    assert meta["codec"]["codebook_sizes"] == [16, 16] and meta["tokenizer"] == "tokenizer"

    run = omni("data", "show", "--config", "configs/demo.py", "--set", f"data.dataset={out}",
               "--set", "data.seq_len=128", "--set", "data.max_image_patches=16", "--out", str(tmp_path / "b.png"))
    assert run.returncode == 0, run.stderr[-2000:]
    assert (tmp_path / "b.png").stat().st_size > 10_000
    assert "<image 3x5>" in run.stdout or "<image 4x4>" in run.stdout  # both sizes fitted to 16 patches
    assert "audio codes" in run.stdout

    from omni.data import pipeline as data
    from omni.train import loop

    cfg = tiny_config()
    cfg.data.dataset = str(out)
    cfg.data.max_image_patches = 16
    cfg.train.steps = 12
    vocab = data.vocab_for(cfg)
    assert vocab.text_size == 300 and vocab.codebook_sizes == (16, 16)
    result = loop.train(cfg, tmp_path / "run", progress=False)
    assert np.isfinite(result["eval"]["loss/text"])
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["data"]["dataset"] == str(out)


def test_build_errors_name_the_line_and_skip_bad_reports(tmp_path):
    manifest = _user_corpus(tmp_path / "corpus", n=6)
    (tmp_path / "corpus" / "img" / "2.png").write_bytes(b"not a png")
    run = omni("data", "build", "--manifest", str(manifest), "--out", str(tmp_path / "ds"), "--codec", "tone")
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert f"{manifest}:3: segment 0: cannot decode image" in run.stderr
    assert not (tmp_path / "ds" / "omni_dataset.json").exists()
    run = omni("data", "build", "--manifest", str(manifest), "--out", str(tmp_path / "ds"), "--codec", "tone",
               "--skip-bad")
    assert run.returncode == 0, run.stderr[-2000:]
    assert "skipped 1 bad line(s)" in run.stdout and f"{manifest}:3:" in run.stdout


def test_codec_errors_are_one_line(tmp_path):
    (tmp_path / "x.wav").write_bytes(b"RIFF....WAVEfmt junk")
    run = omni("codec", "encode", "--codec", "tone", "--wav", str(tmp_path / "x.wav"), "--out", str(tmp_path / "c.npy"))
    assert run.returncode == 2 and "x.wav" in run.stderr and "Traceback" not in run.stderr
    run = omni("codec", "encode", "--codec", str(tmp_path / "nowhere"), "--wav", str(tmp_path / "x.wav"),
               "--out", str(tmp_path / "c.npy"))
    assert run.returncode == 2 and "nowhere" in run.stderr and "Traceback" not in run.stderr


# ----------------------------------------------------------------------------------------------- issue 20: bad input

def _one_line_error(run):
    """The run failed as a user error: exit 2, one stderr line `omni: error: ...`, no traceback."""
    assert run.returncode == 2, (run.returncode, run.stderr[-2000:])
    assert "Traceback" not in run.stderr
    lines = [line for line in run.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("omni: error: "), run.stderr[-2000:]
    return lines[0]


def _text_manifest(folder, lines):
    folder.mkdir(parents=True, exist_ok=True)
    manifest = folder / "manifest.jsonl"
    with open(manifest, "wb") as f:
        for line in lines:
            f.write((line if isinstance(line, bytes) else json.dumps(line).encode()) + b"\n")
    return manifest


def _text(i, split="train", **fields):
    return {"segments": [{"text": f"caption {i}"}], "targets": ["text"], "split": split, **fields}


def test_overwrite_replaces_only_a_dataset_and_only_after_a_good_build(tmp_path):
    manifest = _user_corpus(tmp_path / "corpus", n=6)
    images = sorted(p.name for p in (tmp_path / "corpus" / "img").iterdir())
    build = ("data", "build", "--manifest", str(manifest), "--codec", "tone")
    ds = tmp_path / "ds"
    assert omni(*build, "--out", str(ds)).returncode == 0
    first = (ds / "omni_dataset.json").read_text()

    # a plain folder of user files: refused with or without --overwrite, its files untouched
    user = tmp_path / "mine"
    user.mkdir()
    for name in ("a.txt", "b.txt", "c.txt"):
        (user / name).write_text(name)
    for extra in ((), ("--overwrite",)):
        error = _one_line_error(omni(*build, "--out", str(user), *extra))
        assert f"{user} holds 3 file(s) that are not an omni dataset (a.txt, b.txt, c.txt)" in error
        assert sorted(p.name for p in user.iterdir()) == ["a.txt", "b.txt", "c.txt"]

    # --out is the manifest's folder, or holds it, or holds a file a line names: refused before anything is built
    error = _one_line_error(omni(*build, "--out", str(tmp_path / "corpus"), "--overwrite"))
    assert f"--out {tmp_path / 'corpus'} is the folder of the manifest {manifest}" in error
    error = _one_line_error(omni(*build, "--out", str(tmp_path), "--overwrite"))
    assert f"--out {tmp_path} holds {manifest}, which is the manifest" in error
    error = _one_line_error(omni(*build, "--out", str(tmp_path / "corpus" / "img"), "--overwrite"))
    assert f"holds {tmp_path / 'corpus' / 'img' / '0.png'}, which line 1 of {manifest} names" in error
    assert sorted(p.name for p in (tmp_path / "corpus" / "img").iterdir()) == images and manifest.exists()
    cover = _text_manifest(tmp_path / "other", [{"segments": [{"image": "../ds/cover.png"}, {"text": "x"}],
                                                "targets": ["text"]}])
    Image.new("RGB", (8, 8)).save(ds / "cover.png")
    error = _one_line_error(omni("data", "build", "--manifest", str(cover), "--out", str(ds), "--overwrite"))
    assert f"which line 1 of {cover} names" in error
    (ds / "cover.png").unlink()

    # a rebuild that fails leaves the previous dataset as it was, and no temporary folder behind
    (tmp_path / "corpus" / "img" / "2.png").write_bytes(b"not a png")
    error = _one_line_error(omni(*build, "--out", str(ds), "--overwrite"))
    assert f"{manifest}:3: segment 0: cannot decode image" in error
    assert (ds / "omni_dataset.json").read_text() == first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus", "ds", "mine", "other"]

    # without --overwrite a dataset is kept; with it, a good build replaces it (and nothing else is left)
    assert "--overwrite" in _one_line_error(omni(*build, "--out", str(ds), "--skip-bad"))
    run = omni(*build, "--out", str(ds), "--skip-bad", "--overwrite")
    assert run.returncode == 0, run.stderr[-2000:]
    assert json.loads((ds / "omni_dataset.json").read_text())["skipped"][0]["line"] == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus", "ds", "mine", "other"]


def test_a_line_that_is_not_utf8_is_named_and_skippable(tmp_path):
    manifest = _text_manifest(tmp_path, [_text(1, split="eval"), b'{"segments": [{"text": "caf\xe9"}], "targets": '
                                         b'["text"]}', _text(3)])
    error = _one_line_error(omni("data", "build", "--manifest", str(manifest), "--out", str(tmp_path / "ds")))
    assert error == f"omni: error: {manifest}:2: not UTF-8 (byte 0xe9 at column 28); save the manifest as UTF-8"
    run = omni("data", "build", "--manifest", str(manifest), "--out", str(tmp_path / "ds"), "--skip-bad")
    assert run.returncode == 0, run.stderr[-2000:]
    assert "train: 1 examples, eval: 1 examples; skipped 1 bad line(s)" in run.stdout
    assert f"{manifest}:2: not UTF-8 (byte 0xe9" in run.stdout


def test_text_longer_than_the_limit_is_refused_with_its_length(tmp_path):
    limit = 1_000_000  # omni.data.dataset.MAX_TEXT_BYTES, documented in docs/data.md
    long = {"segments": [{"text": "a" * (limit + 1)}], "targets": ["text"], "split": "train"}
    manifest = _text_manifest(tmp_path, [_text(1, split="eval"), _text(2), long])
    error = _one_line_error(omni("data", "build", "--manifest", str(manifest), "--out", str(tmp_path / "ds")))
    assert f"{manifest}:3: segment 0: text of 1,000,001 bytes is longer than the limit of 1,000,000 bytes" in error
    run = omni("data", "build", "--manifest", str(manifest), "--out", str(tmp_path / "ds"), "--skip-bad")
    assert run.returncode == 0 and "skipped 1 bad line(s)" in run.stdout and f"{manifest}:3:" in run.stdout

    from omni.data import dataset

    assert dataset.MAX_TEXT_BYTES == limit
    docs = (Path(__file__).parents[1] / "docs" / "data.md").read_text()
    assert "`MAX_TEXT_BYTES` = 1,000,000" in docs and "`MAX_EXAMPLE_POSITIONS`" in docs


def test_a_file_that_is_not_an_image_is_named(tmp_path):
    (tmp_path / "notes.png").write_text("shopping list, not a picture")
    manifest = _text_manifest(tmp_path, [_text(1), {"segments": [{"image": "notes.png"}, {"text": "x"}],
                                                    "targets": ["text"]}])
    error = _one_line_error(omni("data", "build", "--manifest", str(manifest), "--out", str(tmp_path / "ds")))
    assert f"{manifest}:2: segment 0: cannot decode image {tmp_path / 'notes.png'}: not an image" in error
    assert "BytesIO" not in error and " at 0x" not in error


def test_target_must_be_boolean_something_must_be_learned_and_ids_unique(tmp_path):
    bad = {  # line -> the reason it is refused with
        "target_no": ({"segments": [{"text": "say no", "target": "no"}], "targets": ["text"]},
                      "segment 0: \"target\" must be the JSON boolean true or false, got 'no'"),
        "nothing": ({"segments": [{"text": "prompt", "target": False}, {"text": "answer", "target": False}],
                     "targets": ["text"]}, "every text segment has \"target\": false; nothing to learn"),
        "duplicate": (_text(3, id="one"), "id 'one' is already the id of line 2; ids must be unique"),
    }
    for name, (line, reason) in bad.items():
        manifest = _text_manifest(tmp_path / name, [_text(1, split="eval"), _text(2, id="one"), line])
        error = _one_line_error(omni("data", "build", "--manifest", str(manifest), "--out", str(tmp_path / "x")))
        assert error.startswith(f"omni: error: {manifest}:3: {reason}"), error
    lines = [_text(1, split="eval"), _text(2, id="one")] + [line for line, _ in bad.values()]
    manifest = _text_manifest(tmp_path / "all", lines)
    run = omni("data", "build", "--manifest", str(manifest), "--out", str(tmp_path / "ds"), "--skip-bad")
    assert run.returncode == 0, run.stderr[-2000:]
    assert "train: 1 examples, eval: 1 examples; skipped 3 bad line(s)" in run.stdout
    for number, (_, reason) in enumerate(bad.values(), start=3):
        assert f"{manifest}:{number}: {reason}" in run.stdout


def test_no_eval_examples_warns_at_build_and_train_time_says_how_to_get_some(tmp_path):
    manifest = _text_manifest(tmp_path, [_text(i) for i in range(4)])
    run = omni("data", "build", "--manifest", str(manifest), "--out", str(tmp_path / "ds"), "--eval-fraction", "0")
    assert run.returncode == 0 and "Traceback" not in run.stderr, run.stderr[-2000:]
    warning = [line for line in run.stderr.splitlines() if line.startswith("omni: warning:")]
    assert len(warning) == 1 and "no eval examples" in warning[0]
    assert "--eval-fraction" in warning[0] and '"split": "eval"' in warning[0]
    error = _one_line_error(omni("data", "show", "--config", "configs/demo.py", "--set", f"data.dataset={tmp_path}/ds",
                                 "--split", "eval", "--out", str(tmp_path / "b.png")))
    assert "no eval examples" in error and "--eval-fraction" in error and '"split": "eval"' in error

    from omni.data import pipeline
    from omni.errors import DatasetError

    cfg = tiny_config()
    cfg.data.dataset = str(tmp_path / "ds")
    with pytest.raises(DatasetError, match="--eval-fraction"):
        pipeline.eval_batches(cfg)


# ---------------------------------------------------------------------------------------------------------------
# Eval splits a user can see and control.


def _stored_eval_ids(folder):
    from omni.data import dataset

    source = dataset.open_dataset(folder).source("eval")
    return sorted(dataset.decode_record(source[i], 1)["id"] for i in range(len(source)))


def test_build_records_the_eval_ids_it_wrote_and_data_split_lists_them(tmp_path):
    from omni.data import dataset
    from omni.data.manifest import DEFAULT_EVAL_FRACTION, split_of

    lines = [{"segments": [{"text": f"caption {i}"}], "targets": ["text"], **({"id": f"c{i}"} if i % 2 else {})}
             for i in range(200)]  # half with an id, half known by their line number
    manifest = _text_manifest(tmp_path, lines)
    run = omni("data", "build", "--manifest", str(manifest), "--out", str(tmp_path / "ds"))
    assert run.returncode == 0, run.stderr[-2000:]
    rule = next(line for line in run.stdout.splitlines() if line.startswith("omni: split rule:"))
    assert "no line names a split" in rule and "--eval-fraction 0.05 (the default)" in rule
    assert f"omni data split --dataset {tmp_path / 'ds'}" in rule

    meta = dataset.open_dataset(tmp_path / "ds").meta
    expected = [(line.get("id", f"line{n}"), n) for n, line in enumerate(lines, start=1)
                if split_of(line, n, DEFAULT_EVAL_FRACTION) == "eval"]
    assert 3 <= len(expected) <= 25
    assert list(zip(meta["eval_ids"], meta["eval_lines"])) == expected  # in manifest order, with their lines
    assert sorted(meta["eval_ids"]) == _stored_eval_ids(tmp_path / "ds")  # exactly what the eval split yields
    assert meta["counts"]["eval"] == len(expected) and meta["split_rule"] in rule

    listed = omni("data", "split", "--dataset", str(tmp_path / "ds"))
    assert listed.returncode == 0, listed.stderr[-2000:]
    out = listed.stdout.splitlines()
    assert out[0] == f"{tmp_path / 'ds'}: train {200 - len(expected)} examples, eval {len(expected)} examples"
    assert out[1] == f"split rule: {meta['split_rule']}"
    assert out[3:] == [f"{i}\t{n}" for i, n in expected]


def test_lines_without_split_go_to_train_when_some_lines_name_one_unless_eval_fraction_is_given(tmp_path):
    from omni.data import dataset
    from omni.data.manifest import split_of

    lines = [{"id": f"x{i}", "segments": [{"text": f"line {i}"}], "targets": ["text"],
              **({"split": "eval"} if i % 10 == 0 else {"split": "train"} if i % 10 == 1 else {})} for i in range(60)]
    manifest = _text_manifest(tmp_path, lines)
    named_eval = [f"x{i}" for i in range(0, 60, 10)]

    run = omni("data", "build", "--manifest", str(manifest), "--out", str(tmp_path / "implicit"))
    assert run.returncode == 0, run.stderr[-2000:]
    assert "12 of 60 lines name their split; the other 48 go to train" in run.stdout
    assert dataset.open_dataset(tmp_path / "implicit").meta["eval_ids"] == named_eval
    assert _stored_eval_ids(tmp_path / "implicit") == sorted(named_eval)

    run = omni("data", "build", "--manifest", str(manifest), "--out", str(tmp_path / "explicit"),
               "--eval-fraction", "0.5")
    assert run.returncode == 0, run.stderr[-2000:]
    assert "of the other 48, a stable hash of the line's id (or its content) puts --eval-fraction 0.5" in run.stdout
    hashed = [line["id"] for n, line in enumerate(lines, start=1) if split_of(line, n, 0.5) == "eval"]
    assert set(named_eval) < set(hashed)  # the named lines, and some hashed ones
    assert dataset.open_dataset(tmp_path / "explicit").meta["eval_ids"] == hashed
    assert _stored_eval_ids(tmp_path / "explicit") == sorted(hashed)


def test_data_split_of_a_dataset_built_before_eval_ids_were_recorded_says_so(tmp_path):
    manifest = _text_manifest(tmp_path, [_text(i, "eval" if i < 2 else "train") for i in range(6)])
    assert omni("data", "build", "--manifest", str(manifest), "--out", str(tmp_path / "ds")).returncode == 0
    meta_file = tmp_path / "ds" / "omni_dataset.json"
    meta = json.loads(meta_file.read_text())
    for key in ("split_rule", "eval_ids", "eval_lines"):
        del meta[key]
    meta_file.write_text(json.dumps(meta))
    run = omni("data", "split", "--dataset", str(tmp_path / "ds"))
    assert run.returncode == 0, run.stderr[-2000:]
    assert "train 4 examples, eval 2 examples" in run.stdout
    assert "built before omni recorded the split rule and the eval ids" in run.stdout and "rebuild" in run.stdout
    assert _stored_eval_ids(tmp_path / "ds") == ["line1", "line2"]  # and it still loads
