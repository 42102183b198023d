"""Image answers: the grid of codes a model generates, the ids allowed at each of its positions, and decoding.

An image answer is the span after `<boi>` (omni.tools.generate.prompt_arrays ends an image prompt with it), laid
out as training lays out image codes (omni.tokens):

    c(0,0,0) .. c(0,0,K-1) c(0,1,0) .. c(0,C-1,K-1) <row>   ...   (R rows)   <eoi>       R * (C*K + 1) + 1 tokens

The grid (R rows x C cols of cells, K codebooks) is fixed before generation starts (ImageGrid): the truth's
grid when there is one to score against, else the grid an image of --image-size pixels is fitted to when it
enters the model (omni.data.images.fitted_grid, the data.max_image_patches budget); by default the size the
model's training images learned as codes mostly had (`omni data build` records it with the image tokenizer, an
export carries it), else the largest square the budget holds. So every position has exactly one legal kind, and allowed_table restricts its logits
to it:

    phase p = n % (C*K + 1) of generated position n     codebook p % K      (p < C*K)
                                                        <row> only          (p == C*K)
    n == R * (C*K + 1)                                  <eoi> only

The markers are forced and every code lies in its codebook's range, so whatever the model (an untrained one
too) the answer decodes into a grid of exactly R x C x K codes, and the image tokenizer turns it into pixels.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass

import numpy as np

from omni import storage
from omni.data.image_tokenizer import ImageTokenizerError
from omni.data.images import fitted_grid
from omni.errors import GenerateError
from omni.tokens import EOI, ROW, Vocab, unflatten_image_codes

HOW_TO_GET_ONE = ("build its dataset with `omni data build --image-tokenizer DIR` (DIR from `omni imagetok fit`) and "
                  "train it on examples with \"targets\": [\"image\"]")


@dataclass(frozen=True)
class ImageGrid:
    """The shape of one image answer: rows x cols cells of `codebooks` codes each."""
    rows: int
    cols: int
    codebooks: int

    @property
    def row_tokens(self) -> int:
        """Codes of one row, then its <row>."""
        return self.cols * self.codebooks + 1

    @property
    def span_tokens(self) -> int:
        """Every generated token of the answer, <eoi> included (the prompt's <boi> is not)."""
        return self.rows * self.row_tokens + 1


def check_can_generate(vocab: Vocab, image_tokenizer) -> None:
    """GenerateError unless the model has image codes in its vocabulary and the tokenizer they came from."""
    if not vocab.image_codebook_sizes:
        raise GenerateError(f"target 'image' needs a model trained on image codes; this one has none in its "
                            f"vocabulary: {HOW_TO_GET_ONE}")
    if image_tokenizer is None:
        raise GenerateError("target 'image' needs the model's image tokenizer, and this model has image codes but "
                            "no tokenizer beside it (an export written before omni saved image_tokenizer/): export "
                            "the checkpoint again")
    if tuple(image_tokenizer.codebook_sizes) != tuple(vocab.image_codebook_sizes):
        raise GenerateError(f"the image tokenizer {image_tokenizer.name!r} has codebooks "
                            f"{list(image_tokenizer.codebook_sizes)} but the model's vocabulary holds "
                            f"{list(vocab.image_codebook_sizes)}; the tokenizer is not the one it was trained with")


def grid_for(image_tokenizer, max_cells: int, image_size: tuple[int, int] | None = None) -> ImageGrid:
    """The grid of an image of image_size = (height, width) pixels as it enters a model whose budget is max_cells
    cells (data.max_image_patches) and whose image tokenizer is `image_tokenizer`; without a size, the largest
    square grid the budget holds."""
    if image_tokenizer is None:
        raise GenerateError(f"target 'image' needs a model with an image tokenizer and this one has none: "
                            f"{HOW_TO_GET_ONE}")
    k = len(image_tokenizer.codebook_sizes)
    if image_size is None:
        side = max(1, math.isqrt(max_cells))
        return ImageGrid(side, side, k)
    height, width = image_size
    if height < 1 or width < 1:
        raise GenerateError(f"an image size must be at least 1 x 1 pixels; got {height} x {width}")
    if image_tokenizer.patch_size is None:
        raise GenerateError(f"image tokenizer {image_tokenizer.name!r} is external and does not say how many pixels "
                            f"a cell covers, so an image size in pixels cannot become a grid; leave the size out "
                            f"(a square of the model's {max_cells}-cell budget)")
    rows, cols = fitted_grid(height, width, image_tokenizer.patch_size, max_cells)
    return ImageGrid(rows, cols, k)


def grid_of_codes(codes_RxCxK: np.ndarray) -> ImageGrid:
    rows, cols, k = np.shape(codes_RxCxK)
    return ImageGrid(rows, cols, k)


def fit_to_context(grid: ImageGrid, prompt_len: int, context: int) -> int:
    """The tokens an image answer takes (the whole grid: a cut image would not decode); GenerateError when the
    model's trained context (data.seq_len) cannot hold them after the prompt."""
    if prompt_len + grid.span_tokens > context:
        raise GenerateError(f"an image of {grid.rows} x {grid.cols} cells takes {grid.span_tokens} tokens but the "
                            f"model was trained on {context}-token sequences and the prompt has {prompt_len}: ask "
                            f"for a smaller image (--image-size) or shorten the prompt")
    return grid.span_tokens


def allowed_table(vocab: Vocab, grid: ImageGrid) -> np.ndarray:
    """bool [C*K + 2, vocab.size]: row p < C*K allows codebook p % K, row C*K only <row>, the last only <eoi>
    (phase gives the row of each generated position)."""
    ck = grid.cols * grid.codebooks
    table = np.zeros((ck + 2, vocab.size), bool)
    for p in range(ck):
        j = p % grid.codebooks
        table[p, vocab.image_offset(j):vocab.image_offset(j) + vocab.image_codebook_sizes[j]] = True
    table[ck, ROW] = True
    table[ck + 1, EOI] = True
    return table


def phase(step, grid: ImageGrid, xp=np):
    """The allowed_table row of generated position `step` (an int or a traced array; xp: numpy or jax.numpy)."""
    return xp.where(step >= grid.rows * grid.row_tokens, grid.row_tokens, step % grid.row_tokens)


def codes_of(tokens, vocab: Vocab, grid: ImageGrid) -> np.ndarray:
    """Generated ids (the answer without its <eoi>) -> codes int [R, C, K]; GenerateError when they are not the
    grid's layout (they always are when allowed_table restricted the generation)."""
    ids = np.asarray(tokens, np.int64)
    if len(ids) != grid.rows * grid.row_tokens:
        raise GenerateError(f"an image answer of {grid.rows} x {grid.cols} cells has {grid.rows * grid.row_tokens} "
                            f"tokens before <eoi>; got {len(ids)}")
    rows = ids.reshape(grid.rows, grid.row_tokens)
    if np.any(rows[:, -1] != ROW):
        raise GenerateError("an image answer lacks a <row> where its grid ends a row")
    codes = unflatten_image_codes(rows[:, :-1].reshape(-1), vocab, grid.cols)
    sizes = np.asarray(vocab.image_codebook_sizes)
    if np.any((codes < 0) | (codes >= sizes)):
        raise GenerateError("an image answer holds an id outside its codebook's range")
    return codes


def decode_answer(tokens, vocab: Vocab, grid: ImageGrid, image_tokenizer) -> dict:
    """{"codes": int [R, C, K], "image": uint8 [R*P, C*P, 3] or None when the tokenizer is external}."""
    codes = codes_of(tokens, vocab, grid)
    if image_tokenizer is None:
        return {"codes": codes, "image": None}
    try:
        image = np.asarray(image_tokenizer.decode(codes), np.uint8)
    except ImageTokenizerError:  # an external tokenizer: its codes are the answer
        image = None
    return {"codes": codes, "image": image}


def write_png(path, image_HxWx3: np.ndarray) -> None:
    """A PNG at `path` (a local path or a URL), written whole or not at all."""
    from PIL import Image

    path = storage.path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = io.BytesIO()
    Image.fromarray(np.asarray(image_HxWx3, np.uint8)).save(data, format="PNG")
    storage.write_bytes(path, data.getvalue())
