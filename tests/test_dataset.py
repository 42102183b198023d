"""Manifest -> TFDS array_record dataset -> read back: round trip, precomputed codes, and every bad-input case."""

import json

import numpy as np
import pytest
from PIL import Image

from omni import storage
from omni.data import dataset
from omni.data.audio import read_wav, write_wav
from omni.data.codec import ToneCodec
from omni.errors import ManifestError

TONE = {"name": ToneCodec.name, "frame_rate": ToneCodec.frame_rate, "codebook_sizes": list(ToneCodec.codebook_sizes)}


def _media(tmp_path):
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (24, 40, 3), dtype=np.uint8)).save(tmp_path / "wide.png")
    Image.fromarray(rng.integers(0, 255, (30, 20, 3), dtype=np.uint8)).save(tmp_path / "tall.jpg", quality=90)
    t = np.arange(16000 // 2) / 16000
    write_wav(tmp_path / "a440.wav", 0.4 * np.sin(2 * np.pi * 440 * t), 16000)
    write_wav(tmp_path / "a440_8k.wav", 0.4 * np.sin(2 * np.pi * 440 * t[::2]), 8000)
    np.save(tmp_path / "codes.npy", np.stack([np.arange(10) % 64, np.arange(10) % 16], 1))


def _write(tmp_path, lines, name="manifest.jsonl"):
    path = tmp_path / name
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


def _build(manifest, out, skip_bad=False, codec=None):
    report = dataset.BuildReport()
    examples, codec = dataset.manifest_examples(manifest, codec or ToneCodec(), 0.0, report, skip_bad)
    return dataset.build(examples, out, codec, report=report)


GOOD = [
    {"id": "cap", "segments": [{"image": "wide.png"}, {"text": "a wide picture"}], "targets": ["text"]},
    {"id": "asr", "split": "eval", "segments": [{"audio": "a440.wav"}, {"text": "la"}], "targets": ["text"]},
    {"id": "tts", "segments": [{"text": "sing la", "target": False}, {"audio": "a440_8k.wav"}],
     "targets": ["audio", "text"], "meta": {"note": "resampled from 8 kHz"}},
    {"id": "pre", "segments": [{"image": "tall.jpg"}, {"codes": "codes.npy"}], "targets": ["audio"], "codec": TONE},
]


def test_manifest_round_trip(tmp_path):
    _media(tmp_path)
    report = _build(_write(tmp_path, GOOD), tmp_path / "ds")
    assert report.counts == {"train": 3, "eval": 1} and not report.skipped
    ds = dataset.open_dataset(tmp_path / "ds")
    assert ds.codebook_sizes == ToneCodec.codebook_sizes and ds.meta["codec"]["name"] == ToneCodec.name
    read = {}
    for split in ("train", "eval"):
        source = ds.source(split)
        for i in range(len(source)):
            example = dataset.decode_record(source[i], 2)
            read[example["id"]] = example
    assert sorted(read) == ["asr", "cap", "pre", "tts"]
    cap = read["cap"]
    assert cap["targets"] == ["text"] and cap["segments"][1] == {"text": "a wide picture", "target": True}
    assert cap["segments"][0]["image_bytes"] == (tmp_path / "wide.png").read_bytes()  # stored as given
    wave, _ = read_wav(tmp_path / "a440.wav")
    assert np.array_equal(read["asr"]["segments"][0]["audio"], ToneCodec().encode(wave))
    tts = read["tts"]
    assert tts["segments"][0] == {"text": "sing la", "target": False} and tts["meta"] == {"note": "resampled from 8 kHz"}
    assert np.all(tts["segments"][1]["audio"][2:-2, 0] == ToneCodec.note_code(440))  # 8 kHz resampled to 16 kHz
    assert np.array_equal(read["pre"]["segments"][1]["audio"], np.load(tmp_path / "codes.npy"))
    assert read["pre"]["segments"][0]["image_bytes"] == (tmp_path / "tall.jpg").read_bytes()


def test_precomputed_codes_define_the_codec_when_none_is_given(tmp_path):
    _media(tmp_path)
    mimi = {"name": "mimi", "frame_rate": 12.5, "codebook_sizes": [2048, 2048, 2048]}
    np.save(tmp_path / "mimi.npy", np.array([[1, 2, 3], [2047, 0, 5]]))
    lines = [{"segments": [{"text": "hi"}, {"codes": "mimi.npy"}], "targets": ["audio"], "codec": mimi}]
    report = dataset.BuildReport()
    examples, codec = dataset.manifest_examples(_write(tmp_path, lines), None, 0.0, report, False)
    dataset.build(examples, tmp_path / "ds", codec, report=report)
    ds = dataset.open_dataset(tmp_path / "ds")
    assert ds.codebook_sizes == (2048, 2048, 2048) and ds.meta["codec"]["frame_rate"] == 12.5
    assert dataset.decode_record(ds.source("train")[0], 3)["segments"][1]["audio"].tolist() == [[1, 2, 3], [2047, 0, 5]]
    with pytest.raises(ValueError, match="decode them with the original mimi"):
        ds.codec().decode(np.zeros((2, 3), np.int32))


def _bad_cases(tmp_path):
    _media(tmp_path)
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 20)
    (tmp_path / "noise.wav").write_bytes(b"RIFF not really a wave file")
    write_wav(tmp_path / "empty.wav", np.zeros(0, np.float32), 16000)
    np.save(tmp_path / "range.npy", np.array([[1, 2], [64, 3]]))
    np.save(tmp_path / "three.npy", np.zeros((4, 3), np.int64))
    return [  # (line, expected message part)
        ({"segments": [{"image": "corrupt.png"}, {"text": "x"}], "targets": ["text"]}, "cannot decode image"),
        ({"segments": [{"image": "missing.png"}, {"text": "x"}], "targets": ["text"]}, "image file not found"),
        ({"segments": [{"audio": "noise.wav"}, {"text": "x"}], "targets": ["text"]}, "noise.wav"),
        ({"segments": [{"audio": "empty.wav"}, {"text": "x"}], "targets": ["text"]}, "empty"),
        ({"segments": [{"codes": "range.npy"}], "targets": ["audio"], "codec": TONE}, "code 64 at frame 1, codebook 0"),
        ({"segments": [{"codes": "three.npy"}], "targets": ["audio"], "codec": TONE}, "2 codebooks"),
        ({"segments": [], "targets": ["text"]}, "empty example"),
        ({"segments": [{"text": "x", "colour": "red"}], "targets": ["text"]}, "unknown field(s) ['colour']"),
        ({"segments": [{"image": "wide.png"}], "targets": ["text"]}, "nothing to learn"),
        ("{\"segments\": [", "not valid JSON"),
    ]


