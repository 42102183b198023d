"""The demo corpus's task metrics: greedy decoding on held-out examples, scored against their answers.

    caption    generated caption vs truth: exact match, and shape / colour / place accuracy (chance 1/3, 1/6, 1/5)
    describe   generated melody description: exact match, and the volume word (chance 1/2)
    synth      generated audio codes: pitch code accuracy per frame against the reference codes

These are one use of the general task scoring (omni.tools.tasks, `omni eval --generate`): the first
`num_examples` held-out examples of each task go through it (generation with omni.tools.generate's batched KV
cache decoder, each answer restricted to its modality; exact match, CER, WER, code accuracy per codebook ...),
and the demo adds its attribute checks on top. `pitch_acc` is the code accuracy of codebook 0.
"""

from __future__ import annotations

from omni.config import Config
from omni.data import pipeline
from omni.demo import corpus
from omni.tools import tasks as tasks_lib
from omni.tools.generate import task_of

# synth: up to 16 frames of 2 codes, then <eoa> (its <boa> ends the prompt)
MAX_NEW_TOKENS = {"caption": 40, "describe": 24, "synth": 1 + 2 * 16, "spoken_caption": 40, "transcribe": 40}
CAPTION_TASKS = ("caption", "spoken_caption", "transcribe")


def run(cfg: Config, graphdef, params, num_examples: int, log=print) -> dict:
    """Scores greedy answers on the first `num_examples` held-out examples of each task; logs a few samples."""
    held_out = pipeline.examples(cfg, "eval")
    examples = []
    for task in corpus.TASKS + corpus.SPEECH_TASKS:
        examples += [e for e in held_out if e["meta"].get("task") == task][:num_examples]
    model = tasks_lib.model_of(cfg, graphdef, params, pipeline.vocab_for(cfg), pipeline.tokenizer_for(cfg),
                               pipeline.dataset_for(cfg).codec(), pipeline.image_tokenizer_for(cfg))
    predictions, scores = tasks_lib.run(model, [task_of(e) for e in examples], max_new_by_group=MAX_NEW_TOKENS,
                                        log=lambda *a: None)
    return demo_scores(predictions, scores, log)


def demo_scores(predictions: list[dict], scores: dict, log=print) -> dict:
    """The demo tasks' scores from general predictions and scores (omni.tools.tasks): each demo task's general
    scores plus its attribute checks, logged as the demo run prints them. Other groups are left out."""
    results = {}
    for task in corpus.TASKS + corpus.SPEECH_TASKS:
        rows = [r for r in predictions if r["group"] == task and "truth" in r]
        if not rows:
            continue
        score = dict(scores[task])
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


def end_of_run_for(cfg: Config):
    """The trainer's end_of_run hook for cfg: scoring demo.scored_examples per task on a demo corpus, else None."""
    if cfg.data.dataset not in corpus.NAMES or not cfg.demo.scored_examples:
        return None
    return lambda cfg, graphdef, params, log=print: run(cfg, graphdef, params, cfg.demo.scored_examples, log=log)
