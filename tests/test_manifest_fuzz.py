"""Random manifests through `omni data build`: never a crash, every line accounted for, built lines read back;
random prompts files through read_prompts (`omni generate --prompts`, `omni eval --prompts`) the same way.

Each example writes a folder of random media (PNGs, JPEGs and WAVs that are valid, truncated or garbage, .npy
arrays of any shape and dtype) and a manifest of random lines (raw bytes, random JSON values, lines with random
fields, segments and paths), then builds it with the omni command in process, with and without --skip-bad:

- the command exits 0 or 2, never anything else, and a failure is one `omni: error:` line, no traceback;
- with --skip-bad the build succeeds (two known-good lines are always there, one per split) and the examples
  built plus the lines skipped are exactly the non-blank lines, each once;
- every built example is what its line said: id, targets, meta, text and target flag of every segment, the image
  bytes as given, the codes of a .npy segment.
"""

import contextlib
import io
import json
import re
import tempfile
from pathlib import Path

import numpy as np
import pytest
import scipy.io.wavfile
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from PIL import Image

from omni import cli
from omni.data import dataset
from omni.data.codec import ToneCodec

TONE = {"name": ToneCodec.name, "frame_rate": ToneCodec.frame_rate, "codebook_sizes": list(ToneCodec.codebook_sizes)}
GOOD = [{"segments": [{"text": "known good train line"}], "targets": ["text"], "split": "train"},
        {"segments": [{"text": "known good eval line"}], "targets": ["text"], "split": "eval"}]

# ----------------------------------------------------------------------------------------------- media files

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=6)


@st.composite
def image_files(draw):
    h, w = draw(st.integers(1, 12)), draw(st.integers(1, 12))
    mode = draw(st.sampled_from(["RGB", "L", "RGBA", "P", "1"]))
    pixels = np.random.default_rng(draw(st.integers(0, 2**16))).integers(0, 255, (h, w, 3), dtype=np.uint8)
    image = Image.fromarray(pixels).convert(mode)
    buffer = io.BytesIO()
    ext = draw(st.sampled_from(["png", "jpg"]))
    image.convert("RGB" if ext == "jpg" else mode).save(buffer, format="PNG" if ext == "png" else "JPEG")
    data = buffer.getvalue()
    variant = draw(st.sampled_from(["valid"] * 4 + ["truncated", "garbage"]))
    if variant == "truncated":
        data = data[:draw(st.integers(0, len(data) - 1))]
    elif variant == "garbage":
        data = draw(st.binary(max_size=40))
    return ext, data


@st.composite
def wav_files(draw):
    rate = draw(st.sampled_from([8000, 16000, 22050, 44100]))
    samples = draw(st.integers(0, 2000))
    channels = draw(st.integers(1, 2))
    dtype = draw(st.sampled_from([np.int16, np.float32, np.uint8, np.int32]))
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    wave = rng.uniform(-1, 1, (samples, channels) if channels == 2 else samples)
    if dtype == np.float32:
        wave = wave.astype(np.float32)
    else:
        info = np.iinfo(dtype)
        wave = ((wave + 1) / 2 * (info.max - info.min) + info.min).astype(dtype)
    buffer = io.BytesIO()
    scipy.io.wavfile.write(buffer, rate, wave)
    data = buffer.getvalue()
    variant = draw(st.sampled_from(["valid"] * 4 + ["truncated", "garbage"]))
    if variant == "truncated":
        data = data[:draw(st.integers(0, len(data) - 1))]
    elif variant == "garbage":
        data = b"RIFF" + draw(st.binary(max_size=40))
    return "wav", data


@st.composite
def npy_files(draw):
    if draw(st.booleans()):  # codes that fit the tone codec: [frames, 2] below (64, 16)
        frames = draw(st.integers(0, 6))
        array = np.stack([np.arange(frames) % 64, np.arange(frames) % 16], 1).astype(
            draw(st.sampled_from([np.int8, np.int16, np.int32, np.int64, np.uint16, np.uint64])))
    else:
        array = draw(hnp.arrays(hnp.scalar_dtypes(), hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=4)))
    buffer = io.BytesIO()
    np.save(buffer, array)
    data = buffer.getvalue()
    if draw(st.integers(0, 5)) == 0:  # truncated
        data = data[:draw(st.integers(0, len(data)))]
    return "npy", data


media_files = st.tuples(image_files(), wav_files(), npy_files()).map(list) | st.lists(
    st.one_of(image_files(), wav_files(), npy_files()), max_size=5)

# ----------------------------------------------------------------------------------------------- manifest lines