def test_each_bad_input_names_its_line_and_reason(tmp_path):
    for line, message in _bad_cases(tmp_path):
        manifest = _write(tmp_path, GOOD[:1] + [line], name="bad.jsonl")
        with pytest.raises(ManifestError) as error:
            _build(manifest, tmp_path / "out")
        assert f"bad.jsonl:2: " in str(error.value) and message in str(error.value), str(error.value)
        assert not (tmp_path / "out" / dataset.DATASET_FILE).exists()  # nothing half-built is left as a dataset


def test_skip_bad_reports_every_skipped_line(tmp_path):
    cases = _bad_cases(tmp_path)
    lines = GOOD + [line for line, _ in cases]
    report = _build(_write(tmp_path, lines), tmp_path / "ds", skip_bad=True)
    assert report.counts == {"train": 3, "eval": 1}
    assert [s["line"] for s in report.skipped] == list(range(len(GOOD) + 1, len(lines) + 1))
    for skipped, (_, message) in zip(report.skipped, cases):
        assert message in skipped["reason"]
    meta = dataset.open_dataset(tmp_path / "ds").meta
    assert len(meta["skipped"]) == len(cases) and f"skipped {len(cases)} bad line(s)" in report.summary()


def test_wav_without_codec_and_codes_without_identity_are_refused(tmp_path):
    _media(tmp_path)
    report = dataset.BuildReport()
    with pytest.raises(ManifestError, match=r"manifest.jsonl:1: WAV audio needs a codec"):
        dataset.manifest_examples(_write(tmp_path, [GOOD[1]]), None, 0.0, report, False)
    line = {"segments": [{"codes": "codes.npy"}], "targets": ["audio"]}
    with pytest.raises(ManifestError, match=r"manifest.jsonl:1: precomputed codes need the codec's identity"):
        dataset.manifest_examples(_write(tmp_path, [line]), None, 0.0, report, False)
    other = dict(GOOD[3], codec={"name": "dac", "frame_rate": 86, "codebook_sizes": [1024] * 2})
    with pytest.raises(ManifestError, match="one dataset holds one codec"):
        _build(_write(tmp_path, [other]), tmp_path / "ds")


