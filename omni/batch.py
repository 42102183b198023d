"""The shape of a batch: the whole data contract between the pipeline, the model and the loss.

A batch is a dict of arrays, B packed sequences of L positions each (B = global batch, L = data.seq_len), and
M patch slots per row (M = data.row_patches, or L when that is 0):

    tokens       int32   [B, L]           token id at every position (see omni.tokens.Vocab for the id ranges);
                                          image patch positions hold IMAGE_PATCH, image code positions their
                                          code's id in an image codebook range, padding holds PAD (0)
    patches      uint8   [B, M, P*P*3]    the raw pixels (0..255, P x P x RGB, row-major) of the row's image
                                          patches in order; the model scales them to [-1, 1] and projects them
    patch_positions int32 [B, M]          the row position (0..L-1) of each patch, L for an unused slot; every
                                          IMAGE_PATCH position of the row is named exactly once
    modality     int32   [B, L]           PAD=0, TEXT=1, IMAGE=2, AUDIO=3, below (markers take their span's modality:
                                          <boi>/<row>/<eoi> are IMAGE, <boa>/<eoa> AUDIO, <bos>/<eos> TEXT)
    segment_ids  int32   [B, L]           1, 2, ... for the examples packed in the row; 0 on padding
    positions    int32   [B, L]           position inside its own example (RoPE), restarting at 0 per segment
    is_target    bool    [B, L]           this token is a target: it belongs to one of its example's target
                                          modalities (text, audio and/or image codes); never true for image
                                          patches or padding

How an image enters is chosen per image when the dataset is built (omni.data.manifest, "as"):

    patches   <boi> IMAGE_PATCH.. <row> .. <eoi>: pixels projected by the model; input only, never a target
    codes     <boi> code ids.. <row> .. <eoi>: an image tokenizer's codes, looked up in the embedding table like
              text and audio; a target when the example learns "image" (markers and <row>s included)
    both      the patches span (input) followed by the codes span of the same image (the target)

All of these positions have modality IMAGE (so loss/image and acc/image count image codes); the model projects
pixels exactly at positions that hold IMAGE_PATCH with modality IMAGE, so code positions are never projected.

The model reads every position. The loss (omni.loss) scores the prediction made at position t for token t+1
only where is_target[t+1] holds and t, t+1 are in the same non-padding segment: so nothing is learned across
packed examples, at padding, or for image patches (which are inputs, never targets).
"""

from __future__ import annotations

import numpy as np

# Modality ids (field `modality`), and the modalities an example may learn (images only as codes, never patches).
PAD, TEXT, IMAGE, AUDIO = 0, 1, 2, 3
IMAGE_PATCH = 8  # the token id every image patch position holds (omni.tokens lays out the other ids)
MODALITY_NAMES = {TEXT: "text", IMAGE: "image", AUDIO: "audio"}
TARGET_MODALITIES = ("text", "audio", "image")

FIELDS = {
    "tokens": np.int32,
    "patches": np.uint8,
    "patch_positions": np.int32,
    "modality": np.int32,
    "segment_ids": np.int32,
    "positions": np.int32,
    "is_target": np.bool_,
}
PER_PATCH_SLOT = ("patches", "patch_positions")  # fields laid out [B, M, ...]; the others are [B, L]


def patch_dim(cfg) -> int:
    """Size of one patch vector, the last axis of `patches`: P*P*3 for cfg (a DataConfig) with patch_size P."""
    return cfg.patch_size * cfg.patch_size * 3


def row_patches(cfg) -> int:
    """M, the patch slots of a row (the second axis of `patches`): data.row_patches, or seq_len when that is 0."""
    return cfg.row_patches or cfg.seq_len


def field_shape(name: str, rows: int, seq_len: int, slots: int, patch_dim: int) -> tuple:
    if name == "patches":
        return (rows, slots, patch_dim)
    return (rows, slots) if name == "patch_positions" else (rows, seq_len)


def padding_rows(rows: int, seq_len: int, slots: int, patch_dim: int) -> dict:
    """`rows` rows of nothing but padding (no segment, no target, no patch), e.g. to fill a last batch."""
    out = {name: np.zeros(field_shape(name, rows, seq_len, slots, patch_dim), dtype) for name, dtype in FIELDS.items()}
    out["patch_positions"][:] = seq_len
    return out


def runs_per_row(*ids_BxL: np.ndarray) -> np.ndarray:
    """int [B]: how many runs each row holds, a new run wherever any of the id arrays changes (segment_ids alone:
    examples + trailing padding; with modality too: late fusion's modality spans)."""
    changes_BxL1 = np.any([ids[:, 1:] != ids[:, :-1] for ids in ids_BxL], axis=0)
    return 1 + np.sum(changes_BxL1, axis=1)


def check_batch(batch: dict, seq_len: int, patch_dim: int, slots: int | None = None) -> None:
    """Raises ValueError naming the field whose dtype or shape breaks the contract above (slots: M, any if None),
    or the row whose patch positions do not name its IMAGE_PATCH positions exactly once."""
    missing = set(FIELDS) - set(batch)
    if missing:
        raise ValueError(f"batch lacks fields {sorted(missing)}")
    b = batch["tokens"].shape[0]
    m = batch["patches"].shape[1] if slots is None and np.ndim(batch["patches"]) == 3 else slots
    for name, dtype in FIELDS.items():
        array = batch[name]
        shape = field_shape(name, b, seq_len, m, patch_dim)
        if array.dtype != dtype or tuple(array.shape) != shape:
            raise ValueError(f"batch field {name}: expected {np.dtype(dtype).name}{list(shape)}, "
                             f"got {array.dtype}{list(array.shape)}")
    positions = np.asarray(batch["patch_positions"])
    used = positions < seq_len
    if np.any(positions < 0):
        raise ValueError("batch field patch_positions: negative position (unused slots hold seq_len)")
    is_patch = (np.asarray(batch["tokens"]) == IMAGE_PATCH) & (np.asarray(batch["modality"]) == IMAGE)
    named = np.zeros((b, seq_len + 1), np.int32)
    np.add.at(named, (np.arange(b)[:, None].repeat(m, 1), positions), 1)
    bad = np.nonzero(np.any(named[:, :seq_len] != is_patch, axis=1))[0]
    if len(bad):
        row = int(bad[0])
        raise ValueError(f"batch row {row}: patch_positions name {int(used[row].sum())} slots for "
                         f"{int(is_patch[row].sum())} image patch positions; each must be named exactly once")