def segments(paths):
    path = st.sampled_from(paths) | st.text(max_size=6) if paths else st.text(max_size=6)
    text = st.text(alphabet=st.characters() | st.characters(categories=["Cs"]), max_size=12)  # lone surrogates too
    value = st.one_of(
        st.fixed_dictionaries({"text": text}),
        st.fixed_dictionaries({"image": path}),
        st.fixed_dictionaries({"audio": path}),
        st.fixed_dictionaries({"codes": path}),
        json_values,
    )

    @st.composite
    def segment(draw):
        out = draw(value)
        if isinstance(out, dict) and draw(st.booleans()):
            out["target"] = draw(st.booleans() | json_values)
        if isinstance(out, dict) and draw(st.integers(0, 9)) == 0:
            out[draw(st.text(max_size=4))] = draw(json_values)
        return out
    return segment()


@st.composite
def structured_lines(draw, paths):
    line = {}
    fields = {
        "segments": st.lists(segments(paths), max_size=4) | json_values,
        "targets": st.lists(st.sampled_from(["text", "audio", "image", "video"]), max_size=3) | json_values,
        "split": st.sampled_from(["train", "eval", "test"]) | json_values,
        "id": st.sampled_from(["a", "b", "c", "7", 7]) | json_values,
        "meta": json_values,
        "codec": st.just(TONE) | json_values,
    }
    for key, strategy in fields.items():
        if key == "segments" or draw(st.booleans()):
            line[key] = draw(strategy)
    if draw(st.integers(0, 9)) == 0:
        line[draw(st.text(max_size=4))] = draw(json_values)
    return json.dumps(line).encode()


@st.composite
def plausible_lines(draw, paths):
    """Lines a user would write: segments of the right kinds on the files there are, targets that fit them."""
    by_kind = {"image": [p for p in paths if p.endswith((".png", ".jpg"))],
               "audio": [p for p in paths if p.endswith(".wav")], "codes": [p for p in paths if p.endswith(".npy")]}
    kinds = ["text"] + [kind for kind, names in by_kind.items() if names]
    segments, present = [], set()
    for kind in draw(st.lists(st.sampled_from(kinds), min_size=1, max_size=3)):
        value = draw(st.text(min_size=1, max_size=12)) if kind == "text" else draw(st.sampled_from(by_kind[kind]))
        segment = {kind: value}
        if draw(st.integers(0, 3)) == 0:
            segment["target"] = draw(st.sampled_from([True, True, False]))
        segments.append(segment)
        present.add({"codes": "audio"}.get(kind, kind))
    learnable = sorted(present - {"image"}) or ["text"]
    line = {"segments": segments, "targets": draw(st.lists(st.sampled_from(learnable), min_size=1, unique=True))}
    for key, strategy in (("id", st.sampled_from(["a", "b", "c", "7", 7])), ("meta", json_values),
                          ("split", st.sampled_from(["train", "eval"]))):
        if draw(st.booleans()):
            line[key] = draw(strategy)
    return json.dumps(line).encode()


def lines(names, paths):
    return st.one_of(
        plausible_lines(names), plausible_lines(names), plausible_lines(names), structured_lines(paths),
        json_values.map(lambda v: json.dumps(v).encode()),
        st.binary(max_size=30),
        st.sampled_from([b"", b"   ", b"\t"]),
    )


@st.composite
def corpora(draw):
    files = draw(media_files)
    names = [f"f{i}.{ext}" for i, (ext, _) in enumerate(files)]
    body = draw(st.lists(lines(names, names + ["missing.png", "missing.wav", "sub/../f0.png"]), min_size=1,
                         max_size=10))
    ending = draw(st.sampled_from([b"\n", b"\r\n"]))
    start = draw(st.integers(0, len(body)))  # where the two known-good lines go
    manifest = body[:start] + [json.dumps(line).encode() for line in GOOD] + body[start:]
    return {name: data for name, (_, data) in zip(names, files)}, ending.join(manifest) + ending


# ----------------------------------------------------------------------------------------------- checks

def _omni(*args):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = cli.main(list(args))
        except SystemExit as e:  # argparse
            code = e.code
    return code, out.getvalue(), err.getvalue()


def _non_blank(manifest: bytes) -> dict:
    """{line number: bytes} of the lines a build must account for (lines end at \\n, \\r\\n or \\r)."""
    lines = manifest.splitlines()
    if lines and lines[0].startswith(b"\xef\xbb\xbf"):
        lines[0] = lines[0][3:]
    return {n: line for n, line in enumerate(lines, start=1) if line.decode("utf-8", "replace").strip()}


