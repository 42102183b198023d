"""The input pipeline: corpus -> seeded shuffle per epoch -> tokenise -> first-fit packing -> batches (grain).

Each process reads its own shard of the examples (`[process_index::process_count]`) and yields process-local
batches in the layout of omni.batch; the trainer turns them into global arrays. The train iterator is a grain
`DatasetIterator` whose state is saved in every checkpoint, so a resumed run continues with the next batch.
"""

from __future__ import annotations

import functools

import grain
import numpy as np
from grain import experimental as grain_experimental

from omni import demo_data
from omni.batch import FIELDS
from omni.codec import ToneCodec
from omni.config import Config, DataConfig
from omni.tokens import ByteTokenizer, Vocab, encode_example

PACKED_FIELDS = ("tokens", "patches", "modality", "is_target")


def vocab_for(cfg: DataConfig) -> Vocab:
    return Vocab(text_size=ByteTokenizer.vocab_size, codebook_sizes=ToneCodec.codebook_sizes)


def patch_dim(cfg: DataConfig) -> int:
    return cfg.patch_size * cfg.patch_size * 3


@functools.lru_cache(maxsize=4)
def _demo_split(split: str, num_examples: int, image_size: int, seed: int) -> tuple:
    return tuple(demo_data.make_split(split, num_examples, image_size, seed))


def corpus(cfg: DataConfig, split: str) -> tuple[dict, ...]:
    """The examples of a split (the demo corpus is generated on first use and kept for the process)."""
    if cfg.corpus != "demo":
        raise ValueError(f"unknown corpus {cfg.corpus!r}")
    num = cfg.train_examples if split == "train" else cfg.eval_examples
    return _demo_split(split, num, cfg.image_size, cfg.corpus_seed)


class Tokenize(grain.transforms.Map):
    """example dict -> per-position arrays (omni.tokens.encode_example), checked against the sequence budget."""

    def __init__(self, cfg: DataConfig):
        self.vocab, self.tokenizer, self.cfg = vocab_for(cfg), ByteTokenizer(), cfg

    def map(self, example: dict) -> dict:
        encoded = encode_example(example, self.vocab, self.tokenizer, self.cfg.patch_size)
        n = len(encoded["tokens"])
        if n > self.cfg.seq_len:
            raise ValueError(f"a {example.get('task', '')} example has {n} tokens, more than data.seq_len="
                             f"{self.cfg.seq_len}; raise data.seq_len (examples are never cut silently)")
        return encoded


def _unpack_names(packed: dict) -> dict:
    out = {name: packed[name] for name in PACKED_FIELDS}
    out["segment_ids"] = packed["tokens_segment_ids"]
    out["positions"] = packed["tokens_positions"]
    return {name: out[name].astype(dtype) for name, dtype in FIELDS.items()}


def _pack(ds: grain.IterDataset, cfg: DataConfig, bins: int, shuffle_bins: bool) -> grain.IterDataset:
    return grain_experimental.FirstFitPackIterDataset(
        ds, length_struct={name: cfg.seq_len for name in PACKED_FIELDS}, num_packing_bins=bins,
        seed=cfg.shuffle_seed, shuffle_bins=shuffle_bins)


def local_batch_size(cfg: Config, process_count: int) -> int:
    if cfg.train.batch_size % process_count:
        raise ValueError(f"train.batch_size={cfg.train.batch_size} does not divide over {process_count} processes")
    return cfg.train.batch_size // process_count


def train_dataset(cfg: Config, process_index: int = 0, process_count: int = 1) -> grain.IterDataset:
    """Endless packed train batches of this process: dict of [local_batch, seq_len, ...] numpy arrays."""
    batch = local_batch_size(cfg, process_count)
    examples = grain.MapDataset.source(corpus(cfg.data, "train"))[process_index::process_count]
    ds = examples.seed(cfg.data.shuffle_seed).shuffle().repeat().map(Tokenize(cfg.data))
    ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=cfg.data.worker_threads, prefetch_buffer_size=4 * batch))
    ds = _pack(ds, cfg.data, cfg.data.packing_bins or batch, shuffle_bins=True)
    return ds.batch(batch, drop_remainder=True).map(_unpack_names)


def eval_batches(cfg: Config, process_index: int = 0, process_count: int = 1) -> list[dict]:
    """The whole eval split of this process, packed in order; the last batch is filled with padding rows."""
    batch = local_batch_size(cfg, process_count)
    examples = grain.MapDataset.source(corpus(cfg.data, "eval"))[process_index::process_count]
    ds = _pack(examples.map(Tokenize(cfg.data)).to_iter_dataset(), cfg.data, batch, shuffle_bins=False)
    batches = list(ds.batch(batch, drop_remainder=False).map(_unpack_names))
    if batches and len(batches[-1]["tokens"]) < batch:
        last = batches[-1]
        missing = batch - len(last["tokens"])
        batches[-1] = {k: np.concatenate([v, np.zeros((missing,) + v.shape[1:], v.dtype)]) for k, v in last.items()}
    if cfg.train.eval_batches:
        batches = batches[: cfg.train.eval_batches]
    return batches
