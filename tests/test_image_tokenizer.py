"""omni.data.image_tokenizer: the built-in patch residual-VQ tokenizer (fit, round trip, files) and its CLI."""

import json

import numpy as np
import pytest
from PIL import Image

from omni.data.image_tokenizer import (ImageTokenizerError, PatchRVQTokenizer, PrecomputedImageTokenizer,
                                       encode_fitted, load_image_tokenizer, psnr)
from tests.test_cli import omni

PALETTE = np.array([[220, 30, 30], [30, 180, 60], [40, 70, 220], [240, 220, 40], [250, 250, 250], [20, 20, 20]],
                   np.uint8)
ROUND_TRIP_PSNR_DB = 25.0  # the promise on flat-colour shapes, measured on images the fit never saw


def flat_shapes(n: int, size: int = 32, seed: int = 0) -> list[np.ndarray]:
    """Flat-colour circles and squares on a flat background, six colours, random place and size."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    out = []
    for _ in range(n):
        background, colour = rng.choice(len(PALETTE), 2, replace=False)
        image = np.empty((size, size, 3), np.uint8)
        image[:] = PALETTE[background]
        cy, cx = rng.integers(6, size - 6, 2)
        r = int(rng.integers(4, 10))
        inside = ((yy - cy) ** 2 + (xx - cx) ** 2 < r * r) if rng.random() < 0.5 else (
            (abs(yy - cy) < r) & (abs(xx - cx) < r))
        image[inside] = PALETTE[colour]
        out.append(image)
    return out


@pytest.fixture(scope="module")
def tokenizer():
    return PatchRVQTokenizer.fit(flat_shapes(200), patch_size=4, codebooks=4, codebook_size=64, iters=10, seed=0)


def test_round_trip_of_unseen_flat_shapes_is_above_the_stated_psnr(tokenizer):
    unseen = flat_shapes(20, seed=1)
    codes = [tokenizer.encode(im) for im in unseen]
    assert codes[0].shape == (8, 8, 4) and codes[0].dtype == np.int32 and codes[0].max() < 64
    back = np.stack([tokenizer.decode(c) for c in codes])
    assert back.dtype == np.uint8 and back.shape == (20, 32, 32, 3)
    assert psnr(np.stack(unseen), back) > ROUND_TRIP_PSNR_DB
    info = tokenizer.fit_info
    # every codebook refines: PSNR rises stage by stage on the fitted images and on the held-out ones
    assert info["images"] == 180 and info["holdout_images"] == 20
    assert np.all(np.diff(info["psnr_db"]) > 0) and np.all(np.diff(info["holdout_psnr_db"]) > 0)
    assert info["holdout_psnr_db"][-1] > ROUND_TRIP_PSNR_DB
    # a prefix of the codebooks decodes coarser
    assert psnr(unseen[0], tokenizer.decode(codes[0][..., :1])) < psnr(unseen[0], back[0])


def test_fit_is_deterministic_and_a_saved_tokenizer_gives_the_same_codes(tokenizer, tmp_path):
    images = flat_shapes(30, seed=2)
    again = PatchRVQTokenizer.fit(flat_shapes(200), patch_size=4, codebooks=4, codebook_size=64, iters=10, seed=0)
    np.testing.assert_array_equal(again.codewords, tokenizer.codewords)
    tokenizer.save(tmp_path / "tok")
    loaded = load_image_tokenizer(tmp_path / "tok")
    assert loaded.codebook_sizes == (64,) * 4 and loaded.patch_size == 4 and loaded.fit_info == tokenizer.fit_info
    for image in images[:3]:
        np.testing.assert_array_equal(loaded.encode(image), tokenizer.encode(image))
    assert load_image_tokenizer(tmp_path / "tok" / "image_tokenizer.json").patch_size == 4


def test_encode_fitted_resizes_to_the_cell_budget(tokenizer):
    photo = np.random.default_rng(0).integers(0, 256, (90, 60, 3), dtype=np.uint8)
    codes = encode_fitted(tokenizer, photo, max_cells=24)
    assert codes.shape[0] * codes.shape[1] <= 24 and codes.shape[2] == 4 and codes.shape[0] > codes.shape[1]


def test_bad_images_codes_and_fits_are_clear_errors(tokenizer):
    with pytest.raises(ImageTokenizerError, match=r"30 x 32 pixels is not a whole number of 4 x 4 cells"):
        tokenizer.encode(np.zeros((30, 32, 3), np.uint8))
    with pytest.raises(ImageTokenizerError, match=r"uint8 \[H, W, 3\]"):
        tokenizer.encode(np.zeros((32, 32), np.uint8))
    with pytest.raises(ImageTokenizerError, match=r"0\.\.63; got 64\.\.64"):
        tokenizer.decode(np.full((2, 2, 4), 64))
    with pytest.raises(ImageTokenizerError, match=r"integer codes \[rows, cols, 1\.\.4\]"):
        tokenizer.decode(np.zeros((2, 2, 5), np.int32))
    with pytest.raises(ImageTokenizerError, match="too few for 256 codewords"):
        PatchRVQTokenizer.fit(flat_shapes(2), patch_size=8, codebook_size=256)
    external = PrecomputedImageTokenizer("vqgan-f16", [16384])
    with pytest.raises(ImageTokenizerError, match="external: omni cannot encode"):
        encode_fitted(external, flat_shapes(1)[0], 16)


def test_a_corrupt_tokenizer_folder_names_the_file_and_field(tokenizer, tmp_path):
    folder = tmp_path / "tok"
    with pytest.raises(ImageTokenizerError, match="no such folder"):
        load_image_tokenizer(folder)
    tokenizer.save(folder)
    config = json.loads((folder / "image_tokenizer.json").read_text())

    (folder / "image_tokenizer.json").write_text(json.dumps(dict(config, patch_size=8)))
    with pytest.raises(ImageTokenizerError, match=r"corrupt: codewords of 48 values do not fit 8 x 8 x 3"):
        load_image_tokenizer(folder)
    (folder / "image_tokenizer.json").write_text(json.dumps(dict(config, codebook_sizes=[64, 64])))
    with pytest.raises(ImageTokenizerError, match=r"image_tokenizer.json: field \"codebook_sizes\" is \[64, 64\]"):
        load_image_tokenizer(folder)
    (folder / "image_tokenizer.json").write_text(json.dumps(dict(config, name="other")))
    with pytest.raises(ImageTokenizerError, match=r"field \"name\" is 'other'"):
        load_image_tokenizer(folder)
    (folder / "image_tokenizer.json").write_text("{not json")
    with pytest.raises(ImageTokenizerError, match=r"image_tokenizer.json is not readable JSON"):
        load_image_tokenizer(folder)
    (folder / "image_tokenizer.json").write_text(json.dumps(config))
    (folder / "image_tokenizer.npz").write_bytes(b"truncated")
    with pytest.raises(ImageTokenizerError, match=r"is corrupt \(.*\); fit it again"):
        load_image_tokenizer(folder)
    (folder / "image_tokenizer.npz").unlink()
    with pytest.raises(ImageTokenizerError, match="has no image_tokenizer.npz"):
        load_image_tokenizer(folder)


def test_cli_fit_encode_decode_round_trips_a_png(tmp_path):
    (tmp_path / "img").mkdir()
    lines = []
    for i, image in enumerate(flat_shapes(40)):
        Image.fromarray(image).save(tmp_path / "img" / f"{i}.png")
        lines.append({"segments": [{"image": f"img/{i}.png"}, {"text": "a shape"}], "targets": ["text"]})
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    run = omni("imagetok", "fit", "--manifest", str(tmp_path / "m.jsonl"), "--out", str(tmp_path / "tok"),
               "--patch-size", "4", "--codebooks", "3", "--codebook-size", "32", "--iters", "8")
    assert run.returncode == 0, run.stderr[-2000:]
    assert "held-out 4 images:" in run.stdout and "reconstruction PSNR on the fitted images" in run.stdout
    Image.fromarray(flat_shapes(1, seed=5)[0]).save(tmp_path / "x.png")
    run = omni("imagetok", "encode", "--tokenizer", str(tmp_path / "tok"), "--image", str(tmp_path / "x.png"),
               "--out", str(tmp_path / "codes.npy"))
    assert run.returncode == 0, run.stderr[-2000:]
    assert np.load(tmp_path / "codes.npy").shape == (8, 8, 3)
    run = omni("imagetok", "decode", "--tokenizer", str(tmp_path / "tok"), "--codes", str(tmp_path / "codes.npy"),
               "--out", str(tmp_path / "y.png"))
    assert run.returncode == 0, run.stderr[-2000:]
    assert psnr(np.asarray(Image.open(tmp_path / "x.png")), np.asarray(Image.open(tmp_path / "y.png"))) > 20

    np.save(tmp_path / "bad.npy", np.full((2, 2, 3), 99))
    run = omni("imagetok", "decode", "--tokenizer", str(tmp_path / "tok"), "--codes", str(tmp_path / "bad.npy"),
               "--out", str(tmp_path / "z.png"))
    assert run.returncode == 2 and "image code 99 at row 0, column 0, codebook 0 is outside [0, 32)" in run.stderr
    assert len(run.stderr.strip().splitlines()) == 1
    run = omni("imagetok", "encode", "--tokenizer", str(tmp_path / "nope"), "--image", str(tmp_path / "x.png"),
               "--out", str(tmp_path / "c.npy"))
    assert run.returncode == 2 and "cannot load image tokenizer" in run.stderr
