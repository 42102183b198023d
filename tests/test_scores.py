"""Task scores against values worked out by hand."""

import math

import numpy as np
import pytest

from omni.data.codec import ToneCodec
from omni.tools import scores


def test_exact_match_and_character_and_word_error_rates():
    assert scores.exact_match(["a red circle", "a blue"], ["a red circle", "a blue square"]) == 0.5
    # "abed" vs "abcd": 1 substitution; "" vs "xy": 2 deletions -> 3 edits over 4 + 2 truth characters
    assert scores.cer(["abed", ""], ["abcd", "xy"]) == pytest.approx(3 / 6)
    assert scores.cer(["abcde"], ["abcd"]) == pytest.approx(1 / 4)  # one insertion
    assert scores.cer(["abcdefgh"], ["ab"]) == pytest.approx(6 / 2)  # can exceed 1
    # "the cat sat" vs "the dog sat down": 1 substitution + 1 deletion over 4 words; "a c" vs "a b c": 1 deletion
    assert scores.wer(["the cat sat", "a c"], ["the dog sat down", "a b c"]) == pytest.approx(3 / 7)
    assert scores.wer(["a b"], ["a b"]) == 0.0


def test_bleu_and_chrf_on_sentences():
    # 1- to 4-gram precisions 5/6, 3/5, 2/4, 1/3, same length (no brevity penalty): (1/12) ** (1/4)
    assert scores.bleu(["the cat sat on the mat"], ["the cat sat on a mat"]) == pytest.approx(
        100 * (1 / 12) ** 0.25, abs=1e-6)
    assert scores.bleu(["a b c d"], ["a b c d"]) == pytest.approx(100)
    assert scores.chrf(["a red circle"], ["a red circle"]) == pytest.approx(100)
    assert scores.chrf(["xyz"], ["abc"]) == 0.0
    sentences = scores.text_scores(["a red circle at the top", "x"], ["a red circle at the top", "a b c d"])
    assert set(sentences) == {"n", "exact", "cer", "wer", "bleu", "chrf"} and sentences["exact"] == 0.5
    words = scores.text_scores(["cat", "dog"], ["cat", "cow"])  # one-word truths: no BLEU / chrF
    assert words == {"n": 2, "exact": 0.5, "cer": pytest.approx(2 / 6), "wer": pytest.approx(1 / 2)}
    with pytest.raises(ValueError, match="1 answers for 2 truths"):
        scores.text_scores(["a"], ["a", "b"])


def test_code_accuracy_per_codebook_counts_missing_frames_as_misses():
    answers = [np.array([[1, 2], [3, 4]]), np.array([[9, 9], [9, 9], [9, 9], [9, 9]])]
    truths = [np.array([[1, 2], [3, 5], [6, 7]]), np.array([[9, 0]])]
    # codebook 0: 2 of 3 frames, then 1 of 1 (extra answer frames not counted): 3 / 4; codebook 1: 1 / 4
    assert scores.code_accuracy(answers, truths) == [0.75, 0.25]
    result = scores.audio_scores(answers, truths)
    assert result == {"n": 2, "code_acc": [0.75, 0.25], "code_acc_mean": 0.5, "frames_diff": 2.0}


def test_mel_distance_is_zero_for_the_same_audio_and_log_4_for_twice_the_amplitude():
    rate = 16000
    truth = 0.2 * np.random.default_rng(0).normal(size=rate // 2)  # white noise: every mel bin far above the floor
    assert scores.mel_distance(truth, truth, rate) == 0.0
    assert scores.mel_distance(2 * truth, truth, rate) == pytest.approx(math.log(4), abs=1e-4)  # power x 4
    # an answer twice as long is cut to the truth; a short one padded with silence (a large distance)
    assert scores.mel_distance(np.concatenate([truth, truth]), truth, rate) == 0.0
    assert scores.mel_distance(truth[: rate // 4], truth, rate) > 5


def test_audio_scores_decode_through_the_codec():
    codec = ToneCodec()
    melody = np.array([[40, 10]] * 5 + [[44, 10]] * 5)
    same = scores.audio_scores([melody], [melody], codec)
    assert same["mel_l1"] == 0.0 and same["code_acc"] == [1.0, 1.0]
    louder = scores.audio_scores([melody + [0, 5]], [melody], codec)  # 5 levels of 4 dB = 20 dB: power x 100
    assert louder["code_acc"] == [1.0, 0.0] and louder["mel_l1"] > 1.0
    assert scores.audio_scores([np.zeros((0, 2), np.int64)], [melody], codec)["code_acc"] == [0.0, 0.0]
