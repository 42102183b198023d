"""The demo corpus's task metrics: greedy decoding on held-out examples, scored against their answers.

    caption    generated caption vs truth: exact match, and shape / colour / place accuracy (chance 1/3, 1/6, 1/5)
    describe   generated melody description: exact match, and the volume word (chance 1/2)
    synth      generated audio codes: pitch code accuracy per frame against the reference codes
    draw       generated image codes, decoded: the shape's colour and place read from the pixels
               (omni.demo.draw.scene_attributes) against the prompt's (chance 1/6, 1/5), beside the same reading
               of the truth images (what a perfect model would score)

These are one use of the general task scoring (omni.tools.tasks, `omni eval --generate`): the first
`num_examples` held-out examples of each task go through it (generation with omni.tools.generate's batched KV
cache decoder, each answer restricted to its modality; exact match, CER, WER, code accuracy per codebook ...),
and the demo adds its attribute checks on top. `pitch_acc` is the code accuracy of codebook 0.
"""

from __future__ import annotations

import numpy as np

from omni.config import Config
from omni.data import pipeline
from omni.demo import corpus, draw
from omni.tools import tasks as tasks_lib
from omni.tools.generate import task_of
from omni.train import artifact

# synth: up to 16 frames of 2 codes, then <eoa> (its <boa> ends the prompt)
MAX_NEW_TOKENS = {"caption": 40, "describe": 24, "synth": 1 + 2 * 16, "spoken_caption": 40, "transcribe": 40}
CAPTION_TASKS = ("caption", "spoken_caption", "transcribe")
DEMO_TASKS = corpus.TASKS + corpus.SPEECH_TASKS + draw.TASKS


def run(cfg: Config, graphdef, params, num_examples: int, log=print) -> dict:
    """Scores greedy answers on the first `num_examples` held-out examples of each task; logs a few samples."""
    held_out = pipeline.examples(cfg, "eval")
    examples = []
    for task in DEMO_TASKS:
        examples += [e for e in held_out if isinstance(e["meta"], dict) and e["meta"].get("task") == task][:num_examples]
    model = artifact.live(cfg, graphdef, params)
    predictions, scores = tasks_lib.run(model, [task_of(e) for e in examples], max_new_by_group=MAX_NEW_TOKENS,
                                        log=lambda *a: None)
    return demo_scores(predictions, scores, log, model.image_tokenizer)


def demo_scores(predictions: list[dict], scores: dict, log=print, image_tokenizer=None) -> dict:
    """The demo tasks' scores from general predictions and scores (omni.tools.tasks): each demo task's general
    scores plus its attribute checks, logged as the demo run prints them. Other groups are left out."""
    results = {}
    for task in DEMO_TASKS:
        rows = [r for r in predictions if r["group"] == task and "truth" in r and "skipped" not in r]
        if not rows:
            continue
        score = dict(scores[task])
        if task == "draw":
            results[task] = draw_scores(rows, score, image_tokenizer, log)
            continue
        if task == "synth":
            score["pitch_acc"] = score["code_acc"][0]
            log(f"demo synth: pitch code accuracy per frame {score['pitch_acc']:.1%} over {len(rows)} held-out prompts")
            results[task] = score
            continue
        texts, answers = [r["text"] for r in rows], [r["truth"] for r in rows]
        if task in CAPTION_TASKS:
            for attr in ("shape", "colour", "place"):
                score[attr] = sum(corpus.parse_caption(t)[attr] == corpus.parse_caption(a)[attr]
                                  for t, a in zip(texts, answers)) / len(rows)
            log(f"demo {task}: exact {score['exact']:.1%} (chance 1.1%), shape {score['shape']:.1%} (chance 33%), "
                f"colour {score['colour']:.1%} (17%), place {score['place']:.1%} (20%) on {len(rows)} held-out examples")
        else:
            score["volume"] = sum(t.split()[:1] == a.split()[:1] for t, a in zip(texts, answers)) / len(rows)
            log(f"demo describe: exact {score['exact']:.1%}, volume word {score['volume']:.1%} (chance 50%) "
                f"on {len(rows)} held-out melodies")
        for t, a in list(zip(texts, answers))[:3]:
            log(f"    truth {a!r:38} model {t!r}")
        results[task] = score
    return results


def draw_scores(rows: list[dict], score: dict, image_tokenizer, log=print) -> dict:
    """The draw task's general scores (code accuracy, PSNR) plus the colour and place read from each decoded
    answer against its prompt's (meta), and the same reading of the truth images."""
    hits = {"colour": 0, "place": 0, "truth_colour": 0, "truth_place": 0}
    for row in rows:
        wanted = row.get("meta") or {}
        drawn = draw.scene_attributes(image_tokenizer.decode(np.asarray(row["codes"])))
        truth = draw.scene_attributes(image_tokenizer.decode(np.asarray(row["truth"])))
        for attr in ("colour", "place"):
            hits[attr] += drawn[attr] == wanted.get(attr)
            hits[f"truth_{attr}"] += truth[attr] == wanted.get(attr)
    score.update({name: count / len(rows) for name, count in hits.items()})
    log(f"demo draw: colour {score['colour']:.1%} (chance 17%), place {score['place']:.1%} (chance 20%) on "
        f"{len(rows)} held-out prompts (the truth images read: {score['truth_colour']:.1%}, "
        f"{score['truth_place']:.1%}); code accuracy {score['code_acc_mean']:.1%}, PSNR {score['psnr_db']:.1f} dB")
    return score


def end_of_run_for(cfg: Config):
    """The trainer's end_of_run hook for cfg: scoring demo.scored_examples per task on a demo corpus, else None."""
    if cfg.data.dataset not in corpus.NAMES or not cfg.demo.scored_examples:
        return None
    return lambda cfg, graphdef, params, log=print: run(cfg, graphdef, params, cfg.demo.scored_examples, log=log)
