"""Task scores: generated answers against the truth, for any dataset (omni eval --generate, omni ablate).

Text answers (strings), corpus-level over a group of examples:

    exact   share of answers equal to the truth (after nothing: case and spaces count)
    cer     character error rate: character edits (substitutions + deletions + insertions) over all truths,
            divided by the truths' characters (jiwer; can exceed 1 when answers are much longer than truths)
    wer     the same over whitespace-separated words (jiwer)
    bleu    sacreBLEU corpus BLEU (0-100, default 13a tokenisation), only where the truths are sentences
            (on average SENTENCE_WORDS words or more)
    chrf    sacreBLEU corpus chrF (0-100), likewise

Audio answers (codes [T, K] of the model's codec):

    code_acc      per codebook k: frames t < T (the truth's length) where answer[t, k] == truth[t, k], over all
                  truth frames (frames the answer lacks count as misses; extra frames are not counted)
    code_acc_mean the mean over codebooks
    frames_diff   mean |answer frames - truth frames|
    mel_l1        where the codec decodes to a waveform: both code sequences are decoded by the codec, and the
                  mean absolute difference of their natural-log mel power (MEL_BINS bins, 25 ms windows every
                  10 ms) is taken over the truth's frames, the answer cut or padded with silence to that length;
                  0 for identical codes (the codec's own error is left out: both sides go through it)

Image answers (codes [R, C, K] of the model's image tokenizer, generated on the truth's grid):

    code_acc      per codebook k: cells (r, c) of the truth's grid where answer[r, c, k] == truth[r, c, k], over
                  all truth cells (cells outside the answer's grid count as misses)
    code_acc_mean the mean over codebooks
    psnr_db       where the image tokenizer decodes: PSNR (dB, over all pixels of the group) of the decoded answer
                  against the decoded truth, the answer cut or padded with black to the truth's size;
                  PSNR_CAP_DB (99) for identical codes (the tokenizer's own error is left out: both sides go
                  through it; `omni imagetok fit` reports that one)
"""

from __future__ import annotations

import numpy as np

from omni.data.precomputed import is_precomputed

SENTENCE_WORDS = 3  # truths this long on average (in words) get BLEU and chrF
MEL_BINS = 40


def exact_match(answers: list[str], truths: list[str]) -> float:
    _check_pairs(answers, truths)
    return float(np.mean([a == t for a, t in zip(answers, truths)]))


def cer(answers: list[str], truths: list[str]) -> float:
    """Character edits over truth characters, corpus-level (jiwer)."""
    import jiwer

    _check_pairs(answers, truths)
    return float(jiwer.cer(list(truths), list(answers)))


def wer(answers: list[str], truths: list[str]) -> float:
    """Word edits over truth words, corpus-level (jiwer); words are whitespace-separated."""
    import jiwer

    _check_pairs(answers, truths)
    return float(jiwer.wer(list(truths), list(answers)))


def are_sentences(truths: list[str]) -> bool:
    return bool(truths) and float(np.mean([len(t.split()) for t in truths])) >= SENTENCE_WORDS


def bleu(answers: list[str], truths: list[str]) -> float:
    import sacrebleu

    _check_pairs(answers, truths)
    return float(sacrebleu.corpus_bleu(list(answers), [list(truths)]).score)


def chrf(answers: list[str], truths: list[str]) -> float:
    import sacrebleu

    _check_pairs(answers, truths)
    return float(sacrebleu.corpus_chrf(list(answers), [list(truths)]).score)


def text_scores(answers: list[str], truths: list[str]) -> dict:
    """{"n", "exact", "cer", "wer"} and, for sentence truths, {"bleu", "chrf"} (module docstring)."""
    _check_pairs(answers, truths)
    # jiwer refuses an empty truth; the manifest allows none, but a truth of only spaces would be one
    kept = [(a, t) for a, t in zip(answers, truths) if t.strip()]
    scores = {"n": len(truths), "exact": exact_match(answers, truths)}
    if kept:
        a, t = map(list, zip(*kept))
        scores.update(cer=cer(a, t), wer=wer(a, t))
        if are_sentences(t):
            scores.update(bleu=bleu(a, t), chrf=chrf(a, t))
    return scores


def code_accuracy(answers: list[np.ndarray], truths: list[np.ndarray]) -> list[float]:
    """Per codebook: matching codes over the truths' frames, corpus-level (module docstring)."""
    _check_pairs(answers, truths)
    k = np.shape(truths[0])[1]
    hits, frames = np.zeros(k), 0
    for answer, truth in zip(answers, truths):
        answer, truth = np.asarray(answer).reshape(-1, k), np.asarray(truth)
        n = min(len(answer), len(truth))
        hits += np.sum(answer[:n] == truth[:n], axis=0)
        frames += len(truth)
    return [float(h / max(frames, 1)) for h in hits]


