"""Offline audio I/O: WAV files in and out, resampling, and `load_audio` for feeding a codec.

Everything here works on mono float32 waveforms in [-1, 1]. Only WAV is read (scipy.io.wavfile): PCM
8/16/24/32-bit and float. Other formats are converted once, outside omni, e.g.
    ffmpeg -i speech.mp3 -ac 1 -ar 16000 speech.wav

Limits (docs/data.md), checked from the header before the samples are read, so a file past them costs nothing:
one file lasts at most MAX_AUDIO_SECONDS and holds at most MAX_AUDIO_BYTES, at a sample rate from
MIN_SAMPLE_RATE to MAX_SAMPLE_RATE (below it the file cannot be speech or music: its header is wrong). A longer
recording is cut into clips first, e.g. `ffmpeg -i talk.wav -f segment -segment_time 300 -c copy clip%03d.wav`.
"""

from __future__ import annotations

import io
import math
import os
import stat
import struct
import warnings

import numpy as np
import scipy.io.wavfile
import scipy.signal

from omni import storage
from omni.errors import AudioError

CONVERT_HINT = "convert it to WAV first, e.g. `ffmpeg -i <input> -ac 1 <output>.wav`"
MAX_AUDIO_SECONDS = 600            # 10 minutes per file: far more than a training sequence holds
MAX_AUDIO_BYTES = 2**30            # 1 GiB of samples per file (10 minutes of 192 kHz stereo float is 0.9 GB)
MIN_SAMPLE_RATE = 4_000            # Hz: below telephone speech (8 kHz), nothing a codec can learn from
MAX_SAMPLE_RATE = 192_000          # Hz: the highest studio rate in use
_CHUNK = 1 << 20                   # samples converted at a time, so memory stays near the file's size


def check_sample_rate(rate, what: str) -> None:
    """AudioError naming `what` when `rate` cannot be the sample rate of speech or music."""
    if not MIN_SAMPLE_RATE <= rate <= MAX_SAMPLE_RATE:
        raise AudioError(f"{what} has a sample rate of {rate:,} Hz, which cannot be speech or music (omni reads "
                         f"{MIN_SAMPLE_RATE:,} to {MAX_SAMPLE_RATE:,} Hz, omni.data.audio.MIN_SAMPLE_RATE and "
                         "MAX_SAMPLE_RATE); its header is probably wrong: re-export it from the source, e.g. "
                         "`ffmpeg -i <input> -ac 1 -ar 16000 <output>.wav`")


def _clock(seconds: float) -> str:
    whole = int(round(seconds))
    return f"{whole // 3600}:{whole // 60 % 60:02d}:{whole % 60:02d}"


def _check_duration(seconds: float, path: str) -> None:
    if seconds > MAX_AUDIO_SECONDS:
        raise AudioError(f"audio file {path} lasts {_clock(seconds)} ({seconds:,.0f} s), longer than the limit of "
                         f"{MAX_AUDIO_SECONDS:,} s per file (omni.data.audio.MAX_AUDIO_SECONDS); cut it into clips "
                         f"first, e.g. `ffmpeg -i {path} -f segment -segment_time 300 -c copy clip%03d.wav`")


def wav_layout(f, file_size: int) -> "tuple[int, int, int, int] | None":
    """(channels, sample rate, bits per sample, bytes of samples) from a WAV file's header (RIFF, RIFX or RF64),
    read with a few seeks from the open binary file `f`; None when the header is not one this reads (scipy then
    says what is wrong). The data size is what the file really holds when its header claims more."""
    head = f.read(12)
    if len(head) < 12 or head[8:12] != b"WAVE" or head[:4] not in (b"RIFF", b"RIFX", b"RF64"):
        return None
    order = ">" if head[:4] == b"RIFX" else "<"
    channels = rate = bits = ds64 = None
    position = 12
    for _ in range(4096):  # chunks before the samples: fmt, LIST, fact, ds64, ...
        chunk = f.read(8)
        if len(chunk) < 8:
            return None
        kind, size = chunk[:4], struct.unpack(order + "I", chunk[4:])[0]
        position += 8
        if kind == b"ds64":
            body = f.read(min(size, 64))
            if len(body) >= 16:
                ds64 = struct.unpack("<Q", body[8:16])[0]
        elif kind == b"fmt ":
            body = f.read(min(size, 64))
            if len(body) < 16:
                return None
            channels, rate = struct.unpack(order + "HI", body[2:8])
            bits = struct.unpack(order + "H", body[14:16])[0]
        elif kind == b"data":
            if head[:4] == b"RF64" and size == 0xFFFFFFFF and ds64 is not None:
                size = ds64
            if not (channels and rate and bits):
                return None
            return channels, rate, bits, max(0, min(size, file_size - position))
        position += size + (size & 1)
        f.seek(position)
    return None


def read_wav(path: str | os.PathLike) -> tuple[np.ndarray, int]:
    """A WAV file -> (float32 [samples] mono in [-1, 1], sample_rate).

    Integer PCM is scaled by its full-scale value, so int16 32767 reads as ~1.0; several channels are
    averaged to mono. Float files are clipped to [-1, 1], their nominal full scale.
    """
    location = storage.path(path)
    path = str(location)
    try:
        if not storage.is_remote(location):
            mode = os.stat(path).st_mode
            if not stat.S_ISREG(mode) and not stat.S_ISDIR(mode):  # /dev/zero, a pipe: reading would never end
                raise AudioError(f"audio file {path} is not a regular file (a device or a pipe); give a WAV file")
        with location.open("rb") as f:
            size = f.seek(0, os.SEEK_END)
            f.seek(0)
            layout = wav_layout(f, size)
            if layout is not None:
                channels, rate, bits, data_bytes = layout
                check_sample_rate(rate, f"audio file {path}")
                _check_duration(data_bytes / (channels * max(1, bits // 8)) / rate, path)
            if size > MAX_AUDIO_BYTES:
                raise AudioError(f"audio file {path} is {size / 2**20:,.0f} MiB, more than the limit of "
                                 f"{MAX_AUDIO_BYTES / 2**20:,.0f} MiB per file (omni.data.audio.MAX_AUDIO_BYTES); "
                                 f"cut it into clips, or {CONVERT_HINT}")
            f.seek(0)
            raw = f.read()
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
    del raw
    check_sample_rate(int(sample_rate), f"audio file {path}")
    _check_duration(len(data) / int(sample_rate), path)
    if data.size == 0:
        raise AudioError(f"audio file {path} has no samples; remove it from the inputs or re-export it")
    # Converted a chunk at a time: float64 of the whole file would take 4x (int16) its size on top of it.
    wave = np.empty(len(data), np.float32)
    for start in range(0, len(data), _CHUNK):
        chunk = _to_float(data[start:start + _CHUNK], path)
        if chunk.ndim == 2:
            chunk = chunk.mean(axis=1)  # [samples, channels] -> mono
        if not np.all(np.isfinite(chunk)):
            raise AudioError(f"audio file {path} contains NaN or infinite samples; re-export it from the source")
        wave[start:start + _CHUNK] = np.clip(chunk, -1.0, 1.0)
    return wave, int(sample_rate)


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
