"""Built datasets: raw examples -> a TFDS dataset in array_record files, read back by random access.

`omni data build` writes

    OUT/omni_dataset.json    what the dataset holds: codec identity, tokenizer, split sizes, skipped lines
    OUT/codec/               the codec's files when it has any (a fitted MelRVQCodec)
    OUT/tokenizer/           the text tokenizer's files when one was given (`--tokenizer`)
    OUT/tfds/omni_dataset/1.0.0/omni_dataset-{train,eval}.array_record-*   the examples

One stored example (TFDS features; no TensorFlow needed to write or read them):

    id            text
    layout        text, JSON {"targets": [...], "meta": {...}, "segments": [
                      {"kind": "text", "text": str} | {"kind": "image"} | {"kind": "audio", "frames": T}
                      each with "target": bool]}
    images        sequence of encoded image bytes (PNG/JPEG as given), one per image segment, in order
    audio_codes   int32 [sum of T * K], every audio segment's codes [T, K] flattened frame-major, in order

Images stay encoded so the patch budget is a training choice; audio is stored as codes of the dataset's codec
(one codec per dataset, since the codebook layout is part of the model's vocabulary).
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
from PIL import Image

from omni.data import manifest as manifest_lib
from omni.data.audio import resample
from omni.data.codec import PrecomputedCodec, codec_from_identity, codec_identity, load_codec
from omni.data.text_tokenizer import save_tokenizer
from omni.errors import DatasetError, ManifestError
from omni.tokens import check_codes

FORMAT_VERSION = 1
DATASET_FILE = "omni_dataset.json"
TFDS_NAME = "omni_dataset"
TFDS_VERSION = "1.0.0"




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


def encode_record(raw: dict, codec) -> dict:
    """A raw example (omni.data.manifest) -> the stored example; audio goes through `codec`. ValueError on bad data."""
    layout, images, codes = [], [], []
    if raw.get("codec") is not None and codec is not None and not codec_matches(raw["codec"], codec):
        raise ValueError(f"precomputed codes come from codec {raw['codec']} but this dataset's codec is "
                         f"{codec.name} with codebooks {list(codec.codebook_sizes)}; one dataset holds one codec")
    for i, segment in enumerate(raw["segments"]):
        target = bool(segment.get("target", True))
        try:
            if "text" in segment:
                if not segment["text"]:
                    raise ValueError("empty text")
                layout.append({"kind": "text", "text": segment["text"], "target": target})
            elif "image_bytes" in segment or "image" in segment:
                images.append(segment["image_bytes"] if "image_bytes" in segment else _png(segment["image"]))
                layout.append({"kind": "image", "target": False})
            elif "audio" in segment or "codes" in segment:
                if codec is None:
                    raise ValueError("audio needs a codec: pass --codec (tone, or a folder from `omni codec fit`)")
                if "audio" in segment:
                    wave = np.asarray(segment["audio"], np.float32)
                    if wave.size == 0:
                        raise ValueError("empty audio")
                    c = np.asarray(codec.encode(resample(wave, int(segment["sample_rate"]), codec.sample_rate)))
                else:
                    c = np.asarray(segment["codes"])
                check_codes(c, codec.codebook_sizes)
                codes.append(c.astype(np.int32).reshape(-1))
                layout.append({"kind": "audio", "frames": int(len(c)), "target": target})
            else:
                raise ValueError(f"unknown segment with keys {sorted(segment)}")
        except ValueError as e:
            raise ValueError(f"segment {i}: {e}") from None
    if not layout:
        raise ValueError("empty example: no segments")
    return {"id": str(raw.get("id", "")),
            "layout": json.dumps({"targets": list(raw["targets"]), "meta": raw.get("meta", {}), "segments": layout}),
            "images": images,
            "audio_codes": np.concatenate(codes) if codes else np.zeros((0,), np.int32)}


def decode_record(record: dict, codebook_count: int) -> dict:
    """A stored example -> {"id", "targets", "meta", "segments"} with image bytes and audio codes [T, K]."""
    layout = json.loads(record["layout"])
    images = iter(record["images"])
    flat = np.asarray(record["audio_codes"])
    at = 0
    segments = []
    for segment in layout["segments"]:
        out = {"target": segment["target"]}
        if segment["kind"] == "text":
            out["text"] = segment["text"]
        elif segment["kind"] == "image":
            out["image_bytes"] = next(images)
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

    def summary(self) -> str:
        parts = [f"{split}: {n} examples" for split, n in self.counts.items()]
        text = ", ".join(parts)
        if self.skipped:
            text += f"; skipped {len(self.skipped)} bad line(s):\n" + "\n".join(
                f"  {s['source']}:{s['line']}: {s['reason']}" for s in self.skipped)
        return text


def codec_for_manifest(lines, path, codec):
    """The dataset's codec: the one given, else the precomputed codec the lines name; checked against the lines."""
    for number, line in lines:
        if isinstance(line, ManifestError) or not isinstance(line.get("segments"), list):
            continue
        kinds = {k for s in line["segments"] if isinstance(s, dict) for k in s}
        if "codec" in line:
            identity = line["codec"]
            if not isinstance(identity, dict) or not {"name", "frame_rate", "codebook_sizes"} <= set(identity):
                raise ManifestError(path, number, "\"codec\" must be {\"name\", \"frame_rate\", \"codebook_sizes\"}")
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


