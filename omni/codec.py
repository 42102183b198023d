"""Audio codecs: the `AudioCodec` interface and `ToneCodec`, a small parametric codec that needs no training.

A codec turns a mono waveform into discrete codes [frames, codebooks] at a fixed frame rate and back. omni
only needs what the interface states; pretrained codecs (EnCodec, Mimi, DAC...) plug in as precomputed codes.

ToneCodec describes each 40 ms frame by two codes:
    codebook 0 (64 codes): the dominant pitch in semitones above C2 (65.4 Hz), 1..63; 0 = silence
    codebook 1 (16 codes): loudness, RMS level in 4 dB steps from -60 dBFS
and decodes by phase-continuous sine synthesis. It is exact enough for the demo corpus's tone melodies (the
pitch of every note survives a round trip) and honest about what it is: not a speech codec.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np


class AudioCodec(Protocol):
    name: str
    sample_rate: int
    frame_rate: float
    codebook_sizes: tuple[int, ...]

    def encode(self, wave: np.ndarray) -> np.ndarray:
        """float32 [samples] at sample_rate -> int32 codes [frames, codebooks]."""

    def decode(self, codes: np.ndarray) -> np.ndarray:
        """int32 codes [frames, codebooks] -> float32 [samples] at sample_rate."""


class ToneCodec:
    name = "tone-v1"
    sample_rate = 16_000
    hop = 640  # samples per frame: 25 frames/s
    frame_rate = sample_rate / hop
    codebook_sizes = (64, 16)
    base_hz = 65.406  # C2
    silence_db = -60.0
    db_step = 4.0

    def encode(self, wave: np.ndarray) -> np.ndarray:
        wave = np.asarray(wave, np.float32)
        if wave.ndim != 1:
            raise ValueError(f"ToneCodec encodes mono audio [samples]; got shape {wave.shape}")
        frames = len(wave) // self.hop
        if frames == 0:
            raise ValueError(f"audio of {len(wave)} samples is shorter than one {self.hop}-sample frame")
        x = wave[: frames * self.hop].reshape(frames, self.hop)
        rms = np.sqrt(np.mean(x**2, axis=1) + 1e-12)
        db = 20 * np.log10(rms)
        level = np.clip(np.floor((db - self.silence_db) / self.db_step), 0, self.codebook_sizes[1] - 1)
        spectrum = np.abs(np.fft.rfft(x * np.hanning(self.hop)[None, :], n=4 * self.hop, axis=1))
        freqs = np.fft.rfftfreq(4 * self.hop, 1.0 / self.sample_rate)
        peak_hz = freqs[np.argmax(spectrum[:, 1:], axis=1) + 1]
        semitone = np.round(12 * np.log2(np.maximum(peak_hz, 1.0) / self.base_hz))
        pitch = np.clip(semitone, 0, self.codebook_sizes[0] - 2) + 1
        pitch = np.where(db < self.silence_db + self.db_step, 0, pitch)
        return np.stack([pitch, level], axis=1).astype(np.int32)

    def decode(self, codes: np.ndarray) -> np.ndarray:
        codes = np.asarray(codes)
        if codes.ndim != 2 or codes.shape[1] != 2:
            raise ValueError(f"ToneCodec decodes codes [frames, 2]; got shape {codes.shape}")
        pitch, level = codes[:, 0], codes[:, 1]
        hz = np.where(pitch > 0, self.base_hz * 2.0 ** ((pitch - 1) / 12.0), 0.0)
        amp = np.where(pitch > 0, 10 ** ((self.silence_db + (level + 0.5) * self.db_step) / 20) * np.sqrt(2), 0.0)
        hz_per_sample = np.repeat(hz, self.hop)
        amp_per_sample = np.repeat(amp, self.hop)
        phase = 2 * np.pi * np.cumsum(hz_per_sample) / self.sample_rate
        return (amp_per_sample * np.sin(phase)).astype(np.float32)

    @classmethod
    def note_code(cls, hz: float) -> int:
        """The pitch code a pure tone of `hz` gets."""
        return int(np.clip(np.round(12 * np.log2(hz / cls.base_hz)), 0, cls.codebook_sizes[0] - 2) + 1)


CODECS = {ToneCodec.name: ToneCodec}
