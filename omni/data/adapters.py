"""TFDS catalog datasets -> omni raw examples (the in-memory form omni.data.manifest documents; omni.data.dataset stores it).

Two parts:

* `ADAPTERS[name](record, **options) -> [raw example, ...]`: pure functions of one TFDS record (a dict of numpy
  values / str / bytes), no TFDS or TensorFlow needed. They accept every form TFDS hands records out in:
  `tfds.data_source` on real files (text as `bytes`, sequences as Python lists), `tfds.data_source` under
  `tfds.testing.mock_data` (text as `str`, sequences as numpy arrays) and `tfds.as_numpy(tfds.load(...))`
  (text as `bytes`, sequences as object arrays).
* `read_catalog(name, split, data_dir=None, limit=None, **options)`: opens a *prepared* dataset and yields raw
  examples; `catalog_examples(...)` gives `{"train": factory, "eval": factory}` for `omni data build --tfds`.

Adapters

    coco_captions   segments [image, caption text], targets ["text"]
        captions="first"  one example per image, with its first (non-empty) caption        (default)
        captions="all"    one example per (image, caption): ~5 per image, the image repeated in each
        id   "coco_captions/<image id>/<caption index>"  (so the first-caption example has the same id either way)
        meta {"image_id": int, "filename": str}
        The image is `{"image_bytes": <the JPEG as stored>}` when read with read_catalog (the default: no decode,
        no re-encode, no Pillow needed) or `{"image": uint8 [H, W, 3]}` when the record holds pixels
        (`decode_images=True`, mock data, hand-made records). Captions are stripped; empty ones are skipped.
    librispeech     targets follow the task; speech int16 -> float32 / 32768 (in [-1, 1)), sample_rate 16000
        task="asr"   [audio, transcript]  targets ["text"]                                   (default)
        task="tts"   [transcript, audio]  targets ["audio"]
        id   "librispeech/<task>/<utterance id>"    meta {"speaker_id": int, "chapter_id": int}
        Transcripts are kept as LibriSpeech writes them (upper case, no punctuation).

A record with nothing to learn (no caption, empty transcript or audio) gives `[]`; a malformed one (wrong dtype
or shape, a bad option) raises ValueError.

Reading needs the dataset prepared beforehand; nothing is downloaded here (`download=False` always):

    tfds build coco_captions --file_format=array_record --data_dir DIR    # where the sources can be downloaded
    tfds build librispeech   --file_format=array_record --data_dir DIR    # (TFDS needs TensorFlow for this)

then `read_catalog(..., data_dir=DIR)` / `omni data build --tfds NAME --tfds-data-dir DIR`. array_record copies
are read by random access (`as_data_source`); a copy prepared in the default tfrecord format is read through
`tfds.as_numpy(builder.as_dataset(...))`, which needs TensorFlow.

TensorFlow: the catalog builders of both datasets import it just to be constructed (`coco.py` declares
`tf.int64` features, `tfds.features.Audio` builds a tf dtype), so `tfds.builder(name)` fails without it. Without
TensorFlow, read_catalog falls back to the dataset's own metadata files (`features.json`), which works for an
array_record copy of coco_captions but not for librispeech (its Audio feature needs TensorFlow even then); the
error says `pip install tensorflow-cpu` when that is the missing piece.
"""

from __future__ import annotations

import functools
import importlib.util
from typing import Callable, Iterable, Iterator

import numpy as np

from omni.errors import CatalogError

LIBRISPEECH_SAMPLE_RATE = 16000

# Option values each adapter accepts, the first one being the default.
OPTIONS = {"coco_captions": {"captions": ("first", "all")},
           "librispeech": {"task": ("asr", "tts")}}

# Catalog splits used by catalog_examples when none is given: omni split -> catalog split.
DEFAULT_SPLITS = {"coco_captions": {"train": "train", "eval": "val"},  # the Karpathy & Li splits
                  "librispeech": {"train": "train_clean100+train_clean360+train_other500", "eval": "dev_clean"}}




# ---------------------------------------------------------------------------------------------- value helpers

