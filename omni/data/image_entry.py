"""How an image enters the token stream: the one rule that training (omni.data.pipeline.prepare, for a stored
example) and generation (omni.tools.generate, for a prompts line) both apply, so a model never sees an image one
way in training and another at inference.

    "as": "patches"   [{"image": uint8 [H, W, 3] fitted to data.max_image_patches patches, "target": False}]
                      (patches are input only)
    "as": "codes"     [{"image_codes": int [R, C, K] of the image tokenizer, "target": the segment's flag}]
    "as": "both"      the patches (input), then the codes (patches in, codes out)
"""

from __future__ import annotations

import numpy as np

from omni.data.image_tokenizer import encode_fitted
from omni.data.images import fit_image

ENTRIES = ("patches", "codes", "both")


def image_segments(pixels: np.ndarray, enters: str, target: bool, patch_size: int, max_image_patches: int,
                   image_tokenizer, missing_tokenizer: str, error: type[Exception] = ValueError) -> list[dict]:
    """The segments one image becomes (module docstring). error(missing_tokenizer) when it enters as codes and
    there is no image tokenizer: the caller's message and error type say what to do where it is."""
    if enters not in ENTRIES:
        raise error(f"an image enters as one of {ENTRIES}, not {enters!r}")
    segments = []
    if enters in ("patches", "both"):
        segments.append({"image": fit_image(pixels, patch_size, max_image_patches), "target": False})
    if enters in ("codes", "both"):
        if image_tokenizer is None:
            raise error(missing_tokenizer)
        segments.append({"image_codes": encode_fitted(image_tokenizer, pixels, max_image_patches), "target": target})
    return segments
