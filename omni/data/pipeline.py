"""The input pipeline: a built dataset -> seeded shuffle per epoch -> decode + tokenise -> pack -> batches (grain).

    dataset (omni.data.dataset, TFDS array_record, random access)
      -> reading shard s of S: examples [s::S]; process p of P reads shards p*S/P .. (p+1)*S/P - 1
      -> seeded shuffle, new order every epoch, endless repeat           (train only)
      -> Tokenize (worker_threads threads): decode images and resize them to the patch budget (an image entering
         as codes: to as many cells of the dataset's image tokenizer, then encoded), text through the tokenizer,
         audio and image codes to tokens; an over-long example is split or truncated (data.overlong)
      -> first-fit packing into seq_len rows (segment ids, positions restart per example, target masks kept)
      -> batches of [batch_size / S, seq_len, ...] per shard in the layout of omni.batch; a process's batch is
         its shards' batches in shard order, i.e. rows of the global batch that its devices hold
      -> num_workers > 0: each shard's chain runs in grain worker processes, prefetching ahead of the trainer

S is data.shards, or the process count when that is 0. A global batch is the concatenation of all S shard
batches, so with data.shards fixed (say 8) the batches and their order are the same whether 1, 2, 4 or 8
processes read them, and a run saved by N processes resumes on M with the same data order. The train
iterator (ShardedBatches) saves every shard's grain iterator state in each checkpoint (one file per shard,
omni.train.checkpoint), so a resumed run continues with exactly the next batch. Nothing is dropped silently: splits
are counted in the dataset build report, over-long examples are split by default and truncation is logged.
"""

from __future__ import annotations

import functools
import logging

import grain
import numpy as np
from grain import experimental as grain_experimental

from omni import storage
from omni.batch import FIELDS, padding_rows, row_patches
from omni.config import Config, DataConfig
from omni.data import dataset as dataset_lib
from omni.data.image_entry import image_segments
from omni.data.images import decode_image
from omni.data.text_tokenizer import HF_FILE, load_tokenizer
from omni.errors import ConfigError, DatasetError, StorageError
from omni.tokens import MAX_CHUNKS, Vocab, encode_example, fit_to_length

PACKED_FIELDS = ("tokens", "modality", "is_target")  # per position, packed to seq_len
PATCH_FIELDS = ("patches", "patch_positions")  # per image patch, packed to data.row_patches slots
log = logging.getLogger("omni.data")


# ----------------------------------------------------------------------------------------------- datasets


# Opened once per process and reused until someone rebuilds them at the same path: each cache key holds the
# file's storage.stamp, so a dataset or tokenizer written again is opened again (a caller never sees a stale one).

@functools.lru_cache(maxsize=8)
def _open(path: str, stamp) -> dataset_lib.Dataset:
    return dataset_lib.open_dataset(path)


def dataset_for(cfg: Config) -> dataset_lib.Dataset:
    """The dataset data.dataset names (a generated corpus is built on first use, omni.data.dataset.dataset_folder)."""
    folder = str(dataset_lib.dataset_folder(cfg))
    return _open(folder, storage.stamp(storage.path(folder) / dataset_lib.DATASET_FILE))


def tokenizer_spec(cfg: Config) -> str:
    return cfg.data.tokenizer or dataset_for(cfg).tokenizer_spec()


def _tokenizer_stamp(spec: str):
    """The stamp of the file a tokenizer spec names ('bytes' has none; a folder: its tokenizer.json)."""
    if spec.strip().lower() in ("bytes", "byte"):
        return None
    try:
        location = storage.path(spec)
    except StorageError:  # load_tokenizer says what is wrong with it
        return None
    return storage.stamp(location / HF_FILE) or storage.stamp(location)


@functools.lru_cache(maxsize=8)
def _tokenizer(spec: str, stamp=None):
    return load_tokenizer(spec)


def tokenizer_for(cfg: Config):
    spec = tokenizer_spec(cfg)
    return _tokenizer(spec, _tokenizer_stamp(spec))


def vocab_for(cfg: Config) -> Vocab:
    ds = dataset_for(cfg)
    return Vocab(text_size=tokenizer_for(cfg).vocab_size, codebook_sizes=ds.codebook_sizes,
                 image_codebook_sizes=ds.image_codebook_sizes)


@functools.lru_cache(maxsize=8)
def _image_tokenizer(dataset_path: str, stamp):
    return _open(dataset_path, stamp).image_tokenizer()


