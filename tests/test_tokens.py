import numpy as np
import pytest

from omni import tokens as T
from omni.data.text_tokenizer import ByteTokenizer


@pytest.fixture
def vocab():
    return T.Vocab(text_size=256, codebook_sizes=(64, 16))


def test_vocab_ranges_are_disjoint_and_padded(vocab):
    assert vocab.text_offset == T.NUM_SPECIAL
    assert vocab.audio_offset(0) == T.NUM_SPECIAL + 256
    assert vocab.audio_offset(1) == vocab.audio_offset(0) + 64
    assert vocab.used_size == T.NUM_SPECIAL + 256 + 80
    assert vocab.size % 128 == 0 and vocab.size >= vocab.used_size
    assert vocab.audio_codebook_of(vocab.audio_offset(1) + 15) == 1
    assert vocab.audio_codebook_of(vocab.text_offset) is None


def test_patchify_round_trip_and_layout():
    image = np.random.default_rng(0).integers(0, 256, (16, 24, 3), dtype=np.uint8)
    patches = T.patchify(image, 8)
    assert patches.shape == (2, 3, 8 * 8 * 3)
    # Patch (row 1, col 2) holds exactly the pixels of that 8x8 block, row-major, channels last.
    assert patches.dtype == np.uint8  # raw pixels travel; the model scales them to [-1, 1]
    np.testing.assert_array_equal(patches[1, 2], image[8:16, 16:24].reshape(-1))
    np.testing.assert_array_equal(T.unpatchify(patches, 8), image)
    np.testing.assert_allclose(T.scale_pixels(np.array([0, 255, 128], np.uint8)), [-1.0, 1.0, 128 / 127.5 - 1], atol=1e-7)
    with pytest.raises(ValueError, match="patch size 5"):
        T.patchify(image, 5)


def test_codes_flatten_frame_major(vocab):
    codes = np.array([[1, 2], [3, 4], [5, 6]])
    flat = T.flatten_codes(codes, vocab)
    o0, o1 = vocab.audio_offset(0), vocab.audio_offset(1)
    np.testing.assert_array_equal(flat, [o0 + 1, o1 + 2, o0 + 3, o1 + 4, o0 + 5, o1 + 6])
    np.testing.assert_array_equal(T.unflatten_codes(flat, vocab), codes)


def test_bad_codes_name_frame_and_codebook(vocab):
    with pytest.raises(ValueError, match="code 16 at frame 1, codebook 1 is outside"):
        T.flatten_codes(np.array([[0, 0], [0, 16]]), vocab)
    with pytest.raises(ValueError, match="2 codebooks"):
        T.flatten_codes(np.zeros((4, 3), int), vocab)


def test_encode_example_layout_and_targets(vocab):
    image = np.random.default_rng(1).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    example = {"segments": [{"text": "hi", "target": False}, {"image": image}, {"text": "ok"},
                            {"audio": np.array([[1, 2]])}],
               "targets": ["text"]}
    enc = T.encode_example(example, vocab, ByteTokenizer(), patch_size=8)
    t, off = vocab.text_offset, vocab.audio_offset
    P = T.IMAGE_PATCH
    expected = [T.BOS, t + ord("h"), t + ord("i"),
                T.BOI, P, P, T.ROW, P, P, T.ROW, T.EOI,
                t + ord("o"), t + ord("k"),
                T.BOA, off(0) + 1, off(1) + 2, T.EOA, T.EOS]
    np.testing.assert_array_equal(enc["tokens"], expected)
    I, X, A = T.IMAGE, T.TEXT, T.AUDIO
    np.testing.assert_array_equal(enc["modality"], [X, X, X, I, I, I, I, I, I, I, I, X, X, A, A, A, A, X])
    # Only "ok" is a target: the prompt opted out, images never, audio is not a target modality here,
    # and <eos> follows a non-target span.
    np.testing.assert_array_equal(np.flatnonzero(enc["is_target"]), [11, 12])
    # Only the four patches travel, in order, each with its position in the example.
    assert enc["patches"].shape == (4, 192) and enc["patches"].dtype == np.uint8
    np.testing.assert_array_equal(enc["patch_positions"], [4, 5, 7, 8])
    np.testing.assert_array_equal(enc["patches"][2], image[8:16, :8].reshape(-1))