def _str(value, what: str) -> str:
    if isinstance(value, np.ndarray) and value.ndim == 0:
        value = value.item()
    if isinstance(value, (bytes, np.bytes_)):
        return bytes(value).decode("utf-8")
    if isinstance(value, str):  # np.str_ too
        return str(value)
    raise ValueError(f"{what} should be text (str or bytes), got {type(value).__name__}")


def _strs(values, what: str) -> list[str]:
    if isinstance(values, (str, bytes, np.str_, np.bytes_)):
        values = [values]
    return [_str(v, what) for v in values]


def _int(value, what: str) -> int:
    array = np.asarray(value)
    if array.ndim != 0 or array.dtype.kind not in "iu":
        raise ValueError(f"{what} should be one integer, got {type(value).__name__} {array.dtype} {array.shape}")
    return int(array)


def _image_segment(value) -> dict:
    """Encoded bytes stay encoded (`image_bytes`); pixels become uint8 [H, W, 3] (`image`)."""
    if isinstance(value, np.ndarray) and value.ndim == 0 and value.dtype.kind in "SO":
        value = value.item()
    if isinstance(value, (bytes, np.bytes_)):
        if not value:
            raise ValueError("image: empty encoded bytes")
        return {"image_bytes": bytes(value)}
    image = np.asarray(value)
    if image.dtype != np.uint8:
        raise ValueError(f"image should be uint8 pixels or encoded bytes, got {image.dtype}")
    if image.ndim == 2:
        image = image[:, :, None]
    if image.ndim != 3 or image.shape[-1] not in (1, 3, 4) or 0 in image.shape:
        raise ValueError(f"image should be [H, W, 1|3|4], got shape {image.shape}")
    if image.shape[-1] == 1:
        image = np.repeat(image, 3, axis=-1)
    return {"image": np.ascontiguousarray(image[:, :, :3])}


def _wave(speech) -> np.ndarray:
    if isinstance(speech, (bytes, np.bytes_)) or (isinstance(speech, np.ndarray) and speech.dtype.kind in "SO"):
        raise ValueError("speech is still encoded (the librispeech/lazy_decode config); use librispeech/default")
    speech = np.asarray(speech)
    if speech.ndim == 2 and speech.shape[1] == 1:
        speech = speech[:, 0]
    if speech.ndim != 1:
        raise ValueError(f"speech should be mono [samples], got shape {speech.shape}")
    if speech.dtype == np.int16:
        return speech.astype(np.float32) / 32768.0
    if speech.dtype.kind == "f":
        return speech.astype(np.float32)
    raise ValueError(f"speech should be int16 PCM (or float), got {speech.dtype}")


def _check_option(dataset: str, key: str, value) -> None:
    allowed = OPTIONS[dataset][key]
    if value not in allowed:
        raise ValueError(f"{dataset}: {key}={value!r} is not one of {', '.join(allowed)}")


# ---------------------------------------------------------------------------------------------- the adapters

def coco_captions(record: dict, *, captions: str = "first") -> list[dict]:
    """One coco_captions record -> [image, caption] examples (module docstring: captions="first"|"all")."""
    _check_option("coco_captions", "captions", captions)
    image_id = _int(record["image/id"], "image/id")
    texts = [(k, t.strip()) for k, t in enumerate(_strs(record["captions"]["text"], "captions/text"))]
    texts = [(k, t) for k, t in texts if t]
    if captions == "first":
        texts = texts[:1]
    if not texts:
        return []
    image = _image_segment(record["image"])
    meta = {"image_id": image_id, "filename": _str(record.get("image/filename", ""), "image/filename")}
    return [{"id": f"coco_captions/{image_id}/{k}", "targets": ["text"], "meta": meta,
             "segments": [image, {"text": text}]} for k, text in texts]


