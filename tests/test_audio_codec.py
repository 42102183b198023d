"""omni.data.audio (WAV in/out, resampling) and the codecs beyond ToneCodec: MelRVQCodec, PrecomputedCodec, load_codec."""

import json

import numpy as np
import pytest
import scipy.io.wavfile

from omni.data.audio import load_audio, read_wav, resample, write_wav
from omni.data.codec import (MelRVQCodec, PrecomputedCodec, ToneCodec, codec_identity, fit_codec_on_files, load_codec,
                             log_mel)
from omni.errors import AudioError, CodecError

SR = 16_000


def tone(hz: float, seconds: float = 1.0, amp: float = 0.5, sr: int = SR) -> np.ndarray:
    t = np.arange(int(sr * seconds)) / sr
    return (amp * np.sin(2 * np.pi * hz * t)).astype(np.float32)


def chirp(f0: float, f1: float, seconds: float = 1.0) -> np.ndarray:
    t = np.arange(int(SR * seconds)) / SR
    return (0.4 * np.sin(2 * np.pi * (f0 * t + (f1 - f0) * t**2 / (2 * seconds)))).astype(np.float32)


def peak_hz(wave: np.ndarray, sr: int) -> float:
    spectrum = np.abs(np.fft.rfft(wave * np.hanning(len(wave))))
    return float(np.fft.rfftfreq(len(wave), 1.0 / sr)[np.argmax(spectrum)])


def training_waves() -> list[np.ndarray]:
    """8 s of tones at several pitches and loudnesses, two chirps and noise: 400 frames."""
    rng = np.random.default_rng(0)
    tones = [tone(hz, amp=amp) for hz, amp in ((220, 0.5), (330, 0.2), (440, 0.5), (660, 0.05), (880, 0.3))]
    return tones + [chirp(200, 2000), chirp(3000, 500), rng.normal(0, 0.1, SR).astype(np.float32)]


@pytest.fixture(scope="module")
def mel_codec():
    return MelRVQCodec.fit(training_waves(), codebooks=4, codebook_size=32, iters=10, seed=0)


# ------------------------------------------------------------------------------------------------- audio I/O

def test_wav_round_trip_within_int16_resolution(tmp_path):
    wave = tone(440, 0.25) * 1.5  # peaks above full scale: written clipped
    write_wav(tmp_path / "a.wav", wave, SR)
    back, rate = read_wav(tmp_path / "a.wav")
    assert rate == SR and back.dtype == np.float32 and back.shape == wave.shape
    np.testing.assert_allclose(back, np.clip(wave, -1, 1), atol=1.0 / 32768 + 1e-7)


@pytest.mark.parametrize("dtype,full_scale,offset", [(np.int16, 32767, 0), (np.int32, 2**31 - 1, 0),
                                                      (np.uint8, 127, 128), (np.float32, 1.0, 0)])
def test_every_pcm_type_reads_to_the_same_scale(tmp_path, dtype, full_scale, offset):
    wave = tone(300, 0.1, amp=0.8)
    pcm = wave if dtype == np.float32 else np.round(wave * full_scale) + offset
    scipy.io.wavfile.write(tmp_path / "x.wav", 8000, pcm.astype(dtype))
    back, rate = read_wav(tmp_path / "x.wav")
    assert rate == 8000
    np.testing.assert_allclose(back, wave, atol=2.0 / 128)


def test_stereo_is_averaged_to_mono(tmp_path):
    left, right = tone(440, 0.1, amp=0.6), tone(660, 0.1, amp=0.2)
    write_wav(tmp_path / "s.wav", np.stack([left, right], axis=1), SR)
    back, _ = read_wav(tmp_path / "s.wav")
    assert back.shape == left.shape
    np.testing.assert_allclose(back, (left + right) / 2, atol=1.0 / 32768)


@pytest.mark.parametrize("from_rate,to_rate", [(44_100, 16_000), (8_000, 16_000), (48_000, 24_000)])
def test_resample_keeps_length_ratio_and_pitch(from_rate, to_rate):
    wave = tone(440, 1.0, sr=from_rate)
    out = resample(wave, from_rate, to_rate)
    assert out.dtype == np.float32 and len(out) == int(np.ceil(len(wave) * to_rate / from_rate))
    assert abs(peak_hz(out, to_rate) - 440) <= 2.0
    assert resample(wave, from_rate, from_rate) is wave


