"""Image tokenizers: the `ImageTokenizer` interface and `PatchRVQTokenizer`, fitted on the user's own images.

An image tokenizer turns pixels into a grid of discrete codes and back, the image counterpart of an audio codec
(omni.data.codec):

    encode   uint8 [H, W, 3], H and W multiples of patch_size  ->  int32 codes [rows, cols, codebooks]
    decode   int codes [rows, cols, codebooks]                   ->  uint8 [rows * patch_size, cols * patch_size, 3]

Each code column (one cell of the grid) covers a patch_size x patch_size square of pixels. Images of any size
are first fitted to a cell budget (omni.data.images.fit_image, the same rule the patch budget uses), so what a
model sees is `encode(fit_image(image, tok.patch_size, max_cells))`: `encode_fitted`.

PatchRVQTokenizer is the built-in one, fitted offline in seconds to minutes on a CPU (numpy only): every
P x P x 3 patch (pixels / 255, minus the mean patch) is quantised by a residual vector quantiser of k-means
codebooks (k-means++ init, seeded, deterministic; the same `rvq_fit` the mel codec uses), and decoding sums the
codewords and rounds back to uint8. It is a pixel-space VQ, blocky at cell edges and blurry on fine texture:
enough to train a model on image codes and look at what it sees, not a replacement for a learned (VQGAN-style)
tokenizer, whose codes come in as precomputed `image_codes` instead (PrecomputedImageTokenizer).

A fitted tokenizer is a folder: image_tokenizer.json (identity, hyper-parameters, the PSNR it reached) and
image_tokenizer.npz (codewords, mean patch). Loading checks both and names what is wrong.
"""

from __future__ import annotations

import io
import json
import os
import time
import zipfile
from typing import Protocol, Sequence

import numpy as np

from omni import storage
from omni.data.codec import rvq_decode, rvq_encode, rvq_fit
from omni.data.images import decode_image, fit_image
from omni.data.precomputed import Precomputed
from omni.errors import CodecError
from omni.progress import silent

CONFIG_FILE = "image_tokenizer.json"
ARRAYS_FILE = "image_tokenizer.npz"
HOLDOUT_EVERY = 10       # with at least MIN_HOLDOUT_IMAGES images, every 10th (seeded order) is held out of the fit
MIN_HOLDOUT_IMAGES = 20
PSNR_CAP_DB = 99.0       # a perfect reconstruction has infinite PSNR; report this instead (JSON has no inf)


class ImageTokenizerError(CodecError):
    """An image tokenizer that cannot be built, loaded or used as asked (a CodecError: the CLI reports it in one
    line)."""


class ImageTokenizer(Protocol):
    name: str
    patch_size: int | None          # side of the pixel square one cell covers (None: an external tokenizer's)
    codebook_sizes: tuple[int, ...]

    def encode(self, image_HxWx3: np.ndarray) -> np.ndarray:
        """uint8 [H, W, 3] (H, W multiples of patch_size) -> int32 codes [H / P, W / P, codebooks]."""

    def decode(self, codes_RxCxK: np.ndarray) -> np.ndarray:
        """int codes [rows, cols, codebooks] -> uint8 [rows * P, cols * P, 3]."""


def psnr(reference: np.ndarray, reconstruction: np.ndarray) -> float:
    """Peak signal-to-noise ratio in dB of two uint8 images (or stacks of them) of one shape, over all pixels."""
    mse = float(np.mean((np.asarray(reference, np.float64) - np.asarray(reconstruction, np.float64)) ** 2))
    return PSNR_CAP_DB if mse == 0 else min(PSNR_CAP_DB, float(10 * np.log10(255.0**2 / mse)))