def librispeech(record: dict, *, task: str = "asr") -> list[dict]:
    """One librispeech record -> one ASR (audio -> text) or TTS (text -> audio) example."""
    _check_option("librispeech", "task", task)
    utterance = _str(record["id"], "id")
    text = _str(record["text"], "text").strip()
    wave = _wave(record["speech"])
    if not text or not wave.size:
        return []
    audio = {"audio": wave, "sample_rate": LIBRISPEECH_SAMPLE_RATE}
    segments, targets = ([audio, {"text": text}], ["text"]) if task == "asr" else ([{"text": text}, audio], ["audio"])
    meta = {"speaker_id": _int(record["speaker_id"], "speaker_id"),
            "chapter_id": _int(record["chapter_id"], "chapter_id")}
    return [{"id": f"librispeech/{task}/{utterance}", "targets": targets, "meta": meta, "segments": segments}]


ADAPTERS: dict[str, Callable[..., list[dict]]] = {"coco_captions": coco_captions, "librispeech": librispeech}


# ---------------------------------------------------------------------------------------------- reading TFDS

def _base_name(name: str) -> str:
    """'coco_captions/2014:1.1.0' -> 'coco_captions'."""
    return name.split("/")[0].split(":")[0]


def adapter_for(name: str, **options) -> Callable[[dict], list[dict]]:
    """The adapter of a catalog name (config/version suffixes allowed) with its options bound; CatalogError if
    the dataset has no adapter or an option is unknown or bad."""
    base = _base_name(name)
    if base not in ADAPTERS:
        raise CatalogError(f"no adapter for TFDS dataset {name!r}; adapters exist for: {', '.join(ADAPTERS)}")
    allowed = OPTIONS[base]
    for key, value in options.items():
        if key not in allowed:
            known = ", ".join(f"{k}={'|'.join(v)}" for k, v in allowed.items())
            raise CatalogError(f"{base} has no option {key!r}; its options: {known}")
        if value not in allowed[key]:
            raise CatalogError(f"{base}: {key}={value!r} is not one of {', '.join(allowed[key])}")
    return functools.partial(ADAPTERS[base], **options)


def _tfds():
    import tensorflow_datasets as tfds

    tfds.disable_progress_bar()
    return tfds


