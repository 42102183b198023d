"""Built datasets: raw examples -> a TFDS dataset in array_record files, read back by random access.

`omni data build` writes

    OUT/omni_dataset.json    what the dataset holds: codec identity, tokenizer, split sizes, skipped lines, the
                             split rule the build applied and the ids (and manifest lines) of the eval examples
    OUT/codec/               the codec's files when it has any (a fitted MelRVQCodec)
    OUT/image_tokenizer/     the image tokenizer's files when it has any (`--image-tokenizer`, omni imagetok fit);
                             its identity in omni_dataset.json also records "image_size" [H, W], the most common
                             size of the images learned as codes (the size image generation draws by default)
    OUT/tokenizer/           the text tokenizer's files when one was given (`--tokenizer`)
    OUT/tfds/omni_dataset/1.0.0/omni_dataset-{train,eval}.array_record-*   the examples

One stored example (TFDS features; no TensorFlow needed to write or read them):

    id            text
    layout        text, JSON {"targets": [...], "meta": {...}, "segments": [
                      {"kind": "text", "text": str} | {"kind": "image", "as": "patches"|"codes"|"both"}
                      | {"kind": "image_codes", "rows": R, "cols": C} | {"kind": "audio", "frames": T}
                      each with "target": bool]}
    images        sequence of encoded image bytes (PNG/JPEG as given), one per image segment, in order
    audio_codes   int32 [sum of T * K], every audio segment's codes [T, K] flattened frame-major, in order
    image_codes   int32 [sum of R * C * K], every image_codes segment's codes [R, C, K] flattened, in order
                  (absent from datasets built before image codes: read as empty)

Images stay encoded so the patch budget is a training choice: an image entering as codes is encoded by the
dataset's image tokenizer when it is read, after it is fitted to data.max_image_patches cells. Audio is stored
as codes of the dataset's codec, precomputed image codes as they came (one codec and one image tokenizer per
dataset, since their codebook layouts are part of the model's vocabulary). A dataset with an image tokenizer has
format 2 (older omni refuses it by name); one without has format 1, readable by older omni as before.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import functools
import io
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np
from PIL import Image

from omni import storage
from omni.data import claim as claim_lib
from omni.data import image_tokenizer as image_tokenizer_lib
from omni.data import manifest as manifest_lib
from omni.data.audio import check_sample_rate, resample
from omni.data.codec import PrecomputedCodec, codec_from_identity, codec_identity, load_codec
from omni.data.precomputed import is_precomputed
from omni.data.text_tokenizer import save_tokenizer
from omni.errors import DatasetError, ManifestError, OmniError, StorageError

Path = storage.Path  # a local path or a gs:// URL (omni.storage)
from omni.progress import silent
from omni.tokens import check_codes, check_image_codes

FORMAT_VERSION = 1             # written by a build without an image tokenizer
IMAGE_FORMAT_VERSION = 2       # with one: older omni, which cannot read image codes, refuses it by its format
READABLE_FORMATS = (FORMAT_VERSION, IMAGE_FORMAT_VERSION)
DATASET_FILE = "omni_dataset.json"
TFDS_NAME = "omni_dataset"
TFDS_VERSION = "1.0.0"
# Size limits of one example, checked at build time (docs/data.md). A training step allocates per-position arrays
# (image patches among them) for every position of an example, so one huge line can exhaust memory only later,
# in the trainer; the build refuses it instead, naming the line.
MAX_TEXT_BYTES = 1_000_000          # UTF-8 bytes of one text segment
MAX_EXAMPLE_POSITIONS = 4_000_000   # text bytes plus audio codes (frames x codebooks) of one example
NO_EVAL_HINT = ("to hold some out, build with --eval-fraction (the share of lines without \"split\" that go to "
                "eval, e.g. 0.05) or put \"split\": \"eval\" on some manifest lines")


def _tfds():
    import tensorflow_datasets as tfds

    tfds.disable_progress_bar()
    return tfds


@functools.cache
def _builder_class():
    """The TFDS builder, defined on first use so importing omni does not import TFDS (registered once)."""
    tfds = _tfds()

    class OmniDataset(tfds.core.GeneratorBasedBuilder):
        """Interleaved text/image/audio examples in omni's stored layout (module docstring)."""

        VERSION = tfds.core.Version(TFDS_VERSION)
        # No checksums/metadata files ship with this builder; without this TFDS looks for them next to the module
        # through importlib_resources, which is not installed with tensorflow-datasets.
        code_path = None

        def __init__(self, *, examples: dict[str, Callable[[], Iterator]], **kwargs):
            self._examples = examples
            super().__init__(**kwargs)

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
                "id": tfds.features.Text(),
                "layout": tfds.features.Text(),
                "images": tfds.features.Sequence(tfds.features.Tensor(shape=(), dtype=np.object_)),
                "audio_codes": tfds.features.Tensor(shape=(None,), dtype=np.int32),
                "image_codes": tfds.features.Tensor(shape=(None,), dtype=np.int32),
            }))

        def _split_generators(self, dl_manager):
            return {split: self._generate_examples(split) for split in self._examples}

        def _generate_examples(self, split):
            yield from self._examples[split]()

    return OmniDataset


# ----------------------------------------------------------------------------------------------- encoding

def codec_matches(identity: dict, codec) -> bool:
    return (identity.get("name") == codec.name
            and [int(s) for s in identity.get("codebook_sizes", [])] == list(codec.codebook_sizes))


