"""The JSONL manifest: how users hand omni their own images, audio and text.

One example per line, an ordered list of segments and the modalities the loss learns:

    {"segments": [{"image": "img/cat.png"}, {"text": "a cat on a mat"}], "targets": ["text"]}
    {"segments": [{"audio": "wav/q1.wav"}, {"text": "what time is it"}], "targets": ["text"], "split": "eval"}
    {"segments": [{"text": "say hello", "target": false}, {"codes": "codes/hello.npy"}], "targets": ["audio"],
     "codec": {"name": "mimi", "frame_rate": 12.5, "codebook_sizes": [2048, 2048, 2048, 2048]}}
    {"segments": [{"text": "draw a red circle", "target": false}, {"image": "img/red_circle.png"}],
     "targets": ["image"]}
    {"segments": [{"text": "a cat"}, {"image_codes": "vq/cat.npy"}], "targets": ["image"],
     "image_tokenizer": {"name": "vqgan-f16", "codebook_sizes": [16384]}}

Segments
    text    a string
    image   a path to an image Pillow decodes (PNG, JPEG, ...); stored as the original encoded bytes and resized to
            the patch budget when read (data.max_image_patches), so one dataset serves several resolutions.
            "as" says how it enters the sequence (omni.batch): "patches" (input only), "codes" (the dataset's
            image tokenizer's codes, `--image-tokenizer`: input, and a target when the line learns "image") or
            "both" (patches, then the codes as the target). Default: "codes" for an image the line learns (its
            targets hold "image" and the segment is not "target": false), "patches" otherwise
    image_codes
            a path to a .npy int array [rows, cols, codebooks] of precomputed codes from any image tokenizer
            (a VQGAN, Chameleon's...); the line (or an earlier one) names it in "image_tokenizer": {name,
            codebook_sizes[, patch_size]}, and every image code of a dataset must come from the same tokenizer
    audio   a path to a WAV file; encoded at build time by the dataset's codec (`--codec`), after resampling
    codes   a path to a .npy int array [frames, codebooks] of precomputed codes from any codec (EnCodec, Mimi,
            DAC, SNAC...); the line (or an earlier one) names the codec in "codec": {name, frame_rate,
            codebook_sizes}, and every codes segment of a dataset must come from the same codec
A segment may carry "target": false (a JSON boolean) to keep that span out of the loss (a prompt before an
answer); a line must keep at least one segment of its targets in the loss.

Line fields
    segments  required, non-empty
    targets   modalities learned from this example: a subset of ["text", "audio", "image"] present in its segments
              (an image is learned only as codes)
    split     optional "train" or "eval". A line without one goes to train when any line of the manifest names a
              split (unless --eval-fraction is given: then a stable hash of its id, or its content, picks); when
              no line names one, the hash puts --eval-fraction of the lines (default 0.05) in eval
    id        optional, kept with the example (defaults to the line number); no two lines may share one
    meta      optional free JSON kept with the example (the demo corpus stores each task's answer there)
    codec     the identity of the codec that made the line's precomputed codes
    image_tokenizer  the identity of the image tokenizer that made the line's image_codes
Relative paths are relative to the manifest's folder.

Reading a line gives a *raw example*, the same in-memory form the catalog adapters (omni.data.adapters) produce:

    {"id": str, "targets": [...], "meta": {...}, "segments": [
        {"text": str} | {"image_bytes": bytes, "as": str} | {"image": uint8[H, W, 3]}
        | {"image_codes": int[rows, cols, codebooks]}
        | {"audio": float32[samples], "sample_rate": int} | {"codes": int32[frames, codebooks]},
        each optionally with "target": False]}
(an in-memory image without "as" enters as image_as() says.)

Every problem is a `ManifestError` naming the file, the line and the reason.
"""

from __future__ import annotations

import codecs
import io
import json
import os
import stat
import zlib

import numpy as np

from omni import storage
from omni.batch import TARGET_MODALITIES
from omni.data.audio import read_wav
from omni.data.images import decode_image
from omni.errors import ManifestError, StorageError