def image_tokenizer_for(cfg: Config):
    """The dataset's image tokenizer (None when it has none), loaded once per build of the dataset."""
    ds = dataset_for(cfg)
    return _image_tokenizer(str(ds.path), storage.stamp(storage.path(ds.path) / dataset_lib.DATASET_FILE))


# ----------------------------------------------------------------------------------------------- examples


def prepare(record: dict, cfg: DataConfig, codebook_count: int, image_tokenizer=None) -> dict:
    """A stored example -> the example dict encode_example takes: images decoded and fitted to the budget, as
    patches ({"image"}), codes of the image tokenizer ({"image_codes"}) or both (patches, input only, then the
    codes), as the dataset says (omni.batch)."""
    image_codebooks = len(image_tokenizer.codebook_sizes) if image_tokenizer is not None else 0
    example = dataset_lib.decode_record(record, codebook_count, image_codebooks)
    segments = []
    for segment in example["segments"]:
        if "image_bytes" not in segment:
            segments.append(segment)
            continue
        enters = segment["as"]
        segments += image_segments(decode_image(segment["image_bytes"]), enters, segment["target"], cfg.patch_size,
                                   cfg.max_image_patches, image_tokenizer,
                                   f"example {example['id']} has an image entering as {enters} but the dataset has "
                                   "no image tokenizer; rebuild it with --image-tokenizer", DatasetError)
    example["segments"] = segments
    return example


class Tokenize(grain.transforms.Map):
    """stored example -> list of per-position array dicts (one, or several pieces of an over-long example).

    Holds only names, not the tokenizer, so it pickles cheaply into grain worker processes.
    """

    def __init__(self, cfg: Config):
        self.cfg = cfg.data
        self.tokenizer_spec = tokenizer_spec(cfg)
        self.tokenizer_stamp = _tokenizer_stamp(self.tokenizer_spec)
        ds = dataset_for(cfg)
        self.codebook_sizes = ds.codebook_sizes
        self.image_codebook_sizes = ds.image_codebook_sizes
        self.dataset_path = str(ds.path)
        self.dataset_stamp = storage.stamp(storage.path(ds.path) / dataset_lib.DATASET_FILE)

    def map(self, record: dict) -> list[dict]:
        tokenizer = _tokenizer(self.tokenizer_spec, self.tokenizer_stamp)
        vocab = Vocab(text_size=tokenizer.vocab_size, codebook_sizes=self.codebook_sizes,
                      image_codebook_sizes=self.image_codebook_sizes)
        image_tokenizer = (_image_tokenizer(self.dataset_path, self.dataset_stamp) if self.image_codebook_sizes
                           else None)
        example = prepare(record, self.cfg, len(self.codebook_sizes), image_tokenizer)
        encoded = encode_example(example, vocab, tokenizer, self.cfg.patch_size, self.cfg.audio_layout)
        try:  # a user's data or settings, not a bug: an OmniError, which the CLI reports in one line (exit 2)
            pieces = fit_to_length(encoded, self.cfg.seq_len, self.cfg.overlong, example["id"])
        except ValueError as e:
            raise DatasetError(str(e)) from None
        slots = row_patches(self.cfg)
        for piece in pieces:
            if len(piece["patches"]) > slots:
                raise DatasetError(f"example {example['id']} holds {len(piece['patches'])} image patches in "
                                 f"{len(piece['tokens'])} positions, more than data.row_patches={slots} patch "
                                 "slots of a row; raise data.row_patches (0 = seq_len) or lower "
                                 "data.max_image_patches")
        return pieces


class _Pieces(grain_experimental.FlatMapTransform):
    max_fan_out = MAX_CHUNKS

    def flat_map(self, pieces: list[dict]) -> list[dict]:
        return pieces