def _png(image_HxWx3: np.ndarray) -> bytes:

    image = np.asarray(image_HxWx3)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"an image array must be uint8 [H, W, 3], got {image.dtype} {list(image.shape)}")
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def _text_bytes(text: str, what: str = "text") -> int:
    """len(text.encode()) -- ValueError for a string with a lone surrogate (no UTF-8 form, cannot be stored)."""
    try:
        return len(text.encode("utf-8"))
    except UnicodeEncodeError as e:
        raise ValueError(f"{what} is not valid Unicode: lone surrogate U+{ord(text[e.start]):04X} at character "
                         f"{e.start + 1}") from None


def _image_layout(segment: dict, targets, image_tokenizer, target: bool) -> dict:
    """The stored layout of an image segment: how it enters ("as"), checked against the dataset's tokenizer."""
    enters = manifest_lib.image_as(segment, targets)
    if enters not in manifest_lib.IMAGE_AS:
        raise ValueError(f"\"as\" must be one of {list(manifest_lib.IMAGE_AS)}, got {manifest_lib.short_repr(enters)}")
    if enters != "patches":
        if image_tokenizer is None:
            raise ValueError(f"an image entering as {enters} needs an image tokenizer: pass --image-tokenizer (a folder "
                             f"from `omni imagetok fit`), or give the image \"as\": \"patches\"")
        if image_tokenizer.patch_size is None:
            raise ValueError(f"image tokenizer {image_tokenizer.name!r} is external and cannot encode pixels; give "
                             f"this image's codes as an \"image_codes\" segment, or pass --image-tokenizer")
    return {"kind": "image", "as": enters, "target": target and enters != "patches"}


def encode_record(raw: dict, codec, image_tokenizer=None) -> dict:
    """A raw example (omni.data.manifest) -> the stored example; audio goes through `codec`, precomputed image codes
    are checked against `image_tokenizer`. ValueError on bad data."""
    layout, images, codes, image_codes = [], [], [], []
    positions = 0
    if raw.get("codec") is not None and codec is not None and not codec_matches(raw["codec"], codec):
        raise ValueError(f"precomputed codes come from codec {raw['codec']} but this dataset's codec is "
                         f"{codec.name} with codebooks {list(codec.codebook_sizes)}; one dataset holds one codec")
    stated = raw.get("image_tokenizer")
    if stated is not None and image_tokenizer is not None and not image_tokenizer_lib.matches(stated, image_tokenizer):
        raise ValueError(f"image codes come from image tokenizer {stated} but this dataset's is {image_tokenizer.name} "
                         f"with codebooks {list(image_tokenizer.codebook_sizes)}; one dataset holds one image tokenizer")
    for i, segment in enumerate(raw["segments"]):
        target = bool(segment.get("target", True))
        try:
            if "text" in segment:
                if not segment["text"]:
                    raise ValueError("empty text")
                size = _text_bytes(segment["text"])
                if size > MAX_TEXT_BYTES:
                    raise ValueError(f"text of {size:,} bytes is longer than the limit of {MAX_TEXT_BYTES:,} bytes per "
                                     "text segment (omni.data.dataset.MAX_TEXT_BYTES); split it over several lines")
                positions += size
                layout.append({"kind": "text", "text": segment["text"], "target": target})
            elif "image_bytes" in segment or "image" in segment:
                layout.append(_image_layout(segment, raw.get("targets", ()), image_tokenizer, target))
                images.append(segment["image_bytes"] if "image_bytes" in segment else _png(segment["image"]))
            elif "image_codes" in segment:
                if image_tokenizer is None:
                    raise ValueError("image codes need the image tokenizer's identity: add \"image_tokenizer\": "
                                     "{\"name\", \"codebook_sizes\"} to the line or pass --image-tokenizer")
                c = np.asarray(segment["image_codes"])
                check_image_codes(c, image_tokenizer.codebook_sizes)
                positions += c.size + len(c)
                image_codes.append(c.astype(np.int32).reshape(-1))
                layout.append({"kind": "image_codes", "rows": int(c.shape[0]), "cols": int(c.shape[1]),
                               "target": target})
            elif "audio" in segment or "codes" in segment:
                if codec is None:
                    raise ValueError("audio needs a codec: pass --codec (tone, or a folder from `omni codec fit`)")
                if "audio" in segment:
                    if is_precomputed(codec) or getattr(codec, "sample_rate", None) is None:
                        raise ValueError(f"WAV audio needs a codec omni can run, and the codec {codec.name!r} is "
                                         "external: give this audio's codes as a \"codes\" segment, or pass --codec "
                                         "tone or a folder from `omni codec fit`")
                    wave = np.asarray(segment["audio"], np.float32)
                    if wave.size == 0:
                        raise ValueError("empty audio")
                    check_sample_rate(int(segment["sample_rate"]), "audio")
                    c = np.asarray(codec.encode(resample(wave, int(segment["sample_rate"]), codec.sample_rate)))
                else:
                    c = np.asarray(segment["codes"])
                check_codes(c, codec.codebook_sizes)
                positions += c.size
                codes.append(c.astype(np.int32).reshape(-1))
                layout.append({"kind": "audio", "frames": int(len(c)), "target": target})
            else:
                raise ValueError(f"unknown segment with keys {sorted(segment)}")
        except ValueError as e:
            raise ValueError(f"segment {i}: {e}") from None
    if not layout:
        raise ValueError("empty example: no segments")
    if positions > MAX_EXAMPLE_POSITIONS:
        raise ValueError(f"example has {positions:,} text bytes, audio and image codes, more than the limit of "
                         f"{MAX_EXAMPLE_POSITIONS:,} per example (omni.data.dataset.MAX_EXAMPLE_POSITIONS); "
                         "split it over several lines")
    example_id = str(raw.get("id", ""))
    _text_bytes(example_id, "id")
    return {"id": example_id,
            "layout": json.dumps({"targets": list(raw["targets"]), "meta": raw.get("meta", {}), "segments": layout}),
            "images": images,
            "audio_codes": np.concatenate(codes) if codes else np.zeros((0,), np.int32),
            "image_codes": np.concatenate(image_codes) if image_codes else np.zeros((0,), np.int32)}