SEGMENT_KINDS = ("text", "image", "image_codes", "audio", "codes")
MODALITY_OF_KIND = {"text": "text", "image": "image", "image_codes": "image", "audio": "audio", "codes": "audio"}
IMAGE_AS = ("patches", "codes", "both")  # how an image segment enters the sequence ("as")
LINE_KEYS = {"segments", "targets", "split", "id", "meta", "codec", "image_tokenizer"}
SPLITS = ("train", "eval")
MAX_CODEBOOK_SIZE = 2**31 - 1  # codes are stored as int32
MAX_FRAME_RATE = 1e6  # frames per second a "codec" identity may give
DEFAULT_EVAL_FRACTION = 0.05  # share of lines hashed into eval when no line names a split and none is given


def split_of(line: dict, line_number: int, eval_fraction: float) -> str:
    """The split a line goes to: its "split" field, else a stable hash of its id or content."""
    if "split" in line:
        return line["split"]
    key = str(line.get("id", json.dumps(line.get("segments"), sort_keys=True)))
    return "eval" if zlib.crc32(key.encode("utf-8", "surrogatepass")) % 10_000 < eval_fraction * 10_000 else "train"


def read_lines(path) -> "list[tuple[int, dict | ManifestError]]":
    """(line number, parsed JSON object or the error) for every non-blank line; nothing is loaded from disk yet.

    Lines end at \\n, \\r\\n or \\r (as an editor counts them); a line that is not UTF-8 or not a JSON object is
    returned as its error, so --skip-bad can skip it like any other bad line.
    """
    try:
        path = storage.path(path)
    except StorageError as e:
        raise ManifestError(path, 0, str(e)) from None
    if not path.is_file():
        raise ManifestError(path, 0, "manifest file not found")
    out = []
    number = 0
    with path.open("rb") as f:
        for chunk in f:  # binary lines end at \n only; splitlines() also ends them at \r, like text mode
            for data in chunk.splitlines():
                number += 1
                if number == 1 and data.startswith(codecs.BOM_UTF8):
                    data = data[len(codecs.BOM_UTF8):]
                try:
                    text = data.decode("utf-8")
                except UnicodeDecodeError as e:
                    column = len(data[:e.start].decode("utf-8")) + 1
                    out.append((number, ManifestError(path, number, f"not UTF-8 (byte 0x{data[e.start]:02x} at "
                                                                    f"column {column}); save the manifest as UTF-8")))
                    continue
                if not text.strip():
                    continue
                out.append((number, _parse_line(text, path, number)))
    return out


def _parse_line(text: str, path, number: int) -> "dict | ManifestError":
    try:
        line = json.loads(text)
    except json.JSONDecodeError as e:
        return ManifestError(path, number, f"not valid JSON ({e.msg} at column {e.colno})")
    except ValueError as e:  # e.g. an integer longer than Python's digit limit
        return ManifestError(path, number, f"not valid JSON ({e})")
    except RecursionError:
        return ManifestError(path, number, "not valid JSON (nested too deeply)")
    if not isinstance(line, dict):
        return ManifestError(path, number, "a line must be a JSON object with \"segments\"")
    return line


def codec_problem(identity) -> "str | None":
    """Why a line's "codec" field is not a codec identity {name, frame_rate, codebook_sizes}, or None."""
    shape = f"\"codec\" must be {{\"name\": str, \"frame_rate\": number in (0, {MAX_FRAME_RATE:g}], \"codebook_sizes\": [int > 0, ...]}}"
    if not isinstance(identity, dict) or not {"name", "frame_rate", "codebook_sizes"} <= set(identity):
        return shape
    name, rate, sizes = identity["name"], identity["frame_rate"], identity["codebook_sizes"]
    if not isinstance(name, str) or not name or not _encodable(name):
        return f"{shape}; name is {short_repr(name)}"
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0 < rate <= MAX_FRAME_RATE:
        return f"{shape}; frame_rate is {short_repr(rate)}"
    if (not isinstance(sizes, list) or not sizes
            or not all(isinstance(n, int) and not isinstance(n, bool) and 0 < n <= MAX_CODEBOOK_SIZE for n in sizes)):
        return f"{shape} with sizes up to {MAX_CODEBOOK_SIZE}; codebook_sizes is {short_repr(sizes)}"
    return None


