from collections import Counter

import numpy as np
import pytest

from omni import data
from omni.batch import check_batch
from omni.tokens import ByteTokenizer, encode_example
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
        check_batch(b, cfg.data.seq_len, data.patch_dim(cfg.data))
        pad = b["segment_ids"] == 0
        assert not b["tokens"][pad].any() and not b["is_target"][pad].any() and not b["patches"][pad].any()
    vocab = data.vocab_for(cfg.data)
    expected = Counter()
    for example in data.corpus(cfg.data, "eval"):
        enc = encode_example(example, vocab, ByteTokenizer(), cfg.data.patch_size)
        expected[(tuple(enc["tokens"]), tuple(enc["is_target"]))] += 1
    assert Counter(s for b in batches for s in _segments(b)) == expected


def test_patches_travel_with_their_tokens():
    cfg = tiny_config()
    batch = data.eval_batches(cfg)[0]
    from omni.tokens import IMAGE, IMAGE_PATCH

    is_patch = (batch["tokens"] == IMAGE_PATCH) & (batch["modality"] == IMAGE)
    assert is_patch.any()
    assert np.all(np.abs(batch["patches"][is_patch]).sum(-1) > 0)
    assert not batch["patches"][~is_patch].any()


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


def test_example_longer_than_the_budget_fails_loudly():
    cfg = tiny_config()
    cfg.data.seq_len = 20
    with pytest.raises(ValueError, match="more than data.seq_len=20"):
        data.eval_batches(cfg)
