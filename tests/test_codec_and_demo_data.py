import numpy as np
import pytest

from omni.data.codec import ToneCodec
from omni.demo import corpus as demo_data


def test_tone_codec_keeps_every_note_pitch_through_a_round_trip():
    codec = ToneCodec()
    rng = np.random.default_rng(0)
    notes = list(demo_data.NOTES)
    wave = demo_data.synth_melody(rng, notes, "loud", codec.sample_rate)
    codes = codec.encode(wave)
    frames_per_note = int(demo_data.NOTE_SECONDS * codec.frame_rate)
    assert codes.shape == (len(notes) * frames_per_note, 2)
    expected = np.repeat([ToneCodec.note_code(demo_data.NOTES[n]) for n in notes], frames_per_note)
    np.testing.assert_array_equal(codes[:, 0], expected)
    assert len(set(expected)) == len(notes)  # every demo note has its own code
    again = codec.encode(codec.decode(codes))
    np.testing.assert_array_equal(again[:, 0], codes[:, 0])
    assert np.all(np.abs(again[:, 1] - codes[:, 1]) <= 1)


def test_tone_codec_silence_and_bad_input():
    codec = ToneCodec()
    assert np.all(codec.encode(np.zeros(codec.hop * 3, np.float32))[:, 0] == 0)
    with pytest.raises(ValueError, match="shorter than one"):
        codec.encode(np.zeros(10, np.float32))
    with pytest.raises(ValueError, match="mono"):
        codec.encode(np.zeros((2, 1000), np.float32))


def test_demo_splits_are_deterministic_disjoint_and_balanced():
    a = demo_data.make_split("train", 30, 32, seed=0)
    b = demo_data.make_split("train", 30, 32, seed=0)
    e = demo_data.make_split("eval", 30, 32, seed=0)
    assert all(np.array_equal(x["segments"][0].get("image", 0), y["segments"][0].get("image", 0)) for x, y in zip(a, b))
    assert [x["meta"]["task"] for x in a].count("caption") == 10
    images_a = {x["segments"][0]["image"].tobytes() for x in a if x["meta"]["task"] == "caption"}
    images_e = {x["segments"][0]["image"].tobytes() for x in e if x["meta"]["task"] == "caption"}
    assert not images_a & images_e


def test_caption_matches_the_drawn_scene():
    rng = np.random.default_rng(1)
    image = demo_data.draw_scene(rng, 32, "square", "red", "top left")
    top_left, bottom_right = image[4:12, 4:12].reshape(-1, 3).mean(0), image[22:30, 22:30].reshape(-1, 3).mean(0)
    assert top_left[0] > 150 and top_left[1] < 100  # red where the caption says
    assert bottom_right.max() < 80  # dark background elsewhere
    assert demo_data.parse_caption("a red square at the top left") == {"shape": "square", "colour": "red",
                                                                       "place": "top left"}
