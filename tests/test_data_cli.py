"""The data verbs as a user runs them: build a manifest with a tokenizer and a fitted codec, show, train on it."""

import json

import numpy as np
from PIL import Image

from omni.data.audio import read_wav, write_wav
from tests.conftest import tiny_config
from tests.test_cli import omni

WORDS = "red green blue small large circle square bird song chirp whistle low high".split()


def _user_corpus(root, n=60):
    """A user-style folder: PNGs of two sizes, WAV clips at two sample rates, captions and transcripts."""
    rng = np.random.default_rng(0)
    (root / "img").mkdir(parents=True)
    (root / "wav").mkdir()
    lines = []
    for i in range(n):
        words = " ".join(rng.choice(WORDS, size=4))
        if i % 2 == 0:
            size = (24, 40) if i % 4 == 0 else (48, 48)
            Image.fromarray(rng.integers(0, 255, size + (3,), dtype=np.uint8)).save(root / "img" / f"{i}.png")
            lines.append({"segments": [{"image": f"img/{i}.png"}, {"text": words}], "targets": ["text"]})
        else:
            rate = 16000 if i % 3 else 22050
            t = np.arange(int(0.4 * rate)) / rate
            hz = 200 + 40 * (i % 9)
            write_wav(root / "wav" / f"{i}.wav", 0.3 * np.sin(2 * np.pi * hz * t) + 0.01 * rng.normal(size=t.size), rate)
            lines.append({"segments": [{"audio": f"wav/{i}.wav"}, {"text": words}], "targets": ["text"],
                          "split": "eval" if i % 10 == 1 else "train"})
    manifest = root / "manifest.jsonl"
    manifest.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return manifest


def test_tokenizer_codec_build_show_and_train_on_user_data(tmp_path):
    manifest = _user_corpus(tmp_path / "corpus")
    run = omni("tokenizer", "train", "--manifest", str(manifest), "--vocab-size", "300", "--out", str(tmp_path / "tok"))
    assert run.returncode == 0, run.stderr[-2000:]
    assert (tmp_path / "tok" / "tokenizer.json").exists()

    run = omni("codec", "fit", "--manifest", str(manifest), "--out", str(tmp_path / "codec"),
               "--codebooks", "2", "--codebook-size", "16")
    assert run.returncode == 0, run.stderr[-2000:]
    clip = tmp_path / "corpus" / "wav" / "1.wav"
    run = omni("codec", "encode", "--codec", str(tmp_path / "codec"), "--wav", str(clip), "--out", str(tmp_path / "c.npy"))
    assert run.returncode == 0, run.stderr[-2000:]
    codes = np.load(tmp_path / "c.npy")
    assert codes.ndim == 2 and codes.shape[1] == 2 and codes.max() < 16
    run = omni("codec", "decode", "--codec", str(tmp_path / "codec"), "--codes", str(tmp_path / "c.npy"),
               "--out", str(tmp_path / "back.wav"))
    assert run.returncode == 0, run.stderr[-2000:]
    wave, rate = read_wav(tmp_path / "back.wav")
    assert abs(len(wave) / rate - 0.4) < 0.1

    out = tmp_path / "ds"
    run = omni("data", "build", "--manifest", str(manifest), "--out", str(out), "--codec", str(tmp_path / "codec"),
               "--tokenizer", str(tmp_path / "tok"))
    assert run.returncode == 0, run.stderr[-2000:]
    assert "train: 54 examples, eval: 6 examples" in run.stdout
    meta = json.loads((out / "omni_dataset.json").read_text())
    assert meta["codec"]["codebook_sizes"] == [16, 16] and meta["tokenizer"] == "tokenizer"

    run = omni("data", "show", "--config", "configs/demo.py", "--set", f"data.dataset={out}",
               "--set", "data.seq_len=128", "--set", "data.max_image_patches=16", "--out", str(tmp_path / "b.png"))
    assert run.returncode == 0, run.stderr[-2000:]
    assert (tmp_path / "b.png").stat().st_size > 10_000
    assert "<image 3x5>" in run.stdout or "<image 4x4>" in run.stdout  # both sizes fitted to 16 patches
    assert "audio codes" in run.stdout

    from omni.data import pipeline as data
    from omni.train import loop

    cfg = tiny_config()
    cfg.data.dataset = str(out)
    cfg.data.max_image_patches = 16
    cfg.train.steps = 12
    vocab = data.vocab_for(cfg)
    assert vocab.text_size == 300 and vocab.codebook_sizes == (16, 16)
    result = loop.train(cfg, tmp_path / "run", progress=False)
    assert np.isfinite(result["eval"]["loss/text"])
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["data"]["dataset"] == str(out)


def test_build_errors_name_the_line_and_skip_bad_reports(tmp_path):
    manifest = _user_corpus(tmp_path / "corpus", n=6)
    (tmp_path / "corpus" / "img" / "2.png").write_bytes(b"not a png")
    run = omni("data", "build", "--manifest", str(manifest), "--out", str(tmp_path / "ds"), "--codec", "tone")
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert f"{manifest}:3: segment 0: cannot decode image" in run.stderr
    assert not (tmp_path / "ds" / "omni_dataset.json").exists()
    run = omni("data", "build", "--manifest", str(manifest), "--out", str(tmp_path / "ds"), "--codec", "tone",
               "--skip-bad")
    assert run.returncode == 0, run.stderr[-2000:]
    assert "skipped 1 bad line(s)" in run.stdout and f"{manifest}:3:" in run.stdout


def test_codec_errors_are_one_line(tmp_path):
    (tmp_path / "x.wav").write_bytes(b"RIFF....WAVEfmt junk")
    run = omni("codec", "encode", "--codec", "tone", "--wav", str(tmp_path / "x.wav"), "--out", str(tmp_path / "c.npy"))
    assert run.returncode == 2 and "x.wav" in run.stderr and "Traceback" not in run.stderr
    run = omni("codec", "encode", "--codec", str(tmp_path / "nowhere"), "--wav", str(tmp_path / "x.wav"),
               "--out", str(tmp_path / "c.npy"))
    assert run.returncode == 2 and "nowhere" in run.stderr and "Traceback" not in run.stderr
