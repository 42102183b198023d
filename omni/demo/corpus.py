"""The embedded demo corpus: generated in a couple of seconds from a seed, never downloaded.

Three tasks, a third of the examples each, so the demo run shows real cross-modal learning:

    caption    image of a coloured shape at a place      -> text  "a red circle at the top left"
    describe   tone melody (WAV, ToneCodec codes)        -> text  "loud notes c e g"
    synth      text "play loud c e g"                    -> audio codes of that melody

With espeak-ng installed, `data.dataset=demo-speech` builds spoken captions instead (write_speech_manifest):
image + caption + the caption spoken, encoded by a MelRVQCodec fitted on the clips at build time.
`data.dataset=demo-draw` builds text -> image examples ("draw a red circle at the top left" -> the scene's image
codes) with an image tokenizer fitted on its images at build time (omni.demo.draw).

The corpus goes through the same path as a user's data: `write_manifest` writes PNGs, WAVs and a manifest,
which `build` makes into a TFDS dataset (once, into data.cache_dir) for the grain pipeline to read.

Images are 32 x 32 (demo.image_size) with pixel noise, jittered position and size; melodies are 1-3 notes
of c4..b4, 0.2 s each, soft or loud, slightly detuned. Train and eval splits are disjoint random draws.
Chance levels for the held-out captions: shape 1/3, colour 1/6, place 1/5, whole caption 1/90.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import subprocess

import numpy as np
from PIL import Image

from omni import storage
from omni.config import Config, ConfigError
from omni.data import dataset as dataset_lib
from omni.data.audio import write_wav
from omni.data.codec import ToneCodec, fit_codec_on_files

SHAPES = ("circle", "square", "triangle")
COLOURS = {"red": (220, 40, 40), "green": (40, 200, 60), "blue": (50, 80, 230), "yellow": (230, 220, 50),
           "white": (240, 240, 240), "purple": (160, 60, 200)}
PLACES = {"top left": (0.28, 0.28), "top right": (0.72, 0.28), "bottom left": (0.28, 0.72),
          "bottom right": (0.72, 0.72), "center": (0.5, 0.5)}
NOTES = {"c": 261.63, "d": 293.66, "e": 329.63, "f": 349.23, "g": 392.00, "a": 440.00, "b": 493.88}
VOLUMES = {"soft": 0.08, "loud": 0.5}
NOTE_SECONDS = 0.2
TASKS = ("caption", "describe", "synth")


def draw_scene(rng: np.random.Generator, size: int, shape: str, colour: str, place: str) -> np.ndarray:
    """uint8 [size, size, 3]: a noisy dark background with one filled shape."""
    image = rng.normal(40, 12, (size, size, 3))
    cx, cy = PLACES[place]
    cx = cx * size + rng.uniform(-1.5, 1.5)
    cy = cy * size + rng.uniform(-1.5, 1.5)
    r = size * rng.uniform(0.16, 0.21)
    yy, xx = np.mgrid[0:size, 0:size] + 0.5
    if shape == "circle":
        inside = (xx - cx) ** 2 + (yy - cy) ** 2 <= r**2
    elif shape == "square":
        inside = (np.abs(xx - cx) <= r * 0.9) & (np.abs(yy - cy) <= r * 0.9)
    else:  # upward triangle
        top, bottom = cy - r, cy + r
        half_width = (yy - top) / (2 * r) * r * 1.15
        inside = (yy >= top) & (yy <= bottom) & (np.abs(xx - cx) <= half_width)
    image[inside] = np.asarray(COLOURS[colour]) + rng.normal(0, 8, (inside.sum(), 3))
    return np.clip(image, 0, 255).astype(np.uint8)


def synth_melody(rng: np.random.Generator, notes: list[str], volume: str, sample_rate: int) -> np.ndarray:
    """float32 mono wave of the notes, each NOTE_SECONDS long, slightly detuned, with short fades."""
    n = int(NOTE_SECONDS * sample_rate)
    t = np.arange(n) / sample_rate
    fade = np.minimum(1.0, np.minimum(t, t[::-1]) / 0.005)
    pieces = [VOLUMES[volume] * fade * np.sin(2 * np.pi * NOTES[name] * rng.uniform(0.99, 1.01) * t
                                              + rng.uniform(0, 2 * np.pi)) for name in notes]
    return np.concatenate(pieces).astype(np.float32)


def make_example(rng: np.random.Generator, task: str, image_size: int, sample_rate: int) -> dict:
    """One raw example (omni.data.manifest) with its task and answer in "meta"."""
    if task == "caption":
        shape, colour, place = rng.choice(SHAPES), rng.choice(list(COLOURS)), rng.choice(list(PLACES))
        answer = f"a {colour} {shape} at the {place}" if place != "center" else f"a {colour} {shape} in the center"
        image = draw_scene(rng, image_size, shape, colour, place)
        return {"meta": {"task": task, "answer": answer}, "targets": ["text"],
                "segments": [{"image": image}, {"text": answer}]}
    notes = list(rng.choice(list(NOTES), size=rng.integers(1, 4)))
    volume = str(rng.choice(list(VOLUMES)))
    audio = {"audio": synth_melody(rng, notes, volume, sample_rate), "sample_rate": sample_rate}
    if task == "describe":
        answer = f"{volume} notes {' '.join(notes)}"
        return {"meta": {"task": task, "answer": answer}, "targets": ["text"],
                "segments": [audio, {"text": answer}]}
    prompt = f"play {volume} {' '.join(notes)}"
    return {"meta": {"task": task, "answer": prompt}, "targets": ["audio"],
            "segments": [{"text": prompt}, audio]}


def make_split(split: str, num_examples: int, image_size: int, seed: int,
               sample_rate: int = ToneCodec.sample_rate) -> list[dict]:
    """A list of `num_examples` raw examples; 'train' and 'eval' use independent random streams."""
    stream = {"train": 0, "eval": 1}[split]
    rng = np.random.default_rng([seed, stream])
    return [make_example(rng, TASKS[i % len(TASKS)], image_size, sample_rate) for i in range(num_examples)]


def write_manifest(out_dir, train_examples: int, eval_examples: int, image_size: int, seed: int):
    """The demo corpus as a user would bring it: PNG images, WAV clips and a manifest.jsonl; returns its path."""


    out_dir = storage.path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    (out_dir / "audio").mkdir(parents=True, exist_ok=True)
    lines = []
    for split, n in (("train", train_examples), ("eval", eval_examples)):
        for i, example in enumerate(make_split(split, n, image_size, seed)):
            name = f"{split}-{i:06d}"
            segments = []
            for segment in example["segments"]:
                if "image" in segment:
                    Image.fromarray(segment["image"]).save(out_dir / "images" / f"{name}.png")
                    segments.append({"image": f"images/{name}.png"})
                elif "audio" in segment:
                    write_wav(out_dir / "audio" / f"{name}.wav", segment["audio"], segment["sample_rate"])
                    segments.append({"audio": f"audio/{name}.wav"})
                else:
                    segments.append({"text": segment["text"]})
            lines.append(json.dumps({"id": name, "split": split, "targets": example["targets"],
                                     "meta": example["meta"], "segments": segments}))
    manifest = out_dir / "manifest.jsonl"
    manifest.write_text("\n".join(lines) + "\n")
    return manifest


def parse_caption(text: str) -> dict:
    """Attributes named in a caption, None where the caption names none (for scoring generated captions)."""
    words = text.split()
    place = next((p for p in PLACES if text.endswith(p)), None)
    return {"shape": next((s for s in SHAPES if s in words), None),
            "colour": next((c for c in COLOURS if c in words), None),
            "place": place}


# ----------------------------------------------------------------------------------------------- spoken captions

SPEECH_TASKS = ("spoken_caption", "transcribe")


def espeak_available() -> bool:
    return shutil.which("espeak-ng") is not None


def speak(text: str, path, rng: np.random.Generator) -> None:
    """A WAV of `text` spoken by espeak-ng (22,050 Hz) with a random pitch and speed, so voices vary."""
    if not espeak_available():
        raise RuntimeError("the spoken-caption demo needs espeak-ng: install it (apt install espeak-ng) or use "
                           "data.dataset=demo")
    pitch, speed = int(rng.integers(30, 71)), int(rng.integers(140, 181))
    subprocess.run(["espeak-ng", "-v", "en", "-p", str(pitch), "-s", str(speed), "-w", str(path), text],
                   check=True, capture_output=True)


def write_speech_manifest(out_dir, train_examples: int, eval_examples: int, image_size: int, seed: int):
    """Image + caption + spoken caption triples (espeak-ng), half as image -> text + speech, half as speech -> text.

        spoken_caption   image            -> text "a red circle at the top left" -> speech of that caption
        transcribe       speech of a caption -> text of it
    """

    out_dir = storage.path(out_dir)
    for folder in ("images", "speech"):
        (out_dir / folder).mkdir(parents=True, exist_ok=True)
    lines = []
    for split, n in (("train", train_examples), ("eval", eval_examples)):
        rng = np.random.default_rng([seed, {"train": 0, "eval": 1}[split], 7])
        for i in range(n):
            name, task = f"{split}-{i:06d}", SPEECH_TASKS[i % len(SPEECH_TASKS)]
            example = make_example(rng, "caption", image_size, ToneCodec.sample_rate)
            caption = example["meta"]["answer"]
            speak(caption, out_dir / "speech" / f"{name}.wav", rng)
            if task == "spoken_caption":
                Image.fromarray(example["segments"][0]["image"]).save(out_dir / "images" / f"{name}.png")
                segments = [{"image": f"images/{name}.png"}, {"text": caption}, {"audio": f"speech/{name}.wav"}]
                targets = ["text", "audio"]
            else:
                segments = [{"audio": f"speech/{name}.wav"}, {"text": caption}]
                targets = ["text"]
            lines.append(json.dumps({"id": name, "split": split, "targets": targets,
                                     "meta": {"task": task, "answer": caption}, "segments": segments}))
    manifest = out_dir / "manifest.jsonl"
    manifest.write_text("\n".join(lines) + "\n")
    return manifest


# ------------------------------------------------------------------------------------------ built once, cached

VERSION = 1  # bump when the generator changes: a new folder name, so a stale cache is never read
NAMES = ("demo", "demo-speech", "demo-draw")
log = logging.getLogger("omni.demo")


def cache_root(cfg: Config):
    """Where generated corpora are built: a local folder (each host of a job builds the demo corpus itself, the
    same bytes from the same seed), so a URL is refused."""
    root = storage.path(cfg.data.cache_dir or os.environ.get("OMNI_CACHE") or "~/.cache/omni")
    if storage.is_remote(root):
        raise ConfigError(f"data.cache_dir={root}: the demo corpus is generated on each host into a local folder; "
                          "set data.cache_dir to a local path (datasets on a bucket are data.dataset=gs://...)")
    return root


def built_path(cfg: Config):
    """Where the corpus cfg.data.dataset names is built: one folder per version and demo.* settings."""
    d = cfg.demo
    return cache_root(cfg) / (f"{cfg.data.dataset}-v{VERSION}-{d.image_size}px-{d.train_examples}-"
                              f"{d.eval_examples}-seed{d.seed}")


def build(cfg: Config):
    """Writes the corpus cfg.data.dataset names as PNG/WAV files + manifest and builds it, once (other processes
    wait on a lock for it); returns the built dataset's folder.

    demo          tone melodies through ToneCodec
    demo-speech   spoken captions (espeak-ng) through a MelRVQCodec fitted on the train clips
    demo-draw     text -> image codes of a PatchRVQTokenizer fitted on the train images (omni.demo.draw)
    """
    path = built_path(cfg)
    if (path / dataset_lib.DATASET_FILE).exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(str(path) + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (path / dataset_lib.DATASET_FILE).exists():
            log.info("building the %s corpus into %s", cfg.data.dataset, path)
            source = storage.path(f"{path}.source")
            d = cfg.demo
            image_tokenizer = None
            if cfg.data.dataset == "demo-draw":
                from omni.demo import draw

                manifest = draw.write_manifest(source, d.train_examples, d.eval_examples, d.image_size, d.seed)
                codec, image_tokenizer = None, draw.fit_tokenizer(source, d.seed)
            else:
                write = write_manifest if cfg.data.dataset == "demo" else write_speech_manifest
                manifest = write(source, d.train_examples, d.eval_examples, d.image_size, d.seed)
            if cfg.data.dataset == "demo":
                codec = ToneCodec()
            elif cfg.data.dataset == "demo-speech":
                clips = sorted((source / "speech").glob("train-*.wav"))
                codec = fit_codec_on_files(clips, storage.path(f"{path}.codec"), codebooks=4, codebook_size=64,
                                           seed=d.seed)
            report = dataset_lib.BuildReport()
            examples, codec = dataset_lib.manifest_examples(manifest, codec, 0.0, report, skip_bad=False,
                                                            image_tokenizer=image_tokenizer)
            dataset_lib.build(examples, path, codec, report=report, overwrite=True, source=str(manifest))
    return path
