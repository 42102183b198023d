"""The JSONL manifest: how users hand omni their own images, audio and text.

One example per line, an ordered list of segments and the modalities the loss learns:

    {"segments": [{"image": "img/cat.png"}, {"text": "a cat on a mat"}], "targets": ["text"]}
    {"segments": [{"audio": "wav/q1.wav"}, {"text": "what time is it"}], "targets": ["text"], "split": "eval"}
    {"segments": [{"text": "say hello", "target": false}, {"codes": "codes/hello.npy"}], "targets": ["audio"],
     "codec": {"name": "mimi", "frame_rate": 12.5, "codebook_sizes": [2048, 2048, 2048, 2048]}}

Segments
    text    a string
    image   a path to an image Pillow decodes (PNG, JPEG, ...); stored as the original encoded bytes and resized to
            the patch budget when read (data.max_image_patches), so one dataset serves several resolutions
    audio   a path to a WAV file; encoded at build time by the dataset's codec (`--codec`), after resampling
    codes   a path to a .npy int array [frames, codebooks] of precomputed codes from any codec (EnCodec, Mimi,
            DAC, SNAC...); the line (or an earlier one) names the codec in "codec": {name, frame_rate,
            codebook_sizes}, and every codes segment of a dataset must come from the same codec
A segment may carry "target": false to keep that span out of the loss (a prompt before an answer).

Line fields
    segments  required, non-empty
    targets   modalities learned from this example: a subset of ["text", "audio"] present in its segments
    split     optional "train" or "eval"; otherwise a stable hash of the line's id (or its text) picks one
    id        optional, kept with the example (defaults to the line number)
    meta      optional free JSON kept with the example (the demo corpus stores each task's answer there)
    codec     the identity of the codec that made the line's precomputed codes
Relative paths are relative to the manifest's folder.

Reading a line gives a *raw example*, the same in-memory form the catalog adapters (omni.data.adapters) produce:

    {"id": str, "targets": [...], "meta": {...}, "segments": [
        {"text": str} | {"image_bytes": bytes} | {"image": uint8[H, W, 3]}
        | {"audio": float32[samples], "sample_rate": int} | {"codes": int32[frames, codebooks]},
        each optionally with "target": False]}

Every problem is a `ManifestError` naming the file, the line and the reason.
"""

from __future__ import annotations

import io
import json
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

from omni.batch import TARGET_MODALITIES
from omni.data.audio import read_wav
from omni.errors import ManifestError

SEGMENT_KINDS = ("text", "image", "audio", "codes")
LINE_KEYS = {"segments", "targets", "split", "id", "meta", "codec"}
SPLITS = ("train", "eval")




def split_of(line: dict, line_number: int, eval_fraction: float) -> str:
    """The split a line goes to: its "split" field, else a stable hash of its id or content."""
    if "split" in line:
        return line["split"]
    key = str(line.get("id", json.dumps(line.get("segments"), sort_keys=True)))
    return "eval" if zlib.crc32(key.encode()) % 10_000 < eval_fraction * 10_000 else "train"


def read_lines(path) -> "list[tuple[int, dict | ManifestError]]":
    """(line number, parsed JSON object or the error) for every non-blank line; nothing is loaded from disk yet."""
    path = Path(path)
    if not path.is_file():
        raise ManifestError(path, 0, "manifest file not found")
    out = []
    with open(path, encoding="utf-8") as f:
        for number, text in enumerate(f, start=1):
            if not text.strip():
                continue
            try:
                line = json.loads(text)
            except json.JSONDecodeError as e:
                out.append((number, ManifestError(path, number, f"not valid JSON ({e.msg} at column {e.colno})")))
                continue
            if not isinstance(line, dict):
                out.append((number, ManifestError(path, number, "a line must be a JSON object with \"segments\"")))
                continue
            out.append((number, line))
    return out


