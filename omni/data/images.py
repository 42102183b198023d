"""Image decoding and fitting to the patch budget (Pillow; no grain, so inference can use it)."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, UnidentifiedImageError


def fit_image(image_HxWx3: np.ndarray, patch_size: int, max_patches: int) -> np.ndarray:
    """Resize keeping the aspect ratio so the image has at most max_patches patches, sides multiples of P.

    Images that already fit with sides that are multiples of P are returned untouched (no resampling).
    """

    h, w = image_HxWx3.shape[:2]
    p = patch_size
    if h % p == 0 and w % p == 0 and (h // p) * (w // p) <= max_patches:
        return image_HxWx3
    rows, cols = fitted_grid(h, w, p, max_patches)
    resized = Image.fromarray(image_HxWx3).resize((cols * p, rows * p), Image.Resampling.BICUBIC)
    return np.asarray(resized)


def fitted_grid(height: int, width: int, patch_size: int, max_patches: int) -> tuple[int, int]:
    """(rows, cols) of P x P patches an image of height x width pixels has after fit_image: the grid an image
    of that size enters a model as (and the grid image generation produces for it)."""
    p = patch_size
    if height % p == 0 and width % p == 0 and (height // p) * (width // p) <= max_patches:
        return height // p, width // p
    scale = min(1.0, (max_patches * p * p / (height * width)) ** 0.5)
    rows, cols = max(1, round(height * scale / p)), max(1, round(width * scale / p))
    while rows * cols > max_patches:  # rounding up can overshoot the budget by a row or a column
        if rows >= cols:
            rows -= 1
        else:
            cols -= 1
    return rows, cols


def decode_image(data: bytes, name: str = "image") -> np.ndarray:
    """Encoded image bytes -> uint8 [H, W, 3]; ValueError naming `name` (a file, an example) when Pillow cannot
    fully decode them."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            if image.width < 1 or image.height < 1:
                raise ValueError("it has no pixels")
            return np.asarray(image.convert("RGB"))
    except UnidentifiedImageError:
        raise ValueError(f"cannot decode image {name}: not an image format Pillow reads (PNG, JPEG, ...)") from None
    except Exception as e:  # Pillow raises many types for corrupt or truncated data
        raise ValueError(f"cannot decode image {name}: {e}") from None