def image_tokenizer_problem(identity) -> "str | None":
    """Why a line's "image_tokenizer" field is not an identity {name, codebook_sizes[, patch_size]}, or None."""
    shape = ("\"image_tokenizer\" must be {\"name\": str, \"codebook_sizes\": [int > 0, ...]} (optionally "
             "\"patch_size\": int > 0)")
    if not isinstance(identity, dict) or not {"name", "codebook_sizes"} <= set(identity):
        return shape
    if set(identity) - {"name", "codebook_sizes", "patch_size"}:
        return f"{shape}; unknown field(s) {sorted(set(identity) - {'name', 'codebook_sizes', 'patch_size'})}"
    name, sizes, patch = identity["name"], identity["codebook_sizes"], identity.get("patch_size")
    if not isinstance(name, str) or not name or not _encodable(name):
        return f"{shape}; name is {short_repr(name)}"
    if (not isinstance(sizes, list) or not sizes
            or not all(isinstance(n, int) and not isinstance(n, bool) and 0 < n <= MAX_CODEBOOK_SIZE for n in sizes)):
        return f"{shape} with sizes up to {MAX_CODEBOOK_SIZE}; codebook_sizes is {short_repr(sizes)}"
    if patch is not None and (isinstance(patch, bool) or not isinstance(patch, int) or patch < 1):
        return f"{shape}; patch_size is {short_repr(patch)}"
    return None


def image_as(segment: dict, targets) -> str:
    """How an image segment enters the sequence: its "as", else "codes" when the example learns images and the
    segment is not "target": false, else "patches" (input only, as before image codes existed)."""
    if "as" in segment:
        return segment["as"]
    return "codes" if "image" in targets and segment.get("target", True) else "patches"


def short_repr(value, limit: int = 80) -> str:
    """repr(value) cut to `limit` characters, for messages that quote what a line holds (one line, any size)."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit - 5]}...{text[-2:]}"


def show_path(file) -> str:
    """A path as a message shows it: as is when printable, else quoted with escapes (keeps the message one line)."""
    text = str(file)
    return text if text.isprintable() else repr(text)


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


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
        fail(f"split {short_repr(line['split'])} is not one of {SPLITS}")
    targets = line.get("targets", [])
    if (not isinstance(targets, list) or not targets
            or not all(isinstance(t, str) and t in TARGET_MODALITIES for t in targets)):
        fail(f"\"targets\" must be a non-empty subset of {json.dumps(list(TARGET_MODALITIES))}, got "
             f"{short_repr(targets)}")
    if "codec" in line and codec_problem(line["codec"]):
        fail(codec_problem(line["codec"]))
    if "image_tokenizer" in line and image_tokenizer_problem(line["image_tokenizer"]):
        fail(image_tokenizer_problem(line["image_tokenizer"]))
    if "id" in line and isinstance(line["id"], str) and not _encodable(line["id"]):
        fail(f"id {short_repr(line['id'])} is not valid Unicode (it holds a lone surrogate escape)")
    present, learned, patch_only = set(), set(), False
    for i, segment in enumerate(segments):
        if not isinstance(segment, dict):
            fail(f"segment {i} must be an object like {{\"text\": ...}}, got {short_repr(segment)}")
        kinds = [k for k in SEGMENT_KINDS if k in segment]
        if len(kinds) != 1:
            fail(f"segment {i} must have exactly one of {list(SEGMENT_KINDS)}, has {kinds or 'none'}")
        extra = set(segment) - {kinds[0], "target"} - ({"as"} if kinds[0] == "image" else set())
        if extra:
            hint = " (\"as\" goes on image segments only)" if "as" in extra else ""
            fail(f"segment {i} has unknown field(s) {sorted(extra)}{hint}")
        if kinds[0] == "image" and segment.get("as", "patches") not in IMAGE_AS:
            fail(f"segment {i}: \"as\" must be one of {list(IMAGE_AS)}, got {short_repr(segment['as'])}")
        value = segment[kinds[0]]
        if not isinstance(value, str) or (kinds[0] != "text" and not value):
            what = "string" if kinds[0] == "text" else "string path"
            fail(f"segment {i}: {kinds[0]} must be a {what}, got {short_repr(value)}")
        if kinds[0] == "text" and not value:
            fail(f"segment {i}: empty text")
        if not _encodable(value):
            fail(f"segment {i}: {kinds[0]} {short_repr(value)} is not valid Unicode (it holds a lone surrogate escape)")
        target = segment.get("target", True)
        if not isinstance(target, bool):
            fail(f"segment {i}: \"target\" must be the JSON boolean true or false, got {short_repr(target)}")
        modality = MODALITY_OF_KIND[kinds[0]]
        if kinds[0] == "image" and image_as(segment, targets) == "patches":
            patch_only = True  # patches are inputs only: no image to learn here
            continue
        present.add(modality)
        if target:
            learned.add(modality)
    missing = set(targets) - present
    if missing:
        hint = ("; an image entering as patches is input only: give it \"as\": \"codes\" (or \"both\")"
                if "image" in missing and patch_only else "")
        fail(f"targets {sorted(missing)} name modalities this example does not contain; nothing to learn{hint}")
    if not learned & set(targets):
        fail(f"every {' or '.join(sorted(set(targets)))} segment has \"target\": false; nothing to learn (drop "
             f"\"target\": false from the answer segment)")


def _resolve_path(base, value: str, path, number: int, what: str):
    """The file a segment names: relative to the manifest's folder, or absolute (a path or a gs:// URL)."""
    try:
        named = storage.path(value)
    except StorageError as e:
        raise ManifestError(path, number, f"{what} {e}") from None
    file = named if named.is_absolute() else base / value
    if not file.is_file():
        raise ManifestError(path, number, f"{what} file not found: {show_path(file)}")
    return file