def decode_record(record: dict, codebook_count: int, image_codebook_count: int = 0) -> dict:
    """A stored example -> {"id", "targets", "meta", "segments"} with image bytes (and "as"), image codes
    [R, C, K] and audio codes [T, K]."""
    layout = json.loads(record["layout"])
    images = iter(record["images"])
    flat = np.asarray(record["audio_codes"])
    image_flat = np.asarray(record.get("image_codes", np.zeros((0,), np.int32)))
    at = image_at = 0
    segments = []
    for segment in layout["segments"]:
        out = {"target": segment["target"]}
        if segment["kind"] == "text":
            out["text"] = segment["text"]
        elif segment["kind"] == "image":
            out["image_bytes"] = next(images)
            out["as"] = segment.get("as", "patches")  # datasets built before image codes: patches
        elif segment["kind"] == "image_codes":
            shape = (segment["rows"], segment["cols"], image_codebook_count)
            n = int(np.prod(shape))
            out["image_codes"] = image_flat[image_at:image_at + n].reshape(shape)
            image_at += n
        else:
            n = segment["frames"] * codebook_count
            out["audio"] = flat[at:at + n].reshape(segment["frames"], codebook_count)
            at += n
        segments.append(out)
    example_id = record["id"]
    return {"id": example_id.decode() if isinstance(example_id, bytes) else example_id,
            "targets": layout["targets"], "meta": layout.get("meta", {}), "segments": segments}


# ----------------------------------------------------------------------------------------------- building

@dataclass
class BuildReport:
    counts: dict = field(default_factory=dict)      # split -> examples written
    skipped: list = field(default_factory=list)     # [{"line": n, "reason": str}]
    # Files the build reads, (path, what it is): `out` may not be or hold any of them, since a dataset folder is
    # replaced whole (manifest_examples fills it with the manifest and every file its lines name).
    inputs: list = field(default_factory=list)
    split_rule: str = ""                             # how lines were put in train or eval, in words
    eval_ids: list = field(default_factory=list)     # ids of the eval examples written, in source order
    eval_lines: list | None = None                   # their manifest line numbers (manifest builds only)
    image_tokenizer: object = None                   # the one the manifest's lines name, when none was given
    image_sizes: collections.Counter = field(default_factory=collections.Counter)  # (H, W) of images learned as codes

    def summary(self) -> str:
        parts = [f"{split}: {n} examples" for split, n in self.counts.items()]
        text = ", ".join(parts)
        if self.skipped:
            text += f"; skipped {len(self.skipped)} bad line(s):\n" + "\n".join(
                f"  {s['source']}:{s['line']}: {s['reason']}" for s in self.skipped)
        return text


def learned_image_sizes(record: dict) -> list[tuple[int, int]]:
    """(height, width) in pixels of a stored example's images that are learned as codes (read from their headers)."""
    sizes, images = [], iter(record["images"])
    for segment in json.loads(record["layout"])["segments"]:
        if segment["kind"] != "image":
            continue
        data = next(images)
        if segment["target"]:
            with Image.open(io.BytesIO(data)) as image:
                sizes.append((image.height, image.width))
    return sizes


def codec_for_manifest(lines, path, codec):
    """The dataset's codec: the one given, else the precomputed codec the lines name; checked against the lines.

    A line whose "codec" is malformed is left to its own check (check_line), so --skip-bad can skip it."""
    for number, line in lines:
        if isinstance(line, ManifestError) or not isinstance(line.get("segments"), list):
            continue
        kinds = {k for s in line["segments"] if isinstance(s, dict) for k in s}
        if "codec" in line:
            if manifest_lib.codec_problem(line["codec"]):
                continue
            identity = line["codec"]
            if codec is None:
                codec = PrecomputedCodec(identity["name"], float(identity["frame_rate"]),
                                         tuple(int(s) for s in identity["codebook_sizes"]))
        elif "codes" in kinds and codec is None:
            raise ManifestError(path, number, "precomputed codes need the codec's identity: add \"codec\": "
                                              "{\"name\", \"frame_rate\", \"codebook_sizes\"} to the line or pass --codec")
        if "audio" in kinds and codec is None:
            raise ManifestError(path, number, "WAV audio needs a codec to encode it: pass --codec tone, or a folder "
                                              "made by `omni codec fit`")
    return codec


def image_tokenizer_for_manifest(lines, path, image_tokenizer):
    """The dataset's image tokenizer: the one given, else the external one the lines' "image_tokenizer" names;
    a line with image_codes and no tokenizer to check them against is an error naming it. A malformed identity
    is left to check_line, so --skip-bad can skip its line."""
    for number, line in lines:
        if isinstance(line, ManifestError) or not isinstance(line.get("segments"), list):
            continue
        kinds = {k for s in line["segments"] if isinstance(s, dict) for k in s}
        if "image_tokenizer" in line:
            if manifest_lib.image_tokenizer_problem(line["image_tokenizer"]):
                continue
            if image_tokenizer is None:
                image_tokenizer = image_tokenizer_lib.from_identity(line["image_tokenizer"])
        elif "image_codes" in kinds and image_tokenizer is None:
            raise ManifestError(path, number, "image_codes need the image tokenizer's identity: add "
                                              "\"image_tokenizer\": {\"name\", \"codebook_sizes\"} to the line or "
                                              "pass --image-tokenizer")
    return image_tokenizer


