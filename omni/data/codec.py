"""Audio codecs: the `AudioCodec` interface and `ToneCodec`, a small parametric codec that needs no training.

A codec turns a mono waveform into discrete codes [frames, codebooks] at a fixed frame rate and back. omni
only needs what the interface states; pretrained codecs (EnCodec, Mimi, DAC...) plug in as precomputed codes.

ToneCodec describes each 40 ms frame by two codes:
    codebook 0 (64 codes): the dominant pitch in semitones above C2 (65.4 Hz), 1..63; 0 = silence
    codebook 1 (16 codes): loudness, RMS level in 4 dB steps from -60 dBFS
and decodes by phase-continuous sine synthesis. It is exact enough for the demo corpus's tone melodies (the
pitch of every note survives a round trip) and honest about what it is: not a speech codec.

MelRVQCodec is the built-in trainable codec for real audio, fitted on the user's own recordings in minutes on a
CPU (numpy only). Each 20 ms frame (hop 320 at 16 kHz: 50 frames/s) becomes a 64-band log-mel vector, which a
residual vector quantiser of 4 k-means codebooks x 256 codewords turns into 4 codes (200 tokens/s); decoding
sums the codewords and inverts the mel spectrum with Griffin-Lim. The round trip keeps pitch, loudness and
spectral envelope but not the phase, so it sounds phasey: good enough to train and listen to a model end to
end, not a replacement for a neural codec.

PrecomputedCodec stands for an external codec (EnCodec, Mimi, DAC...) whose codes users bring precomputed: it
carries the identity (name, frame rate, codebook sizes) that the vocabulary and checkpoints need, nothing more.
"""

from __future__ import annotations

import io
import json
import os
import zipfile
from collections import abc
from typing import Protocol, Sequence

import numpy as np

from omni import storage
from omni.data.audio import load_audio
from omni.data.precomputed import Precomputed
from omni.errors import CodecError
from omni.progress import silent


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




# ---------------------------------------------------------------------------------------------------------
# Log-mel analysis and Griffin-Lim synthesis (numpy only)

LOG_FLOOR = 1e-8  # mel power floor before the log: -80 dB re a full-scale sine, so digital silence stays finite
ENCODE_CHUNK_FRAMES = 4096  # STFT this many frames at a time, so an hour of audio never needs GBs at once


def hz_to_mel(hz):
    return 2595.0 * np.log10(1.0 + np.asarray(hz, np.float64) / 700.0)


def mel_to_hz(mel):
    return 700.0 * (10.0 ** (np.asarray(mel, np.float64) / 2595.0) - 1.0)


def mel_filterbank(sample_rate: int, n_fft: int, n_mels: int) -> np.ndarray:
    """float32 [n_mels, n_fft // 2 + 1]: triangular filters evenly spaced on the HTK mel scale, 0 Hz..Nyquist."""
    freqs = np.fft.rfftfreq(n_fft, 1.0 / sample_rate)
    edges = mel_to_hz(np.linspace(0.0, hz_to_mel(sample_rate / 2), n_mels + 2))
    lo, centre, hi = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    bank = np.maximum(0.0, np.minimum((freqs - lo) / (centre - lo), (hi - freqs) / (hi - centre)))
    empty = np.flatnonzero(bank.sum(axis=1) == 0)
    if empty.size:  # narrower than one FFT bin: the band would always read as silence
        raise CodecError(f"{empty.size} of the {n_mels} mel bands fall between FFT bins at n_fft={n_fft}; "
                         f"use fewer n_mels or a larger n_fft")
    return bank.astype(np.float32)


def mel_to_linear(mel_power: np.ndarray, filterbank: np.ndarray, iters: int = 50) -> np.ndarray:
    """mel power [frames, n_mels] -> a non-negative linear power spectrum [frames, bins] with those band powers.

    There are fewer bands than bins, so many spectra fit; the plain pseudo-inverse rings (its negative lobes,
    cut to zero, leave energy ten bands away: ~10x the log-mel error of this). Instead: spread each band's
    power density over its triangle, which interpolates linearly between band centres, then refine with
    multiplicative non-negative least-squares updates (Lee & Seung), which keep every bin >= 0.
    """
    bank = filterbank.astype(np.float64)
    power = (mel_power / bank.sum(axis=1)) @ bank
    target = mel_power @ bank
    for _ in range(iters):
        power *= target / np.maximum((power @ bank.T) @ bank, 1e-30)
    return power


