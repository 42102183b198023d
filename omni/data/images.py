"""Image decoding and fitting to the patch budget (Pillow; no grain, so inference can use it)."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image


def fit_image(image_HxWx3: np.ndarray, patch_size: int, max_patches: int) -> np.ndarray:
    """Resize keeping the aspect ratio so the image has at most max_patches patches, sides multiples of P.

    Images that already fit with sides that are multiples of P are returned untouched (no resampling).
    """

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

    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert("RGB"))