def test_load_audio_resamples_to_the_codec_rate(tmp_path):
    write_wav(tmp_path / "cd.wav", tone(440, 0.5, sr=44_100), 44_100)
    wave = load_audio(tmp_path / "cd.wav", SR)
    assert len(wave) == SR // 2 and abs(peak_hz(wave, SR) - 440) <= 2.0


def test_audio_errors_name_the_file(tmp_path):
    missing = tmp_path / "nope.wav"
    with pytest.raises(AudioError, match=f"{missing}.*does not exist"):
        read_wav(missing)
    corrupt = tmp_path / "corrupt.wav"
    corrupt.write_bytes(b"ID3 this is an mp3, honest" * 4)
    with pytest.raises(AudioError, match=f"could not read {corrupt}.*ffmpeg"):
        read_wav(corrupt)
    truncated = tmp_path / "truncated.wav"
    truncated.write_bytes(b"RIFF\x00\x00")
    with pytest.raises(AudioError, match=f"{truncated}"):
        read_wav(truncated)
    whole = tmp_path / "whole.wav"
    scipy.io.wavfile.write(whole, SR, (np.sin(np.arange(SR) / 5) * 3000).astype(np.int16))
    cut = tmp_path / "cut.wav"  # a copy stopped half-way: the header promises twice the samples there are
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    with pytest.raises(AudioError, match=f"audio file {cut} is truncated .*Reached EOF prematurely"):
        read_wav(cut)
    empty = tmp_path / "empty.wav"
    scipy.io.wavfile.write(empty, SR, np.zeros(0, np.int16))
    with pytest.raises(AudioError, match=f"{empty} has no samples"):
        read_wav(empty)
    nan = tmp_path / "nan.wav"
    scipy.io.wavfile.write(nan, SR, np.array([0.0, np.nan, 0.5], np.float32))
    with pytest.raises(AudioError, match=f"{nan} contains NaN"):
        read_wav(nan)
    assert issubclass(AudioError, ValueError)


# ----------------------------------------------------------------------------------------------- MelRVQCodec

