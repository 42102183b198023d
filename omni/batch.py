"""The shape of a batch: the whole data contract between the pipeline, the model and the loss.

A batch is a dict of arrays, B packed sequences of L positions each (B = global batch, L = data.seq_len):

    tokens       int32   [B, L]           token id at every position (see omni.tokens.Vocab for the id ranges);
                                          image positions hold IMAGE_PATCH, padding holds PAD (0)
    patches      float32 [B, L, P*P*3]    the pixels of the image patch at that position, scaled to [-1, 1];
                                          zeros everywhere that is not an image patch
    modality     int32   [B, L]           PAD=0, TEXT=1, IMAGE=2, AUDIO=3, below (markers take their span's modality:
                                          <boi>/<row>/<eoi> are IMAGE, <boa>/<eoa> AUDIO, <bos>/<eos> TEXT)
    segment_ids  int32   [B, L]           1, 2, ... for the examples packed in the row; 0 on padding
    positions    int32   [B, L]           position inside its own example (RoPE), restarting at 0 per segment
    is_target    bool    [B, L]           this token is a target: it belongs to one of its example's target
                                          modalities (text and/or audio); never true for images or padding

The model reads every position. The loss (omni.loss) scores the prediction made at position t for token t+1
only where is_target[t+1] holds and t, t+1 are in the same non-padding segment: so nothing is learned across
packed examples, at padding, or for image patches (which are inputs, never targets).
"""

from __future__ import annotations

import numpy as np

# Modality ids (field `modality`), and the modalities an example may learn (images are inputs, never targets).
PAD, TEXT, IMAGE, AUDIO = 0, 1, 2, 3
MODALITY_NAMES = {TEXT: "text", IMAGE: "image", AUDIO: "audio"}
TARGET_MODALITIES = ("text", "audio")

FIELDS = {
    "tokens": np.int32,
    "patches": np.float32,
    "modality": np.int32,
    "segment_ids": np.int32,
    "positions": np.int32,
    "is_target": np.bool_,
}


def patch_dim(cfg) -> int:
    """Size of one patch vector, the last axis of `patches`: P*P*3 for cfg (a DataConfig) with patch_size P."""
    return cfg.patch_size * cfg.patch_size * 3


def runs_per_row(*ids_BxL: np.ndarray) -> np.ndarray:
    """int [B]: how many runs each row holds, a new run wherever any of the id arrays changes (segment_ids alone:
    examples + trailing padding; with modality too: late fusion's modality spans)."""
    changes_BxL1 = np.any([ids[:, 1:] != ids[:, :-1] for ids in ids_BxL], axis=0)
    return 1 + np.sum(changes_BxL1, axis=1)


def check_batch(batch: dict, seq_len: int, patch_dim: int) -> None:
    """Raises ValueError naming the field whose dtype or shape breaks the contract above."""
    missing = set(FIELDS) - set(batch)
    if missing:
        raise ValueError(f"batch lacks fields {sorted(missing)}")
    b = batch["tokens"].shape[0]
    for name, dtype in FIELDS.items():
        array = batch[name]
        shape = (b, seq_len, patch_dim) if name == "patches" else (b, seq_len)
        if array.dtype != dtype or tuple(array.shape) != shape:
            raise ValueError(f"batch field {name}: expected {np.dtype(dtype).name}{list(shape)}, "
                             f"got {array.dtype}{list(array.shape)}")
