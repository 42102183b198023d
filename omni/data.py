"""The input pipeline: a built dataset -> seeded shuffle per epoch -> decode + tokenise -> pack -> batches (grain).

    dataset (omni.dataset, TFDS array_record, random access)
      -> reading shard s of S: examples [s::S]; process p of P reads shards p*S/P .. (p+1)*S/P - 1
      -> seeded shuffle, new order every epoch, endless repeat           (train only)
      -> Tokenize (worker_threads threads): decode images and resize them to the patch budget, text through
         the tokenizer, audio codes to tokens; an over-long example is split or truncated (data.overlong)
      -> first-fit packing into seq_len rows (segment ids, positions restart per example, target masks kept)
      -> batches of [batch_size / S, seq_len, ...] per shard in the layout of omni.batch; a process's batch is
         its shards' batches in shard order, i.e. rows of the global batch that its devices hold
      -> num_workers > 0: each shard's chain runs in grain worker processes, prefetching ahead of the trainer

S is data.shards, or the process count when that is 0. A global batch is the concatenation of all S shard
batches, so with data.shards fixed (say 8) the batches and their order are the same whether 1, 2, 4 or 8
processes read them, and a run saved by N processes resumes on M with the same data order. The train
iterator (ShardedBatches) saves every shard's grain iterator state in each checkpoint (one file per shard,
omni.checkpoint), so a resumed run continues with exactly the next batch. Nothing is dropped silently: splits
are counted in the dataset build report, over-long examples are split by default and truncation is logged.
"""

from __future__ import annotations

import fcntl
import functools
import io
import logging
import os
import queue
import threading
from pathlib import Path

import grain
import numpy as np
from grain import experimental as grain_experimental

from omni import dataset as dataset_lib
from omni.batch import FIELDS, patch_dim  # noqa: F401  (data.patch_dim: the name callers know)
from omni.config import Config, ConfigError, DataConfig
from omni.tokens import MAX_CHUNKS, Vocab, encode_example, fit_to_length  # noqa: F401

PACKED_FIELDS = ("tokens", "patches", "modality", "is_target")
DEMO_VERSION = 1
log = logging.getLogger("omni.data")


# ----------------------------------------------------------------------------------------------- datasets

def cache_root(cfg: DataConfig) -> Path:
    return Path(cfg.cache_dir or os.environ.get("OMNI_CACHE") or "~/.cache/omni").expanduser()


DEMOS = ("demo", "demo-speech")


def demo_path(cfg: DataConfig) -> Path:
    return cache_root(cfg) / (f"{cfg.dataset}-v{DEMO_VERSION}-{cfg.image_size}px-{cfg.train_examples}-"
                              f"{cfg.eval_examples}-seed{cfg.corpus_seed}")