def test_mel_rvq_identity_and_code_shapes(mel_codec):
    assert mel_codec.name == "mel-rvq-v1" and mel_codec.sample_rate == SR
    assert mel_codec.frame_rate == 50.0 and mel_codec.codebook_sizes == (32,) * 4
    codes = mel_codec.encode(tone(440, 1.0))
    assert codes.shape == (50, 4) and codes.dtype == np.int32
    assert codes.min() >= 0 and codes.max() < 32
    assert len(mel_codec.encode(np.zeros(SR // 2 + 100, np.float32))) == 25  # a partial frame is dropped
    wave = mel_codec.decode(codes)
    assert wave.dtype == np.float32 and wave.shape == (50 * mel_codec.hop,)


def test_mel_rvq_fit_is_deterministic_per_seed(mel_codec):
    again = MelRVQCodec.fit(training_waves(), codebooks=4, codebook_size=32, iters=10, seed=0)
    np.testing.assert_array_equal(again.codewords, mel_codec.codewords)
    other = MelRVQCodec.fit(training_waves(), codebooks=4, codebook_size=32, iters=10, seed=1)
    assert not np.array_equal(other.codewords, mel_codec.codewords)
    np.testing.assert_array_equal(mel_codec.decode(mel_codec.encode(chirp(300, 900))),
                                  mel_codec.decode(mel_codec.encode(chirp(300, 900))))


def test_mel_rvq_save_load_gives_identical_codes(mel_codec, tmp_path):
    mel_codec.save(tmp_path / "codec")
    config = json.loads((tmp_path / "codec" / "codec.json").read_text())
    assert config["name"] == "mel-rvq-v1" and config["frame_rate"] == 50.0
    assert config["codebook_sizes"] == [32] * 4 and config["n_mels"] == 64 and config["fit"]["seed"] == 0
    loaded = MelRVQCodec.load(tmp_path / "codec")
    for wave in training_waves():
        np.testing.assert_array_equal(loaded.encode(wave), mel_codec.encode(wave))


def test_each_residual_stage_reduces_quantisation_error(mel_codec):
    frames = np.concatenate([mel_codec.features(w) for w in training_waves()])
    codes = np.concatenate([mel_codec.encode(w) for w in training_waves()])
    errors = [np.mean((frames - mel_codec.dequantise(codes[:, :k])) ** 2) for k in range(1, 5)]
    assert all(a > b for a, b in zip(errors, errors[1:])), errors
    assert errors[-1] < 0.5 * errors[0]


def test_mel_rvq_decode_keeps_pitch_loudness_and_spectrum(mel_codec):
    x = tone(440, 1.0)
    y = mel_codec.decode(mel_codec.encode(x))
    assert abs(peak_hz(y, SR) / 440 - 1) < 0.04  # mel bands are ~45 Hz wide here
    assert abs(np.sqrt(np.mean(y**2)) / np.sqrt(np.mean(x**2)) - 1) < 0.2
    target = log_mel(x, SR, mel_codec.n_fft, mel_codec.hop, mel_codec.n_mels)
    error = np.mean((log_mel(y, SR, mel_codec.n_fft, mel_codec.hop, mel_codec.n_mels) - target) ** 2)
    best_constant = np.mean((target - target.mean()) ** 2)  # the best any signal-blind decoder could do
    other_note = np.mean((log_mel(tone(880), SR, mel_codec.n_fft, mel_codec.hop, mel_codec.n_mels) - target) ** 2)
    assert error < 0.25 * best_constant and error < 0.25 * other_note


def test_mel_rvq_errors(mel_codec, tmp_path):
    with pytest.raises(CodecError, match="cannot fit 256 codewords.*smaller codebook_size"):
        MelRVQCodec.fit([tone(440, 1.0)])  # 50 frames
    with pytest.raises(CodecError, match="shorter than one"):
        mel_codec.encode(np.zeros(100, np.float32))
    with pytest.raises(CodecError, match="mono"):
        mel_codec.encode(np.zeros((2, SR), np.float32))
    with pytest.raises(CodecError, match=r"\[frames, 4\]"):
        mel_codec.decode(np.zeros((10, 2), np.int32))
    with pytest.raises(CodecError, match="0..31"):
        mel_codec.decode(np.full((10, 4), 32, np.int32))
    with pytest.raises(CodecError, match="does not exist"):
        MelRVQCodec.load(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CodecError, match="has no codec.json"):
        MelRVQCodec.load(tmp_path / "empty")
    mel_codec.save(tmp_path / "broken")
    (tmp_path / "broken" / "codec.npz").write_bytes(b"not a zip")
    with pytest.raises(CodecError, match="is corrupt.*re-fit"):
        MelRVQCodec.load(tmp_path / "broken")


# -------------------------------------------------------------------------------- other codecs and loading

def test_precomputed_codec_is_identity_only():
    mimi = PrecomputedCodec("mimi", 12.5, [2048] * 8, sample_rate=24_000)
    assert codec_identity(mimi) == {"name": "mimi", "frame_rate": 12.5, "codebook_sizes": [2048] * 8,
                                    "sample_rate": 24_000}
    assert codec_identity(PrecomputedCodec("dac", 86.1, [1024]))["sample_rate"] is None
    with pytest.raises(CodecError, match="precompute the codes.*mimi"):
        mimi.encode(np.zeros(1000, np.float32))
    with pytest.raises(CodecError, match="decode them with the original mimi"):
        mimi.decode(np.zeros((4, 8), np.int32))
    with pytest.raises(CodecError, match="frame_rate must be positive"):
        PrecomputedCodec("x", 0, [16])
    with pytest.raises(CodecError, match="codebook_sizes"):
        PrecomputedCodec("x", 50, [])


def test_load_codec_forms(tmp_path):
    assert isinstance(load_codec("tone"), ToneCodec) and isinstance(load_codec("tone-v1"), ToneCodec)
    assert codec_identity(load_codec("tone")) == {"name": "tone-v1", "frame_rate": 25.0,
                                                  "codebook_sizes": [64, 16], "sample_rate": 16_000}
    paths = []
    for i, hz in enumerate((220, 440, 880)):
        paths.append(tmp_path / f"{i}.wav")
        write_wav(paths[-1], tone(hz, 1.0, sr=22_050), 22_050)  # resampled to 16 kHz on the way in
    fitted = fit_codec_on_files(paths, tmp_path / "mine", codebooks=2, codebook_size=16, iters=5)
    assert fitted.fit_info["frames"] == 150
    for spec in (tmp_path / "mine", str(tmp_path / "mine" / "codec.json")):
        loaded = load_codec(spec)
        assert isinstance(loaded, MelRVQCodec) and codec_identity(loaded) == codec_identity(fitted)
    for spec, why in (("encodec", "not a codec name"), (str(tmp_path), "without codec.json"),
                      (str(paths[0]), "is a file")):
        with pytest.raises(CodecError, match=f"{why}.*Accepted: 'tone'.*codec.json"):
            load_codec(spec)