def check_line(line: dict, path, number: int) -> None:
    """Structural checks that need no file access (so a bad line fails before any decoding)."""
    def fail(reason):
        raise ManifestError(path, number, reason)

    unknown = set(line) - LINE_KEYS
    if unknown:
        fail(f"unknown field(s) {sorted(unknown)}; a line may have {sorted(LINE_KEYS)}")
    segments = line.get("segments")
    if not isinstance(segments, list) or not segments:
        fail("empty example: \"segments\" must be a non-empty list")
    if line.get("split", "train") not in SPLITS:
        fail(f"split {line['split']!r} is not one of {SPLITS}")
    targets = line.get("targets", [])
    if not isinstance(targets, list) or not set(targets) <= set(TARGET_MODALITIES) or not targets:
        fail(f"\"targets\" must be a non-empty subset of [\"text\", \"audio\"], got {targets!r}")
    present = set()
    for i, segment in enumerate(segments):
        if not isinstance(segment, dict):
            fail(f"segment {i} must be an object like {{\"text\": ...}}, got {segment!r}")
        kinds = [k for k in SEGMENT_KINDS if k in segment]
        if len(kinds) != 1:
            fail(f"segment {i} must have exactly one of {list(SEGMENT_KINDS)}, has {kinds or 'none'}")
        extra = set(segment) - {kinds[0], "target"}
        if extra:
            fail(f"segment {i} has unknown field(s) {sorted(extra)}")
        value = segment[kinds[0]]
        if not isinstance(value, str) or (kinds[0] != "text" and not value):
            fail(f"segment {i}: {kinds[0]} must be a string{' path' if kinds[0] != 'text' else ''}, got {value!r}")
        if kinds[0] == "text" and not value:
            fail(f"segment {i}: empty text")
        present.add("audio" if kinds[0] in ("audio", "codes") else kinds[0])
    missing = set(targets) - present
    if missing:
        fail(f"targets {sorted(missing)} name modalities this example does not contain; nothing to learn")


def _resolve_path(base: Path, value: str, path, number: int, what: str) -> Path:
    file = (base / value) if not Path(value).is_absolute() else Path(value)
    if not file.is_file():
        raise ManifestError(path, number, f"{what} file not found: {file}")
    return file


def load_image_bytes(file: Path) -> bytes:
    """The file's bytes after checking that Pillow fully decodes them (ValueError otherwise)."""
    data = file.read_bytes()
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            if image.width < 1 or image.height < 1:
                raise ValueError("image has no pixels")
    except Exception as e:  # Pillow raises many types for corrupt data
        raise ValueError(f"cannot decode image {file}: {e}") from None
    return data


def load_codes(file: Path) -> np.ndarray:
    try:
        codes = np.load(file, allow_pickle=False)
    except Exception as e:
        raise ValueError(f"cannot read codes {file} as a .npy array: {e}") from None
    if codes.ndim != 2 or not np.issubdtype(codes.dtype, np.integer):
        raise ValueError(f"codes {file} must be an integer array [frames, codebooks], got {codes.dtype} "
                         f"{list(codes.shape)}")
    if len(codes) == 0:
        raise ValueError(f"codes {file} have no frames")
    return codes.astype(np.int32)


def load_line(line: dict, path, number: int) -> dict:
    """A checked manifest line -> raw example (module docstring), reading its files."""
    check_line(line, path, number)
    base = Path(path).parent
    segments = []
    for i, segment in enumerate(line["segments"]):
        kind = next(k for k in SEGMENT_KINDS if k in segment)
        out: dict = {} if segment.get("target", True) else {"target": False}
        try:
            if kind == "text":
                out["text"] = segment["text"]
            elif kind == "image":
                out["image_bytes"] = load_image_bytes(_resolve_path(base, segment["image"], path, number, "image"))
            elif kind == "audio":
                wave, rate = read_wav(_resolve_path(base, segment["audio"], path, number, "audio"))
                out.update(audio=wave, sample_rate=rate)
            else:
                out["codes"] = load_codes(_resolve_path(base, segment["codes"], path, number, "codes"))
        except ManifestError:
            raise
        except ValueError as e:
            raise ManifestError(path, number, f"segment {i}: {e}") from None
        segments.append(out)
    raw = {"id": str(line.get("id", f"line{number}")), "targets": list(line["targets"]),
           "meta": line.get("meta", {}), "segments": segments}
    if "codec" in line:
        raw["codec"] = line["codec"]
    return raw
