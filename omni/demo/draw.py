"""The draw demo corpus (data.dataset=demo-draw): text -> image, with an image tokenizer fitted at build time.

    draw    text "draw a red circle at the top left"   -> the image codes of that scene

Scenes are the caption task's (omni.demo.corpus.draw_scene: one coloured shape on a dark, noisy background,
jittered in place and size). When the corpus is built, a PatchRVQTokenizer (omni.data.image_tokenizer) is
fitted on the train images, 8 x 8 pixel cells with TOKENIZER["codebooks"] codebooks, and the dataset is built
with it as a user's would be (`omni data build --image-tokenizer`): a 32 x 32 image is 4 x 4 cells, 37 tokens
with its markers at 2 codebooks.

scene_attributes reads a (generated) image back: the pixels far from the image's median colour are the shape;
their mean colour names the colour (nearest of corpus.COLOURS) and their centroid the place (nearest of
corpus.PLACES). The demo scorer (omni.demo.scorer) compares them with the prompt's; chance is 1/6 for the
colour and 1/5 for the place, and reading the truth images (after the tokenizer) shows what a perfect model
would score.
"""

from __future__ import annotations

import json

import numpy as np
from PIL import Image

from omni import storage
from omni.data.image_tokenizer import PatchRVQTokenizer
from omni.demo import corpus

TASKS = ("draw",)
TOKENIZER = {"patch_size": 8, "codebooks": 2, "codebook_size": 64, "iters": 20}
FOREGROUND_DISTANCE = 60.0  # RGB distance from the median (background) colour that makes a pixel part of the shape


def make_example(rng: np.random.Generator, image_size: int) -> dict:
    """One raw "draw" example: the scene's description as a text prompt (not learned), its image learned as codes."""
    shape, colour, place = rng.choice(corpus.SHAPES), rng.choice(list(corpus.COLOURS)), rng.choice(list(corpus.PLACES))
    scene = f"a {colour} {shape} at the {place}" if place != "center" else f"a {colour} {shape} in the center"
    image = corpus.draw_scene(rng, image_size, shape, colour, place)
    return {"meta": {"task": "draw", "answer": scene, "shape": str(shape), "colour": str(colour), "place": str(place)},
            "targets": ["image"], "segments": [{"text": f"draw {scene}", "target": False}, {"image": image}]}


def write_manifest(out_dir, train_examples: int, eval_examples: int, image_size: int, seed: int):
    """The draw corpus as PNG images and a manifest.jsonl (train and eval are independent draws); returns its path."""
    out_dir = storage.path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    for split, n in (("train", train_examples), ("eval", eval_examples)):
        rng = np.random.default_rng([seed, {"train": 0, "eval": 1}[split], 11])
        for i in range(n):
            name, example = f"{split}-{i:06d}", make_example(rng, image_size)
            text, image = example["segments"]
            Image.fromarray(image["image"]).save(out_dir / "images" / f"{name}.png")
            lines.append(json.dumps({"id": name, "split": split, "targets": example["targets"], "meta": example["meta"],
                                     "segments": [text, {"image": f"images/{name}.png"}]}))
    manifest = out_dir / "manifest.jsonl"
    manifest.write_text("\n".join(lines) + "\n")
    return manifest


def fit_tokenizer(source, seed: int) -> PatchRVQTokenizer:
    """The built-in image tokenizer of the draw corpus, fitted on its train images (source/images/train-*.png)."""
    images = [np.asarray(Image.open(path).convert("RGB")) for path in sorted((source / "images").glob("train-*.png"))]
    return PatchRVQTokenizer.fit(images, seed=seed, **TOKENIZER)


def scene_attributes(image_HxWx3: np.ndarray) -> dict:
    """{"colour", "place"} of the one shape in an image (module docstring); None when no pixel stands out."""
    pixels = np.asarray(image_HxWx3, np.float64)
    background = np.median(pixels.reshape(-1, 3), axis=0)
    foreground = np.linalg.norm(pixels - background, axis=-1) > FOREGROUND_DISTANCE
    if not foreground.any():
        return {"colour": None, "place": None}
    mean = pixels[foreground].mean(axis=0)
    names = list(corpus.COLOURS)
    colour = names[int(np.argmin([np.linalg.norm(mean - np.asarray(corpus.COLOURS[n])) for n in names]))]
    ys, xs = np.nonzero(foreground)
    h, w = foreground.shape
    centre = np.array([(xs.mean() + 0.5) / w, (ys.mean() + 0.5) / h])
    places = list(corpus.PLACES)
    place = places[int(np.argmin([np.linalg.norm(centre - np.asarray(corpus.PLACES[p])) for p in places]))]
    return {"colour": colour, "place": place}