def _check_read_back(folder: Path, out: Path, expected: dict) -> int:
    """Every built example against its line; returns how many were built."""
    ds = dataset.open_dataset(out)
    by_id: dict = {}
    for number, data in expected.items():
        line = json.loads(data)
        key = str(line["id"]) if "id" in line else f"line{number}"
        by_id[key] = None if key in by_id else line  # None: two lines give this id, do not compare
    built = 0
    for split, count in ds.meta["counts"].items():
        source = ds.source(split)
        assert len(source) == count
        for i in range(count):
            example = dataset.decode_record(source[i], len(ds.codebook_sizes))
            built += 1
            line = by_id.get(example["id"])
            assert example["id"] in by_id, example["id"]
            if line is None:
                continue
            assert example["targets"] == line["targets"]
            assert json.dumps(example["meta"]) == json.dumps(line.get("meta", {}))
            assert len(example["segments"]) == len(line["segments"])
            for got, want in zip(example["segments"], line["segments"]):
                if "text" in want:
                    assert got["text"] == want["text"] and got["target"] == want.get("target", True)
                elif "image" in want:
                    assert got["image_bytes"] == (folder / want["image"]).read_bytes()
                elif "codes" in want:
                    assert np.array_equal(got["audio"], np.load(folder / want["codes"]))
                else:
                    assert got["audio"].ndim == 2 and len(got["audio"]) > 0
    return built


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(corpus=corpora(), codec=st.sampled_from(["tone", "tone", None]))
def test_random_manifests_build_or_fail_cleanly_and_account_for_every_line(corpus, codec):
    files, manifest = corpus
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "corpus"
        folder.mkdir()
        for name, data in files.items():
            (folder / name).write_bytes(data)
        (folder / "manifest.jsonl").write_bytes(manifest)
        base = ["data", "build", "--manifest", str(folder / "manifest.jsonl"), "--eval-fraction", "0.5"]
        base += ["--codec", codec] if codec else []
        non_blank = _non_blank(manifest)

        for skip_bad in (False, True):
            out = Path(tmp) / f"ds-{skip_bad}"
            code, stdout, stderr = _omni(*base, "--out", str(out), *(["--skip-bad"] if skip_bad else []))
            assert code in (0, 2), (code, stderr)
            event(f"skip_bad={skip_bad} exit {code}")
            assert "Traceback" not in stderr
            if code == 2:
                errors = [line for line in stderr.splitlines() if line.strip()]
                assert len(errors) == 1 and errors[0].startswith("omni: error: "), stderr
                assert not out.exists() and not [p for p in Path(tmp).iterdir() if p.name.startswith(".")]
                assert not skip_bad or codec is None, stderr  # good lines in both splits: only a missing codec stops it
                continue
            meta = json.loads((out / dataset.DATASET_FILE).read_text())
            skipped = [s["line"] for s in meta["skipped"]]
            assert not skip_bad and not skipped or skip_bad
            assert len(set(skipped)) == len(skipped) and set(skipped) <= set(non_blank)
            built = _check_read_back(folder, out, {n: non_blank[n] for n in non_blank if n not in skipped})
            assert built + len(skipped) == len(non_blank), (built, skipped, sorted(non_blank))
            event(f"skip_bad={skip_bad}: {min(built - 2, 3)}+ random lines built")
            assert f"omni: built {out}:" in stdout
            assert not [p for p in Path(tmp).iterdir() if p.name.startswith(".")]  # no temporary folder left


# ----------------------------------------------------------------------------------------------- prompts files

@st.composite
def prompt_lines(draw, names):
    """`{"prompt": ...}` lines as `omni generate --prompts` takes them: text around tags on the files there are,
    missing ones, unknown tag words and unclosed tags, with random extra fields."""
    paths = st.sampled_from(names + ["missing.png", "missing.wav", "sub/../f0.png", ""])
    tag = st.one_of(
        paths.map(lambda p: f"<image:{p}>"), paths.map(lambda p: f"<audio:{p}>"), paths.map(lambda p: f"<codes:{p}>"),
        st.sampled_from(["<video:x.mp4>", "<image:", "<>", "<audio:a.wav", ">"]))
    pieces = draw(st.lists(st.text(max_size=6) | tag, max_size=4))
    line = {"prompt": "".join(pieces) if draw(st.integers(0, 9)) else draw(json_values)}
    fields = {"id": st.sampled_from(["a", "b", "7", 7]) | json_values,
              "target": st.sampled_from(["text", "audio", "image", "video"]) | json_values,
              "audio": st.lists(paths, max_size=2) | json_values,
              "image_size": st.sampled_from([[8, 8], [16, 4], [0, 8], [8], "8x8"]) | json_values}
    for key, strategy in fields.items():
        if draw(st.integers(0, 2)) == 0:
            line[key] = draw(strategy)
    if draw(st.integers(0, 9)) == 0:
        line[draw(st.text(max_size=4))] = draw(json_values)
    return json.dumps(line).encode()