def build_demo(cfg: DataConfig) -> Path:
    """Writes a demo corpus as PNG/WAV files + manifest and builds it, once (other processes wait for it).

    demo          tone melodies through ToneCodec
    demo-speech   spoken captions (espeak-ng) through a MelRVQCodec fitted on the train clips
    """
    from omni import demo_data
    from omni.codec import ToneCodec, fit_codec_on_files

    path = demo_path(cfg)
    if (path / dataset_lib.DATASET_FILE).exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(str(path) + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (path / dataset_lib.DATASET_FILE).exists():
            log.info("building the %s corpus into %s", cfg.dataset, path)
            source = Path(str(path) + ".source")
            write = demo_data.write_manifest if cfg.dataset == "demo" else demo_data.write_speech_manifest
            manifest = write(source, cfg.train_examples, cfg.eval_examples, cfg.image_size, cfg.corpus_seed)
            if cfg.dataset == "demo":
                codec = ToneCodec()
            else:
                clips = sorted((source / "speech").glob("train-*.wav"))
                codec = fit_codec_on_files(clips, Path(str(path) + ".codec"), codebooks=4, codebook_size=64,
                                           seed=cfg.corpus_seed)
            report = dataset_lib.BuildReport()
            examples, codec = dataset_lib.manifest_examples(manifest, codec, 0.0, report, skip_bad=False)
            dataset_lib.build(examples, path, codec, report=report, overwrite=True, source=str(manifest))
    return path


@functools.lru_cache(maxsize=8)
def _open(path: str) -> dataset_lib.Dataset:
    return dataset_lib.open_dataset(path)


def dataset_for(cfg: DataConfig) -> dataset_lib.Dataset:
    """The dataset data.dataset names (the demo corpus is built on first use)."""
    path = build_demo(cfg) if cfg.dataset in DEMOS else Path(cfg.dataset).expanduser()
    return _open(str(path))


def tokenizer_spec(cfg: DataConfig) -> str:
    return cfg.tokenizer or dataset_for(cfg).tokenizer_spec()


@functools.lru_cache(maxsize=8)
def _tokenizer(spec: str):
    from omni.text_tokenizer import load_tokenizer

    return load_tokenizer(spec)


def tokenizer_for(cfg: DataConfig):
    return _tokenizer(tokenizer_spec(cfg))


def vocab_for(cfg: DataConfig) -> Vocab:
    return Vocab(text_size=tokenizer_for(cfg).vocab_size, codebook_sizes=dataset_for(cfg).codebook_sizes)


# ----------------------------------------------------------------------------------------------- examples

def fit_image(image_HxWx3: np.ndarray, patch_size: int, max_patches: int) -> np.ndarray:
    """Resize keeping the aspect ratio so the image has at most max_patches patches, sides multiples of P.

    Images that already fit with sides that are multiples of P are returned untouched (no resampling).
    """
    from PIL import Image

    h, w = image_HxWx3.shape[:2]
    p = patch_size
    if h % p == 0 and w % p == 0 and (h // p) * (w // p) <= max_patches:
        return image_HxWx3
    scale = min(1.0, (max_patches * p * p / (h * w)) ** 0.5)
    rows, cols = max(1, round(h * scale / p)), max(1, round(w * scale / p))
    while rows * cols > max_patches:  # rounding up can overshoot the budget by a row or a column
        if rows >= cols:
            rows -= 1
        else:
            cols -= 1
    resized = Image.fromarray(image_HxWx3).resize((cols * p, rows * p), Image.Resampling.BICUBIC)
    return np.asarray(resized)


def decode_image(data: bytes) -> np.ndarray:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert("RGB"))


def prepare(record: dict, cfg: DataConfig, codebook_count: int) -> dict:
    """A stored example -> the example dict encode_example takes (images decoded and fitted to the budget)."""
    example = dataset_lib.decode_record(record, codebook_count)
    for segment in example["segments"]:
        if "image_bytes" in segment:
            segment["image"] = fit_image(decode_image(segment.pop("image_bytes")), cfg.patch_size,
                                         cfg.max_image_patches)
    return example


class Tokenize(grain.transforms.Map):
    """stored example -> list of per-position array dicts (one, or several pieces of an over-long example).

    Holds only names, not the tokenizer, so it pickles cheaply into grain worker processes.
    """

    def __init__(self, cfg: DataConfig):
        self.cfg = cfg
        self.tokenizer_spec = tokenizer_spec(cfg)
        self.codebook_sizes = dataset_for(cfg).codebook_sizes

    def map(self, record: dict) -> list[dict]:
        tokenizer = _tokenizer(self.tokenizer_spec)
        vocab = Vocab(text_size=tokenizer.vocab_size, codebook_sizes=self.codebook_sizes)
        example = prepare(record, self.cfg, len(self.codebook_sizes))
        encoded = encode_example(example, vocab, tokenizer, self.cfg.patch_size, self.cfg.audio_layout)
        return fit_to_length(encoded, self.cfg.seq_len, self.cfg.overlong, example["id"])


class _Pieces(grain_experimental.FlatMapTransform):
    max_fan_out = MAX_CHUNKS

    def flat_map(self, pieces: list[dict]) -> list[dict]:
        return pieces


def _unpack_names(packed: dict) -> dict:
    out = {name: packed[name] for name in PACKED_FIELDS}
    out["segment_ids"] = packed["tokens_segment_ids"]
    out["positions"] = packed["tokens_positions"]
    return {name: out[name].astype(dtype) for name, dtype in FIELDS.items()}


def _pack(ds: grain.IterDataset, cfg: DataConfig, bins: int, shuffle_bins: bool) -> grain.IterDataset:
    ds = grain_experimental.FlatMapIterDataset(ds, _Pieces())
    return grain_experimental.FirstFitPackIterDataset(
        ds, length_struct={name: cfg.seq_len for name in PACKED_FIELDS}, num_packing_bins=bins,
        seed=cfg.shuffle_seed, shuffle_bins=shuffle_bins)


def local_batch_size(cfg: Config, process_count: int) -> int:
    if cfg.train.batch_size % process_count:
        raise ValueError(f"train.batch_size={cfg.train.batch_size} does not divide over {process_count} processes")
    return cfg.train.batch_size // process_count


def num_shards(cfg: Config, process_count: int) -> int:
    """S: data.shards, or one per process; checked to split over the processes and the batch."""
    shards = cfg.data.shards or process_count
    if shards % process_count or cfg.train.batch_size % shards:
        raise ConfigError(f"data.shards={shards} must be a multiple of the {process_count} processes and divide "
                         f"train.batch_size={cfg.train.batch_size}; set --set data.shards=N accordingly")
    return shards


def split_source(cfg: DataConfig, split: str, process_index: int = 0, process_count: int = 1) -> grain.MapDataset:
    """Shard `process_index` of `process_count` of a split's stored examples."""
    return grain.MapDataset.source(dataset_for(cfg).source(split))[process_index::process_count]


def shard_dataset(cfg: Config, shard: int, shards: int) -> grain.IterDataset:
    """Endless packed batches of one reading shard: dict of [batch_size / shards, seq_len, ...] numpy arrays."""
    rows = cfg.train.batch_size // shards
    examples = split_source(cfg.data, "train", shard, shards)
    ds = examples.seed(cfg.data.shuffle_seed).shuffle().repeat().map(Tokenize(cfg.data))
    ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=cfg.data.worker_threads, prefetch_buffer_size=4 * rows))
    ds = _pack(ds, cfg.data, cfg.data.packing_bins or rows, shuffle_bins=True)
    ds = ds.batch(rows, drop_remainder=True).map(_unpack_names)
    if cfg.data.num_workers:
        from absl import flags

        if not flags.FLAGS.is_parsed():  # grain's workers read absl flags (known grain 0.2 issue)
            flags.FLAGS.mark_as_parsed()
        ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=cfg.data.num_workers))
    return ds


