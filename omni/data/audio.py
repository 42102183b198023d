"""Offline audio I/O: WAV files in and out, resampling, and `load_audio` for feeding a codec.

Everything here works on mono float32 waveforms in [-1, 1]. Only WAV is read (scipy.io.wavfile): PCM
8/16/24/32-bit and float. Other formats are converted once, outside omni, e.g.
    ffmpeg -i speech.mp3 -ac 1 -ar 16000 speech.wav
"""

from __future__ import annotations

import io
import math
import os
import struct
import warnings

import numpy as np
import scipy.io.wavfile
import scipy.signal

from omni import storage
from omni.errors import AudioError

CONVERT_HINT = "convert it to WAV first, e.g. `ffmpeg -i <input> -ac 1 <output>.wav`"




def read_wav(path: str | os.PathLike) -> tuple[np.ndarray, int]:
    """A WAV file -> (float32 [samples] mono in [-1, 1], sample_rate).

    Integer PCM is scaled by its full-scale value, so int16 32767 reads as ~1.0; several channels are
    averaged to mono. Float files are clipped to [-1, 1], their nominal full scale.
    """
    location = storage.path(path)
    path = str(location)
    try:
        raw = location.read_bytes()
    except FileNotFoundError:
        raise AudioError(f"audio file {path} does not exist; check the path") from None
    except IsADirectoryError:
        raise AudioError(f"audio file {path} is a folder, not a WAV file; check the path") from None
    except OSError as e:
        raise AudioError(f"cannot read audio file {path}: {e.strerror or e}") from None
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", scipy.io.wavfile.WavFileWarning)
            sample_rate, data = scipy.io.wavfile.read(io.BytesIO(raw))
    # scipy reports a bad header as ValueError, a truncated one as struct.error or EOFError
    except (ValueError, OSError, EOFError, struct.error) as e:
        raise AudioError(f"could not read {path} as a WAV file ({e}); if it is another format, "
                         f"{CONVERT_HINT}") from e
    for warning in caught:  # a data chunk cut short reads as fewer samples, with only a warning from scipy
        if "EOF prematurely" in str(warning.message):
            raise AudioError(f"audio file {path} is truncated ({warning.message}); re-export or re-copy it")
    wave = _to_float(data, path)
    if wave.ndim == 2:
        wave = wave.mean(axis=1)  # [samples, channels] -> mono
    if wave.size == 0:
        raise AudioError(f"audio file {path} has no samples; remove it from the inputs or re-export it")
    if not np.all(np.isfinite(wave)):
        raise AudioError(f"audio file {path} contains NaN or infinite samples; re-export it from the source")
    return np.clip(wave, -1.0, 1.0).astype(np.float32), int(sample_rate)


def _to_float(data: np.ndarray, path: str) -> np.ndarray:
    """PCM samples of any WAV dtype -> float64 with full scale at 1.0."""
    if data.dtype == np.uint8:  # 8-bit WAV is unsigned, silence at 128
        return (data.astype(np.float64) - 128.0) / 128.0
    if np.issubdtype(data.dtype, np.signedinteger):
        # 24-bit files come back from scipy as int32 with the samples in the high bytes, so this covers them
        return data.astype(np.float64) / float(2 ** (8 * data.dtype.itemsize - 1))
    if np.issubdtype(data.dtype, np.floating):
        return data.astype(np.float64)
    raise AudioError(f"audio file {path} has samples of type {data.dtype}, which omni does not read; {CONVERT_HINT}")


def write_wav(path: str | os.PathLike, wave: np.ndarray, sample_rate: int) -> None:
    """float [samples] (or [samples, channels]) in [-1, 1] -> 16-bit PCM WAV; louder samples are clipped,
    NaNs written as silence."""
    wave = np.asarray(wave, np.float64)
    if wave.ndim not in (1, 2):
        raise ValueError(f"write_wav takes [samples] or [samples, channels]; got shape {wave.shape}")
    if int(sample_rate) <= 0:
        raise ValueError(f"sample_rate must be positive; got {sample_rate}")
    # the inverse of read_wav's scaling (1/32768), so a round trip only rounds; +1.0 itself clips to 32767
    pcm = np.clip(np.round(np.nan_to_num(wave) * 32768), -32768, 32767).astype(np.int16)
    out = io.BytesIO()
    scipy.io.wavfile.write(out, int(sample_rate), pcm)
    storage.write_bytes(path, out.getvalue())  # whole or not at all, on disk or a bucket


def resample(wave: np.ndarray, from_rate: int, to_rate: int) -> np.ndarray:
    """float32 [samples] at from_rate -> float32 [ceil(samples * to_rate / from_rate)] at to_rate.

    Polyphase filtering by the exact rational ratio (e.g. 44100 -> 16000 is up 160, down 441), which
    includes the anti-aliasing low-pass; equal rates return the input unchanged.
    """
    wave = np.asarray(wave, np.float32)
    from_rate, to_rate = int(from_rate), int(to_rate)
    if from_rate <= 0 or to_rate <= 0:
        raise ValueError(f"sample rates must be positive; got {from_rate} -> {to_rate}")
    if from_rate == to_rate:
        return wave
    g = math.gcd(from_rate, to_rate)
    return scipy.signal.resample_poly(wave, to_rate // g, from_rate // g).astype(np.float32)


def load_audio(path: str | os.PathLike, sample_rate: int) -> np.ndarray:
    """A WAV file -> float32 [samples] mono at `sample_rate` (a codec's rate), resampled if needed."""
    wave, rate = read_wav(path)
    return resample(wave, rate, sample_rate)