def _check_framing(hop: int, n_fft: int) -> None:
    if not 0 < hop <= n_fft:
        raise CodecError(f"need 0 < hop <= n_fft; got hop={hop}, n_fft={n_fft}")


def _pad(n_fft: int, hop: int) -> tuple[int, int]:
    """Zeros before/after the signal so that frame t is centred on samples [t * hop, (t + 1) * hop)."""
    left = (n_fft - hop) // 2
    return left, n_fft - hop - left


def stft(wave: np.ndarray, n_fft: int, hop: int) -> np.ndarray:
    """float [samples] -> complex [samples // hop, n_fft // 2 + 1], Hann-windowed, scaled so that a sine of
    amplitude A peaks at about A / 2 whatever n_fft is. A trailing partial frame is dropped, as in ToneCodec."""
    frames = len(wave) // hop
    return _spectrum(np.pad(np.asarray(wave, np.float64)[: frames * hop], _pad(n_fft, hop)), n_fft, hop)


def _spectrum(padded: np.ndarray, n_fft: int, hop: int) -> np.ndarray:
    """The windowed spectra of frames starting every hop samples of an already padded signal."""
    window = np.hanning(n_fft + 1)[:-1]  # periodic Hann: overlap-adds flat
    framed = np.lib.stride_tricks.sliding_window_view(padded, n_fft)[::hop]
    return np.fft.rfft(framed * window, axis=1) / window.sum()


def log_mel(wave: np.ndarray, sample_rate: int, n_fft: int, hop: int, n_mels: int) -> np.ndarray:
    """float [samples] -> natural-log mel power float32 [samples // hop, n_mels] (power floored at LOG_FLOOR)."""
    bank = mel_filterbank(sample_rate, n_fft, n_mels).astype(np.float64)
    frames = len(wave) // hop
    padded = np.pad(np.asarray(wave, np.float64)[: frames * hop], _pad(n_fft, hop))
    out = np.empty((frames, n_mels), np.float32)
    for start in range(0, frames, ENCODE_CHUNK_FRAMES):
        count = min(ENCODE_CHUNK_FRAMES, frames - start)
        # the chunk's samples plus the overhang of its last window: the same frames stft would cut
        spec = _spectrum(padded[start * hop : (start + count - 1) * hop + n_fft], n_fft, hop)
        out[start : start + count] = np.log((np.abs(spec) ** 2) @ bank.T + LOG_FLOOR)
    return out


def istft(spec: np.ndarray, n_fft: int, hop: int) -> np.ndarray:
    """complex [frames, n_fft // 2 + 1] -> float [frames * hop]: the least-squares inverse of `stft`
    (windowed overlap-add divided by the summed squared window)."""
    frames = spec.shape[0]
    window = np.hanning(n_fft + 1)[:-1]
    pieces = np.fft.irfft(spec * window.sum(), n=n_fft, axis=1) * window
    out = _overlap_add(pieces, hop)
    norm = _overlap_add(np.broadcast_to(window**2, pieces.shape), hop)
    left, _ = _pad(n_fft, hop)
    # every kept sample lies well inside some window, so norm is far from 0 there
    return (out / np.maximum(norm, 1e-8))[left : left + frames * hop]