def manifest_inputs(lines, path) -> list:
    """(path, what it is) for the manifest and every file its lines name (BuildReport.inputs)."""
    path = storage.path(path)
    base = path.parent
    inputs = [(path, "is the manifest")]
    for number, line in lines:
        if isinstance(line, ManifestError) or not isinstance(line.get("segments"), list):
            continue
        for segment in line["segments"]:
            if not isinstance(segment, dict):
                continue
            for kind in ("image", "image_codes", "audio", "codes"):
                value = segment.get(kind)
                if isinstance(value, str) and value:
                    inputs.append((base / value, f"line {number} of {path} names"))
    return inputs


def _duplicate_ids(lines) -> dict:
    """{line number: first line number} for every line whose "id" an earlier line already has."""
    first, duplicates = {}, {}
    for number, line in lines:
        if isinstance(line, dict) and "id" in line:
            key = str(line["id"])
            if key in first:
                duplicates[number] = first[key]
            else:
                first[key] = number
    return duplicates


def _skip(report: BuildReport, source, line: int, reason: str) -> None:
    # reasons are printed on stdout: keep characters with no UTF-8 form (lone surrogates) as escapes
    reason = reason.encode("utf-8", "backslashreplace").decode("utf-8")
    report.skipped.append({"source": str(source), "line": line, "reason": reason})


def split_rule(lines: int, named: int, eval_fraction: float | None) -> tuple[float, str]:
    """(the share of lines without "split" hashed into eval, the rule in words) for a manifest of `lines` lines,
    `named` of which have a "split" field, built with --eval-fraction `eval_fraction` (None: not given).

    When any line names a split, the others go to train unless --eval-fraction is given; when none does, the hash
    puts --eval-fraction (default manifest.DEFAULT_EVAL_FRACTION) of them in eval."""
    given = eval_fraction is not None
    fraction = eval_fraction if given else (0.0 if named else manifest_lib.DEFAULT_EVAL_FRACTION)
    hashed = (f"a stable hash of the line's id (or its content) puts --eval-fraction {fraction:g}"
              f"{'' if given else ' (the default)'} of them in eval")
    if named == 0:
        return fraction, f"no line names a split: {hashed.replace('the line', 'each line')}"
    if named == lines:
        return fraction, ("every line names its split (\"split\" field)"
                          + (f"; --eval-fraction {fraction:g} had no line to apply to" if given else ""))
    if given:
        return fraction, f"{named} of {lines} lines name their split; of the other {lines - named}, {hashed}"
    return fraction, (f"{named} of {lines} lines name their split; the other {lines - named} go to train, since some "
                      "lines name a split (give --eval-fraction to hash a share of them into eval)")


def manifest_examples(path, codec, eval_fraction: float | None, report: BuildReport, skip_bad: bool,
                      progress=silent, image_tokenizer=None):
    """{split: generator factory} over a manifest's lines, for build(); report.split_rule says how lines were split
    (split_rule; `eval_fraction` None: --eval-fraction was not given). progress (omni.progress) counts the lines
    of each split as they are encoded. report.image_tokenizer is the dataset's image tokenizer: the one given, or
    the external one the lines name (build() records it)."""
    lines = manifest_lib.read_lines(path)
    codec = codec_for_manifest(lines, path, codec)
    image_tokenizer = report.image_tokenizer = image_tokenizer_for_manifest(lines, path, image_tokenizer)
    report.inputs.extend(manifest_inputs(lines, path))
    duplicates = _duplicate_ids(lines)
    named = sum(1 for _, line in lines if isinstance(line, dict) and "split" in line)
    eval_fraction, report.split_rule = split_rule(len(lines), named, eval_fraction)
    report.eval_lines = []

    def line_split(number, line):
        if isinstance(line, dict) and line.get("split", "train") in manifest_lib.SPLITS:
            return manifest_lib.split_of(line, number, eval_fraction)
        return "train"  # a line too broken to have a split is reported once, in the train pass

    def generate(split):
        with progress(f"data build: {split}", total=per_split[split], unit="line") as bar:
            yield from encode(split, bar)
            if report.skipped:
                bar.update(0, skipped=len(report.skipped))

    def encode(split, bar):
        for number, line in lines:
            if line_split(number, line) != split:
                continue
            bar.update(1, **({"skipped": len(report.skipped)} if report.skipped else {}))
            try:
                if isinstance(line, ManifestError):
                    raise line
                if number in duplicates:
                    raise ManifestError(path, number, f"id {manifest_lib.short_repr(line['id'])} is already the id of "
                                                      f"line {duplicates[number]}; ids must be unique")
                raw = manifest_lib.load_line(line, path, number)
                try:
                    record = encode_record(raw, codec, image_tokenizer)
                except ValueError as e:
                    raise ManifestError(path, number, str(e)) from None
            except ManifestError as e:
                if not skip_bad:
                    raise
                _skip(report, path, number, e.reason)
                continue
            report.counts[split] = report.counts.get(split, 0) + 1
            report.image_sizes.update(learned_image_sizes(record))
            if split == "eval":
                report.eval_ids.append(record["id"])
                report.eval_lines.append(number)
            yield number, record

    # TFDS cannot write an empty split: leave out a split no line goes to (a bad line is reported in the first).
    per_split = collections.Counter(line_split(number, line) for number, line in lines)
    return {split: (lambda s=split: generate(s)) for split in manifest_lib.SPLITS if split in per_split}, codec


