"""The demo corpus's task metrics: greedy decoding on held-out examples, scored against their answers.

    caption    generated caption vs truth: exact match, and shape / colour / place accuracy (chance 1/3, 1/6, 1/5)
    describe   generated melody description: exact match, and the volume word (chance 1/2)
    synth      generated audio codes: pitch code accuracy per frame against the reference codes

Decoding is omni.tools.generate's: one prefill of the prompt batch into a KV cache, then one token per step inside a
jitted loop, restricted to the answer's modality (text ids for text answers, codebook-ordered codes for synth).
"""

from __future__ import annotations

import numpy as np

from omni.config import Config
from omni.data import pipeline
from omni.demo import corpus
from omni.tokens import AUDIO_DELAY, BOA, EOA, EOS, PAD_ID, encode_example, slice_positions, unflatten_codes
from omni.tools.generate import generate

# synth: up to 16 frames of 2 codes, then <eoa> (its <boa> ends the prompt)
MAX_NEW_TOKENS = {"caption": 40, "describe": 24, "synth": 1 + 2 * 16, "spoken_caption": 40, "transcribe": 40}
STOP = {"synth": EOA, "spoken_caption": BOA}  # the others end their text answer with <eos>
TARGET = {"synth": "audio"}  # the answer's modality; the others answer in text (spoken_caption: text, then <boa>)
CAPTION_TASKS = ("caption", "spoken_caption", "transcribe")


def _prompt(example: dict, cfg: Config) -> dict:
    """The example's per-position arrays up to its first target token: excluded for a text answer, included
    when it is the <boa> that opens an audio answer (the generator continues with codes)."""
    encoded = encode_example(example, pipeline.vocab_for(cfg), pipeline.tokenizer_for(cfg), cfg.data.patch_size,
                             cfg.data.audio_layout)
    first_target = int(np.argmax(encoded["is_target"]))
    end = first_target + (encoded["tokens"][first_target] == BOA)
    return slice_positions(encoded, 0, int(end))


def greedy_generate(cfg: Config, graphdef, params, prompts: list[dict], max_new: int, stop_id: int,
                    target: str = "text") -> list[list[int]]:
    """Greedy continuation of each prompt (dicts of arrays as omni.tools.generate.prompt_arrays gives them) until stop_id (left out of
    the output) or max_new tokens, with the KV-cache generator."""
    result = generate(graphdef, params, cfg.model, pipeline.vocab_for(cfg), prompts, target=target,
                      max_new_tokens=max_new, stop_ids=(stop_id,), audio_layout=cfg.data.audio_layout)
    return result.tokens


def run(cfg: Config, graphdef, params, num_examples: int, log=print) -> dict:
    """Scores greedy answers on the first `num_examples` held-out examples of each task; logs a few samples."""
    vocab, tokenizer = pipeline.vocab_for(cfg), pipeline.tokenizer_for(cfg)
    held_out = pipeline.examples(cfg, "eval")
    results = {}
    for task in corpus.TASKS + corpus.SPEECH_TASKS:
        examples = [e for e in held_out if e["meta"].get("task") == task][:num_examples]
        if not examples:
            continue
        prompts = [_prompt(e, cfg) for e in examples]
        stop = STOP.get(task, EOS)
        outputs = greedy_generate(cfg, graphdef, params, prompts, MAX_NEW_TOKENS[task], stop,
                                  target=TARGET.get(task, "text"))
        if task == "synth":
            results[task] = _score_synth(examples, outputs, vocab, cfg.data.audio_layout)
            log(f"demo synth: pitch code accuracy per frame {results[task]['pitch_acc']:.1%} "
                f"over {len(examples)} held-out prompts")
            continue
        texts = [tokenizer.decode([t - vocab.text_offset for t in o if t != stop]) for o in outputs]
        answers = [e["meta"]["answer"] for e in examples]
        score = {"exact": float(np.mean([t == a for t, a in zip(texts, answers)])), "n": len(examples)}
        if task in CAPTION_TASKS:
            for attr in ("shape", "colour", "place"):
                score[attr] = float(np.mean([corpus.parse_caption(t)[attr] == corpus.parse_caption(a)[attr]
                                             for t, a in zip(texts, answers)]))
            log(f"demo {task}: exact {score['exact']:.1%} (chance 1.1%), shape {score['shape']:.1%} (chance 33%), "
                f"colour {score['colour']:.1%} (17%), place {score['place']:.1%} (20%) on {len(examples)} held-out examples")
        else:
            score["volume"] = float(np.mean([t.split()[:1] == a.split()[:1] for t, a in zip(texts, answers)]))
            log(f"demo describe: exact {score['exact']:.1%}, volume word {score['volume']:.1%} (chance 50%) "
                f"on {len(examples)} held-out melodies")
        for t, a in list(zip(texts, answers))[:3]:
            log(f"    truth {a!r:38} model {t!r}")
        results[task] = score
    return results


def _score_synth(examples, outputs, vocab, layout: str) -> dict:
    hits, total = 0, 0
    for example, out in zip(examples, outputs):
        reference = next(s["audio"] for s in example["segments"] if "audio" in s)[:, 0]
        tokens = [t for t in out if t not in (BOA, EOA, EOS, PAD_ID)]
        codes = unflatten_codes(np.asarray(tokens, np.int64), vocab, layout)[:, 0] if len(tokens) >= 2 else np.zeros(0)
        codes = np.where(codes == AUDIO_DELAY - vocab.audio_offset(0), -1, codes)
        n = min(len(codes), len(reference))
        hits += int(np.sum(codes[:n] == reference[:n]))
        total += len(reference)
    return {"pitch_acc": hits / max(total, 1), "n": len(examples)}


def end_of_run_for(cfg: Config):
    """The trainer's end_of_run hook for cfg: scoring demo.scored_examples per task on a demo corpus, else None."""
    if cfg.data.dataset not in corpus.NAMES or not cfg.demo.scored_examples:
        return None
    return lambda cfg, graphdef, params, log=print: run(cfg, graphdef, params, cfg.demo.scored_examples, log=log)