@st.composite
def plausible_prompt_lines(draw, names):
    """Prompt lines a user would write: tags of the right kind on the files there are."""
    tags = {"png": "image", "jpg": "image", "wav": "audio", "npy": "codes"}
    pieces = draw(st.lists(st.text(min_size=1, max_size=6).filter(lambda t: "<" not in t and ">" not in t)
                           | st.sampled_from([f"<{tags[n.rsplit('.', 1)[1]]}:{n}>" for n in names] or ["x"]),
                           min_size=1, max_size=3))
    line = {"prompt": "".join(pieces)}
    if draw(st.booleans()):
        line["id"] = draw(st.sampled_from(["a", "b", "7", 7]))
    if draw(st.booleans()):
        line["target"] = draw(st.sampled_from(["text", "audio"]))
    return json.dumps(line).encode()


@st.composite
def prompts_files(draw):
    files = draw(media_files)
    names = [f"f{i}.{ext}" for i, (ext, _) in enumerate(files)]
    if draw(st.booleans()):  # as a user writes them (most lines read)
        body = draw(st.lists(plausible_prompt_lines(names) | plausible_lines(names), min_size=1, max_size=4))
    else:  # anything
        body = draw(st.lists(prompt_lines(names) | prompt_lines(names) | lines(names, names + ["missing.wav"]),
                             min_size=1, max_size=8))
    ending = draw(st.sampled_from([b"\n", b"\r\n"]))
    return {name: data for name, (_, data) in zip(names, files)}, ending.join(body) + ending


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(prompts=prompts_files(), codec=st.sampled_from([ToneCodec(), None]), target=st.sampled_from(["text", "audio"]))
def test_random_prompts_files_read_or_fail_naming_the_line(prompts, codec, target):
    """`omni generate --prompts` / `omni eval --prompts` read a file of random lines: either one task per non-blank
    line, in order, with the id the line gave, or one GenerateError line naming the file and a non-blank line;
    never another exception."""
    from omni.errors import GenerateError
    from omni.tools.generate import read_prompts

    files, body = prompts
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for name, data in files.items():
            (folder / name).write_bytes(data)
        path = folder / "prompts.jsonl"
        path.write_bytes(body)
        non_blank = _non_blank(body)
        try:
            tasks = read_prompts(path, patch_size=4, max_image_patches=16, codec=codec, target=target)
        except GenerateError as e:
            message = str(e)
            if not non_blank:
                assert message == f"prompts file {path} has no prompts (every line is blank)"
                return
            assert "\n" not in message and message.startswith(f"{path}:"), message
            number = re.match(rf"{re.escape(str(path))}:(\d+)", message)
            assert number and int(number.group(1)) in non_blank, message
            event("a line refused")
            return
        event(f"{min(len(tasks), 3)}+ tasks read")
        assert [t.line for t in tasks] == sorted(non_blank)
        for task in tasks:
            line = json.loads(non_blank[task.line])
            assert task.id == str(line.get("id", f"line{task.line}"))
            assert task.target in ("text", "audio", "image")  # (an empty prompt is an unconditional sample)


def test_a_prompt_line_whose_audio_list_holds_a_non_path_names_the_line(tmp_path):
    """Found by the fuzz above: "audio": [null] gave TypeError in the path join, "audio": [""] a StorageError
    without the line."""
    from omni.errors import GenerateError
    from omni.tools.generate import read_prompts

    path = tmp_path / "p.jsonl"
    for bad in ("null", '""', '"  "', "3"):
        path.write_text(f'{{"prompt": "hi"}}\n{{"prompt": "", "audio": [{bad}]}}\n')
        with pytest.raises(GenerateError, match=rf"^{re.escape(str(path))}:2: \"prompt\" must be a string and "
                                                r"\"audio\" a list of WAV paths$"):
            read_prompts(path, patch_size=4, max_image_patches=16)


def test_a_manifest_line_whose_meta_is_not_an_object_is_read_as_a_prompt(tmp_path):
    """Found by the fuzz above: "meta": true gave AttributeError ('bool' object has no attribute 'get')."""
    from omni.tools.generate import read_prompts

    path = tmp_path / "p.jsonl"
    path.write_text('{"segments": [{"text": "q", "target": false}, {"text": "a"}], "targets": ["text"], '
                    '"meta": true}\n')
    (task,) = read_prompts(path, patch_size=4, max_image_patches=16)
    assert (task.group, task.truth, task.meta, task.segments) == ("text", "a", True, [{"text": "q"}])