def raw_examples(examples_by_split: dict, codec, report: BuildReport, skip_bad: bool, source: str,
                 progress=silent, image_tokenizer=None):
    """{split: generator factory} over in-memory raw examples (adapters, the demo corpus); progress
    (omni.progress) counts the examples of each split as they are encoded."""
    report.image_tokenizer = image_tokenizer
    def generate(split):
        with progress(f"data build: {split}", unit="example") as bar:
            yield from encode(split, bar)

    def encode(split, bar):
        for number, raw in enumerate(examples_by_split[split](), start=1):
            bar.update(1)
            try:
                record = encode_record(raw, codec, image_tokenizer)
            except ValueError as e:
                if not skip_bad:
                    raise ManifestError(source, number, str(e)) from None
                _skip(report, source, number, str(e))
                continue
            report.counts[split] = report.counts.get(split, 0) + 1
            report.image_sizes.update(learned_image_sizes(record))
            if split == "eval":
                report.eval_ids.append(record["id"])
            yield number, record

    report.split_rule = report.split_rule or f"the splits of {source}"
    return {split: (lambda s=split: generate(s)) for split in examples_by_split}


# What a build writes in its folder (module docstring); a folder holding only these is omni's to replace.
OWN_ENTRIES = {DATASET_FILE, "tfds", "tfds.incomplete", "codec", "tokenizer", "image_tokenizer"}


def _real(path) -> str:
    """A path resolved as the OS sees it (links followed); a URL as written, without a trailing slash."""
    if storage.is_remote(path):
        return str(storage.path(path)).rstrip("/")
    try:
        return str(Path(os.path.realpath(os.fspath(path))))
    except (OSError, ValueError, RuntimeError):  # a name the OS cannot take, a symlink loop
        return os.path.abspath(os.fspath(path))


def _inside(folder: str, out: str) -> bool:
    return folder == out or folder.startswith(out.rstrip("/") + "/")


def _listing(names: list[str], limit: int = 3) -> str:
    return ", ".join(names[:limit]) + (", ..." if len(names) > limit else "")


def _entries(out) -> list[str]:
    """The names in a folder, folders with a trailing '/' (on a bucket: the prefixes under `out`)."""
    if storage.is_remote(out):
        fs = storage._fs(out)
        fs.invalidate_cache()
        try:
            listing = fs.ls(str(out), detail=True)
        except FileNotFoundError:
            return []
        return sorted(item["name"].rstrip("/").rsplit("/", 1)[-1] + ("/" if item["type"] == "directory" else "")
                      for item in listing)
    return sorted(p.name + ("/" if p.is_dir() else "") for p in out.iterdir())


def check_out(out, overwrite: bool, inputs=()) -> None:
    """DatasetError unless `out` may become the dataset folder: it does not exist, is empty, holds an unfinished
    omni build, or holds a dataset and `overwrite` is set; and it is not and holds none of the build's `inputs`
    ((path, what) pairs, BuildReport.inputs), since the whole folder is replaced. `out` may be a gs:// URL."""
    out = storage.path(out)
    if not out.exists():
        return  # nothing in it to lose (and no input can be in it)
    if not storage.is_remote(out) and not out.is_dir():
        raise DatasetError(f"{out} is a file, not a folder; choose another --out for the dataset")
    names = _entries(out)
    out_real = _real(out)
    checked: set = set()
    for path, what in inputs:
        path = storage.path(path)
        folder = path.parent
        if str(folder) in checked:
            continue
        checked.add(str(folder))
        folder_real = _real(folder)
        if _inside(folder_real, out_real):
            if what == "is the manifest" and folder_real == out_real:
                problem = f"is the folder of the manifest {path}"
            else:
                problem = f"holds {manifest_lib.show_path(path)}, which {what}"
            raise DatasetError(f"--out {out} {problem}; a dataset folder is replaced whole when built, so choose "
                               "another --out (e.g. a new folder beside it)")
    if not names:
        return
    foreign = [n for n in names if n.rstrip("/") not in OWN_ENTRIES]
    if DATASET_FILE in names:
        if foreign:
            raise DatasetError(f"{out} holds an omni dataset and also {len(foreign)} file(s) a build did not write "
                               f"({_listing(foreign)}); move them out, or choose another --out")
        if not overwrite:
            raise DatasetError(f"{out} already holds a dataset; pass --overwrite to rebuild it")
        return
    if not foreign and {"tfds/", "tfds.incomplete/"} & set(names):
        return  # an unfinished build (no DATASET_FILE yet): building again is how to finish it
    raise DatasetError(f"{out} holds {len(names)} file(s) that are not an omni dataset ({_listing(names)}); choose "
                       "another --out (--overwrite only replaces a folder holding an omni dataset)")