class ShardedBatches:
    """This process's endless train batches, [batch_size / process_count, seq_len, ...]: the batches of its
    reading shards, concatenated in shard order. State: every shard's grain iterator state."""

    def __init__(self, cfg: Config, process_index: int = 0, process_count: int = 1):
        self.num_shards = num_shards(cfg, process_count)
        per_process = self.num_shards // process_count
        self.shard_ids = list(range(process_index * per_process, (process_index + 1) * per_process))
        self._iterators = [iter(shard_dataset(cfg, s, self.num_shards)) for s in self.shard_ids]

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        parts = [next(it) for it in self._iterators]
        if len(parts) == 1:
            return parts[0]
        return {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}

    def close(self) -> None:
        """Stops the shards' worker processes (data.num_workers > 0)."""
        for it in self._iterators:
            if hasattr(it, "close"):
                it.close()

    def get_state(self) -> dict:
        return {"num_shards": self.num_shards,
                "shards": {str(s): it.get_state() for s, it in zip(self.shard_ids, self._iterators)}}

    def set_state(self, state: dict) -> None:
        if state["num_shards"] != self.num_shards:
            raise ValueError(f"iterator state of {state['num_shards']} reading shards cannot restore a pipeline of "
                             f"{self.num_shards}; set data.shards={state['num_shards']}")
        for s, it in zip(self.shard_ids, self._iterators):
            it.set_state(state["shards"][str(s)])


