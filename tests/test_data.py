import time
from collections import Counter

import numpy as np
import pytest

from omni import config as config_lib
from omni.batch import check_batch, patch_dim, row_patches
from omni.config import ConfigError
from omni.data import images
from omni.data import pipeline as data
from omni.data.prefetch import Prefetched
from omni.data.text_tokenizer import ByteTokenizer
from omni.errors import DatasetError
from omni.tokens import encode_example
from tests.conftest import tiny_config


def _segments(batch):
    """Every packed example as a tuple of its tokens and its target flags."""
    out = []
    for row in range(len(batch["tokens"])):
        ids = batch["segment_ids"][row]
        for s in np.unique(ids[ids > 0]):
            at = ids == s
            assert np.array_equal(batch["positions"][row][at], np.arange(at.sum()))  # positions restart
            out.append((tuple(batch["tokens"][row][at]), tuple(batch["is_target"][row][at])))
    return out


def test_eval_packing_preserves_every_token_and_mask():
    cfg = tiny_config()
    batches = data.eval_batches(cfg)
    for b in batches:
        check_batch(b, cfg.data.seq_len, patch_dim(cfg.data), row_patches(cfg.data))  # patches named once each
        pad = b["segment_ids"] == 0
        assert not b["tokens"][pad].any() and not b["is_target"][pad].any()
        assert not b["patches"][b["patch_positions"] == cfg.data.seq_len].any()  # unused slots are empty
    vocab = data.vocab_for(cfg)
    expected = Counter()
    for example in data.examples(cfg, "eval"):
        enc = encode_example(example, vocab, ByteTokenizer(), cfg.data.patch_size)
        expected[(tuple(enc["tokens"]), tuple(enc["is_target"]))] += 1
    assert Counter(s for b in batches for s in _segments(b)) == expected


def test_patches_travel_with_their_tokens():
    """Every image of the eval split reaches the batch pixel for pixel, each patch at the row position of its
    IMAGE_PATCH token, whatever row and offset the packer gave its example."""
    cfg = tiny_config()
    batches = data.eval_batches(cfg)
    vocab = data.vocab_for(cfg)
    expected = Counter()
    for example in data.examples(cfg, "eval"):
        enc = encode_example(example, vocab, ByteTokenizer(), cfg.data.patch_size)
        expected[(tuple(enc["tokens"]), enc["patches"].tobytes())] += 1
    got = Counter()
    for b in batches:
        for row in range(len(b["tokens"])):
            for s in set(b["segment_ids"][row]) - {0}:
                at = np.flatnonzero(b["segment_ids"][row] == s)
                mine = (b["patch_positions"][row] >= at[0]) & (b["patch_positions"][row] <= at[-1])
                order = np.argsort(b["patch_positions"][row][mine])
                got[(tuple(b["tokens"][row][at]), b["patches"][row][mine][order].tobytes())] += 1
    assert sum(len(k[1]) for k in expected) > 0 and got == expected


def test_rows_pack_only_the_patches_their_slots_hold():
    cfg = tiny_config()
    cfg.data.row_patches = cfg.data.max_image_patches  # one image per row at most
    for b in data.eval_batches(cfg):
        check_batch(b, cfg.data.seq_len, patch_dim(cfg.data), cfg.data.max_image_patches)
        assert b["patches"].shape[1] == cfg.data.max_image_patches
    cfg.data.row_patches = 4  # fewer slots than one image has patches: refused, naming the example and the key
    with pytest.raises(DatasetError, match=r"holds \d+ image patches .* more than data.row_patches=4"):
        data.eval_batches(cfg)


def test_same_seed_same_order_and_other_seed_differs():
    cfg = tiny_config()
    a, b = iter(data.train_dataset(cfg)), iter(data.train_dataset(cfg))
    for _ in range(3):
        x, y = next(a), next(b)
        assert all(np.array_equal(x[k], y[k]) for k in x)
    cfg.data.shuffle_seed = 1
    z = next(iter(data.train_dataset(cfg)))
    assert not np.array_equal(next(iter(data.train_dataset(tiny_config())))["tokens"], z["tokens"])


def test_process_shards_are_disjoint():
    cfg = tiny_config()
    seen = []
    for index in range(2):
        batch = next(iter(data.train_dataset(cfg, process_index=index, process_count=2)))
        assert batch["tokens"].shape[0] == cfg.train.batch_size // 2
        seen.append({s for s in _segments(batch) if 3 in s[0]})  # caption examples: images are unique draws
    assert seen[0] and seen[1] and not seen[0] & seen[1]


def test_iterator_state_restores_to_exactly_the_next_batch():
    cfg = tiny_config()
    it = iter(data.train_dataset(cfg))
    for _ in range(3):
        next(it)
    state = it.get_state()
    expected = [next(it) for _ in range(2)]
    fresh = iter(data.train_dataset(cfg))
    fresh.set_state(state)
    for want in expected:
        got = next(fresh)
        assert all(np.array_equal(got[k], want[k]) for k in want)