def manifest_examples(path, codec, eval_fraction: float, report: BuildReport, skip_bad: bool):
    """{split: generator factory} over a manifest's lines, for build()."""
    lines = manifest_lib.read_lines(path)
    codec = codec_for_manifest(lines, path, codec)

    def line_split(number, line):
        if isinstance(line, dict) and line.get("split", "train") in manifest_lib.SPLITS:
            return manifest_lib.split_of(line, number, eval_fraction)
        return "train"  # a line too broken to have a split is reported once, in the train pass

    def generate(split):
        for number, line in lines:
            if line_split(number, line) != split:
                continue
            try:
                if isinstance(line, ManifestError):
                    raise line
                raw = manifest_lib.load_line(line, path, number)
                try:
                    record = encode_record(raw, codec)
                except ValueError as e:
                    raise ManifestError(path, number, str(e)) from None
            except ManifestError as e:
                if not skip_bad:
                    raise
                report.skipped.append({"source": str(path), "line": number, "reason": e.reason})
                continue
            report.counts[split] = report.counts.get(split, 0) + 1
            yield number, record

    # TFDS cannot write an empty split: leave out a split no line goes to (a bad line is reported in the first).
    splits = {line_split(number, line) for number, line in lines}
    return {split: (lambda s=split: generate(s)) for split in manifest_lib.SPLITS if split in splits}, codec


def raw_examples(examples_by_split: dict, codec, report: BuildReport, skip_bad: bool, source: str):
    """{split: generator factory} over in-memory raw examples (adapters, the demo corpus)."""
    def generate(split):
        for number, raw in enumerate(examples_by_split[split](), start=1):
            try:
                record = encode_record(raw, codec)
            except ValueError as e:
                if not skip_bad:
                    raise ManifestError(source, number, str(e)) from None
                report.skipped.append({"source": source, "line": number, "reason": str(e)})
                continue
            report.counts[split] = report.counts.get(split, 0) + 1
            yield number, record

    return {split: (lambda s=split: generate(s)) for split in examples_by_split}


def build(examples: dict, out, codec, tokenizer=None, report: BuildReport | None = None,
          overwrite: bool = False, source: str = "") -> BuildReport:
    """Write the examples ({split: generator factory of (key, stored example)}) as a dataset in `out`."""
    out = Path(out)
    report = report or BuildReport()
    if (out / DATASET_FILE).exists() and not overwrite:
        raise DatasetError(f"{out} already holds a dataset; pass --overwrite to rebuild it")
    if out.exists() and overwrite:
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "tfds.incomplete"
    shutil.rmtree(tmp, ignore_errors=True)
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
        shutil.rmtree(tmp, ignore_errors=True)
        if first_error:
            raise first_error[0] from None
        if "No examples were yielded" in str(e):
            raise DatasetError(f"a split of {source or out} has no good examples left ({report.summary()})") from None
        raise
    shutil.rmtree(out / "tfds", ignore_errors=True)
    tmp.rename(out / "tfds")
    meta = {"format_version": FORMAT_VERSION, "source": source, "counts": report.counts,
            "skipped": report.skipped, "codec": codec_identity(codec) if codec is not None else None,
            "tokenizer": None}
    if codec is not None and hasattr(codec, "save"):
        codec.save(out / "codec")
        meta["codec"]["path"] = "codec"
    if tokenizer is not None:

        save_tokenizer(tokenizer, out / "tokenizer")
        meta["tokenizer"] = "tokenizer" if tokenizer.files() else "bytes"
    # Written last: a folder without this file is an unfinished build.
    (out / DATASET_FILE).write_text(json.dumps(meta, indent=2))
    return report


# ----------------------------------------------------------------------------------------------- reading

@dataclass
class Dataset:
    """A built dataset folder: its metadata, codec and random-access splits."""
    path: Path
    meta: dict

    @property
    def codebook_sizes(self) -> tuple[int, ...]:
        return tuple(self.meta["codec"]["codebook_sizes"]) if self.meta.get("codec") else ()

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

    def source(self, split: str):
        """Random-access examples of a split (decoded TFDS features), a grain-compatible data source."""
        tfds = _tfds()
        if split not in self.meta["counts"] or not self.meta["counts"][split]:
            raise DatasetError(f"dataset {self.path} has no {split!r} examples (splits: {self.meta['counts']})")
        builder = tfds.builder_from_directory(str(self.path / "tfds" / TFDS_NAME / TFDS_VERSION))
        return builder.as_data_source(split=split)


GENERATED: dict = {}  # data.dataset name -> build(cfg) -> folder, for corpora generated on first use (omni.demo)


def register_generated(name: str, build) -> None:
    """Makes `data.dataset=<name>` build (once) and open the folder build(cfg) returns."""
    GENERATED[name] = build


def dataset_folder(cfg) -> Path:
    """The folder cfg.data.dataset names: a generated corpus (built on first use) or a built dataset's folder."""
    name = cfg.data.dataset
    if name in GENERATED:
        return GENERATED[name](cfg)
    path = Path(name).expanduser()
    if not path.exists() and name in ("demo", "demo-speech"):
        raise DatasetError(f"data.dataset={name!r} is the generated demo corpus, and omni.demo (which builds it) is "
                           "not imported; the omni command imports it, in Python `import omni.demo` first")
    return path


def open_dataset(path) -> Dataset:
    path = Path(path).expanduser()
    meta_file = path / DATASET_FILE
    if not meta_file.is_file():
        hint = " (the build did not finish; run `omni data build` again)" if path.exists() else ""
        raise DatasetError(f"{path} is not a built omni dataset: {DATASET_FILE} is missing{hint}")
    meta = json.loads(meta_file.read_text())
    if meta.get("format_version") != FORMAT_VERSION:
        raise DatasetError(f"{path} has dataset format {meta.get('format_version')}, this omni reads "
                           f"{FORMAT_VERSION}; rebuild it with `omni data build`")
    return Dataset(path, meta)