def test_audio_target_includes_markers_and_eos(vocab):
    example = {"segments": [{"text": "play"}, {"audio": np.array([[1, 2], [3, 4]])}], "targets": ["audio"]}
    enc = T.encode_example(example, vocab, ByteTokenizer(), patch_size=8)
    assert enc["tokens"][5] == T.BOA and enc["tokens"][-2] == T.EOA
    np.testing.assert_array_equal(np.flatnonzero(enc["is_target"]), range(5, 12))


def test_bad_examples_are_refused(vocab):
    tok = ByteTokenizer()
    with pytest.raises(ValueError, match="no segments"):
        T.encode_example({"segments": [], "targets": ["text"]}, vocab, tok, 8)
    with pytest.raises(ValueError, match="segment 0 must have exactly one"):
        T.encode_example({"segments": [{"text": "a", "audio": 1}]}, vocab, tok, 8)
    with pytest.raises(ValueError, match="not learnable"):
        T.encode_example({"segments": [{"text": "a"}], "targets": ["video"]}, vocab, tok, 8)


def test_delay_pattern_round_trip_and_layout():
    AUDIO_DELAY, Vocab, flatten_codes, unflatten_codes = T.AUDIO_DELAY, T.Vocab, T.flatten_codes, T.unflatten_codes
    vocab = Vocab(text_size=256, codebook_sizes=(8, 4, 4))
    codes = np.array([[1, 2, 3], [4, 0, 1], [7, 3, 2], [0, 1, 0]])
    ids = flatten_codes(codes, vocab, "delay").reshape(-1, 3)
    assert ids.shape == (4 + 3 - 1, 3)
    # step s holds codebook k of frame s-k: coarse codes of a frame lead its finer codes
    assert ids[0].tolist() == [codes[0, 0] + vocab.audio_offset(0), AUDIO_DELAY, AUDIO_DELAY]
    assert ids[2].tolist() == [codes[2, 0] + vocab.audio_offset(0), codes[1, 1] + vocab.audio_offset(1),
                               codes[0, 2] + vocab.audio_offset(2)]
    assert ids[-1].tolist() == [AUDIO_DELAY, AUDIO_DELAY, codes[3, 2] + vocab.audio_offset(2)]
    assert np.array_equal(unflatten_codes(ids.reshape(-1), vocab, "delay"), codes)
    assert np.array_equal(unflatten_codes(flatten_codes(codes, vocab), vocab), codes)


def test_pieces_of_an_example_carry_exactly_their_own_patches(vocab):
    """Splitting or truncating an example inside an image hands each piece the patches of its positions,
    renumbered from the piece's start; none is lost or duplicated."""
    image = np.random.default_rng(2).integers(0, 256, (16, 24, 3), dtype=np.uint8)  # 2 x 3 patches
    enc = T.encode_example({"segments": [{"text": "ab"}, {"image": image}, {"text": "cd"}], "targets": ["text"]},
                           vocab, ByteTokenizer(), patch_size=8)
    np.testing.assert_array_equal(enc["patch_positions"], [4, 5, 6, 8, 9, 10])
    pieces = T.fit_to_length(enc, 6, "split", "x")
    assert [len(p["tokens"]) for p in pieces] == [6, 6, 4]
    assert [p["patch_positions"].tolist() for p in pieces] == [[4, 5], [0, 2, 3, 4], []]
    np.testing.assert_array_equal(np.concatenate([p["patches"] for p in pieces]), enc["patches"])
    truncated = T.fit_to_length(enc, 9, "truncate", "x")[0]
    assert truncated["patch_positions"].tolist() == [4, 5, 6, 8] and len(truncated["patches"]) == 4
    with pytest.raises(ValueError, match="uint8"):
        T.patchify(image.astype(np.float32), 8)