def build(examples: dict, out, codec, tokenizer=None, report: BuildReport | None = None,
          overwrite: bool = False, source: str = "", image_tokenizer=None, log=None) -> BuildReport:
    """Write the examples ({split: generator factory of (key, stored example)}) as a dataset in `out`, recording
    `image_tokenizer` (default: report.image_tokenizer, the one manifest_examples / raw_examples used).

    Before any work `out` is checked (storage.check_writable: a read-only, forbidden or full place is one line) and
    claimed (omni.data.claim: `.NAME.omni-claim` beside it, so a second build of the same `out` stops at once,
    naming this one); check_out then says whether `out` may be replaced, and what it holds is noted. On disk the
    dataset is written into a temporary folder beside `out` (`.NAME.omni-build-HOST-PID`) and swapped in only
    when it is complete, so a failed build leaves `out` as it was; if anything the build did not write appeared
    in `out` meanwhile, the swap refuses and the new dataset is put beside it (`NAME.omni-built-TIME`), the
    files in `out` untouched. Folders of earlier builds of `out` killed outright on this host are removed
    first. On a bucket (array_record cannot write to gs://) it is built in a local temporary folder and uploaded
    (_publish_remote). A full or read-only disk met on the way is a StorageError of one line.
    """
    report = report or BuildReport()
    image_tokenizer = image_tokenizer if image_tokenizer is not None else report.image_tokenizer
    remote = storage.is_remote(out)
    out = storage.path(out) if remote else Path(os.path.abspath(os.path.expanduser(os.fspath(storage.path(out)))))
    storage.check_writable(out, "--out")
    check_out(out, overwrite, report.inputs)  # refused before a claim is even made
    with claim_lib.claim(out, log=log) as held:
        check_out(out, overwrite, report.inputs)  # again, now that no other build can write there
        before = _snapshot(out)
        if remote:
            _build_remote(examples, out, codec, tokenizer, report, source, image_tokenizer, held, before)
        else:
            _build_local(examples, out, codec, tokenizer, report, source, image_tokenizer, held, before)
    return report


# Disk conditions a build's writes may meet; the reading of inputs has its own messages (ManifestError).
_WRITE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS)


def _disk_error(error: BaseException, location, what: str = "--out"):
    """The one-line StorageError for a full or read-only disk behind `error` (None for any other error)."""
    if isinstance(error, OmniError) or not isinstance(error, Exception) or storage.os_errno(error) not in _WRITE_ERRNOS:
        return None
    return storage.os_error(error, location, what, "write")


def _build_local(examples, out, codec, tokenizer, report, source, image_tokenizer, held, before) -> None:
    _remove_dead_builds(out)
    work = out.parent / f".{out.name}.omni-build-{storage.host_name()}-{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    try:
        work.mkdir()
    except OSError as e:
        raise storage.os_error(e, out, "--out", "write") from None
    try:
        _write(examples, work, codec, tokenizer, report, source, label=source or str(out),
               image_tokenizer=image_tokenizer)
        held.check_held()
        _swap(work, out, before)
    except BaseException as e:
        shutil.rmtree(work, ignore_errors=True)
        disk = _disk_error(e, out)
        if disk is not None:
            raise disk from None
        raise


def _build_remote(examples, out, codec, tokenizer, report, source, image_tokenizer, held, before) -> None:
    try:
        work = storage.Path(tempfile.mkdtemp(prefix="omni-build-"))
    except OSError as e:
        raise storage.os_error(e, tempfile.gettempdir(), "TMPDIR", "write") from None
    try:
        try:
            _write(examples, work, codec, tokenizer, report, source, label=source or str(out),
                   image_tokenizer=image_tokenizer)
        except BaseException as e:
            disk = _disk_error(e, work, "TMPDIR (where a bucket's dataset is built before its upload)")
            if disk is not None:
                raise disk from None
            raise
        held.check_held()
        appeared = _appeared(out, before)
        if appeared:
            aside = _aside_name(out)
            storage.upload_folder(work, aside, last=DATASET_FILE)
            raise _changed(out, appeared, aside)
        _publish_remote(work, out)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _tree(folder) -> list[str]:
    """Every path below a local folder, relative to it, folders with a trailing '/' (links not followed): a file
    put inside a subfolder of the old dataset (OUT/tfds/notes.txt) is seen, not only new top-level names."""
    paths = []
    for root, dirs, files in os.walk(folder):
        rel = os.path.relpath(root, folder)
        prefix = "" if rel == "." else rel + "/"
        paths += [prefix + d + "/" for d in dirs] + [prefix + f for f in files]
    return sorted(paths)


def _snapshot(out) -> list[str] | None:
    """What `out` holds when the build starts (every path below it on disk, folders with '/'; on a bucket its
    top-level names), None when it does not exist."""
    if storage.is_remote(out):
        return _entries(out) if out.exists() else None
    if not (os.path.lexists(out)):
        return None
    return _tree(out) if out.is_dir() else [out.name]


def _appeared(folder, before) -> list[str]:
    """What is in `folder` (`out`, or the name it was just renamed to) that was not there when the build started:
    written by someone else, since this build holds the claim. A file in place of the folder is named '.'."""
    if not storage.is_remote(folder) and os.path.lexists(folder) and not folder.is_dir():
        return ["." if before is None else folder.name]
    if storage.is_remote(folder):
        return sorted(set(_entries(folder)) - set(before or ()))
    if os.path.lexists(folder):
        return sorted(set(_tree(folder)) - set(before or ()))
    return []