def test_existing_dataset_is_not_overwritten_and_unfinished_one_is_named(tmp_path):
    _media(tmp_path)
    manifest = _write(tmp_path, GOOD)
    _build(manifest, tmp_path / "ds")
    with pytest.raises(dataset.DatasetError, match="--overwrite"):
        _build(manifest, tmp_path / "ds")
    (tmp_path / "half").mkdir()
    with pytest.raises(dataset.DatasetError, match="did not finish"):
        dataset.open_dataset(tmp_path / "half")


def test_hash_split_is_stable_and_roughly_the_fraction(tmp_path):
    from omni.data.manifest import split_of

    lines = [{"id": f"ex{i}", "segments": [{"text": "x"}]} for i in range(2000)]
    splits = [split_of(line, i, 0.1) for i, line in enumerate(lines)]
    assert splits == [split_of(line, i + 7, 0.1) for i, line in enumerate(lines)]  # not the line number
    assert 150 < splits.count("eval") < 250


def test_an_example_over_the_position_limit_is_refused(tmp_path, monkeypatch):
    _media(tmp_path)  # codes.npy: 10 frames x 2 codebooks = 20 positions, the text 2 more
    monkeypatch.setattr(dataset, "MAX_EXAMPLE_POSITIONS", 21)
    line = {"segments": [{"text": "hi", "target": False}, {"codes": "codes.npy"}], "targets": ["audio"], "codec": TONE}
    with pytest.raises(ManifestError, match=r"manifest.jsonl:2: example has 22 text bytes, audio and image codes, more "
                                            r"than the limit of 21 per example"):
        _build(_write(tmp_path, GOOD[:1] + [line]), tmp_path / "ds")


def test_lines_end_at_cr_too_and_a_byte_order_mark_is_ignored(tmp_path):
    from omni.data.manifest import read_lines

    path = tmp_path / "m.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + b"\r\n".join([json.dumps(GOOD[0]).encode(), b"", b"[1]\r{\"x\": 1}"]) + b"\n")
    lines = read_lines(path)
    assert [n for n, _ in lines] == [1, 3, 4] and lines[0][1] == GOOD[0]
    assert "must be a JSON object" in str(lines[1][1]) and lines[2][1] == {"x": 1}


def test_malformed_codec_and_lone_surrogates_are_line_errors_that_skip_bad_skips(tmp_path):
    _media(tmp_path)
    bad = [({"segments": [{"codes": "codes.npy"}], "targets": ["audio"],
             "codec": {"name": "x", "frame_rate": "fast", "codebook_sizes": [4]}}, "frame_rate is 'fast'"),
           ({"segments": [{"text": "caf\ud800"}], "targets": ["text"]}, "is not valid Unicode"),
           ({"id": "\udc80", "segments": [{"text": "x"}], "targets": ["text"]}, "is not valid Unicode")]
    for line, message in bad:
        with pytest.raises(ManifestError, match=rf"manifest.jsonl:2: .*{message}"):
            _build(_write(tmp_path, GOOD[:1] + [line]), tmp_path / "ds")
    report = _build(_write(tmp_path, GOOD + [line for line, _ in bad]), tmp_path / "ds", skip_bad=True)
    assert [s["line"] for s in report.skipped] == [5, 6, 7] and report.counts == {"train": 3, "eval": 1}


def test_check_out_refuses_what_it_must_not_replace(tmp_path):
    _media(tmp_path)
    manifest = _write(tmp_path, GOOD)
    _build(manifest, tmp_path / "ds")
    dataset.check_out(tmp_path / "ds", overwrite=True)  # a dataset, --overwrite: fine
    dataset.check_out(tmp_path / "new", overwrite=False)  # does not exist yet: fine
    (tmp_path / "ds" / "notes.txt").write_text("mine")
    with pytest.raises(dataset.DatasetError, match=r"also 1 file\(s\) a build did not write \(notes.txt\)"):
        dataset.check_out(tmp_path / "ds", overwrite=True)
    with pytest.raises(dataset.DatasetError, match="is a file, not a folder"):
        dataset.check_out(manifest, overwrite=True)
    (tmp_path / "half" / "tfds.incomplete").mkdir(parents=True)  # an unfinished build: building again finishes it
    dataset.check_out(tmp_path / "half", overwrite=False)