class Prefetched:
    """Batches made ready `size` ahead on a background thread: next(source) and put(batch) (the trainer's put sends
    it to the devices) run while the devices compute the steps before, so the training loop only waits when the
    pipeline is slower than the step. get_state() is the source's state after the last batch handed out (not after
    the batches waiting in the queue), so a checkpoint resumes at the first batch the trainer has not taken."""

    def __init__(self, source: ShardedBatches, put, size: int):
        self.source, self._put, self._size = source, put, size
        self._queue = queue.Queue(maxsize=size)
        self._stop = threading.Event()
        self._thread = None
        self._state = None  # after the last batch handed out; None: nothing taken since set_state / the start

    shard_ids = property(lambda self: self.source.shard_ids)
    num_shards = property(lambda self: self.source.num_shards)

    def __iter__(self):
        return self

    def __next__(self):
        if self._thread is None:
            self._thread = threading.Thread(target=self._fill, name="omni-prefetch", daemon=True)
            self._thread.start()
        item = self._queue.get()
        if isinstance(item, BaseException):  # the pipeline's error (a corrupt file, say) surfaces in the loop
            self._thread.join()
            self._thread = None
            raise item
        batch, self._state = item
        return batch

    def _fill(self) -> None:
        while not self._stop.is_set():
            try:
                host_batch = next(self.source)
                item = (self._put(host_batch), self.source.get_state())
            except BaseException as e:  # noqa: BLE001 - handed to the consumer, which raises it
                item = e
            while not self._stop.is_set():
                try:
                    self._queue.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if isinstance(item, BaseException):
                return

    def get_state(self) -> dict:
        return self.source.get_state() if self._state is None else self._state

    def set_state(self, state: dict) -> None:
        if self._thread is not None:
            raise RuntimeError("set_state after batches were taken: restore before the first next()")
        self.source.set_state(state)
        self._state = None

    def close(self) -> None:
        """Stops the thread (dropping the batches it made ahead) and the source's worker processes."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.source.close()


def train_dataset(cfg: Config, process_index: int = 0, process_count: int = 1) -> ShardedBatches:
    """Endless packed train batches of this process (ShardedBatches; module docstring)."""
    return ShardedBatches(cfg, process_index, process_count)


def eval_batches(cfg: Config, process_index: int = 0, process_count: int = 1) -> list[dict]:
    """The whole eval split of this process, packed in order; the last batch is filled with padding rows."""
    batch = local_batch_size(cfg, process_count)
    examples = split_source(cfg.data, "eval", process_index, process_count)
    ds = _pack(examples.map(Tokenize(cfg.data)).to_iter_dataset(), cfg.data, batch, shuffle_bins=False)
    batches = list(ds.batch(batch, drop_remainder=False).map(_unpack_names))
    if batches and len(batches[-1]["tokens"]) < batch:
        last = batches[-1]
        missing = batch - len(last["tokens"])
        batches[-1] = {k: np.concatenate([v, np.zeros((missing,) + v.shape[1:], v.dtype)]) for k, v in last.items()}
    if cfg.train.eval_batches:
        batches = batches[: cfg.train.eval_batches]
    return batches


def examples(cfg: DataConfig, split: str, limit: int | None = None) -> list[dict]:
    """Decoded examples of a split in stored order (for demo metrics and inspection), images fitted."""
    source = dataset_for(cfg).source(split)
    count = len(dataset_for(cfg).codebook_sizes)
    n = len(source) if limit is None else min(limit, len(source))
    return [prepare(source[i], cfg, count) for i in range(n)]