def _overlap_add(pieces: np.ndarray, hop: int) -> np.ndarray:
    """[frames, n] windows starting every hop samples -> their sum [(frames - 1) * hop + n], vectorised by
    splitting each window into hop-long blocks (block r of frame t lands on output block t + r)."""
    frames, n = pieces.shape
    per_frame = -(-n // hop)
    blocks = np.pad(pieces, ((0, 0), (0, per_frame * hop - n))).reshape(frames, per_frame, hop)
    out = np.zeros((frames + per_frame - 1, hop))
    for r in range(per_frame):
        out[r : r + frames] += blocks[:, r]
    return out.reshape(-1)[: (frames - 1) * hop + n]


def griffin_lim(magnitude: np.ndarray, n_fft: int, hop: int, iters: int, rng: np.random.Generator,
                momentum: float = 0.99) -> np.ndarray:
    """|STFT| [frames, n_fft // 2 + 1] -> float [frames * hop] whose STFT magnitude approximates it.

    Fast Griffin-Lim (Perraudin et al. 2013; the momentum term is librosa's default) from random phases: it
    converges in a few dozen iterations where plain Griffin-Lim needs hundreds.
    """
    angles = np.exp(2j * np.pi * rng.random(magnitude.shape))
    previous = None
    for _ in range(iters):
        rebuilt = stft(istft(magnitude * angles, n_fft, hop), n_fft, hop)
        angles = rebuilt if previous is None else rebuilt - (momentum / (1 + momentum)) * previous
        angles = angles / np.maximum(np.abs(angles), 1e-12)
        previous = rebuilt
    return istft(magnitude * angles, n_fft, hop)


# ---------------------------------------------------------------------------------------------------------
# k-means and residual vector quantisation (vectorised numpy)

NEAREST_CHUNK = 16384  # rows per distance matrix: 16384 x 256 float32 = 16 MB


def nearest(x: np.ndarray, codewords: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """x [n, d], codewords [k, d] -> (index of the nearest codeword [n] int64, its squared distance [n]).

    float32 throughout (a third of float64's time, and the fit is mostly this matmul); |x|^2 is the same
    for every codeword, so the argmin needs only |c|^2 - 2 x.c and |x|^2 is added back for the distance.
    """
    x = np.asarray(x, np.float32)
    codewords = np.asarray(codewords, np.float32)
    index = np.empty(len(x), np.int64)
    dist = np.empty(len(x), np.float32)
    c_sq = (codewords**2).sum(axis=1)
    for start in range(0, len(x), NEAREST_CHUNK):
        part = x[start : start + NEAREST_CHUNK]
        score = c_sq[None, :] - 2.0 * (part @ codewords.T)
        best = np.argmin(score, axis=1)
        index[start : start + len(part)] = best
        dist[start : start + len(part)] = np.maximum((part**2).sum(axis=1) + score[np.arange(len(part)), best], 0)
    return index, dist


def kmeans_pp_init(x: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """k rows of x [n, d] drawn by k-means++: each next one with probability proportional to its squared
    distance from the ones already drawn, so the initial codewords spread over the data."""
    chosen = [int(rng.integers(len(x)))]
    dist = ((x - x[chosen[0]]) ** 2).sum(axis=1)
    for _ in range(k - 1):
        total = dist.sum()
        if total > 0:
            i = int(np.searchsorted(np.cumsum(dist), rng.random() * total, side="right"))
            i = min(i, len(x) - 1)
        else:  # fewer distinct rows than k: the spare codewords repeat one (harmless, never nearer)
            i = int(rng.integers(len(x)))
        chosen.append(i)
        dist = np.minimum(dist, ((x - x[i]) ** 2).sum(axis=1))
    return x[chosen].copy()


def kmeans(x: np.ndarray, k: int, rng: np.random.Generator, iters: int, tick=None) -> np.ndarray:
    """x [n, d] (n >= k) -> codewords [k, d]: k-means++ then at most `iters` Lloyd steps.

    A codeword that loses all its rows moves to the row quantised worst, so no codeword stays unused.
    tick(n), if given, is called with the Lloyd steps done (the ones left over at convergence included).
    """
    x = np.asarray(x, np.float32)
    codewords = kmeans_pp_init(x, k, rng)
    previous = None
    for step in range(iters):
        if tick is not None and step:
            tick(1)
        index, dist = nearest(x, codewords)
        if previous is not None and np.array_equal(index, previous):
            if tick is not None:
                tick(iters - step)
            return codewords  # converged: more steps would change nothing
        previous = index
        codewords, used = _centroids(x, index, codewords)
        empty = np.flatnonzero(~used)
        if empty.size:
            worst = np.argsort(dist)[::-1][: empty.size]
            codewords[empty] = x[worst]
    if tick is not None and iters:
        tick(1)
    return codewords


def _centroids(x: np.ndarray, index: np.ndarray, codewords: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The mean of the rows of x assigned to each codeword (summed in float64 after sorting by codeword,
    much faster than np.add.at); codewords with no rows are returned unchanged, flagged False in `used`."""
    order = np.argsort(index, kind="stable")
    sorted_index = index[order]
    starts = np.flatnonzero(np.r_[True, sorted_index[1:] != sorted_index[:-1]])
    sums = np.add.reduceat(x[order], starts, axis=0, dtype=np.float64)
    counts = np.diff(np.r_[starts, len(x)])
    updated = codewords.copy()
    updated[sorted_index[starts]] = sums / counts[:, None]
    used = np.zeros(len(codewords), bool)
    used[sorted_index[starts]] = True
    return updated, used


def rvq_fit(x: np.ndarray, codebooks: int, codebook_size: int, rng: np.random.Generator,
            iters: int, progress=None, errors: list | None = None) -> np.ndarray:
    """x [n, d] -> codewords [codebooks, codebook_size, d]: each stage is k-means on what the stages before
    it left unexplained, so every codebook refines the sum of the previous ones.

    progress (an omni.progress reporter's bar) advances by Lloyd steps and shows the relative error reached;
    `errors`, if given, receives the relative error after each stage: mean |residual|^2 / mean |x|^2."""
    residual = np.array(x, np.float32)
    energy = max(float(np.mean(np.square(residual), dtype=np.float64)), 1e-12)
    stages = []
    for stage in range(codebooks):
        codewords = kmeans(residual, codebook_size, rng, iters, tick=progress.update if progress else None)
        index, _ = nearest(residual, codewords)
        residual -= codewords[index]
        stages.append(codewords)
        error = float(np.mean(np.square(residual), dtype=np.float64)) / energy
        if errors is not None:
            errors.append(error)
        if progress is not None:
            progress.update(0, codebook=f"{stage + 1}/{codebooks}", error=error)
    return np.stack(stages).astype(np.float32)


def rvq_encode(x: np.ndarray, codewords: np.ndarray) -> np.ndarray:
    """x [n, d], codewords [K, size, d] -> codes int32 [n, K] (greedy: each stage quantises the residual)."""
    residual = np.array(x, np.float32)
    codes = np.empty((len(x), len(codewords)), np.int32)
    for stage, book in enumerate(np.asarray(codewords, np.float32)):
        codes[:, stage], _ = nearest(residual, book)
        residual -= book[codes[:, stage]]
    return codes


def rvq_decode(codes: np.ndarray, codewords: np.ndarray) -> np.ndarray:
    """codes [n, k] with k <= K (a prefix of the stages gives a coarser reconstruction) -> x [n, d]."""
    return sum(codewords[stage][codes[:, stage]] for stage in range(codes.shape[1])).astype(np.float32)


# ---------------------------------------------------------------------------------------------------------
# MelRVQCodec

class MelRVQCodec:
    """A residual k-means vector quantiser on normalised log-mel frames, fitted on the user's own audio.

    Defaults: 16 kHz; hop 320 (20 ms, 50 frames/s); n_fft 1024 (64 ms Hann window, 15.6 Hz bins, fine enough
    to place a pitch); 64 mel bands; 4 codebooks x 256 codewords (200 tokens/s, 32 bits/frame); decoding
    runs 32 Griffin-Lim iterations from a fixed seed, so decode is deterministic.

    Build one with `MelRVQCodec.fit(waves)` or `MelRVQCodec.load(dir)`; the constructor takes fitted arrays.
    """

    name = "mel-rvq-v1"

    def __init__(self, codewords: np.ndarray, mean: np.ndarray, std: float, *, sample_rate: int = 16_000,
                 hop: int = 320, n_fft: int = 1024, griffin_lim_iters: int = 32, fit_info: dict | None = None):
        codewords = np.asarray(codewords, np.float32)
        if codewords.ndim != 3:
            raise CodecError(f"codewords must be [codebooks, codebook_size, n_mels]; got shape {codewords.shape}")
        _check_framing(hop, n_fft)
        self.codewords = codewords
        self.codebooks, self.codebook_size, self.n_mels = codewords.shape
        self.mean = np.asarray(mean, np.float32).reshape(self.n_mels)
        self.std = float(np.float32(std))  # what codec.npz stores, so a loaded codec gives identical codes
        if not self.std > 0:
            raise CodecError(f"std must be positive; got {std}")
        self.sample_rate, self.hop, self.n_fft = int(sample_rate), int(hop), int(n_fft)
        self.griffin_lim_iters = int(griffin_lim_iters)
        self.frame_rate = self.sample_rate / self.hop
        self.codebook_sizes = (self.codebook_size,) * self.codebooks
        self.fit_info = dict(fit_info or {})
        self.filterbank = mel_filterbank(self.sample_rate, self.n_fft, self.n_mels)

    # -- features ------------------------------------------------------------------------------------------

    def features(self, wave: np.ndarray) -> np.ndarray:
        """float32 [samples] -> normalised log-mel float32 [samples // hop, n_mels], what the codebooks quantise."""
        return (log_mel(wave, self.sample_rate, self.n_fft, self.hop, self.n_mels) - self.mean) / self.std

    def dequantise(self, codes: np.ndarray) -> np.ndarray:
        """codes [frames, k], k <= codebooks -> normalised log-mel [frames, n_mels] (the first k stages)."""
        codes = np.asarray(codes)
        if codes.ndim != 2 or not 1 <= codes.shape[1] <= self.codebooks:
            raise CodecError(f"{self.name} codes must be [frames, 1..{self.codebooks}]; got shape {codes.shape}")
        if codes.size and (codes.min() < 0 or codes.max() >= self.codebook_size):
            raise CodecError(f"{self.name} codes must lie in 0..{self.codebook_size - 1}; "
                             f"got {codes.min()}..{codes.max()}")
        return rvq_decode(codes, self.codewords)

    # -- AudioCodec ----------------------------------------------------------------------------------------

    def encode(self, wave: np.ndarray) -> np.ndarray:
        wave = np.asarray(wave, np.float32)
        if wave.ndim != 1:
            raise CodecError(f"{self.name} encodes mono audio [samples]; got shape {wave.shape}")
        if len(wave) < self.hop:
            raise CodecError(f"audio of {len(wave)} samples is shorter than one {self.hop}-sample frame")
        if not np.all(np.isfinite(wave)):
            raise CodecError(f"{self.name} cannot encode NaN or infinite samples")
        return rvq_encode(self.features(wave), self.codewords)

    def decode(self, codes: np.ndarray) -> np.ndarray:
        codes = np.asarray(codes)
        if codes.ndim != 2 or codes.shape[1] != self.codebooks:
            raise CodecError(f"{self.name} decodes codes [frames, {self.codebooks}]; got shape {codes.shape}")
        if len(codes) == 0:
            return np.zeros(0, np.float32)
        logmel = self.dequantise(codes).astype(np.float64) * self.std + self.mean
        mel_power = np.maximum(np.exp(logmel) - LOG_FLOOR, 0.0)
        power = mel_to_linear(mel_power, self.filterbank)
        # a fixed seed for the initial phases: the same codes always decode to the same samples
        wave = griffin_lim(np.sqrt(power), self.n_fft, self.hop, self.griffin_lim_iters, np.random.default_rng(0))
        return np.clip(wave, -1.0, 1.0).astype(np.float32)

    # -- fitting -------------------------------------------------------------------------------------------

    @classmethod
    def fit(cls, waves: Sequence[np.ndarray], *, sample_rate: int = 16_000, hop: int = 320, n_fft: int = 1024,
            n_mels: int = 64, codebooks: int = 4, codebook_size: int = 256, griffin_lim_iters: int = 32,
            seed: int = 0, iters: int = 20, max_frames: int = 200_000, progress=silent) -> MelRVQCodec:
        """Fit on waves (float32 [samples] each, already at `sample_rate`; see `fit_codec_on_files`).

        All log-mel frames are pooled (a random `max_frames` of them if there are more: 200k frames is ~67
        minutes, plenty for 256 codewords and bounded in time), normalised by their per-band mean and one
        global std, then quantised stage by stage. Fewer frames than `codebook_size` is an error rather than
        a silently smaller codebook, because codebook sizes fix the model's vocabulary.

        progress (omni.progress) shows the clips read and the k-means steps with the reconstruction error
        reached; fit_info records that error (relative: the normalised log-mel's squared error left over the
        squared error of coding every frame as the mean frame) after each codebook.
        """
        if codebooks < 1 or codebook_size < 2:
            raise CodecError(f"need codebooks >= 1 and codebook_size >= 2; got {codebooks}, {codebook_size}")
        _check_framing(hop, n_fft)
        frame_rate = sample_rate / hop
        logmels = []
        with progress("codec fit: read", total=len(waves) if hasattr(waves, "__len__") else None,
                      unit="clip") as bar:
            for i, wave in enumerate(waves):
                wave = np.asarray(wave, np.float32)
                if wave.ndim != 1:
                    raise CodecError(f"wave {i} is not mono audio [samples]: shape {wave.shape}")
                logmels.append(log_mel(wave, sample_rate, n_fft, hop, n_mels))
                bar.update(1, seconds=round(sum(len(m) for m in logmels) / frame_rate, 1))
        frames = np.concatenate(logmels) if logmels else np.zeros((0, n_mels), np.float32)
        seconds = len(frames) / frame_rate
        if len(frames) < codebook_size:
            raise CodecError(f"{len(frames)} frames ({seconds:.1f} s of audio) cannot fit {codebook_size} "
                             f"codewords per codebook; give at least {codebook_size / frame_rate:.1f} s "
                             f"of audio (minutes are better) or a smaller codebook_size")
        rng = np.random.default_rng(seed)
        if len(frames) > max_frames:
            frames = frames[np.sort(rng.choice(len(frames), max_frames, replace=False))]
        # per-band mean, one global std: per-band std would blow up bands that are nearly always silent and
        # spend codewords on their noise; a single scale keeps k-means' error the log-mel error
        mean = frames.mean(axis=0, dtype=np.float64).astype(np.float32)
        std = np.float32(np.sqrt(((frames - mean) ** 2).mean(dtype=np.float64)))
        std = std if std > 1e-6 else 1.0  # constant input (e.g. all silence): nothing to scale
        errors: list = []
        with progress("codec fit: k-means", total=codebooks * iters, unit="step") as bar:
            codewords = rvq_fit((frames - mean) / std, codebooks, codebook_size, rng, iters, bar, errors)
        info = {"seed": seed, "iters": iters, "max_frames": max_frames, "frames": len(frames),
                "seconds": round(seconds, 2), "relative_error": [round(e, 5) for e in errors]}
        return cls(codewords, mean, std, sample_rate=sample_rate, hop=hop, n_fft=n_fft,
                   griffin_lim_iters=griffin_lim_iters, fit_info=info)

    # -- files ---------------------------------------------------------------------------------------------

    def config(self) -> dict:
        """The contents of codec.json: identity, every hyper-parameter, and how it was fitted."""
        return {"name": self.name, "sample_rate": self.sample_rate, "frame_rate": self.frame_rate,
                "codebook_sizes": list(self.codebook_sizes), "hop": self.hop, "n_fft": self.n_fft,
                "n_mels": self.n_mels, "codebooks": self.codebooks, "codebook_size": self.codebook_size,
                "griffin_lim_iters": self.griffin_lim_iters, "fit": self.fit_info}

    def save(self, directory: str | os.PathLike) -> None:
        """Write codec.npz (codewords, normalisation), then codec.json (readable identity and hyper-parameters):
        a reader finds codec.json only once both are whole (a local folder or a gs:// URL)."""
        directory = storage.path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        arrays = io.BytesIO()
        np.savez(arrays, codewords=self.codewords, mean=self.mean, std=np.float32(self.std))
        storage.write_bytes(directory / "codec.npz", arrays.getvalue())
        storage.write_text(directory / "codec.json", json.dumps(self.config(), indent=2) + "\n")

    @classmethod
    def load(cls, directory: str | os.PathLike) -> MelRVQCodec:
        directory = storage.path(directory)
        refit = "re-fit it with omni.data.codec.fit_codec_on_files"
        json_path, npz_path = directory / "codec.json", directory / "codec.npz"
        for path in (json_path, npz_path):
            if not path.is_file():
                if path is json_path and not directory.is_dir():
                    raise CodecError(f"codec directory {directory} does not exist; check the path or {refit}")
                raise CodecError(f"codec directory {directory} has no {path.name}; "
                                 f"a saved {cls.name} codec has codec.json and codec.npz; {refit}")
        try:
            config = json.loads(json_path.read_text())
            if config.get("name") != cls.name:
                raise CodecError(f"{json_path} describes codec {config.get('name')!r}, not {cls.name!r}")
            with np.load(io.BytesIO(npz_path.read_bytes())) as arrays:
                codewords, mean, std = arrays["codewords"], arrays["mean"], float(arrays["std"])
            codec = cls(codewords, mean, std, sample_rate=config["sample_rate"], hop=config["hop"],
                        n_fft=config["n_fft"], griffin_lim_iters=config["griffin_lim_iters"],
                        fit_info=config.get("fit"))
        except CodecError:
            raise
        except (OSError, ValueError, KeyError, TypeError, AttributeError, zipfile.BadZipFile) as e:
            raise CodecError(f"codec directory {directory} is corrupt ({type(e).__name__}: {e}); {refit}") from e
        saved = {key: config.get(key) for key in ("n_mels", "codebooks", "codebook_size", "frame_rate",
                                                  "codebook_sizes")}
        actual = {key: codec.config()[key] for key in saved}
        if saved != actual:
            raise CodecError(f"codec directory {directory} is inconsistent: codec.json says {saved} but "
                             f"codec.npz holds {actual}; {refit}")
        return codec


# ---------------------------------------------------------------------------------------------------------
# External codecs, identity, loading

class PrecomputedCodec(Precomputed):
    """The identity of an external codec (EnCodec, Mimi, DAC...) whose codes users bring precomputed
    (omni.data.precomputed): frame_rate and, when given, sample_rate besides the name and codebook sizes."""

    what, error, codes_shape, example = "codec", CodecError, "[frames, codebooks]", "encodec-24khz"

    def __init__(self, name: str, frame_rate: float, codebook_sizes: Sequence[int], sample_rate: int | None = None):
        if name and (not frame_rate or float(frame_rate) <= 0):
            raise CodecError(f"codec {name!r}: frame_rate must be positive; got {frame_rate}")
        super().__init__(name, codebook_sizes)
        self.frame_rate = float(frame_rate)
        self.sample_rate = None if sample_rate is None else int(sample_rate)


def codec_identity(codec: AudioCodec) -> dict:
    """What a checkpoint or dataset records about its codec (JSON-ready): name, frame_rate, codebook_sizes,
    sample_rate (None for a precomputed codec that did not give one)."""
    sample_rate = getattr(codec, "sample_rate", None)
    return {"name": codec.name, "frame_rate": float(codec.frame_rate),
            "codebook_sizes": [int(s) for s in codec.codebook_sizes],
            "sample_rate": None if sample_rate is None else int(sample_rate)}


def codec_from_identity(identity: dict) -> AudioCodec:
    """The codec a recorded identity (codec_identity) names: a built-in one by its name, otherwise an external
    codec whose codes omni takes as they are (PrecomputedCodec). Fitted codecs load from their folder instead."""
    try:
        return load_codec(identity["name"])
    except CodecError:
        return PrecomputedCodec(identity["name"], identity["frame_rate"], tuple(identity["codebook_sizes"]),
                                identity.get("sample_rate"))


def load_codec(spec: str | os.PathLike) -> AudioCodec:
    """A codec from a spec: "tone" or "tone-v1" -> ToneCodec; a directory holding codec.json (or that file
    itself) -> the MelRVQCodec saved there."""
    spec = os.fspath(spec)
    if spec in ("tone", ToneCodec.name):
        return ToneCodec()
    path = storage.path(spec)
    directory = path.parent if path.name == "codec.json" else path
    if (directory / "codec.json").is_file():
        return MelRVQCodec.load(directory)
    why = (f"{spec} is a directory without codec.json" if path.is_dir() else
           f"{spec!r} is not a codec name and no such path exists" if not path.exists() else
           f"{spec} is a file, not a codec directory")
    raise CodecError(f"cannot load codec {spec!r}: {why}. Accepted: 'tone' / '{ToneCodec.name}' (the built-in "
                     f"tone codec), or a directory with codec.json + codec.npz written by "
                     f"omni.data.codec.fit_codec_on_files ({MelRVQCodec.name})")


class _Clips(abc.Sequence):
    """WAV files read one at a time as they are iterated (a fit keeps only their log-mel frames)."""

    def __init__(self, paths, sample_rate: int):
        self.paths, self.sample_rate = list(paths), sample_rate

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i):
        return load_audio(self.paths[i], self.sample_rate)


def fit_codec_on_files(paths: Sequence[str | os.PathLike], out_dir: str | os.PathLike, **hparams) -> MelRVQCodec:
    """Fit a MelRVQCodec on WAV files (each resampled to its sample_rate) and save it to out_dir.

    hparams are MelRVQCodec.fit's keywords (sample_rate, hop, n_fft, n_mels, codebooks, codebook_size,
    griffin_lim_iters, seed, iters, max_frames, progress).
    """

    if not paths:
        raise CodecError("no audio files given to fit the codec on")
    sample_rate = hparams.get("sample_rate", 16_000)
    codec = MelRVQCodec.fit(_Clips(paths, sample_rate), **hparams)
    codec.save(out_dir)
    return codec