def cells_of(image_HxWx3: np.ndarray, patch_size: int) -> np.ndarray:
    """uint8 [H, W, 3] -> float32 [H/P, W/P, P*P*3] in [0, 1], ValueError unless H, W are multiples of P."""
    image = np.asarray(image_HxWx3)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ImageTokenizerError(f"an image to encode must be uint8 [H, W, 3]; got {image.dtype} {list(image.shape)}")
    h, w, _ = image.shape
    p = patch_size
    if h % p or w % p or h == 0 or w == 0:
        raise ImageTokenizerError(f"image of {h} x {w} pixels is not a whole number of {p} x {p} cells; fit it first "
                                  f"(omni.data.image_tokenizer.encode_fitted)")
    cells = image.reshape(h // p, p, w // p, p, 3).transpose(0, 2, 1, 3, 4)
    return cells.reshape(h // p, w // p, p * p * 3).astype(np.float32) / 255.0


def uncells(cells_RxCxD: np.ndarray, patch_size: int) -> np.ndarray:
    """float [rows, cols, P*P*3] in [0, 1] -> uint8 [rows * P, cols * P, 3] (rounded, clipped)."""
    r, c, _ = cells_RxCxD.shape
    p = patch_size
    pixels = np.clip(np.rint(np.asarray(cells_RxCxD, np.float64) * 255.0), 0, 255).astype(np.uint8)
    return pixels.reshape(r, c, p, p, 3).transpose(0, 2, 1, 3, 4).reshape(r * p, c * p, 3)


def fitted(tokenizer: ImageTokenizer, image_HxWx3: np.ndarray, max_cells: int) -> np.ndarray:
    """The image as the tokenizer encodes it for a model: resized to at most max_cells cells keeping its aspect
    ratio (as data.max_image_patches fits images for patches); untouched when it already fits."""
    return fit_image(np.asarray(image_HxWx3), tokenizer.patch_size, max_cells)


def encode_fitted(tokenizer: ImageTokenizer, image_HxWx3: np.ndarray, max_cells: int) -> np.ndarray:
    """Codes [rows, cols, K] of the image as a model sees it (`fitted`, then encoded)."""
    if tokenizer.patch_size is None:  # an external tokenizer: its encode says where codes must come from
        return tokenizer.encode(image_HxWx3)
    return tokenizer.encode(fitted(tokenizer, image_HxWx3, max_cells))


class PatchRVQTokenizer:
    """Residual k-means over P x P x 3 pixel patches (module docstring). Build one with `fit` or `load`.

    Defaults: 8 x 8 cells (192 values), 4 codebooks x 256 codewords: 4 codes per cell, 32 bits per 64 pixels.
    """

    name = "patch-rvq-v1"

    def __init__(self, codewords: np.ndarray, mean: np.ndarray, patch_size: int, fit_info: dict | None = None):
        codewords = np.asarray(codewords, np.float32)
        if codewords.ndim != 3:
            raise ImageTokenizerError(f"codewords must be [codebooks, codebook_size, P*P*3]; got shape "
                                      f"{list(codewords.shape)}")
        self.patch_size = int(patch_size)
        if self.patch_size < 1 or codewords.shape[2] != self.patch_size**2 * 3:
            raise ImageTokenizerError(f"codewords of {codewords.shape[2]} values do not fit {self.patch_size} x "
                                      f"{self.patch_size} x 3 patches")
        self.codewords = codewords
        self.codebooks, self.codebook_size, _ = codewords.shape
        self.codebook_sizes = (self.codebook_size,) * self.codebooks
        self.mean = np.asarray(mean, np.float32).reshape(codewords.shape[2])
        self.fit_info = dict(fit_info or {})

    # -- ImageTokenizer ------------------------------------------------------------------------------------

    def encode(self, image_HxWx3: np.ndarray) -> np.ndarray:
        cells = cells_of(image_HxWx3, self.patch_size)
        rows, cols, dim = cells.shape
        codes = rvq_encode(cells.reshape(-1, dim) - self.mean, self.codewords)
        return codes.reshape(rows, cols, self.codebooks)

    def decode(self, codes_RxCxK: np.ndarray) -> np.ndarray:
        """Codes [rows, cols, k], k <= codebooks (a prefix of the stages decodes coarser) -> uint8 pixels."""
        codes = np.asarray(codes_RxCxK)
        if codes.ndim != 3 or not 1 <= codes.shape[2] <= self.codebooks or not np.issubdtype(codes.dtype, np.integer):
            raise ImageTokenizerError(f"{self.name} decodes integer codes [rows, cols, 1..{self.codebooks}]; got "
                                      f"{codes.dtype} {list(codes.shape)}")
        if codes.size and (codes.min() < 0 or codes.max() >= self.codebook_size):
            raise ImageTokenizerError(f"{self.name} codes must lie in 0..{self.codebook_size - 1}; got "
                                      f"{codes.min()}..{codes.max()}")
        rows, cols, k = codes.shape
        cells = rvq_decode(codes.reshape(-1, k), self.codewords) + self.mean
        return uncells(cells.reshape(rows, cols, -1), self.patch_size)

    # -- fitting -------------------------------------------------------------------------------------------

    @classmethod
    def fit(cls, images: Sequence[np.ndarray], *, patch_size: int = 8, codebooks: int = 4, codebook_size: int = 256,
            max_cells: int = 256, seed: int = 0, iters: int = 20, max_patches: int = 200_000,
            progress=silent) -> PatchRVQTokenizer:
        """Fit on uint8 [H, W, 3] images, each first fitted to max_cells cells as training will see it.

        With MIN_HOLDOUT_IMAGES or more images, every HOLDOUT_EVERY-th of a seeded order is held out of the fit;
        fit_info records the PSNR (dB, over all pixels, after each codebook) on the fitted images and on the
        held-out ones, the counts and the fit time. The patches pooled are a random max_patches of them if there
        are more. Fewer patches than codebook_size is an error: codebook sizes fix the model's vocabulary.
        """
        if codebooks < 1 or codebook_size < 2 or patch_size < 1:
            raise ImageTokenizerError(f"need codebooks >= 1, codebook_size >= 2 and patch_size >= 1; got "
                                      f"{codebooks}, {codebook_size}, {patch_size}")
        started = time.perf_counter()
        rng = np.random.default_rng(seed)
        fitted = []
        with progress("imagetok fit: read", total=len(images), unit="image") as bar:
            for i, image in enumerate(images):
                image = np.asarray(image)
                if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
                    raise ImageTokenizerError(f"image {i} is not uint8 [H, W, 3]: {image.dtype} {list(image.shape)}")
                fitted.append(fit_image(image, patch_size, max_cells))
                bar.update(1)
        order = rng.permutation(len(fitted))
        held = set(order[::HOLDOUT_EVERY].tolist()) if len(fitted) >= MIN_HOLDOUT_IMAGES else set()
        train = [im for i, im in enumerate(fitted) if i not in held]
        holdout = [im for i, im in enumerate(fitted) if i in held]
        dim = patch_size * patch_size * 3
        x = np.concatenate([cells_of(im, patch_size).reshape(-1, dim) for im in train]) if train else np.zeros((0, dim))
        if len(x) < codebook_size:
            raise ImageTokenizerError(f"{len(train)} images hold {len(x)} patches of {patch_size} x {patch_size}, too "
                                      f"few for {codebook_size} codewords per codebook; give more images or a "
                                      f"smaller codebook_size")
        total = len(x)
        if len(x) > max_patches:
            x = x[np.sort(rng.choice(len(x), max_patches, replace=False))]
        mean = x.mean(axis=0, dtype=np.float64).astype(np.float32)
        with progress("imagetok fit: k-means", total=codebooks * iters, unit="step") as bar:
            codewords = rvq_fit(x - mean, codebooks, codebook_size, rng, iters, bar)
        tokenizer = cls(codewords, mean, patch_size)
        tokenizer.fit_info = {
            "seed": seed, "iters": iters, "max_cells": max_cells, "max_patches": max_patches,
            "images": len(train), "patches": total, "patches_used": len(x), "holdout_images": len(holdout),
            "psnr_db": [round(v, 2) for v in tokenizer.psnr_by_stage(train)],
            "holdout_psnr_db": [round(v, 2) for v in tokenizer.psnr_by_stage(holdout)] if holdout else None,
            "seconds": round(time.perf_counter() - started, 2)}
        return tokenizer

    def psnr_by_stage(self, images: Sequence[np.ndarray]) -> list[float]:
        """PSNR (dB) over all pixels of these images (already whole cells) decoded from the first 1, 2, ..., K
        codebooks."""
        codes = [self.encode(im) for im in images]
        reference = np.concatenate([im.reshape(-1, 3) for im in images])
        return [psnr(reference, np.concatenate([self.decode(c[..., :k + 1]).reshape(-1, 3) for c in codes]))
                for k in range(self.codebooks)]

    # -- files ---------------------------------------------------------------------------------------------

    def config(self) -> dict:
        return {"name": self.name, "patch_size": self.patch_size, "codebook_sizes": list(self.codebook_sizes),
                "codebooks": self.codebooks, "codebook_size": self.codebook_size, "fit": self.fit_info}

    def save(self, directory: str | os.PathLike) -> None:
        """The arrays, then the config a reader looks for (a local folder or a gs:// URL)."""
        directory = storage.path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        arrays = io.BytesIO()
        np.savez(arrays, codewords=self.codewords, mean=self.mean)
        storage.write_bytes(directory / ARRAYS_FILE, arrays.getvalue())
        storage.write_text(directory / CONFIG_FILE, json.dumps(self.config(), indent=2) + "\n")

    @classmethod
    def load(cls, directory: str | os.PathLike) -> PatchRVQTokenizer:
        directory = storage.path(directory)
        refit = "fit it again with `omni imagetok fit`"
        json_path, npz_path = directory / CONFIG_FILE, directory / ARRAYS_FILE
        for path in (json_path, npz_path):
            if not path.is_file():
                raise ImageTokenizerError(f"image tokenizer folder {directory} has no {path.name}; a "
                                          f"saved {cls.name} has {CONFIG_FILE} and {ARRAYS_FILE}; {refit}")
        try:
            config = json.loads(json_path.read_text())
        except (OSError, ValueError) as e:
            raise ImageTokenizerError(f"{json_path} is not readable JSON ({e}); {refit}") from None
        if not isinstance(config, dict) or config.get("name") != cls.name:
            name = config.get("name") if isinstance(config, dict) else None
            raise ImageTokenizerError(f"{json_path}: field \"name\" is {name!r}, not {cls.name!r}; {refit}")
        try:
            with np.load(io.BytesIO(npz_path.read_bytes())) as arrays:
                codewords, mean = arrays["codewords"], arrays["mean"]
            tokenizer = cls(codewords, mean, config["patch_size"], fit_info=config.get("fit"))
        except ImageTokenizerError as e:
            raise ImageTokenizerError(f"image tokenizer folder {directory} is corrupt: {e}; {refit}") from None
        except (OSError, ValueError, KeyError, TypeError, AttributeError, zipfile.BadZipFile) as e:
            field = (f"{e} missing from {CONFIG_FILE} or {ARRAYS_FILE}" if isinstance(e, KeyError)
                     else f"{type(e).__name__}: {e}")
            raise ImageTokenizerError(f"image tokenizer folder {directory} is corrupt ({field}); {refit}") from None
        for key in ("patch_size", "codebook_sizes"):
            if config.get(key) != tokenizer.config()[key]:
                raise ImageTokenizerError(f"{json_path}: field \"{key}\" is {config.get(key)} but {ARRAYS_FILE} holds "
                                          f"{tokenizer.config()[key]}; the folder is inconsistent; {refit}")
        return tokenizer


# ---------------------------------------------------------------------------------------------------------
# External tokenizers, identity, loading

class PrecomputedImageTokenizer(Precomputed):
    """The identity of an external image tokenizer (a VQGAN, Chameleon's, MaskGIT's...) whose codes users bring
    precomputed as `image_codes` (omni.data.precomputed); patch_size when given."""

    what, error, codes_shape, example = "image tokenizer", ImageTokenizerError, "[rows, cols, codebooks]", \
        "vqgan-f16-16384"

    def __init__(self, name: str, codebook_sizes: Sequence[int], patch_size: int | None = None):
        super().__init__(name, codebook_sizes)
        self.patch_size = None if patch_size is None else int(patch_size)


def identity(tokenizer: ImageTokenizer) -> dict:
    """What a dataset (or checkpoint) records about its image tokenizer, JSON-ready: name, codebook_sizes,
    patch_size (None when an external tokenizer did not give one)."""
    return {"name": tokenizer.name, "codebook_sizes": [int(s) for s in tokenizer.codebook_sizes],
            "patch_size": None if tokenizer.patch_size is None else int(tokenizer.patch_size)}


def from_identity(record: dict) -> ImageTokenizer:
    """The external tokenizer a recorded identity names (fitted ones load from their folder instead)."""
    return PrecomputedImageTokenizer(record["name"], record["codebook_sizes"], record.get("patch_size"))


def matches(record: dict, tokenizer: ImageTokenizer) -> bool:
    return (record.get("name") == tokenizer.name
            and [int(s) for s in record.get("codebook_sizes", [])] == list(tokenizer.codebook_sizes))


def load_image_tokenizer(spec: str | os.PathLike) -> ImageTokenizer:
    """A fitted tokenizer from its folder (or that folder's image_tokenizer.json)."""
    spec = os.fspath(spec)
    path = storage.path(spec)
    directory = path.parent if path.name == CONFIG_FILE else path
    if (directory / CONFIG_FILE).is_file():
        return PatchRVQTokenizer.load(directory)
    why = (f"{spec} is a folder without {CONFIG_FILE}" if path.is_dir() else
           f"no such folder: {spec}" if not path.exists() else f"{spec} is a file, not a tokenizer folder")
    raise ImageTokenizerError(f"cannot load image tokenizer {spec!r}: {why}. Give a folder written by `omni imagetok "
                              f"fit` ({CONFIG_FILE} + {ARRAYS_FILE})")


class _Images:
    """Image files decoded one at a time as a fit reads them (it keeps only their budget-sized copies)."""

    def __init__(self, paths):
        self.paths = [storage.path(p) for p in paths]

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i) -> np.ndarray:
        path = self.paths[i]
        try:
            data = path.read_bytes()
        except OSError as e:
            raise ImageTokenizerError(f"cannot read image {path}: {e.strerror or e}") from None
        try:
            return decode_image(data, name=str(path))
        except ValueError as e:
            raise ImageTokenizerError(str(e)) from None


def fit_on_files(paths: Sequence[str | os.PathLike], out_dir: str | os.PathLike, **hparams) -> PatchRVQTokenizer:
    """Fit a PatchRVQTokenizer on image files (any format Pillow reads) and save it to out_dir; hparams are
    PatchRVQTokenizer.fit's keywords."""
    if not paths:
        raise ImageTokenizerError("no image files given to fit the image tokenizer on")
    tokenizer = PatchRVQTokenizer.fit(_Images(paths), **hparams)
    tokenizer.save(out_dir)
    return tokenizer