def load_image_bytes(file) -> bytes:
    """The file's bytes after checking that Pillow fully decodes them (ValueError naming the file otherwise)."""
    data = storage.path(file).read_bytes()
    decode_image(data, name=show_path(file))
    return data


MAX_CODES_BYTES = 256 * 2**20  # one .npy of codes: far above what one example may hold (dataset.MAX_EXAMPLE_POSITIONS)
NPY_MAGIC = b"\x93NUMPY"
# What a file that is not a .npy often is, by its first bytes (to say so instead of numpy's unpickling advice).
_SIGNATURES = ((b"\x89PNG", "a PNG image"), (b"\xff\xd8\xff", "a JPEG image"), (b"GIF8", "a GIF image"),
               (b"RIFF", "a RIFF file (WAV or WebP)"), (b"PK\x03\x04", "a zip archive (.npz?)"),
               (b"\x80", "a Python pickle"), (b"\x1f\x8b", "a gzip file"), (b"%PDF", "a PDF"))


def read_npy(file, what: str, shape: str, maker: str = "") -> np.ndarray:
    """The one integer array in the .npy file `file` (a path or URL). ValueError naming the file when it is not a
    regular file, larger than MAX_CODES_BYTES, not a .npy at all (saying what it looks like: a PNG given as
    codes), an .npz archive, an array of Python objects (never unpickled) or a damaged one; `shape` is the
    expected layout in words ("[frames, codebooks]"), `maker` the command that writes one."""
    location = storage.path(file)
    name = show_path(file)
    hint = f"give a .npy integer array {shape}" + (f" (`{maker}` writes one)" if maker else "")
    try:
        if not storage.is_remote(location):
            info = os.stat(os.fspath(location))
            if stat.S_ISDIR(info.st_mode):
                raise ValueError(f"{what} {name} is a folder, not a .npy file; {hint}")
            if not stat.S_ISREG(info.st_mode):
                raise ValueError(f"{what} {name} is not a regular file (a device or a pipe); {hint}")
        with location.open("rb") as f:
            data = f.read(MAX_CODES_BYTES + 1)
    except FileNotFoundError:
        raise ValueError(f"{what} file not found: {name}") from None
    except OSError as e:
        raise ValueError(f"cannot read {what} {name}: {e.strerror or e}") from None
    if len(data) > MAX_CODES_BYTES:
        raise ValueError(f"{what} {name} is larger than the limit of {MAX_CODES_BYTES // 2**20} MiB for one .npy "
                         "(omni.data.manifest.MAX_CODES_BYTES); split the example over several lines")
    if not data.startswith(NPY_MAGIC):
        looks = next((words for magic, words in _SIGNATURES if data.startswith(magic)), None)
        if data.startswith(b"PK\x03\x04"):
            raise ValueError(f"{what} {name} is an .npz archive, not one .npy array; save the one array with "
                             f"numpy.save; {hint}")
        like = f" (it looks like {looks})" if looks else (" (it is empty)" if not data else "")
        raise ValueError(f"{what} {name} is not a .npy file of integer codes{like}; {hint}")
    try:
        array = np.load(io.BytesIO(data), allow_pickle=False)
    except ValueError as e:
        if "allow_pickle" in str(e) or "pickle" in str(e):
            raise ValueError(f"{what} {name} holds Python objects, not integer codes (omni never unpickles a file); "
                             f"{hint}") from None
        raise ValueError(f"{what} {name} is a damaged .npy file ({e}); write it again, {hint}") from None
    except Exception as e:  # noqa: BLE001 - numpy's other complaints about a bad header
        raise ValueError(f"{what} {name} is a damaged .npy file ({type(e).__name__}: {e}); write it again, "
                         f"{hint}") from None
    return array