def test_a_build_clears_what_killed_builds_of_the_same_out_left_on_this_host(tmp_path):
    import os
    import subprocess
    import sys

    _media(tmp_path)
    manifest = _write(tmp_path, GOOD)
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # a pid that no longer runs: a build killed outright
    host = storage.host_name()
    dead = [tmp_path / f".ds.omni-build-{host}-{gone.pid}", tmp_path / f".ds.omni-old-{host}-{gone.pid}"]
    alive = tmp_path / f".ds.omni-build-{host}-{os.getppid()}"  # a running process: maybe a build in progress
    elsewhere = tmp_path / f".ds.omni-build-another-host-{gone.pid}"  # another host's: its pids are not ours
    user = tmp_path / ".ds.omni-build-notes"  # not a name omni gives its folders
    for folder in dead + [alive, elsewhere, user]:
        folder.mkdir()
        (folder / "partial").write_text("x")
    _build(manifest, tmp_path / "ds")
    assert not any(folder.exists() for folder in dead)
    assert alive.exists() and elsewhere.exists() and user.exists()
    assert dataset.open_dataset(tmp_path / "ds").codebook_sizes


# ------------------------------------------------------------------------------------------------ image codes

VQ = {"name": "vqgan-f16", "codebook_sizes": [1024, 16]}


def _image_code_files(tmp_path):
    _media(tmp_path)
    np.save(tmp_path / "vq.npy", np.array([[[1, 2], [1023, 15]], [[0, 0], [5, 6]]]))  # [rows, cols, K]
    np.save(tmp_path / "vq_range.npy", np.array([[[1, 2], [1024, 3]]]))
    np.save(tmp_path / "vq_2d.npy", np.zeros((4, 2), np.int64))
    np.save(tmp_path / "vq_float.npy", np.zeros((1, 1, 2), np.float32))


def test_precomputed_image_codes_define_the_image_tokenizer_and_read_back(tmp_path):
    _image_code_files(tmp_path)
    lines = [{"segments": [{"text": "a cat", "target": False}, {"image_codes": "vq.npy"}], "targets": ["image"],
              "image_tokenizer": VQ},
             {"segments": [{"image_codes": "vq.npy"}, {"text": "a cat"}], "targets": ["text"]},
             GOOD[0]]
    report = _build(_write(tmp_path, lines), tmp_path / "ds")
    assert report.counts == {"train": 3}
    ds = dataset.open_dataset(tmp_path / "ds")
    assert ds.meta["format_version"] == dataset.IMAGE_FORMAT_VERSION
    assert ds.image_codebook_sizes == (1024, 16) and ds.meta["image_tokenizer"]["name"] == "vqgan-f16"
    source = ds.source("train")
    by_id = {e["id"]: e for e in (dataset.decode_record(source[i], 2, 2) for i in range(len(source)))}
    learned = by_id["line1"]["segments"][1]
    assert learned["image_codes"].tolist() == np.load(tmp_path / "vq.npy").tolist() and learned["target"] is True
    assert by_id["line2"]["segments"][0]["image_codes"].shape == (2, 2, 2)
    assert by_id["cap"]["segments"][0]["as"] == "patches"  # an image a line does not learn: patches, as before
    with pytest.raises(ValueError, match="external: omni cannot decode"):
        ds.image_tokenizer().decode(np.zeros((1, 1, 2), np.int32))


def test_a_dataset_without_image_codes_keeps_format_1(tmp_path):
    _media(tmp_path)
    _build(_write(tmp_path, GOOD), tmp_path / "ds")
    ds = dataset.open_dataset(tmp_path / "ds")
    assert ds.meta["format_version"] == 1 and ds.image_codebook_sizes == () and ds.image_tokenizer() is None


