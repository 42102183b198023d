"""The whole road out of omni through the CLI: train -> `omni export` -> `omni generate` from an image file."""

import json
import subprocess
import sys

import pytest

from omni.demo import corpus
from omni.train import loop
from tests.conftest import tiny_config


def _omni(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "omni.cli", *args], capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def memorised(tmp_path_factory):
    """A tiny model trained until it knows its few demo captions by heart, exported as float32."""
    workdir = tmp_path_factory.mktemp("run")
    cfg = tiny_config()
    cfg.model.d = 64
    cfg.demo.train_examples, cfg.demo.eval_examples = 12, 6
    cfg.train.steps, cfg.train.lr, cfg.train.warmup_steps, cfg.train.weight_decay = 300, 1e-2, 20, 0.0
    cfg.train.log_every, cfg.train.checkpoint_every = 50, 300
    loop.train(cfg, workdir, progress=False)
    out = tmp_path_factory.mktemp("export") / "model"
    result = _omni("export", "--workdir", str(workdir), "--out", str(out), "--dtype", "float32")
    assert result.returncode == 0, result.stderr
    manifest = corpus.built_path(cfg).with_name(corpus.built_path(cfg).name + ".source") / "manifest.jsonl"
    lines = [json.loads(line) for line in manifest.read_text().splitlines()]
    captions = [(manifest.parent / line["segments"][0]["image"], line["meta"]["answer"]) for line in lines
                if line["meta"]["task"] == "caption" and line.get("split") == "train"]
    assert captions
    return out, captions


def test_generate_writes_the_caption_of_a_memorised_image(memorised):
    out, captions = memorised
    for image, caption in captions:
        result = _omni("generate", "--model", str(out), "--prompt", f"<image:{image}>", "--target", "text")
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip() == caption
        assert "tokens until a stop token" in result.stderr and "decode" in result.stderr


def test_generate_audio_writes_a_wav_through_the_codec(memorised, tmp_path):
    out, _ = memorised
    wav = tmp_path / "melody.wav"
    result = _omni("generate", "--model", str(out), "--prompt", "play loud c e g", "--target", "audio",
                   "--max-new-tokens", "12", "--out", str(wav))
    assert result.returncode == 0, result.stderr
    from omni.data.audio import read_wav

    wave, rate = read_wav(wav)
    assert rate == 16000 and len(wave) > 0


def test_generate_names_a_missing_image_and_a_folder_that_is_not_an_export(memorised, tmp_path):
    out, _ = memorised
    missing = _omni("generate", "--model", str(out), "--prompt", f"<image:{tmp_path / 'cat.png'}>")
    assert missing.returncode == 2 and f"{tmp_path / 'cat.png'}" in missing.stderr
    not_export = _omni("generate", "--model", str(tmp_path), "--prompt", "hi")
    assert not_export.returncode == 2 and "not an omni export" in not_export.stderr
