"""Image answers: forced markers and codebook ranges give a decodable grid from any model, batched == single."""

import numpy as np
import pytest
from flax import nnx

from omni.batch import IMAGE, patch_dim
from omni.data.text_tokenizer import ByteTokenizer
from omni.errors import GenerateError
from omni.model.transformer import OmniTransformer
from omni.tokens import BOI, EOI, ROW, Vocab
from omni.tools import generate as generate_lib
from omni.tools import image_generate
from omni.tools.image_generate import ImageGrid
from tests.conftest import tiny_config

IMAGE_SIZES = (16, 16)  # two image codebooks of 16


@pytest.fixture(scope="module")
def untrained():
    """A random tiny model over bytes + two image codebooks; <eoi> and <row> get huge logits everywhere, so only
    the restriction can make it draw a grid."""
    cfg = tiny_config()
    vocab = Vocab(text_size=ByteTokenizer().vocab_size, codebook_sizes=(), image_codebook_sizes=IMAGE_SIZES)
    model = OmniTransformer(cfg.model, vocab.size, patch_dim(cfg.data), rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model, nnx.Param)
    params["unembed"][...] = params["unembed"][...].at[:, EOI].add(100.0).at[:, ROW].add(50.0)
    return cfg, vocab, graphdef, params


def _prompts(vocab, texts):
    return [generate_lib.prompt_arrays([{"text": t}], vocab, ByteTokenizer(), 8, "flat", "image") for t in texts]


def test_an_image_prompt_ends_with_boi_as_an_image_position():
    vocab = Vocab(text_size=ByteTokenizer().vocab_size, codebook_sizes=(), image_codebook_sizes=IMAGE_SIZES)
    prompt = _prompts(vocab, ["draw"])[0]
    assert prompt["tokens"][-1] == BOI and prompt["modality"][-1] == IMAGE


def test_allowed_table_forces_the_markers_where_the_grid_puts_them():
    vocab = Vocab(text_size=256, codebook_sizes=(4,), image_codebook_sizes=(3, 5))
    grid = ImageGrid(rows=2, cols=3, codebooks=2)
    table = image_generate.allowed_table(vocab, grid)
    kinds = []
    for n in range(grid.span_tokens):
        allowed = np.flatnonzero(table[image_generate.phase(n, grid)])
        kinds.append("row" if list(allowed) == [ROW] else "eoi" if list(allowed) == [EOI] else
                     vocab.image_codebook_of(int(allowed[0])))
        if kinds[-1] in (0, 1):  # exactly that codebook's whole range
            k = kinds[-1]
            assert list(allowed) == list(range(vocab.image_offset(k), vocab.image_offset(k) + (3, 5)[k]))
    assert kinds == ([0, 1] * 3 + ["row"]) * 2 + ["eoi"]
    assert grid.span_tokens == 2 * (3 * 2 + 1) + 1


def test_any_model_yields_a_decodable_grid_of_the_asked_shape(untrained):
    cfg, vocab, graphdef, params = untrained
    cases = [(ImageGrid(2, 3, 2), {}), (ImageGrid(1, 1, 2), {"temperature": 1.0}),
             (ImageGrid(4, 2, 2), {"temperature": 2.0, "top_k": 3})]
    for grid, sampling in cases:
        prompts = _prompts(vocab, ["draw a red circle", "x", "a blue square at the bottom right"])
        result = generate_lib.generate(graphdef, params, cfg.model, vocab, prompts, target="image",
                                       max_new_tokens=1, image_grid=grid, **sampling)
        assert result.stopped == [EOI] * 3
        for tokens in result.tokens:
            out = generate_lib.decode_output(tokens, "image", vocab, ByteTokenizer(), image_grid=grid)
            assert out["codes"].shape == (grid.rows, grid.cols, 2) and out["image"] is None
            assert out["codes"].min() >= 0 and out["codes"].max() < 16


def test_batched_image_answers_equal_single_ones(untrained):
    cfg, vocab, graphdef, params = untrained
    texts = ["draw a red circle", "x", "a blue square at the bottom right", "green"]
    grids = [ImageGrid(2, 2, 2), ImageGrid(2, 2, 2), ImageGrid(1, 3, 2), ImageGrid(2, 2, 2)]
    requests = [generate_lib.Request(p, "image", 1, None, g) for p, g in zip(_prompts(vocab, texts), grids)]
    many = generate_lib.generate_many(graphdef, params, cfg.model, vocab, requests, batch_size=2)
    for request, tokens in zip(requests, many.tokens):
        single = generate_lib.generate(graphdef, params, cfg.model, vocab, [request.prompt], target="image",
                                       max_new_tokens=1, image_grid=request.image_grid)
        assert tokens == single.tokens[0]
        assert len(tokens) == request.image_grid.span_tokens - 1
    assert len(many.batches) == 3  # the 2 x 2 grids in batches of two, the 1 x 3 grid apart


def test_a_model_without_image_codes_or_tokenizer_is_told_what_to_do(untrained):
    vocab = Vocab(text_size=256, codebook_sizes=())
    with pytest.raises(GenerateError, match="omni data build --image-tokenizer"):
        image_generate.check_can_generate(vocab, None)
    with pytest.raises(GenerateError, match="export the checkpoint again"):
        image_generate.check_can_generate(untrained[1], None)
    with pytest.raises(GenerateError, match="omni data build --image-tokenizer"):
        image_generate.grid_for(None, 16)
    with pytest.raises(GenerateError, match="takes 11 tokens .* 16-token"):
        image_generate.fit_to_context(ImageGrid(2, 2, 2), 6, 16)


def test_grid_for_fits_an_image_size_as_training_fits_images():
    class Tok:
        name, patch_size, codebook_sizes = "t", 4, (16, 16)

    assert image_generate.grid_for(Tok(), 16) == ImageGrid(4, 4, 2)
    assert image_generate.grid_for(Tok(), 16, (8, 16)) == ImageGrid(2, 4, 2)
    assert image_generate.grid_for(Tok(), 16, (64, 64)) == ImageGrid(4, 4, 2)  # resized to the budget