def _missing_tensorflow(error: BaseException) -> bool:
    """Whether `error` (or what it wraps) is TensorFlow failing to import because it is not installed."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, ImportError) and "tensorflow" in (f"{error.name} {error}"):
            return importlib.util.find_spec("tensorflow") is None
        error = error.__cause__ or error.__context__
    return False


def _prepare_hint(name: str) -> str:
    return (f"nothing is downloaded here. Prepare it once on a machine that can download the sources: "
            f"`tfds build {_base_name(name)} --file_format=array_record --data_dir DIR` (TFDS needs TensorFlow to "
            f"build), then pass that DIR as data_dir (omni data build --tfds-data-dir DIR)")


def _builder(tfds, name: str, data_dir):
    try:
        return tfds.builder(name, data_dir=data_dir)
    except Exception as error:  # noqa: BLE001 - TFDS wraps the ImportError in its own exception types
        if not _missing_tensorflow(error):
            raise
    # The catalog code needs TensorFlow; a prepared copy can still be opened from its own metadata files.
    from tensorflow_datasets.core import read_only_builder
    from tensorflow_datasets.core.registered import DatasetNotFoundError

    missing = (f"TFDS needs TensorFlow to construct the catalog builder of {name!r} and it is not installed: "
               f"`pip install tensorflow-cpu` (or tensorflow)")
    try:
        return read_only_builder.builder_from_files(name, data_dir=data_dir)
    except DatasetNotFoundError:
        where = data_dir or "the default TFDS data dir (~/tensorflow_datasets or $TFDS_DATA_DIR)"
        raise CatalogError(f"{missing}; without it only a copy already prepared in array_record format can be "
                           f"read (coco_captions only), and none was found in {where}") from None
    except Exception as error:  # noqa: BLE001
        if _missing_tensorflow(error):
            raise CatalogError(f"{missing}; reading a prepared copy needs it too for {_base_name(name)} "
                               f"(its feature types import TensorFlow)") from None
        raise


class _SourceRecords:
    """A random-access data source read front to back (one record at a time: batching the reads with
    `__getitems__` was no faster on local array_record files, and tfds.testing.mock_data breaks it)."""

    def __init__(self, source):
        self.source = source

    def __len__(self) -> int:
        return len(self.source)

    def __iter__(self) -> Iterator[dict]:
        for i in range(len(self.source)):
            yield self.source[i]


def open_catalog(name: str, split: str, data_dir=None, decode_images: bool = False) -> Iterable[dict]:
    """The TFDS records of a prepared split, re-iterable, in stored order; CatalogError if it cannot be opened.

    Images (coco_captions) stay encoded unless `decode_images`; never downloads anything."""
    tfds = _tfds()
    builder = _builder(tfds, name, data_dir)
    decoders = None if decode_images or "image" not in builder.info.features else {"image": tfds.decode.SkipDecoding()}
    try:
        return _SourceRecords(builder.as_data_source(split=split, decoders=decoders))
    except NotImplementedError:  # no random-access files: nothing prepared here, or a tfrecord copy
        if not builder.is_prepared():
            raise CatalogError(f"TFDS dataset {builder.info.full_name} is not prepared in {builder.data_dir}; "
                               + _prepare_hint(name)) from None
    except (ValueError, KeyError) as error:
        raise CatalogError(f"{name}: cannot open split {split!r}: {error} "
                           f"(prepared splits: {', '.join(builder.info.splits) or 'none'})") from error
    try:  # a tfrecord copy: read sequentially through tf.data
        return tfds.as_numpy(builder.as_dataset(split=split, decoders=decoders, shuffle_files=False))
    except Exception as error:  # noqa: BLE001
        if _missing_tensorflow(error):
            raise CatalogError(f"{builder.info.full_name} in {builder.data_dir} is in tfrecord format, which "
                               f"only TensorFlow reads: `pip install tensorflow-cpu`, or rebuild it with "
                               f"`tfds build {_base_name(name)} --file_format=array_record`") from None
        raise


def _adapt(records: Iterable[dict], adapter: Callable[[dict], list[dict]], limit: int | None) -> Iterator[dict]:
    if limit is not None and limit <= 0:
        return
    count = 0
    for record in records:
        for example in adapter(record):
            yield example
            count += 1
            if limit is not None and count >= limit:
                return


def read_catalog(name: str, split: str, data_dir=None, limit: int | None = None, decode_images: bool = False,
                 **options) -> Iterator[dict]:
    """Raw examples of a prepared TFDS catalog split through its adapter, in the order stored.

    name     'coco_captions' or 'librispeech' (a config/version suffix is allowed: 'coco_captions/2014:1.1.0')
    split    a catalog split or TFDS split expression ('val', 'dev_clean', 'train[:1000]', 'a+b')
    limit    at most this many raw examples (not records: captions="all" gives ~5 per record)
    options  the adapter's: captions="first"|"all" (coco_captions), task="asr"|"tts" (librispeech)

    The dataset is opened at the call, so an unknown name or option, a split that is not prepared or missing
    TensorFlow raise CatalogError here rather than at the first `next()`.
    """
    adapter = adapter_for(name, **options)
    return _adapt(open_catalog(name, split, data_dir, decode_images), adapter, limit)


def catalog_splits(name: str, train_split: str | None = "", eval_split: str | None = "") -> dict:
    """{"train": catalog split(s), "eval": catalog split} omni reads, the defaults (DEFAULT_SPLITS) filled in."""
    defaults = DEFAULT_SPLITS[_base_name(name)]
    return {"train": train_split or defaults["train"], "eval": eval_split or defaults["eval"]}


def catalog_examples(name: str, train_split: str | None = "", eval_split: str | None = "", data_dir=None,
                     limit: int | None = None, decode_images: bool = False, **options) -> dict:
    """{"train": factory, "eval": factory} of raw-example generators for omni.data.dataset.raw_examples.

    Empty splits take DEFAULT_SPLITS (coco_captions: train / val; librispeech: the three train sets / dev_clean).
    Both splits are opened here, so problems raise CatalogError before any building starts."""
    adapter = adapter_for(name, **options)
    splits = catalog_splits(name, train_split, eval_split)
    opened = {omni_split: open_catalog(name, split, data_dir, decode_images) for omni_split, split in splits.items()}
    return {omni_split: (lambda records=records: _adapt(records, adapter, limit))
            for omni_split, records in opened.items()}