def test_a_vocab_without_image_codebooks_keeps_every_id_it_had():
    """Old checkpoints and exports: no image codebooks, the same offsets and size as before image codes."""
    old = T.Vocab(text_size=256, codebook_sizes=(64, 16))
    assert (old.audio_offset(0), old.audio_offset(1), old.used_size, old.size) == (272, 336, 352, 384)
    both = T.Vocab(text_size=256, codebook_sizes=(64, 16), image_codebook_sizes=(32, 8))
    assert [both.audio_offset(k) for k in range(2)] == [272, 336]  # audio ids do not move
    assert [both.image_offset(k) for k in range(2)] == [352, 384] and both.used_size == 392
    assert both.image_codebook_of(352) == 0 and both.image_codebook_of(391) == 1 and both.image_codebook_of(351) is None
    assert both.audio_codebook_of(352) is None


def test_image_codes_enter_as_rows_of_cells_with_row_markers_and_are_targets_when_learned():
    vocab = T.Vocab(text_size=256, codebook_sizes=(64,), image_codebook_sizes=(32, 8))
    codes = np.array([[[1, 2], [3, 4]], [[5, 6], [7, 0]]])  # [rows 2, cols 2, K 2]
    tok = ByteTokenizer()
    image = np.zeros((8, 16, 3), np.uint8)
    out = T.encode_example({"segments": [{"text": "a", "target": False}, {"image": image}, {"image_codes": codes}],
                            "targets": ["image"]}, vocab, tok, 8)
    i0, i1 = vocab.image_offset(0), vocab.image_offset(1)
    expected_codes = [T.BOI, i0 + 1, i1 + 2, i0 + 3, i1 + 4, T.ROW, i0 + 5, i1 + 6, i0 + 7, i1 + 0, T.ROW, T.EOI]
    patches = [T.BOI, T.IMAGE_PATCH, T.IMAGE_PATCH, T.ROW, T.EOI]
    assert out["tokens"].tolist() == [T.BOS, 16 + ord("a")] + patches + expected_codes + [T.EOS]
    assert out["modality"].tolist() == [T.TEXT, T.TEXT] + [T.IMAGE] * 17 + [T.TEXT]
    # patches are never targets; the code span (markers and rows included) and <eos> after it are
    assert out["is_target"].tolist() == [False] * 7 + [True] * 12 + [True]
    assert out["patch_positions"].tolist() == [3, 4]  # only IMAGE_PATCH positions take pixels
    np.testing.assert_array_equal(T.unflatten_image_codes(out["tokens"][8:18][[0, 1, 2, 3, 5, 6, 7, 8]], vocab, 2),
                                  codes)
    assert T.describe_tokens(out["tokens"][7:12], vocab, tok) == "<boi><i0:1><i1:2><i0:3><i1:4>"

    not_learned = T.encode_example({"segments": [{"image_codes": codes}, {"text": "b"}], "targets": ["text"]},
                                   vocab, tok, 8)
    assert not not_learned["is_target"][:13].any() and not_learned["is_target"][13]  # only "b" (and <eos>)


def test_bad_image_codes_name_row_column_and_codebook():
    vocab = T.Vocab(text_size=256, codebook_sizes=(), image_codebook_sizes=(32, 8))
    with pytest.raises(ValueError, match=r"image code 8 at row 1, column 0, codebook 1 is outside \[0, 8\)"):
        T.flatten_image_codes(np.array([[[0, 0]], [[0, 8]]]), vocab)
    with pytest.raises(ValueError, match=r"do not match the image tokenizer's 2 codebooks \(expected integers "
                                         r"\[rows, cols, 2\]\)"):
        T.flatten_image_codes(np.zeros((2, 2)), vocab)
    with pytest.raises(ValueError, match="have no cells"):
        T.check_image_codes(np.zeros((0, 3, 2), int), (32, 8))