def _unpack_names(packed: dict) -> dict:
    """grain's packed rows -> the fields of omni.batch. A patch's position inside its example becomes its
    position in the row: its segment's first position (segments are laid out in id order) plus that offset."""
    out = {name: packed[name] for name in PACKED_FIELDS + ("patches",)}
    segment_ids_BxL = packed["tokens_segment_ids"]
    out["segment_ids"] = segment_ids_BxL
    out["positions"] = packed["tokens_positions"]
    rows, seq_len = segment_ids_BxL.shape
    segments = int(segment_ids_BxL.max(initial=0))
    lengths_BxS = np.stack([np.sum(segment_ids_BxL == s, axis=1) for s in range(1, segments + 1)], axis=1) \
        if segments else np.zeros((rows, 0), np.int64)
    starts_BxS1 = np.concatenate([np.zeros((rows, 1), np.int64), np.cumsum(lengths_BxS, axis=1)], axis=1)
    patch_segment_BxM = packed["patch_positions_segment_ids"]
    start_BxM = np.take_along_axis(starts_BxS1, np.maximum(patch_segment_BxM - 1, 0), axis=1)
    out["patch_positions"] = np.where(patch_segment_BxM > 0, start_BxM + packed["patch_positions"], seq_len)
    return {name: out[name].astype(dtype) for name, dtype in FIELDS.items()}


def _pack(ds: grain.IterDataset, cfg: DataConfig, bins: int, shuffle_bins: bool) -> grain.IterDataset:
    ds = grain_experimental.FlatMapIterDataset(ds, _Pieces())
    lengths = {name: cfg.seq_len for name in PACKED_FIELDS} | {name: row_patches(cfg) for name in PATCH_FIELDS}
    return grain_experimental.FirstFitPackIterDataset(
        ds, length_struct=lengths, num_packing_bins=bins, seed=cfg.shuffle_seed, shuffle_bins=shuffle_bins)


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


def split_source(cfg: Config, split: str, process_index: int = 0, process_count: int = 1) -> grain.MapDataset:
    """Shard `process_index` of `process_count` of a split's stored examples."""
    return grain.MapDataset.source(dataset_for(cfg).source(split))[process_index::process_count]


def shard_dataset(cfg: Config, shard: int, shards: int) -> grain.IterDataset:
    """Endless packed batches of one reading shard: dict of [batch_size / shards, seq_len, ...] numpy arrays."""
    rows = cfg.train.batch_size // shards
    examples = split_source(cfg, "train", shard, shards)
    ds = examples.seed(cfg.data.shuffle_seed).shuffle().repeat().map(Tokenize(cfg))
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


def train_dataset(cfg: Config, process_index: int = 0, process_count: int = 1) -> ShardedBatches:
    """Endless packed train batches of this process (ShardedBatches; module docstring)."""
    return ShardedBatches(cfg, process_index, process_count)


def eval_batches(cfg: Config, process_index: int = 0, process_count: int = 1) -> list[dict]:
    """The whole eval split of this process, packed in order; the last batch is filled with padding rows."""
    if not dataset_for(cfg).meta["counts"].get("eval"):
        raise DatasetError(f"data.dataset={cfg.data.dataset} has no eval examples to measure held-out loss on; "
                           f"{dataset_lib.NO_EVAL_HINT}")
    batch = local_batch_size(cfg, process_count)
    examples = split_source(cfg, "eval", process_index, process_count)
    ds = _pack(examples.map(Tokenize(cfg)).to_iter_dataset(), cfg.data, batch, shuffle_bins=False)
    batches = list(ds.batch(batch, drop_remainder=False).map(_unpack_names))
    if batches and len(batches[-1]["tokens"]) < batch:
        last = batches[-1]
        empty = padding_rows(batch - len(last["tokens"]), cfg.data.seq_len, row_patches(cfg.data),
                             last["patches"].shape[-1])
        batches[-1] = {k: np.concatenate([v, empty[k]]) for k, v in last.items()}
    if cfg.train.eval_batches:
        batches = batches[: cfg.train.eval_batches]
    return batches


def split_description(cfg: Config, split: str = "eval") -> dict:
    """What a result measured on `split` of cfg's dataset was measured on: the dataset as named (data.dataset),
    its folder, the split and its example count; eval results carry it (omni eval, the trainer's eval.json)."""
    ds = dataset_for(cfg)
    return {"name": cfg.data.dataset, "path": str(ds.path), "split": split,
            "examples": int(ds.meta["counts"].get(split, 0))}


def examples(cfg: Config, split: str, limit: int | None = None) -> list[dict]:
    """Decoded examples of a split in stored order (for demo metrics and inspection), images fitted."""
    ds, image_tokenizer = dataset_for(cfg), image_tokenizer_for(cfg)
    source = ds.source(split)
    n = len(source) if limit is None else min(limit, len(source))
    return [prepare(source[i], cfg.data, len(ds.codebook_sizes), image_tokenizer) for i in range(n)]
