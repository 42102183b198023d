"""External models whose codes users bring precomputed (an audio codec such as EnCodec or Mimi, an image
tokenizer such as a VQGAN): one base for both. Such an identity sizes the vocabulary and is recorded in datasets
and checkpoints like any codec or tokenizer, but cannot run: omni does not ship those models, so encode and
decode raise and say where the codes must come from. `is_precomputed` is how other code asks (never by the
class's name)."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from omni.errors import OmniError


class Precomputed:
    """name, codebook_sizes (one or more positive sizes); subclasses set `what` ("codec", "image tokenizer"),
    `error` (their OmniError) and `codes_shape` (how the codes are laid out, for the messages)."""

    what = "model"
    error: type[OmniError] = OmniError
    codes_shape = "[..., codebooks]"
    example = "a name"

    def __init__(self, name: str, codebook_sizes: Sequence[int]):
        if not name:
            raise self.error(f"a precomputed {self.what} needs a name, e.g. {self.example!r}")
        sizes = tuple(int(s) for s in codebook_sizes)
        if not sizes or min(sizes) < 1:
            raise self.error(f"{self.what} {name!r}: codebook_sizes must be one or more positive sizes; got "
                             f"{list(sizes)}")
        self.name, self.codebook_sizes = name, sizes

    def encode(self, x: np.ndarray) -> np.ndarray:
        raise self.error(f"{self.what} {self.name!r} is external: omni cannot encode with it; precompute the codes "
                         f"{self.codes_shape.replace('codebooks', str(len(self.codebook_sizes)))} with the original "
                         f"{self.name} model and give those to omni")

    def decode(self, codes: np.ndarray) -> np.ndarray:
        raise self.error(f"{self.what} {self.name!r} is external: omni cannot decode its codes; decode them with "
                         f"the original {self.name} model")


def is_precomputed(model) -> bool:
    """Whether a codec or image tokenizer is only the identity of an external one (it cannot encode or decode)."""
    return isinstance(model, Precomputed)