def _aside_name(out):
    """Where a finished dataset goes when `out` may not be replaced: `NAME.omni-built-TIME` beside it."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for n in range(1, 1000):
        aside = out.parent / f"{out.name}.omni-built-{stamp}{'' if n == 1 else f'-{n}'}"
        if not (aside.exists() or (not storage.is_remote(aside) and os.path.lexists(aside))):
            return aside
    raise DatasetError(f"cannot find a free name beside {out} to keep the new dataset; clean up {out.parent}")


def _changed(out, appeared, aside) -> DatasetError:
    what = (f"a file was put at {out}" if appeared == ["."] else
            f"{_listing(appeared)} appeared in it" + (f" ({len(appeared)} entries)" if len(appeared) > 3 else ""))
    return DatasetError(f"--out {out} changed while the dataset was built: {what}, which this build did not "
                        f"write, so --out was left as it is; the new dataset is at {aside} instead (move it where "
                        f"you want it, or move those files out of --out and build again)")


def _publish_remote(work, out) -> None:
    """Puts the finished local folder `work` at the URL `out`. A reader opens a dataset by its DATASET_FILE, so
    an old dataset's DATASET_FILE goes first (readers see "unfinished build", never a mix), then the old build's
    own entries (OWN_ENTRIES, checked by check_out: nothing else is there), and the new DATASET_FILE is uploaded
    after every other file."""
    old = [name.rstrip("/") for name in _entries(out)]
    try:
        if DATASET_FILE in old:
            (out / DATASET_FILE).unlink()
        for name in old:
            if name in OWN_ENTRIES and name != DATASET_FILE:
                storage.remove_tree(out / name)
        storage.upload_folder(work, out, last=DATASET_FILE)
    except StorageError:
        raise
    except OSError as e:
        line = storage.describe_remote_error(out, e) or f"{type(e).__name__}: {e}"
        raise DatasetError(f"cannot write the dataset to {out}: {line}") from None


def _remove_dead_builds(out) -> None:
    """Deletes the temporary folders of builds of `out` that were killed outright (SIGKILL, power loss): only
    those omni named itself, made on this host, by a process that no longer exists."""
    for folder in out.parent.glob(f".{out.name}.omni-*-{storage.host_name()}-*"):
        kind, _, pid = folder.name[len(out.name) + 2:].partition(f"-{storage.host_name()}-")
        if kind not in ("omni-build", "omni-old") or not pid.isdigit():
            continue
        if not storage.process_alive(int(pid)):
            shutil.rmtree(folder, ignore_errors=True)


def _swap(new, out, before) -> None:
    """Puts the finished folder `new` at `out`, which held `before` (_snapshot) when the build started: the old
    one is renamed away first and deleted last. Anything else found in `out` (_appeared), before or just after it
    is renamed away, stops the swap: `out` is put back as it was and `new` beside it (_changed)."""
    def refuse(appeared):
        aside = _aside_name(out)
        new.rename(aside)
        return _changed(out, appeared, aside)

    if not os.path.lexists(out):
        try:
            os.rename(new, out)
            return
        except OSError as e:  # `out` appeared this instant: a folder with files (or a file) is not replaced
            if e.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR, errno.EISDIR):
                raise
    appeared = _appeared(out, before)
    if appeared:
        raise refuse(appeared)
    if before is None:  # an empty folder appeared at `out`: rename(2) replaces it, or fails if it filled up
        try:
            os.rename(new, out)
            return
        except OSError as e:
            if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
            raise refuse(_appeared(out, before) or ["."]) from None
    old = out.parent / f".{out.name}.omni-old-{storage.host_name()}-{os.getpid()}"
    shutil.rmtree(old, ignore_errors=True)
    out.rename(old)
    appeared = _appeared(old, before)  # written there the moment before the rename
    if appeared:
        old.rename(out)
        raise refuse(appeared)
    try:
        new.rename(out)
    except BaseException:
        old.rename(out)
        raise
    if os.path.islink(old):
        old.unlink()  # --out was a link to a dataset: the link is replaced, the folder it pointed to is kept
    else:
        shutil.rmtree(old, ignore_errors=True)


def _write(examples: dict, out, codec, tokenizer, report: BuildReport, source: str, label: str,
           image_tokenizer=None) -> None:
    tmp = out / "tfds.incomplete"
    first_error: list[Exception] = []

    def guarded(factory):
        def run():
            try:
                yield from factory()
            except ManifestError as e:  # TFDS may wrap what its generators raise: keep ours to re-raise it
                first_error.append(e)
                raise
        return run

    builder = _builder_class()(examples={s: guarded(f) for s, f in examples.items()},
                               data_dir=str(tmp), file_format="array_record")
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # TFDS prints "Downloading and preparing..." banners
            builder.download_and_prepare()
    except Exception as e:
        if first_error:
            raise first_error[0] from None
        if "No examples were yielded" in str(e):
            empty = [split for split in examples if not report.counts.get(split)] or ["a"]
            first = report.skipped[0] if report.skipped else None
            skipped = (f"; {len(report.skipped)} bad line(s) skipped, the first {first['source']}:{first['line']}: "
                       f"{first['reason']}" if first else "")
            raise DatasetError(f"the {empty[0]} split of {label} has no good examples left{skipped}") from None
        raise
    tmp.rename(out / "tfds")
    meta = {"format_version": FORMAT_VERSION, "source": source, "counts": report.counts,
            "skipped": report.skipped, "codec": codec_identity(codec) if codec is not None else None,
            "tokenizer": None, "split_rule": report.split_rule, "eval_ids": report.eval_ids}
    if report.eval_lines is not None:
        meta["eval_lines"] = report.eval_lines
    if codec is not None and hasattr(codec, "save"):
        codec.save(out / "codec")
        meta["codec"]["path"] = "codec"
    if image_tokenizer is not None:
        meta["format_version"] = IMAGE_FORMAT_VERSION
        meta["image_tokenizer"] = image_tokenizer_lib.identity(image_tokenizer)
        if report.image_sizes:  # what image generation draws by default (omni.tools.image_generate.grid_for)
            meta["image_tokenizer"]["image_size"] = list(report.image_sizes.most_common(1)[0][0])
        if hasattr(image_tokenizer, "save"):
            image_tokenizer.save(out / "image_tokenizer")
            meta["image_tokenizer"]["path"] = "image_tokenizer"
    if tokenizer is not None:
        save_tokenizer(tokenizer, out / "tokenizer")
        meta["tokenizer"] = "tokenizer" if tokenizer.files() else "bytes"
    # Written last: a folder without this file is an unfinished build.
    (out / DATASET_FILE).write_text(json.dumps(meta, indent=2))


# ----------------------------------------------------------------------------------------------- reading

@dataclass
class Dataset:
    """A built dataset folder: its metadata, codec and random-access splits."""
    path: Path  # a local folder or a gs:// URL
    meta: dict

    @property
    def codebook_sizes(self) -> tuple[int, ...]:
        return tuple(self.meta["codec"]["codebook_sizes"]) if self.meta.get("codec") else ()

    @property
    def image_codebook_sizes(self) -> tuple[int, ...]:
        identity = self.meta.get("image_tokenizer")
        return tuple(identity["codebook_sizes"]) if identity else ()

    def image_tokenizer(self):
        """The dataset's image tokenizer: the fitted one saved with it, an external one's identity, or None."""
        identity = self.meta.get("image_tokenizer")
        if identity is None:
            return None
        if identity.get("path"):
            return image_tokenizer_lib.load_image_tokenizer(str(self.path / identity["path"]))
        return image_tokenizer_lib.from_identity(identity)

    def codec(self):

        identity = self.meta.get("codec")
        if identity is None:
            return None
        if identity.get("path"):
            return load_codec(str(self.path / identity["path"]))
        return codec_from_identity(identity)

    def tokenizer_spec(self) -> str:
        name = self.meta.get("tokenizer")
        return str(self.path / name) if name and name != "bytes" else "bytes"

    def split_listing(self) -> str:
        """What `omni data split` prints: the split sizes, the rule the build applied and every eval example's id
        (with its manifest line); a dataset built before omni recorded them says so."""
        counts = ", ".join(f"{split} {n} examples" for split, n in self.meta["counts"].items())
        head = f"{self.path}: {counts or 'no examples'}"
        if "eval_ids" not in self.meta:
            return (f"{head}\n{self.path} was built before omni recorded the split rule and the eval ids in "
                    f"{DATASET_FILE}, so they cannot be listed; rebuild it with `omni data build` to record them")
        ids, lines = self.meta["eval_ids"], self.meta.get("eval_lines")
        out = [head, f"split rule: {self.meta.get('split_rule') or 'not recorded'}",
               f"eval examples ({len(ids)}): id" + ("\tmanifest line" if lines is not None else "")]
        out += [f"{i}\t{n}" for i, n in zip(ids, lines)] if lines is not None else [str(i) for i in ids]
        return "\n".join(out)

    def source(self, split: str):
        """Random-access examples of a split (decoded TFDS features), a grain-compatible data source."""
        tfds = _tfds()
        if split not in self.meta["counts"] or not self.meta["counts"][split]:
            hint = f"; {NO_EVAL_HINT}" if split == "eval" else ""
            raise DatasetError(f"dataset {self.path} has no {split!r} examples (splits: {self.meta['counts']}){hint}")
        builder = tfds.builder_from_directory(str(self.path / "tfds" / TFDS_NAME / TFDS_VERSION))
        return builder.as_data_source(split=split)


GENERATED: dict = {}  # data.dataset name -> build(cfg) -> folder, for corpora generated on first use (omni.demo)


def register_generated(name: str, build) -> None:
    """Makes `data.dataset=<name>` build (once) and open the folder build(cfg) returns."""
    GENERATED[name] = build


def dataset_folder(cfg):
    """The folder cfg.data.dataset names: a generated corpus (built on first use) or a built dataset's folder
    (a local path or a gs:// URL)."""
    name = cfg.data.dataset
    if name in GENERATED:
        return GENERATED[name](cfg)
    try:
        path = storage.path(name)
    except StorageError as e:
        raise DatasetError(f"data.dataset: {e}") from None
    if not path.exists() and name in ("demo", "demo-speech", "demo-draw"):
        raise DatasetError(f"data.dataset={name!r} is the generated demo corpus, and omni.demo (which builds it) is "
                           "not imported; the omni command imports it, in Python `import omni.demo` first")
    return path


def open_dataset(path) -> Dataset:
    try:
        path = storage.path(path)
        storage.check_reachable(path, "dataset")
    except StorageError as e:
        raise DatasetError(str(e)) from None
    meta_file = path / DATASET_FILE
    if not meta_file.is_file():
        hint = " (the build did not finish; run `omni data build` again)" if path.exists() else ""
        raise DatasetError(f"{path} is not a built omni dataset: {DATASET_FILE} is missing{hint}")
    meta = json.loads(meta_file.read_text())
    if meta.get("format_version") not in READABLE_FORMATS:
        raise DatasetError(f"{path} has dataset format {meta.get('format_version')}, this omni reads "
                           f"{' and '.join(map(str, READABLE_FORMATS))}; rebuild it with `omni data build`")
    return Dataset(path, meta)