def test_bad_image_codes_and_image_targets_name_the_line_and_what_to_do(tmp_path):
    _image_code_files(tmp_path)
    cases = [
        ({"segments": [{"image_codes": "vq_range.npy"}], "targets": ["image"], "image_tokenizer": VQ},
         "image code 1024 at row 0, column 1, codebook 0 is outside [0, 1024)"),
        ({"segments": [{"image_codes": "vq_2d.npy"}], "targets": ["image"], "image_tokenizer": VQ},
         "must be an integer array [rows, cols, codebooks], got int64 [4, 2]"),
        ({"segments": [{"image_codes": "vq_float.npy"}], "targets": ["image"], "image_tokenizer": VQ},
         "must be an integer array [rows, cols, codebooks], got float32"),
        ({"segments": [{"image_codes": "gone.npy"}], "targets": ["image"], "image_tokenizer": VQ},
         "image codes file not found"),
        ({"segments": [{"image_codes": "vq.npy"}], "targets": ["image"],
          "image_tokenizer": {"name": "vq", "codebook_sizes": [16]}}, "one dataset holds one image tokenizer"),
        ({"segments": [{"image_codes": "vq.npy"}], "targets": ["image"], "image_tokenizer": {"name": "vq"}},
         "\"image_tokenizer\" must be {"),
        ({"segments": [{"image": "wide.png", "as": "patches"}], "targets": ["image"]},
         "an image entering as patches is input only"),
        ({"segments": [{"image": "wide.png", "as": "pixels"}], "targets": ["text"]}, "\"as\" must be one of"),
        ({"segments": [{"text": "x", "as": "codes"}], "targets": ["text"]}, "\"as\" goes on image segments only"),
        ({"segments": [{"text": "draw", "target": False}, {"image": "wide.png"}], "targets": ["image"]},
         "image tokenizer 'vqgan-f16' is external and cannot encode pixels; give this image's codes as an "
         "\"image_codes\" segment"),
    ]
    good = {"segments": [{"image_codes": "vq.npy"}], "targets": ["image"], "image_tokenizer": VQ}
    for line, message in cases:
        manifest = _write(tmp_path, [good, line], name="bad.jsonl")
        with pytest.raises(ManifestError) as error:
            _build(manifest, tmp_path / "out")
        assert "bad.jsonl:2: " in str(error.value) and message in str(error.value), str(error.value)
    draw = {"segments": [{"text": "draw", "target": False}, {"image": "wide.png"}], "targets": ["image"]}
    with pytest.raises(ManifestError, match=r"manifest.jsonl:1: segment 1: an image entering as codes needs an "
                                            r"image tokenizer: pass --image-tokenizer"):
        _build(_write(tmp_path, [draw]), tmp_path / "o")
    with pytest.raises(ManifestError, match=r"manifest.jsonl:1: image_codes need the image tokenizer's identity"):
        _build(_write(tmp_path, [{"segments": [{"image_codes": "vq.npy"}], "targets": ["image"]}]), tmp_path / "o")


def test_a_dataset_or_tokenizer_rebuilt_at_the_same_path_is_seen_in_the_same_process(tmp_path, capsys):
    """pipeline.*_for reuse what they opened until it is written again (the key holds the file's stamp): a
    rebuilt dataset came back stale from an lru_cache keyed by its path alone."""
    import json as json_lib

    from omni import cli
    from omni.config import Config
    from omni.data import pipeline
    from omni.data.text_tokenizer import train_bpe

    def build(n):
        manifest = tmp_path / "m.jsonl"
        manifest.write_text("".join(json_lib.dumps({"segments": [{"text": f"words number {i}"}], "targets": ["text"],
                                                    "split": "eval" if i % 4 == 0 else "train"}) + "\n"
                                    for i in range(n)))
        assert cli.main(["data", "build", "--manifest", str(manifest), "--out", str(tmp_path / "ds"),
                         "--overwrite", "--no-progress"]) == 0

    cfg = Config()
    cfg.data.dataset = str(tmp_path / "ds")
    build(8)
    first = pipeline.dataset_for(cfg)
    assert first.meta["counts"] == {"train": 6, "eval": 2} and pipeline.dataset_for(cfg) is first  # reused
    build(12)
    assert pipeline.dataset_for(cfg).meta["counts"] == {"train": 9, "eval": 3}

    texts = [f"some text {i} more words" for i in range(50)]
    train_bpe(texts, 300, tmp_path / "tok")
    cfg.data.tokenizer = str(tmp_path / "tok")
    assert pipeline.tokenizer_for(cfg).vocab_size == 300 and pipeline.vocab_for(cfg).text_size == 300
    train_bpe(texts, 280, tmp_path / "tok")
    assert pipeline.tokenizer_for(cfg).vocab_size == 280 and pipeline.vocab_for(cfg).text_size == 280