def mel_distance(answer_wave: np.ndarray, truth_wave: np.ndarray, sample_rate: int) -> float:
    """Mean |log-mel(answer) - log-mel(truth)| over the truth's frames (answer cut or padded with silence)."""
    from omni.data.codec import log_mel

    hop, n_fft = sample_rate // 100, 1 << int(np.ceil(np.log2(sample_rate * 0.025)))
    truth_wave = np.asarray(truth_wave, np.float64)
    answer_wave = np.asarray(answer_wave, np.float64)[: len(truth_wave)]
    answer_wave = np.pad(answer_wave, (0, len(truth_wave) - len(answer_wave)))
    truth_mel = log_mel(truth_wave, sample_rate, n_fft, hop, MEL_BINS)
    if len(truth_mel) == 0:
        return 0.0
    answer_mel = log_mel(answer_wave, sample_rate, n_fft, hop, MEL_BINS)
    return float(np.mean(np.abs(answer_mel - truth_mel)))


def audio_scores(answers: list[np.ndarray], truths: list[np.ndarray], codec=None) -> dict:
    """{"n", "code_acc" [per codebook], "code_acc_mean", "frames_diff"} and "mel_l1" when `codec` decodes."""
    _check_pairs(answers, truths)
    per_codebook = code_accuracy(answers, truths)
    scores = {"n": len(truths), "code_acc": per_codebook, "code_acc_mean": float(np.mean(per_codebook)),
              "frames_diff": float(np.mean([abs(len(a) - len(t)) for a, t in zip(answers, truths)]))}
    rate = getattr(codec, "sample_rate", None)
    if codec is not None and rate is not None and not is_precomputed(codec):
        distances = []
        for answer, truth in zip(answers, truths):
            truth_wave = np.asarray(codec.decode(np.asarray(truth)))
            answer_wave = (np.asarray(codec.decode(np.asarray(answer))) if len(answer)
                           else np.zeros(0, np.float32))
            distances.append(mel_distance(answer_wave, truth_wave, rate))
        scores["mel_l1"] = float(np.mean(distances))
    return scores


def image_code_accuracy(answers: list[np.ndarray], truths: list[np.ndarray]) -> list[float]:
    """Per codebook: matching codes over the truths' cells, corpus-level (module docstring)."""
    _check_pairs(answers, truths)
    k = np.shape(truths[0])[2]
    hits, cells = np.zeros(k), 0
    for answer, truth in zip(answers, truths):
        answer, truth = np.asarray(answer), np.asarray(truth)
        rows, cols = min(len(answer), len(truth)), min(answer.shape[1], truth.shape[1])
        hits += np.sum(answer[:rows, :cols] == truth[:rows, :cols], axis=(0, 1))
        cells += truth.shape[0] * truth.shape[1]
    return [float(h / max(cells, 1)) for h in hits]


def image_scores(answers: list[np.ndarray], truths: list[np.ndarray], image_tokenizer=None) -> dict:
    """{"n", "code_acc" [per codebook], "code_acc_mean"} and "psnr_db" when `image_tokenizer` decodes."""
    from omni.data.image_tokenizer import ImageTokenizerError, psnr

    per_codebook = image_code_accuracy(answers, truths)
    scores = {"n": len(truths), "code_acc": per_codebook, "code_acc_mean": float(np.mean(per_codebook))}
    if image_tokenizer is None:
        return scores
    try:
        pairs = [(_fit_to(image_tokenizer.decode(np.asarray(a)), np.shape(t)[:2], image_tokenizer.patch_size),
                  image_tokenizer.decode(np.asarray(t))) for a, t in zip(answers, truths)]
    except ImageTokenizerError:  # an external tokenizer cannot decode here
        return scores
    scores["psnr_db"] = psnr(np.concatenate([t.reshape(-1, 3) for _, t in pairs]),
                             np.concatenate([a.reshape(-1, 3) for a, _ in pairs]))
    return scores


def _fit_to(image_HxWx3: np.ndarray, grid: tuple[int, int], patch_size: int) -> np.ndarray:
    """The image cut or padded with black to grid cells of patch_size pixels."""
    h, w = grid[0] * patch_size, grid[1] * patch_size
    out = np.zeros((h, w, 3), np.uint8)
    part = np.asarray(image_HxWx3)[:h, :w]
    out[:part.shape[0], :part.shape[1]] = part
    return out


def _check_pairs(answers, truths) -> None:
    if len(answers) != len(truths):
        raise ValueError(f"{len(answers)} answers for {len(truths)} truths")
    if not len(truths):
        raise ValueError("no answers to score")