def test_overlong_examples_are_split_truncated_or_refused_never_lost(caplog):
    cfg = tiny_config()
    cfg.data.seq_len = 20
    lengths = [len(encode_example(e, data.vocab_for(cfg), ByteTokenizer(), cfg.data.patch_size)["tokens"])
               for e in data.examples(cfg, "eval")]
    assert max(lengths) > 20
    batches = data.eval_batches(cfg)  # default data.overlong="split": every token is somewhere
    assert sum(int((b["segment_ids"] > 0).sum()) for b in batches) == sum(lengths)

    cfg.data.overlong = "truncate"
    with caplog.at_level("WARNING", logger="omni.data"):
        batches = data.eval_batches(cfg)
    assert sum(int((b["segment_ids"] > 0).sum()) for b in batches) == sum(min(n, 20) for n in lengths)
    assert sum("truncated to data.seq_len=20" in r.message for r in caplog.records) == sum(n > 20 for n in lengths)

    cfg.data.overlong = "error"
    with pytest.raises(ValueError, match="more than data.seq_len=20"):
        data.eval_batches(cfg)


def test_split_pieces_keep_order_and_flags():
    encoded = {"tokens": np.arange(45), "is_target": np.arange(45) % 3 == 0, "modality": np.ones(45, np.int32),
               "patches": np.zeros((0, 12), np.uint8), "patch_positions": np.zeros(0, np.int32)}
    pieces = data.fit_to_length(encoded, 20, "split", "x")
    assert [len(p["tokens"]) for p in pieces] == [20, 20, 5]
    assert np.array_equal(np.concatenate([p["tokens"] for p in pieces]), encoded["tokens"])
    assert np.array_equal(np.concatenate([p["is_target"] for p in pieces]), encoded["is_target"])


@pytest.mark.parametrize("shape", [(32, 32), (100, 50), (37, 203), (5, 5), (640, 480)])
def test_images_fit_the_patch_budget_keeping_aspect(shape):
    image = np.random.default_rng(0).integers(0, 255, shape + (3,), dtype=np.uint8)
    fitted = images.fit_image(image, patch_size=8, max_patches=64)
    h, w = fitted.shape[:2]
    assert h % 8 == 0 and w % 8 == 0 and (h // 8) * (w // 8) <= 64 and h >= 8 and w >= 8
    if shape == (32, 32):
        assert fitted is image  # already fits: no resampling
    if min(shape) >= 40:
        assert abs(np.log((h / w) / (shape[0] / shape[1]))) < 0.35


def test_worker_processes_deliver_and_resume_exactly():
    cfg = tiny_config()
    cfg.data.num_workers = 2
    it = iter(data.train_dataset(cfg))
    first = next(it)
    check_batch(first, cfg.data.seq_len, patch_dim(cfg.data))
    state = it.get_state()
    expected = [next(it) for _ in range(2)]
    it.close()
    fresh = iter(data.train_dataset(cfg))
    fresh.set_state(state)
    for want in expected:
        got = next(fresh)
        assert all(np.array_equal(got[k], want[k]) for k in want)
    fresh.close()


def test_fixed_reading_shards_give_the_same_global_batches_for_any_process_count():
    cfg = tiny_config()
    cfg.data.shards = 4
    per_count = {}
    for processes in (1, 2, 4):
        iterators = [data.train_dataset(cfg, p, processes) for p in range(processes)]
        per_count[processes] = [{k: np.concatenate([next_batch[k] for next_batch in rows]) for k in rows[0]}
                                for rows in ([next(it) for it in iterators] for _ in range(3))]
    for processes in (2, 4):
        for got, want in zip(per_count[processes], per_count[1]):
            assert all(np.array_equal(got[k], want[k]) for k in want), processes
    one = data.train_dataset(cfg)  # the state of 4 shards restores across process counts
    next(one)
    state = one.get_state()
    halves = [data.train_dataset(cfg, p, 2) for p in range(2)]
    for half in halves:
        half.set_state(state)
    want = next(one)
    got = [next(h) for h in halves]
    assert all(np.array_equal(np.concatenate([got[0][k], got[1][k]]), want[k]) for k in want)


def test_shards_that_do_not_split_are_refused():
    cfg = tiny_config()
    cfg.data.shards = 4
    with pytest.raises(ConfigError, match="multiple of the 3 processes"):
        data.train_dataset(cfg, 0, 3)
    with pytest.raises(ConfigError, match="must be 0 or divide"):
        config_lib.apply_overrides(tiny_config(), ["data.shards=3"])


def test_prefetched_batches_keep_order_and_checkpoint_the_batches_taken_not_those_made_ahead():
    cfg = tiny_config()
    plain = data.train_dataset(cfg)
    expected = [next(plain) for _ in range(6)]
    made = []
    prefetched = Prefetched(data.train_dataset(cfg), lambda b: made.append(1) or b, size=3)
    taken = [next(prefetched) for _ in range(2)]
    deadline = time.monotonic() + 60
    while len(made) < 5 and time.monotonic() < deadline:  # the thread runs ahead: 2 taken + 3 in the queue
        time.sleep(0.01)
    assert len(made) == 5
    state = prefetched.get_state()
    prefetched.close()
    for got, want in zip(taken, expected):
        assert all(np.array_equal(got[k], want[k]) for k in want)
    resumed = Prefetched(data.train_dataset(cfg), lambda b: b, size=2)
    resumed.set_state(state)
    for want in expected[2:5]:  # resumes at batch 3, the first one not taken, though 5 had been made
        got = next(resumed)
        assert all(np.array_equal(got[k], want[k]) for k in want)
    with pytest.raises(RuntimeError, match="restore before the first next"):
        resumed.set_state(state)
    resumed.close()


def test_prefetched_pipeline_errors_surface_in_the_training_loop():
    def put(batch):
        raise ValueError("example 7: corrupt image")

    prefetched = Prefetched(data.train_dataset(tiny_config()), put, size=2)
    with pytest.raises(ValueError, match="example 7: corrupt image"):
        next(prefetched)
    prefetched.close()