def load_codes(file) -> np.ndarray:
    """A .npy integer array [frames >= 1, codebooks], as stored (the codec's range check comes at encoding)."""
    codes = read_npy(file, "codes", "[frames, codebooks]", "omni codec encode")
    if codes.ndim != 2 or not np.issubdtype(codes.dtype, np.integer):
        raise ValueError(f"codes {show_path(file)} must be an integer array [frames, codebooks], got {codes.dtype} "
                         f"{list(codes.shape)}")
    if len(codes) == 0:
        raise ValueError(f"codes {show_path(file)} have no frames")
    return codes.astype(np.int64) if codes.dtype != np.uint64 else codes


def load_image_codes(file) -> np.ndarray:
    """A .npy integer array [rows >= 1, cols >= 1, codebooks], as stored (the tokenizer's range check comes at
    encoding)."""
    codes = read_npy(file, "image codes", "[rows, cols, codebooks]", "omni imagetok encode")
    if codes.ndim != 3 or not np.issubdtype(codes.dtype, np.integer):
        raise ValueError(f"image codes {show_path(file)} must be an integer array [rows, cols, codebooks], got "
                         f"{codes.dtype} {list(codes.shape)}")
    if codes.shape[0] == 0 or codes.shape[1] == 0:
        raise ValueError(f"image codes {show_path(file)} have no cells (shape {list(codes.shape)})")
    return codes.astype(np.int64) if codes.dtype != np.uint64 else codes


def load_line(line: dict, path, number: int) -> dict:
    """A checked manifest line -> raw example (module docstring), reading its files."""
    check_line(line, path, number)
    base = storage.path(path).parent
    segments = []
    for i, segment in enumerate(line["segments"]):
        kind = next(k for k in SEGMENT_KINDS if k in segment)
        out: dict = {} if segment.get("target", True) else {"target": False}
        try:
            if kind == "text":
                out["text"] = segment["text"]
            elif kind == "image":
                out["image_bytes"] = load_image_bytes(_resolve_path(base, segment["image"], path, number, "image"))
                out["as"] = image_as(segment, line["targets"])
            elif kind == "image_codes":
                out["image_codes"] = load_image_codes(_resolve_path(base, segment["image_codes"], path, number,
                                                                    "image codes"))
            elif kind == "audio":
                wave, rate = read_wav(_resolve_path(base, segment["audio"], path, number, "audio"))
                out.update(audio=wave, sample_rate=rate)
            else:
                out["codes"] = load_codes(_resolve_path(base, segment["codes"], path, number, "codes"))
        except ManifestError:
            raise
        except ValueError as e:
            raise ManifestError(path, number, f"segment {i}: {e}") from None
        except OSError as e:  # a file that exists but cannot be read (permissions, an I/O error)
            raise ManifestError(path, number, f"segment {i}: cannot read the {kind} file "
                                              f"{show_path(e.filename or segment[kind])}: {e.strerror or e}") from None
        segments.append(out)
    raw = {"id": str(line.get("id", f"line{number}")), "targets": list(line["targets"]),
           "meta": line.get("meta", {}), "segments": segments}
    for key in ("codec", "image_tokenizer"):
        if key in line:
            raw[key] = line[key]
    return raw
