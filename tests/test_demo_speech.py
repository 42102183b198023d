"""The spoken-caption demo corpus (espeak-ng): image + caption + speech triples through a fitted MelRVQCodec."""

import pytest

from omni.data import pipeline as data
from omni.data.audio import read_wav
from omni.demo import corpus
from omni.demo import corpus as demo_data
from tests.conftest import tiny_config

pytestmark = pytest.mark.skipif(not demo_data.espeak_available(),
                                reason="espeak-ng is not installed (apt install espeak-ng); the speech demo needs it")


def test_speech_demo_builds_triples_with_a_fitted_codec():
    cfg = tiny_config()
    cfg.data.dataset = "demo-speech"
    cfg.demo.train_examples, cfg.demo.eval_examples = 24, 4
    cfg.data.seq_len = 1024
    ds = data.dataset_for(cfg)
    assert ds.meta["codec"]["name"] == "mel-rvq-v1" and ds.codebook_sizes == (64,) * 4
    examples = data.examples(cfg, "train")
    source = corpus.built_path(cfg).with_name(corpus.built_path(cfg).name + ".source")
    tasks = {e["meta"]["task"] for e in examples}
    assert tasks == set(demo_data.SPEECH_TASKS)
    for e in examples:
        kinds = [next(k for k in ("text", "image", "audio") if k in s) for s in e["segments"]]
        if e["meta"]["task"] == "spoken_caption":
            assert kinds == ["image", "text", "audio"] and e["targets"] == ["text", "audio"]
        else:
            assert kinds == ["audio", "text"] and e["targets"] == ["text"]
        assert e["segments"][kinds.index("text")]["text"] == e["meta"]["answer"]
        frames = e["segments"][kinds.index("audio")]["audio"].shape[0]
        wave, rate = read_wav(source / "speech" / f"{e['id']}.wav")
        assert abs(frames / 50 - len(wave) / rate) < 0.05  # 50 codec frames per second of speech
    batch = next(iter(data.train_dataset(cfg)))
    assert batch["is_target"][batch["modality"] == 3].any()  # spoken captions are learned
