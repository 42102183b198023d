"""Task scoring on any dataset: generate the answers of held-out examples and score them against the truth.

    omni eval --workdir runs/my --generate [--max-examples N] [--prompts held_out.jsonl]

Each eval example (or each line of a prompts file that has an answer) becomes a Task (omni.tools.generate.task_of):
the prompt is every segment before its first target segment, which is generated (greedy, batched, KV cache)
and scored against that segment (omni.tools.scores): text answers by exact match, CER and WER (and BLEU and
chrF for sentences), audio answers by code accuracy per codebook and the log-mel distance of the decoded
audio, image answers (generated on the truth's grid) by code accuracy per codebook and the PSNR of the decoded
image. Scores are grouped by the example's meta "task" when it has one (the demo corpus's caption / describe /
synth), else by the answer's modality ("text", "audio", "image"). The demo scores (omni.demo.scorer) are this path
plus the demo's own attribute checks.
"""

from __future__ import annotations

import numpy as np

from omni.errors import GenerateError
from omni.tools import generate as generate_lib
from omni.tools import scores as scores_lib
from omni.train import artifact


def eval_tasks(cfg, max_examples: int | None = None, prompts=None, codec=None,
               image_tokenizer=None) -> tuple[list, str]:
    """(Tasks, split name): the first max_examples of the eval split (all when None), or a prompts file's lines
    that carry an answer (manifest lines; inline prompts have nothing to score and are left out)."""
    from omni.data import pipeline

    if prompts is not None:
        tasks = generate_lib.read_prompts(prompts, patch_size=cfg.data.patch_size,
                                          max_image_patches=cfg.data.max_image_patches, codec=codec,
                                          image_tokenizer=image_tokenizer)
        tasks = [t for t in tasks if t.truth is not None]
        if not tasks:
            raise GenerateError(f"no line of {prompts} has an answer to score: give manifest lines "
                                             f"(segments with targets), not only {{\"prompt\": ...}} lines")
        return tasks[:max_examples], str(prompts)
    examples = pipeline.examples(cfg, "eval", limit=max_examples)
    return [generate_lib.task_of(e) for e in examples], "eval"


def score_predictions(predictions: list[dict], codec=None, image_tokenizer=None) -> dict:
    """{group: scores} over the predictions that carry a truth (omni.tools.scores for each modality)."""
    groups: dict = {}
    for row in predictions:
        if "truth" in row and "skipped" not in row:
            groups.setdefault(row["group"], []).append(row)
    out = {}
    for group, rows in groups.items():
        if rows[0]["target"] == "text":
            out[group] = scores_lib.text_scores([r["text"] for r in rows], [r["truth"] for r in rows])
        elif rows[0]["target"] == "image":
            out[group] = scores_lib.image_scores([np.asarray(r["codes"]) for r in rows],
                                                 [np.asarray(r["truth"]) for r in rows], image_tokenizer)
        else:
            k = len(rows[0]["truth"][0]) if len(rows[0]["truth"]) else 0
            answers = [np.asarray(r["codes"], np.int64).reshape(-1, k) for r in rows]
            out[group] = scores_lib.audio_scores(answers, [np.asarray(r["truth"]) for r in rows], codec)
    return out


def describe(group: str, score: dict) -> str:
    """One log line of a group's scores."""
    if "exact" in score:
        text = f"exact {score['exact']:.1%}"
        if "cer" in score:
            text += f", CER {score['cer']:.1%}, WER {score['wer']:.1%}"
        if "bleu" in score:
            text += f", BLEU {score['bleu']:.1f}, chrF {score['chrf']:.1f}"
    else:
        text = "code accuracy per codebook " + " ".join(f"{a:.1%}" for a in score["code_acc"])
        if "mel_l1" in score:
            text += f", log-mel L1 {score['mel_l1']:.3f}"
        if "psnr_db" in score:
            text += f", PSNR {score['psnr_db']:.1f} dB"
    return f"task {group}: {text} on {score['n']} held-out examples"


def run(model: artifact.ModelArtifact, tasks: list, *, max_new_tokens: int | None = None, max_new_by_group: dict | None = None,
        batch_size: int = 64, log=print, source: str = "") -> tuple[list[dict], dict]:
    """Generates every task greedily and scores the answers: (predictions, {group: scores}). A task whose prompt
    leaves no room for its answer in the model's context is skipped in one line (its row says why) rather than
    losing the others' scores. source: the prompts file the tasks' lines are in."""
    predictions, result = generate_lib.run_tasks(model, tasks, max_new_tokens=max_new_tokens, batch_size=batch_size,
                                                 max_new_by_group=max_new_by_group, skip_unfit=True,
                                                 source=source)
    scores = score_predictions(predictions, model.codec, model.image_tokenizer)
    skipped = [row for row in predictions if "skipped" in row]
    if skipped:
        log(f"omni: skipped {len(skipped)} of {len(predictions)} examples whose prompt leaves no room for the "
            f"answer (not scored; their rows in the predictions say why), the first: {skipped[0]['skipped']}")
    log(f"omni: generated {len(predictions) - len(skipped)} answers ({result.generated} tokens, {result.tokens_per_s:,.0f} "
        f"tokens/s, compile {result.compile_s:.1f} s)")
    return predictions, scores


def end_of_run_for(cfg, num_examples: int):
    """A trainer end_of_run hook (omni.train.loop) that generates and scores the first `num_examples` eval
    examples of any dataset and returns {group: scores}; None when num_examples is 0."""
    if not num_examples:
        return None

    def end_of_run(cfg, graphdef, params, log=print):
        model = artifact.live(cfg, graphdef, params)
        tasks, _ = eval_tasks(cfg, num_examples, codec=model.codec, image_tokenizer=model.image_tokenizer)
        _, scores = run(model, tasks, log=log)
        for group, score in scores.items():
            log(f"omni: {describe(group, score)}")
        return scores

    return end_of_run
