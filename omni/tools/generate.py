"""Generation with a KV cache: prompts with inline images and audio -> text, audio codes (and a waveform), or image
codes (and pixels).

Prompt syntax (parse_prompt): plain text with inline tags, each becoming one segment in order:

    "<image:photos/cat.png> what is this"      image file (anything Pillow reads), fitted to the patch budget
    "describe <audio:clip.wav>"                WAV file, resampled to the codec's rate and encoded by the codec
    "say <codes:clip.npy>"                     precomputed codes int [frames, codebooks] (for external codecs)

Whitespace next to a tag is dropped and so is text left empty; files given with `audio=[...]` (`--audio`)
follow the text as audio segments. Anything of the tag shape `<word:...>` is read as a tag: an unknown word
(`<video:x.mp4>`) or an empty path (`<image:>`) is an error, never prompt text; `<` and `>` in any other
shape (`a < b > c`) are text. A prompt with nothing in it (no text, tag or audio file) is an error.
prompt_arrays turns the segments into exactly the token prefix the model saw in training (`<bos>` spans ...,
no `<eos>`), plus `<boa>` when the answer is audio, `<boi>` when it is an image. fit_to_context caps the new tokens to what the model's
training sequence length leaves after the prompt (omni generate does; generate itself takes any count).

Decoding (generate): one jitted prefill of the right-padded prompt batch fills the cache (omni.model), then a
`lax.while_loop` feeds one token per row per step until every row has produced a stop id or its own
max_new_tokens. The batch is padded to buckets (rows and new tokens to powers of two, prompt width to a power of
two >= 16; prompt_batch is the one place per-prompt arrays become a model batch), so batches of similar shape
share one compiled program; padding rows and positions change no row's tokens. The loop runs in chunks of steps (about DECODE_CHUNK_S seconds each) with a host check in
between, so Ctrl-C (KeyboardInterrupt) stops it between two chunks. Each step's logits are restricted to the
target modality:

    text    text ids, and the stop ids (default <eos>)
    audio   flat layout: position n of the span must be codebook n % K; delay layout: codebook n % K or
            <delay>; the stop ids (default <eoa>) only at a frame boundary (n % K == 0)
    image   the codebook, <row> or <eoi> the answer's grid puts at position n (omni.tools.image_generate): an
            image answer is always its whole grid of R x C cells, with the markers forced, so it always decodes

Many prompts (generate_many, `omni generate --prompts FILE`): requests with the same target and stop ids are
sorted by prompt length and cut into batches of at most batch_size; read_prompts reads a prompts file of
manifest lines (the first target segment is the answer: left out of the prompt, kept as the truth; task_of)
or {"prompt": "... <image:PATH> ..."} lines, and names the file and line of any bad one; run_tasks generates
them all and gives one result dict per line (id, output, stop reason, token count, truth).

Sampling: temperature 0 is greedy (argmax); temperature T > 0 samples softmax(logits / T), restricted to the
top_k most likely ids when top_k > 0 (top_k=1 is greedy). The PRNG is seeded by `seed`: same seed, same
output (for the same batch: a prompt's samples depend on its row and the batch shape; greedy output does
not). Timings are measured after compiling (compile time reported apart); compiled executables are kept per
model, settings and shapes, so a second call with the same shapes compiles nothing.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import re
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from omni import sharding, storage
from omni.batch import AUDIO, IMAGE, TEXT
from omni.data import manifest
from omni.data.audio import load_audio
from omni.data.image_entry import image_segments
from omni.data.images import decode_image, fit_image
from omni.data.precomputed import is_precomputed
from omni.errors import AudioError, GenerateError
from omni.model.transformer import init_cache
from omni.tokens import (AUDIO_DELAY, BOA, BOI, BOS, EOA, EOI, EOS, PAD_ID, ROW, Vocab, check_codes,
                         check_image_codes, encode_example, slice_positions, unflatten_codes)
from omni.tools import image_generate
from omni.tools.image_generate import ImageGrid
from omni.train import artifact

GENERATED_MODALITIES = ("text", "audio", "image")
TAGS = {"image": "<image:PATH>", "audio": "<audio:PATH.wav>", "codes": "<codes:PATH.npy>"}
TAG = re.compile(r"<([A-Za-z][\w-]*):([^<>]*)>")  # the tag shape: any word; unknown words are errors
TAG_HELP = ", ".join(TAGS.values())
DEFAULT_STOP = {"text": (EOS,), "audio": (EOA,), "image": (EOI,)}
DECODE_CHUNK_S = 0.1  # seconds of decoding between two host checks (how soon an interrupt lands)




# ----------------------------------------------------------------------------------------------- prompts

def parse_prompt(text: str, audio=(), *, patch_size: int = 8, max_image_patches: int = 256,
                 codec=None, base=None) -> list[dict]:
    """A prompt string (module docstring) + audio files -> segments for encode_example.

    Segments are {"text": str}, {"image": uint8 [H, W, 3]} (fitted to the patch budget) or {"audio": int
    codes [T, K]} (encoded by `codec`, or loaded from a .npy given as <codes:PATH>). Relative tag paths are
    relative to `base` when given (a prompts file's folder), else to the working directory.
    """
    segments, start, parts = [], 0, []
    for match in TAG.finditer(text):
        kind, value = match.group(1), match.group(2).strip()
        if kind not in TAGS:
            raise GenerateError(f"unknown tag {match.group(0)} in the prompt; the known tags are {TAG_HELP}")
        if not value:
            raise GenerateError(f"tag {match.group(0)} in the prompt names no file; write {TAGS[kind]} (the known "
                                f"tags are {TAG_HELP})")
        parts.append(("text", text[start:match.start()]))
        parts.append((kind, _relative(value, None if base is None else storage.path(base))))
        start = match.end()
    parts.append(("text", text[start:]))
    parts += [("audio", str(path)) for path in audio]
    for i, (kind, value) in enumerate(parts):
        if kind == "text":
            if i > 0:
                value = value.lstrip()
            if i + 1 < len(parts):
                value = value.rstrip()
            if value:
                segments.append({"text": value})
        elif kind == "image":
            segments.append({"image": load_image(value, patch_size, max_image_patches)})
        elif kind == "audio":
            segments.append({"audio": encode_audio(value, codec)})
        else:
            segments.append({"audio": load_codes(value, codec)})
    if all(s.get("text", "x").isspace() for s in segments):  # nothing, or only whitespace
        raise GenerateError(f"the prompt is empty: give it text, a tag ({TAG_HELP}) or an --audio file")
    return segments


def fit_to_context(max_new_tokens: int, prompt_len: int, context: int) -> int:
    """max_new_tokens cut to what the model's trained context leaves after the prompt (context - prompt_len).

    A model never saw positions past its training sequence length (config data.seq_len), so nothing is
    generated beyond it; a prompt that fills the context on its own, or max_new_tokens < 1, is a GenerateError.
    """
    if max_new_tokens < 1:
        raise GenerateError(f"--max-new-tokens must be at least 1; got {max_new_tokens}")
    if prompt_len >= context:
        raise GenerateError(f"the prompt has {prompt_len} tokens but the model was trained on {context}-token "
                            f"sequences: no room is left to generate; shorten the prompt (or its images and audio)")
    return min(max_new_tokens, context - prompt_len)


def load_image(path: str, patch_size: int, max_image_patches: int) -> np.ndarray:
    """An image file -> uint8 [H, W, 3] RGB fitted to the patch budget, read as the dataset build reads images."""
    if not storage.path(path).is_file():
        raise GenerateError(f"image file {path} does not exist; check the path in <image:{path}>")
    try:
        data = manifest.load_image_bytes(storage.path(path))
    except ValueError as e:
        raise GenerateError(f"{e}; is it a PNG/JPEG file?") from e
    return fit_image(decode_image(data), patch_size, max_image_patches)


def encode_audio(path: str, codec) -> np.ndarray:
    """A WAV file -> codes [T, K] from the model's codec."""
    if codec is None:
        raise GenerateError(f"cannot use audio {path}: this model has no audio codec (its dataset had no audio)")
    if getattr(codec, "sample_rate", None) is None or is_precomputed(codec):
        raise GenerateError(f"cannot encode audio {path}: the model's codec {codec.name!r} is external; encode the "
                            f"file with that codec and pass its codes [frames, codebooks] as <codes:FILE.npy>")
    try:
        wave = load_audio(path, codec.sample_rate)
    except AudioError as e:
        raise GenerateError(str(e)) from e
    try:
        return np.asarray(codec.encode(wave))
    except ValueError as e:
        raise GenerateError(f"could not encode audio {path} with codec {codec.name!r}: {e}") from e


def load_codes(path: str, codec) -> np.ndarray:
    """A .npy of int codes [frames, codebooks] of the model's codec, checked as the dataset build checks them."""
    if codec is None:
        raise GenerateError(f"cannot use codes {path}: this model has no audio codec (its dataset had no audio)")
    if not storage.path(path).is_file():
        raise GenerateError(f"codes file {path} does not exist; check the path in <codes:{path}>")
    try:
        codes = manifest.load_codes(storage.path(path))
        check_codes(codes, codec.codebook_sizes)
    except ValueError as e:
        raise GenerateError(f"codes {path} do not fit codec {codec.name!r}: {e}") from e
    return codes


def prompt_arrays(segments: list[dict], vocab: Vocab, tokenizer, patch_size: int, audio_layout: str = "flat",
                  target: str = "text") -> dict:
    """Segments -> {"tokens", "modality", "patches", "patch_positions"} of the training-time prefix (per
    position, then the image patches and their positions, as encode_example gives them): `<bos>` spans (no
    `<eos>`), then `<boa>` when the target is audio, `<boi>` when it is an image (the model goes on with codes)."""
    _check_target(target)
    encoded = encode_example({"segments": segments, "targets": []}, vocab, tokenizer, patch_size, audio_layout)
    prompt = slice_positions(encoded, 0, len(encoded["tokens"]) - 1)  # drop <eos>
    opening = {"audio": (BOA, AUDIO), "image": (BOI, IMAGE)}.get(target)
    if opening is not None:
        prompt = dict(prompt, tokens=np.append(prompt["tokens"], np.int32(opening[0])),
                      modality=np.append(prompt["modality"], np.int32(opening[1])))
    return prompt


def _check_target(target: str) -> None:
    if target not in GENERATED_MODALITIES:
        raise GenerateError(f"target {target!r} is not one of {GENERATED_MODALITIES}")


# ----------------------------------------------------------------------------------------------- decoding

@dataclasses.dataclass
class GenerationResult:
    tokens: list[list[int]]      # generated ids per prompt, stop id excluded
    stopped: list[int | None]    # the stop id that ended each row, None where max_new_tokens ran out
    prefill_s: float             # prefill of the whole batch (compiled), seconds
    decode_s: float              # the decode loop (compiled), seconds
    compile_s: float             # lowering + compiling both, 0 when this call found them compiled
    decode_tokens: int           # tokens produced by the decode loop, all rows (each row's first comes from prefill)
    decode_steps: int            # decode loop iterations

    @property
    def decode_tokens_per_s(self) -> float:
        return self.decode_tokens / self.decode_s if self.decode_s > 0 else 0.0


@dataclasses.dataclass(frozen=True)
class _Spec:
    """Everything static about one generate call (part of the compile key)."""
    vocab: Vocab
    target: str
    audio_layout: str
    max_new_tokens: int
    greedy: bool  # temperature == 0
    use_top_k: bool  # top_k > 0; temperature and top_k themselves are arguments: changing them compiles nothing
    stop_ids: tuple[int, ...]
    model: str  # repr of the ModelConfig
    image_grid: ImageGrid | None = None  # the answer's grid (target image)


def allowed_table(vocab: Vocab, target: str, audio_layout: str, stop_ids) -> np.ndarray:
    """bool [phases, vocab.size]: the ids allowed at generated position n are row n % phases."""
    stop_ids = list(stop_ids)
    if target == "text":
        table = np.zeros((1, vocab.size), bool)
        table[0, vocab.text_offset:vocab.text_offset + vocab.text_size] = True
        table[0, stop_ids] = True
        return table
    k = len(vocab.codebook_sizes)
    if k == 0:
        raise GenerateError("target 'audio' needs a model with an audio codec; this vocabulary has no codebooks")
    table = np.zeros((k, vocab.size), bool)
    for j, size in enumerate(vocab.codebook_sizes):
        table[j, vocab.audio_offset(j):vocab.audio_offset(j) + size] = True
        if audio_layout == "delay":
            table[j, AUDIO_DELAY] = True
    table[0, stop_ids] = True  # an audio span ends only at a frame (step) boundary
    return table


def _modality_of(tokens_B, vocab: Vocab):
    """The modality training gave each id: audio codes and markers AUDIO, image codes and markers IMAGE."""
    image_start = vocab.image_offset(0)  # = the end of the audio ranges, with or without image codebooks
    is_audio = ((tokens_B >= vocab.audio_offset(0)) & (tokens_B < image_start)) | jnp.isin(
        tokens_B, jnp.array([BOA, EOA, AUDIO_DELAY]))
    is_image = ((tokens_B >= image_start) & (tokens_B < vocab.used_size)) | jnp.isin(tokens_B, jnp.array([BOI, EOI, ROW]))
    return jnp.where(is_audio, AUDIO, jnp.where(is_image, IMAGE, TEXT)).astype(jnp.int32)


def _sample(logits_BxV, allowed_V, key, spec: _Spec, temperature, top_k):
    logits_BxV = jnp.where(allowed_V[None], logits_BxV, -jnp.inf)
    if spec.greedy:
        return jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
    logits_BxV = logits_BxV / temperature
    if spec.use_top_k:  # keep logits >= the k-th largest (ties at the k-th are kept too)
        descending_BxV = -jnp.sort(-logits_BxV, axis=-1)
        kth_Bx1 = descending_BxV[:, jnp.clip(top_k - 1, 0, logits_BxV.shape[-1] - 1)][:, None]
        logits_BxV = jnp.where(logits_BxV >= kth_Bx1, logits_BxV, -jnp.inf)
    return jax.random.categorical(key, logits_BxV, axis=-1).astype(jnp.int32)


def _make_fns(graphdef, model_cfg, spec: _Spec, total_len: int, patch_dim: int):
    """The jittable prefill (prompt -> loop state) and decode loop (state -> final state)."""
    if spec.target == "image":
        allowed = image_generate.allowed_table(spec.vocab, spec.image_grid)
        row_of = functools.partial(image_generate.phase, grid=spec.image_grid, xp=jnp)
    else:
        allowed = allowed_table(spec.vocab, spec.target, spec.audio_layout, spec.stop_ids)
        phases = allowed.shape[0]

        def row_of(step):
            return step % phases
    stops = np.asarray(spec.stop_ids, np.int32)

    def pick(logits_BxV, step, key, sampling):
        allowed_PxV = jnp.asarray(allowed)
        return _sample(logits_BxV, allowed_PxV[row_of(step)], key, spec, *sampling)

    if model_cfg.fusion in ("early", "mot"):  # global causal attention: a KV cache holds all a step needs
        first_logits, next_logits = _cached_steps(model_cfg, spec, total_len, patch_dim)
    else:
        first_logits, next_logits = _recompute_steps(spec, total_len)

    def prefill(params, batch, lengths_B, limits_B, key, sampling):
        n = lengths_B.shape[0]
        logits_BxV, cache = first_logits(nnx.merge(graphdef, params), batch, lengths_B)
        key, sub = jax.random.split(key)
        token_B = pick(logits_BxV, 0, sub, sampling)
        out_BxN = jnp.full((n, spec.max_new_tokens), PAD_ID, jnp.int32).at[:, 0].set(token_B)
        return {"step": jnp.ones((), jnp.int32), "token": token_B, "cache": cache, "lengths": lengths_B,
                "limits": limits_B, "finished": jnp.isin(token_B, stops) | (limits_B <= 1), "key": key,
                "out": out_BxN, "sampling": sampling}

    def decode(params, state, limit):
        """Steps until every row stopped, max_new_tokens, or step `limit` (the end of this chunk)."""
        def cond(carry):
            s = carry[1]
            return (s["step"] < jnp.minimum(limit, spec.max_new_tokens)) & ~jnp.all(s["finished"])

        def body(carry):  # params ride in the carry: nnx modules must be built from this trace's values
            params, s = carry
            slot_B = s["lengths"] + s["step"] - 1  # where the fed token sits
            logits_BxV, cache = next_logits(nnx.merge(graphdef, params), s["token"], slot_B, s["cache"])
            key, sub = jax.random.split(s["key"])
            new_B = jnp.where(s["finished"], PAD_ID, pick(logits_BxV, s["step"], sub, s["sampling"]))
            return params, dict(s, step=s["step"] + 1, token=new_B, cache=cache, key=key,
                                finished=s["finished"] | jnp.isin(new_B, stops) | (s["step"] + 1 >= s["limits"]),
                                out=s["out"].at[:, s["step"]].set(new_B))

        return jax.lax.while_loop(cond, body, (params, state))[1]

    return prefill, decode


def _cached_steps(model_cfg, spec: _Spec, total_len: int, patch_dim: int):
    """Early fusion and mot: the prompt fills a KV cache, then each step runs one token per row against it (mot
    routes it through its modality's slice)."""
    def first_logits(model, batch, lengths_B):
        cache = init_cache(model_cfg, lengths_B.shape[0], total_len)
        logits_Bx1xV, cache = model.prefill(batch, cache, lengths_B - 1)
        return logits_Bx1xV[:, 0], cache

    def next_logits(model, token_B, slot_B, cache):
        batch = step_batch(token_B, _modality_of(token_B, spec.vocab), slot_B, patch_dim)
        logits_Bx1xV, cache = model.decode_step(batch, cache)
        return logits_Bx1xV[:, 0], cache

    return first_logits, next_logits


def _recompute_steps(spec: _Spec, total_len: int):
    """Late and cross fusion (no KV cache): the "cache" is the whole sequence so far, [B, total_len], run again
    through the model at every step (O(total_len^2) per token; these variants are for ablations)."""

    def full_batch(seq):
        n = seq["tokens"].shape[0]
        return dict(seq, segment_ids=jnp.ones((n, total_len), jnp.int32),  # causal: later slots never matter
                    positions=jnp.tile(jnp.arange(total_len, dtype=jnp.int32), (n, 1)))

    def first_logits(model, batch, lengths_B):
        pad = total_len - batch["tokens"].shape[1]
        seq = {name: jnp.pad(batch[name], [(0, 0), (0, pad)]) for name in ("tokens", "modality")}
        seq.update(patches=batch["patches"], patch_positions=batch["patch_positions"])  # generated: no patch
        logits_BxLxV = model(full_batch(seq))
        return jnp.take_along_axis(logits_BxLxV, (lengths_B - 1)[:, None, None], axis=1)[:, 0], seq

    def next_logits(model, token_B, slot_B, seq):
        rows_B = jnp.arange(token_B.shape[0])
        seq = dict(seq, tokens=seq["tokens"].at[rows_B, slot_B].set(token_B),
                   modality=seq["modality"].at[rows_B, slot_B].set(_modality_of(token_B, spec.vocab)))
        logits_BxLxV = model(full_batch(seq))
        return jnp.take_along_axis(logits_BxLxV, slot_B[:, None, None], axis=1)[:, 0], seq

    return first_logits, next_logits


_COMPILED: collections.OrderedDict = collections.OrderedDict()
_MAX_COMPILED = 16


def _compiled(name: str, graphdef, spec: _Spec, fn, *args, donate=()):
    """fn(*args) lowered and compiled once per (model, settings, argument shapes/shardings, active mesh);
    returns (executable, seconds spent compiling now)."""
    leaves, tree = jax.tree.flatten(args)
    key = (name, id(graphdef), spec, tree, sharding.active_mesh_key(),
           tuple((np.shape(x), str(x.dtype), getattr(x, "sharding", None)) for x in leaves))
    hit = _COMPILED.get(key)
    if hit is not None and hit[0] is graphdef:
        _COMPILED.move_to_end(key)
        return hit[1], 0.0
    start = time.perf_counter()
    executable = jax.jit(fn, donate_argnums=donate).lower(*args).compile()
    seconds = time.perf_counter() - start
    _COMPILED[key] = (graphdef, executable)
    while len(_COMPILED) > _MAX_COMPILED:
        _COMPILED.popitem(last=False)
    return executable, seconds


# ----------------------------------------------------------------------------------------------- model batches

def bucket(n: int, smallest: int = 1) -> int:
    """n rounded up to a power of two (at least `smallest`): the fixed sizes batches and lengths are padded to,
    so that a handful of compiled programs serve every call."""
    return max(smallest, 1 << max(int(n) - 1, 0).bit_length())


NO_POSITION = 2**30  # an unused patch slot's position: past any row, so the model's scatter drops it


def prompt_batch(prompts: list[dict], rows: int, width: int) -> dict:
    """Per-prompt arrays (prompt_arrays) -> the model's batch (omni.batch), right-padded to `width` positions and
    `rows` rows, the patch slots padded to a power of two; the rows past len(prompts) hold a lone <bos> (their
    output is never read). This and step_batch are the only places generation builds model inputs."""
    pdim = np.shape(prompts[0]["patches"])[-1]
    slots = bucket(max(len(p["patches"]) for p in prompts))
    lengths = np.ones(rows, np.int32)
    lengths[:len(prompts)] = [len(p["tokens"]) for p in prompts]
    batch = {"tokens": np.zeros((rows, width), np.int32), "modality": np.zeros((rows, width), np.int32),
             "patches": np.zeros((rows, slots, pdim), np.uint8),
             "patch_positions": np.full((rows, slots), NO_POSITION, np.int32),
             "segment_ids": (np.arange(width)[None] < lengths[:, None]).astype(np.int32),
             "positions": np.tile(np.arange(width, dtype=np.int32), (rows, 1))}
    batch["tokens"][len(prompts):, 0], batch["modality"][len(prompts):, 0] = BOS, TEXT
    for i, p in enumerate(prompts):
        for name in ("tokens", "modality"):
            batch[name][i, :lengths[i]] = p[name]
        batch["patches"][i, :len(p["patches"])] = p["patches"]
        batch["patch_positions"][i, :len(p["patches"])] = p["patch_positions"]
    return batch


def step_batch(token_B, modality_B, slot_B, patch_dim: int) -> dict:
    """One new token per row at cache slot slot_B (a decode step): never an image patch, so no pixels."""
    n = token_B.shape[0]
    return {"tokens": token_B[:, None], "patches": jnp.zeros((n, 1, patch_dim), jnp.uint8),
            "patch_positions": jnp.full((n, 1), NO_POSITION, jnp.int32),
            "modality": modality_B[:, None], "segment_ids": jnp.ones((n, 1), jnp.int32), "positions": slot_B[:, None]}


def generate(graphdef, params, model_cfg, vocab: Vocab, prompts: list[dict], *, target: str, max_new_tokens,
             temperature: float = 0.0, top_k: int = 0, seed: int = 0, stop_ids=None,
             audio_layout: str = "flat", buckets: bool = True, image_grid: ImageGrid | None = None) -> GenerationResult:
    """Continues each prompt (arrays as prompt_arrays gives them) in one batch.

    Rows stop at their first stop id (default <eos> for text, <eoa> for audio) or after max_new_tokens (one
    count for all, or one per prompt). An image answer (target "image") is always the whole `image_grid`, its
    markers forced, ending at <eoi>: max_new_tokens is not used (a cut image would not decode). With `buckets` the batch is padded to bucket(rows) rows of
    bucket(width, 16) positions and the loop sized for bucket(max_new_tokens, 16) steps, so calls with similar
    shapes reuse one compiled program; padding changes no row's tokens (each row stops at its own count).
    """
    _check_target(target)
    if not prompts:
        raise GenerateError("no prompts to generate from")
    if target == "image":
        if image_grid is None:
            raise GenerateError("target 'image' needs the grid of the image to generate (image_grid)")
        max_new_tokens = image_grid.span_tokens
    limits = np.broadcast_to(np.asarray(max_new_tokens, np.int64), (len(prompts),))
    if limits.min() < 1:
        raise GenerateError(f"max_new_tokens must be >= 1; got {int(limits.min())}")
    if temperature < 0 or top_k < 0:
        raise GenerateError(f"temperature and top_k must be >= 0; got {temperature}, {top_k}")
    stop_ids = tuple(int(s) for s in (DEFAULT_STOP[target] if stop_ids is None else stop_ids))
    lengths = np.array([len(p["tokens"]) for p in prompts], np.int32)
    if lengths.min() < 1:
        raise GenerateError("every prompt needs at least one token (<bos>)")
    n, width, steps = len(prompts), int(lengths.max()), int(limits.max())
    if buckets:
        rows, width, steps = bucket(n), bucket(width, 16), bucket(steps, 16)
    else:
        rows = n
    spec = _Spec(vocab, target, audio_layout, steps, temperature == 0, top_k > 0, stop_ids, repr(model_cfg),
                 image_grid if target == "image" else None)
    batch = prompt_batch(prompts, rows, width)
    lengths_B = np.ones(rows, np.int32)
    lengths_B[:n] = lengths
    limits_B = np.zeros(rows, np.int32)  # padding rows are finished from the start
    limits_B[:n] = limits
    pdim = batch["patches"].shape[-1]
    prefill_fn, decode_fn = _make_fns(graphdef, model_cfg, spec, width + steps, pdim)
    sampling = (np.float32(temperature or 1.0), np.int32(top_k))
    args = (params, batch, lengths_B, limits_B, jax.random.key(seed), sampling)
    prefill, compile_prefill = _compiled("prefill", graphdef, spec, prefill_fn, *args)
    start = time.perf_counter()
    state = jax.block_until_ready(prefill(*args))
    prefill_s = time.perf_counter() - start
    # the loop state (the cache above all) is donated: the loop updates it in place
    decode, compile_decode = _compiled("decode", graphdef, spec, decode_fn, params, state, np.int32(1),
                                       donate=(1,))
    state, decode_s = _decode_in_chunks(decode, params, state, spec.max_new_tokens)

    out = _to_host(state["out"])
    tokens, stopped = [], []
    for row, limit in zip(out[:n], limits):
        row = row[:limit]
        hits = np.flatnonzero(np.isin(row, stop_ids))
        end = int(hits[0]) if hits.size else len(row)
        tokens.append([int(t) for t in row[:end]])
        stopped.append(int(row[end]) if hits.size else None)
    produced = sum(len(t) + (s is not None) for t, s in zip(tokens, stopped))
    return GenerationResult(tokens=tokens, stopped=stopped, prefill_s=prefill_s, decode_s=decode_s,
                            compile_s=compile_prefill + compile_decode, decode_tokens=produced - n,
                            decode_steps=int(_to_host(state["step"])) - 1)


def _decode_in_chunks(decode, params, state, max_new_tokens: int):
    """Runs the compiled loop a chunk of steps at a time until every row stopped or max_new_tokens; returns
    (state, seconds). Between chunks control is back in Python, so Ctrl-C (KeyboardInterrupt) stops generation
    within about DECODE_CHUNK_S. Chunks grow or shrink to take about that long; with several processes they
    keep a fixed size, so that every process runs the same calls."""
    adapt = jax.process_count() == 1
    chunk, step, seconds = (8 if adapt else 64), 1, 0.0
    while step < max_new_tokens:
        start = time.perf_counter()
        state = decode(params, state, np.int32(min(step + chunk, max_new_tokens)))
        step, finished = int(_to_host(state["step"])), bool(np.all(_to_host(state["finished"])))
        elapsed = time.perf_counter() - start
        seconds += elapsed
        if finished:
            break
        if adapt:
            chunk = int(np.clip(chunk * DECODE_CHUNK_S / max(elapsed, 1e-6), max(1, chunk // 4), chunk * 4))
    return state, seconds


def _to_host(x) -> np.ndarray:
    """A result as numpy on this process, gathered from the others when its shards live on several hosts."""
    if getattr(x, "is_fully_addressable", True) or x.is_fully_replicated:
        return np.asarray(x)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


# ----------------------------------------------------------------------------------------------- many prompts

@dataclasses.dataclass
class Request:
    """One prompt to continue: its arrays (prompt_arrays), what to generate, how far, and where to stop."""
    prompt: dict
    target: str
    max_new_tokens: int
    stop_ids: tuple[int, ...] | None = None  # None: DEFAULT_STOP[target]
    image_grid: ImageGrid | None = None  # target image: the answer's grid (it fixes the answer's length)


@dataclasses.dataclass
class ManyResult:
    tokens: list[list[int]]      # per request, in request order, stop id excluded
    stopped: list[int | None]    # the stop id that ended each, None where its max_new_tokens ran out
    batches: list[tuple[int, int, int]]  # (prompts, padded rows, padded width) of every batch run
    generated: int               # tokens generated, all requests (stop ids included)
    prefill_s: float
    decode_s: float
    compile_s: float
    decode_tokens: int = 0       # tokens made by decode steps (generated less each request's first token)

    @property
    def decode_tokens_per_s(self) -> float:
        """Decode-loop tokens per second, as GenerationResult.decode_tokens_per_s."""
        return self.decode_tokens / self.decode_s if self.decode_s > 0 else 0.0

    @property
    def tokens_per_s(self) -> float:
        """Generated tokens per second of prefill + decode (compiling excluded)."""
        seconds = self.prefill_s + self.decode_s
        return self.generated / seconds if seconds > 0 else 0.0


def generate_many(graphdef, params, model_cfg, vocab: Vocab, requests: list[Request], *, batch_size: int = 64,
                  temperature: float = 0.0, top_k: int = 0, seed: int = 0, audio_layout: str = "flat",
                  ) -> ManyResult:
    """Any number of requests in batches of at most `batch_size`: requests with the same target, stop ids (and
    image grid) are sorted by prompt length (so a batch holds similar lengths), cut into batches and run through generate,
    whose buckets let every batch of similar shape reuse one compiled program. Results come back in order."""
    if batch_size < 1:
        raise GenerateError(f"the batch size must be at least 1; got {batch_size}")
    groups: dict = {}
    for i, r in enumerate(requests):
        _check_target(r.target)
        stop = tuple(DEFAULT_STOP[r.target] if r.stop_ids is None else r.stop_ids)
        groups.setdefault((r.target, stop, r.image_grid if r.target == "image" else None), []).append(i)
    tokens, stopped = [None] * len(requests), [None] * len(requests)
    out = ManyResult(tokens, stopped, [], 0, 0.0, 0.0, 0.0)
    for (target, stop, grid), members in groups.items():
        members.sort(key=lambda i: len(requests[i].prompt["tokens"]))
        for start in range(0, len(members), batch_size):
            chunk = members[start:start + batch_size]
            result = generate(graphdef, params, model_cfg, vocab, [requests[i].prompt for i in chunk],
                              target=target, max_new_tokens=[requests[i].max_new_tokens for i in chunk],
                              temperature=temperature, top_k=top_k, seed=seed, stop_ids=stop,
                              audio_layout=audio_layout, image_grid=grid)
            for i, t, s in zip(chunk, result.tokens, result.stopped):
                tokens[i], stopped[i] = t, s
            width = max(len(requests[i].prompt["tokens"]) for i in chunk)
            out.batches.append((len(chunk), bucket(len(chunk)), bucket(width, 16)))
            out.generated += result.decode_tokens + len(chunk)
            out.decode_tokens += result.decode_tokens
            out.prefill_s += result.prefill_s
            out.decode_s += result.decode_s
            out.compile_s += result.compile_s
    return out


# ----------------------------------------------------------------------------------------------- prompts files

@dataclasses.dataclass
class Task:
    """One line of a prompts file (or one held-out example): the prompt segments, what to generate and, when
    the line is an example with its answer, the truth to score against."""
    id: str
    segments: list[dict]            # the prompt, as parse_prompt gives them
    target: str                     # "text", "audio" or "image"
    stop_ids: tuple[int, ...]       # what ends the answer (the marker of the segment that follows it)
    truth: "str | np.ndarray | None" = None  # the answer: text, audio codes [T, K] or image codes [R, C, K]
    group: str = ""                 # what scores are grouped by: the example's meta "task", else its target
    line: int = 0                   # line number in the prompts file (0: not from a file)
    meta: dict = dataclasses.field(default_factory=dict)
    image_grid: ImageGrid | None = None  # target image: the grid to generate (the truth's, when there is one)


def task_of(example: dict, line: int = 0) -> Task:
    """An example ({"id", "targets", "meta", "segments"} with images decoded and audio as codes) -> its Task.

    The answer is the first segment of a target modality that is in the loss ("target" not false; an image as
    patches never is, its codes are); the prompt is every segment before it. A text answer ends where the next
    segment's marker would come (<boa> before audio, <boi> before an image) or at <eos>; an audio answer at
    <eoa>, an image answer (of the truth's grid) at <eoi>. Later segments are not generated.
    """
    targets = set(example.get("targets", ()))
    segments = example["segments"]
    for i, segment in enumerate(segments):
        kind = ("text" if "text" in segment else "audio" if "audio" in segment else
                "image" if "image_codes" in segment else None)  # image patches are inputs only
        if kind in targets and segment.get("target", True):
            break
    else:
        raise GenerateError(f"example {example.get('id')} has no segment of its targets {sorted(targets)} to "
                            f"generate")
    grid = None
    if kind == "audio":
        stop, truth = (EOA,), np.asarray(segments[i]["audio"])
    elif kind == "image":
        truth = np.asarray(segments[i]["image_codes"])
        stop, grid = (EOI,), image_generate.grid_of_codes(truth)
    else:
        following = segments[i + 1] if i + 1 < len(segments) else {}
        stop = (BOA,) if "audio" in following else (BOI,) if {"image", "image_codes"} & set(following) else (EOS,)
        truth = segments[i]["text"]
    prompt = [{k: v for k, v in s.items() if k != "target"} for s in segments[:i]]
    meta = example.get("meta") or {}
    group = str(meta.get("task", kind)) if isinstance(meta, dict) else kind  # a manifest's meta may be any JSON
    return Task(id=str(example.get("id", f"line{line}")), segments=prompt, target=kind, stop_ids=stop,
                truth=truth, group=group, line=line, meta=meta, image_grid=grid)


PROMPT_KEYS = {"prompt", "id", "target", "audio", "image_size"}


def read_prompts(path, *, patch_size: int, max_image_patches: int, codec=None, target: str = "text",
                 image_tokenizer=None, image_size: tuple[int, int] | None = None) -> list[Task]:
    """A prompts file -> Tasks. Each non-blank line is a JSON object, either

        a manifest line (omni.data.manifest; "segments", "targets", ...): the prompt is every segment before
            its first target segment, which is the answer (kept as the truth to score against); images enter
            as the line says ("as"; codes through `image_tokenizer`, fitted to max_image_patches cells);
        {"prompt": "text with <image:PATH> ... tags", "id": ..., "target": "text"|"audio"|"image",
         "audio": [PATH, ...], "image_size": [HEIGHT, WIDTH]}: an inline-tag prompt as `omni generate --prompt`
            takes it ("target" defaults to `target`; an image answer has the grid of "image_size" pixels, default
            `image_size`, else the largest square of max_image_patches cells: image_generate.grid_for).

    Relative paths in either are relative to the file's folder. A bad line is a GenerateError naming the file
    and line: not JSON, an unknown field, tag or target, a missing file, codes out of range, an image target
    without an image tokenizer.
    """
    from omni.data.audio import resample

    path = storage.path(path)
    if not path.is_file():
        raise GenerateError(f"prompts file {path} does not exist")
    tasks = []
    for number, line in manifest.read_lines(path):
        if isinstance(line, manifest.ManifestError):
            raise GenerateError(str(line))

        def fail(reason):
            raise GenerateError(f"{path}:{number}: {reason}")

        if "segments" not in line:
            unknown = set(line) - PROMPT_KEYS
            if "prompt" not in line or unknown:
                fail(f"a line is a manifest line with \"segments\" or a prompt {{\"prompt\": \"text with "
                     f"{TAG_HELP} tags\", \"id\", \"target\", \"audio\"}}"
                     + (f"; unknown field(s) {sorted(unknown)}" if unknown else ""))
            kind = line.get("target", target)
            if kind not in GENERATED_MODALITIES:
                fail(f"target {manifest.short_repr(kind)} is not one of {GENERATED_MODALITIES}")
            audio = line.get("audio", [])
            if not isinstance(line["prompt"], str) or not isinstance(audio, list) or \
                    not all(isinstance(a, str) and a.strip() for a in audio):
                fail("\"prompt\" must be a string and \"audio\" a list of WAV paths")
            size = line.get("image_size", image_size)
            if "image_size" in line and not (kind == "image" and _is_size(size)):
                fail(f"\"image_size\" is [HEIGHT, WIDTH] in pixels, for a \"target\": \"image\" line; got "
                     f"{manifest.short_repr(size)} with target {kind!r}")
            try:
                segments = parse_prompt(line["prompt"], [_relative(a, path.parent) for a in audio],
                                        patch_size=patch_size, max_image_patches=max_image_patches, codec=codec,
                                        base=path.parent)
                grid = (image_generate.grid_for(image_tokenizer, max_image_patches, size) if kind == "image"
                        else None)
            except GenerateError as e:
                fail(str(e))
            tasks.append(Task(id=str(line.get("id", f"line{number}")), segments=segments, target=kind,
                              stop_ids=DEFAULT_STOP[kind], group=kind, line=number, image_grid=grid))
            continue
        try:
            raw = manifest.load_line(line, path, number)
        except manifest.ManifestError as e:
            raise GenerateError(str(e)) from None
        segments = []
        for i, segment in enumerate(raw["segments"]):
            out = {"target": segment.get("target", True)}
            try:
                if "image_bytes" in segment or "image_codes" in segment:
                    segments += _image_segments(segment, out["target"], patch_size, max_image_patches,
                                                image_tokenizer)
                    continue
                if "text" in segment:
                    out["text"] = segment["text"]
                else:
                    if codec is None:
                        fail(f"segment {i} is audio but this model has no audio codec (its dataset had no audio)")
                    if "audio" in segment:
                        if getattr(codec, "sample_rate", None) is None:
                            fail(f"segment {i}: the model's codec {codec.name!r} is external; give the codes of "
                                 f"this audio as a \"codes\" segment")
                        codes = np.asarray(codec.encode(resample(segment["audio"], segment["sample_rate"],
                                                                 codec.sample_rate)))
                    else:
                        codes = segment["codes"]
                    check_codes(codes, codec.codebook_sizes)
                    out["audio"] = codes
            except ValueError as e:
                if isinstance(e, GenerateError):
                    raise
                fail(f"segment {i}: {e}")
            segments.append(out)
        tasks.append(task_of(dict(raw, segments=segments), number))
    if not tasks:
        raise GenerateError(f"prompts file {path} has no prompts (every line is blank)")
    return tasks


def _image_segments(segment: dict, target: bool, patch_size: int, max_image_patches: int, image_tokenizer) -> list:
    """A manifest line's image segment as training reads it (omni.data.image_entry, the rule both use): patches
    fitted to the budget, codes of the image tokenizer, or both (patches in, codes out); precomputed codes as
    they are."""
    needs = "an image tokenizer (its dataset had none): give the image \"as\": \"patches\""
    if "image_codes" in segment:
        if image_tokenizer is None:
            raise ValueError(f"image codes need {needs}")
        check_image_codes(segment["image_codes"], image_tokenizer.codebook_sizes)
        return [{"image_codes": np.asarray(segment["image_codes"]), "target": target}]
    enters = segment.get("as", "patches")
    return image_segments(decode_image(segment["image_bytes"]), enters, target, patch_size, max_image_patches,
                          image_tokenizer, f"an image entering as {enters} needs {needs}")


def _is_size(value) -> bool:
    return (isinstance(value, (list, tuple)) and len(value) == 2
            and all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in value))


def _relative(value, base) -> str:
    if base is None or storage.path(value).is_absolute():
        return str(value)
    return str(base / value)


def requests_for(tasks: list[Task], vocab: Vocab, tokenizer, patch_size: int, audio_layout: str, context: int,
                 max_new_tokens: int | None = None, source: str = "") -> list[Request]:
    """Tasks -> Requests: each prompt encoded as in training, its new tokens capped to what the context leaves
    (fit_to_context; None: all of it), an image answer's set by its grid. A prompt that fills the context (or
    leaves too little for its image) is a GenerateError naming its line."""
    requests = []
    for task in tasks:
        prompt = prompt_arrays(task.segments, vocab, tokenizer, patch_size, audio_layout, task.target)
        try:
            if task.target == "image":
                limit = image_generate.fit_to_context(task.image_grid, len(prompt["tokens"]), context)
            else:
                limit = fit_to_context(context if max_new_tokens is None else max_new_tokens, len(prompt["tokens"]),
                                       context)
        except GenerateError as e:
            where = (f"{source}:{task.line}" if task.line else task.id if task.id == PROMPT_ID
                     else f"example {task.id}")
            raise GenerateError(f"{where}: {e}") from None
        requests.append(Request(prompt, task.target, limit, task.stop_ids, task.image_grid))
    return requests


STOP_REASONS = ("stop token", "max new tokens", "context full")


def stop_reason(stopped, tokens: list[int], limit: int, asked: int | None) -> str:
    """Why generation ended: a stop id, the --max-new-tokens asked for, or the end of the trained context."""
    if stopped is not None:
        return STOP_REASONS[0]
    return STOP_REASONS[1] if asked is not None and limit >= asked else STOP_REASONS[2]


@dataclasses.dataclass
class Answer:
    """One task's generation: its request (the prompt arrays and the token limit it got), the generated tokens
    (stop id excluded), the stop id or None, and the decoded output (decode_output)."""
    task: Task
    request: Request
    tokens: list[int]
    stopped: int | None
    output: object


def answer_tasks(model, tasks: list[Task], *, max_new_tokens: int | None = None, temperature: float = 0.0,
                 top_k: int = 0, seed: int = 0, batch_size: int = 64, source: str = "",
                 max_new_by_group: dict | None = None, skip_unfit: bool = False, log=None,
                 ) -> tuple[dict[int, Answer], dict[int, str], ManyResult]:
    """The one way tasks are generated (`omni generate --prompt` is one task, `--prompts` and eval many):
    ({task index: Answer}, {task index: why it was skipped}, ManyResult).

    max_new_tokens None lets each answer run to the end of the trained context (data.seq_len);
    max_new_by_group overrides it per task group (the demo tasks' own caps). Image answers are their grid.
    A task whose prompt leaves no room for its answer in the context is a GenerateError naming it; with
    skip_unfit (scoring, where the other answers must not be lost) it is skipped, saying why. With `log`, a
    text or audio answer whose max_new_tokens the context cuts is said before generating (`omni generate`)."""
    cfg = model.config
    if any(task.target == "image" for task in tasks):
        image_generate.check_can_generate(model.vocab, model.image_tokenizer)
    requests, fitting, skipped = [], [], {}
    for i, task in enumerate(tasks):
        limit = (max_new_by_group or {}).get(task.group, max_new_tokens)
        try:
            requests += requests_for([task], model.vocab, model.tokenizer, cfg.data.patch_size,
                                     cfg.data.audio_layout, cfg.data.seq_len, limit, source)
            fitting.append(i)
        except GenerateError as e:
            if not skip_unfit:
                raise
            skipped[i] = str(e)
    for i, request in zip(fitting, requests):
        asked = (max_new_by_group or {}).get(tasks[i].group, max_new_tokens)
        if log is not None and request.target != "image" and asked is not None and request.max_new_tokens < asked:
            log(f"omni: --max-new-tokens {asked} capped to {request.max_new_tokens}: the model was trained on "
                f"{cfg.data.seq_len}-token sequences and the prompt has {len(request.prompt['tokens'])}")
    result = generate_many(model.graphdef, model.params, cfg.model, model.vocab, requests, batch_size=batch_size,
                           temperature=temperature, top_k=top_k, seed=seed, audio_layout=cfg.data.audio_layout)
    answers = {}
    for i, request, tokens, stopped in zip(fitting, requests, result.tokens, result.stopped):
        output = decode_output(tokens, tasks[i].target, model.vocab, model.tokenizer, model.codec,
                               cfg.data.audio_layout, image_grid=request.image_grid,
                               image_tokenizer=model.image_tokenizer)
        answers[i] = Answer(tasks[i], request, tokens, stopped, output)
    return answers, skipped, result


def run_tasks(model, tasks: list[Task], *, max_new_tokens: int | None = None, temperature: float = 0.0,
              top_k: int = 0, seed: int = 0, batch_size: int = 64, wav_dir=None, source: str = "",
              max_new_by_group: dict | None = None, image_dir=None, skip_unfit: bool = False,
              ) -> tuple[list[dict], ManyResult]:
    """Generates every task (answer_tasks, which says what the options do) and returns one prediction dict per
    task, in order:

        {"id", "line" (prompts files), "group", "target", "text" | "codes" (audio [T][K], image [R][C][K])
         (+ "wav" with wav_dir, "png" with image_dir when the tokenizer decodes),
         "stop": "stop token" | "max new tokens" | "context full", "tokens": generated count (stop id included),
         "truth": the answer when the task has one, "meta": the example's meta when it has one}

    a skipped task (skip_unfit) is {"id", ..., "skipped": why}.
    """
    answers, skipped, result = answer_tasks(model, tasks, max_new_tokens=max_new_tokens, temperature=temperature,
                                            top_k=top_k, seed=seed, batch_size=batch_size, source=source,
                                            max_new_by_group=max_new_by_group, skip_unfit=skip_unfit)
    for folder in (wav_dir, image_dir):
        if folder is not None:
            storage.path(folder).mkdir(parents=True, exist_ok=True)
    predictions = {i: _row(tasks[i]) | {"skipped": why} | _truth(tasks[i]) for i, why in skipped.items()}
    for i, answer in answers.items():
        task, output = answer.task, answer.output
        asked = (max_new_by_group or {}).get(task.group, max_new_tokens)
        row = _row(task)
        if task.target == "text":
            row["text"] = output
        elif task.target == "image":
            row["codes"] = output["codes"].tolist()
            if image_dir is not None and output["image"] is not None:
                png = storage.path(image_dir) / f"{_file_name(task.id)}.png"
                image_generate.write_png(png, output["image"])
                row["png"] = str(png)
        else:
            row["codes"] = np.asarray(output["codes"]).tolist()
            if wav_dir is not None and output["wave"] is not None:
                from omni.data.audio import write_wav

                wav = storage.path(wav_dir) / f"{_file_name(task.id)}.wav"
                write_wav(wav, output["wave"], output["sample_rate"])
                row["wav"] = str(wav)
        row["stop"] = stop_reason(answer.stopped, answer.tokens, answer.request.max_new_tokens, asked)
        row["tokens"] = len(answer.tokens) + (answer.stopped is not None)
        predictions[i] = row | _truth(task)
    return [predictions[i] for i in range(len(tasks))], result


PROMPT_ID = "--prompt"  # the id of the one task `omni generate --prompt` makes (messages name it so)


def prompt_task(text: str, audio, target: str, model, image_size=None) -> Task:
    """`omni generate --prompt TEXT [--audio WAV ...]`: the one Task it is, read as a prompts line {"prompt":
    TEXT, "audio": [...], "target": ...} is (an image answer has the grid of image_size pixels, default the size
    the model's images mostly had)."""
    _check_target(target)
    cfg = model.config
    grid = None
    if target == "image":
        image_generate.check_can_generate(model.vocab, model.image_tokenizer)
        grid = image_generate.grid_for(model.image_tokenizer, cfg.data.max_image_patches,
                                       image_size or model.image_size)
    segments = parse_prompt(text, audio, patch_size=cfg.data.patch_size,
                            max_image_patches=cfg.data.max_image_patches, codec=model.codec)
    return Task(id=PROMPT_ID, segments=segments, target=target, stop_ids=DEFAULT_STOP[target], group=target,
                image_grid=grid)


def _row(task: Task) -> dict:
    """The fields of a prediction that say which task it answers."""
    return {"id": task.id, **({"line": task.line} if task.line else {}), "group": task.group,
            "target": task.target, **({"meta": task.meta} if task.meta else {})}


def _truth(task: Task) -> dict:
    if task.truth is None:
        return {}
    return {"truth": task.truth if isinstance(task.truth, str) else np.asarray(task.truth).tolist()}


def generate_file(model_path, prompts, out, *, step: int | None = None, target: str = "text",
                  max_new_tokens: int | None = 200, temperature: float = 0.0, top_k: int = 0, seed: int = 0,
                  batch_size: int = 64, wav_dir=None, image_dir=None, image_size: tuple[int, int] | None = None,
                  log=None) -> list[dict]:
    """`omni generate --prompts`: every prompt of the file `prompts` (read_prompts) continued by the model at
    `model_path` (an export or a workdir) in batches; one JSON line per prompt, in file order, to `out`
    (run_tasks for the fields). Inline image prompts are image_size (H, W) pixels, default the size the model's
    images mostly had. Prints a summary line on stderr."""
    import sys

    log = log or (lambda text: print(text, file=sys.stderr, flush=True))
    start = time.perf_counter()
    model = artifact.load(model_path, step)
    cfg = model.config
    tasks = read_prompts(prompts, patch_size=cfg.data.patch_size, max_image_patches=cfg.data.max_image_patches,
                         codec=model.codec, target=target, image_tokenizer=model.image_tokenizer,
                         image_size=image_size or model.image_size)
    predictions, result = run_tasks(model, tasks, max_new_tokens=max_new_tokens, temperature=temperature,
                                    top_k=top_k, seed=seed, batch_size=batch_size, wav_dir=wav_dir,
                                    source=str(prompts), image_dir=image_dir)
    write_jsonl(out, predictions)
    shapes = ", ".join(f"{rows}x{width}" for rows, width in sorted({(r, w) for _, r, w in result.batches}))
    log(f"omni: {len(tasks)} prompts -> {out}: {result.generated} tokens in {len(result.batches)} batches "
        f"(padded rows x width: {shapes}); prefill {result.prefill_s:.2f} s, decode {result.decode_s:.2f} s, "
        f"{result.tokens_per_s:,.0f} tokens/s, compile {result.compile_s:.1f} s, "
        f"{time.perf_counter() - start:.1f} s in all")
    return predictions


def _file_name(task_id: str) -> str:
    """A prediction's id as a safe file name (ids are free text)."""
    name = re.sub(r"[^\w.-]+", "_", task_id).strip("._") or "prediction"
    return name[:120]


def write_jsonl(path, rows: list[dict]):
    """rows as JSON lines at `path` (a local path or a URL), written whole or not at all (omni.storage)."""
    import json

    path = storage.path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    storage.write_text(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
    return path


# ----------------------------------------------------------------------------------------------- outputs

def decode_output(tokens, target: str, vocab: Vocab, tokenizer, codec=None, audio_layout: str = "flat", *,
                  image_grid: ImageGrid | None = None, image_tokenizer=None):
    """Generated ids -> a string (text), {"codes": int [T, K], "wave": float32 [samples] or None,
    "sample_rate": int or None} (audio; the wave when the codec can decode), or {"codes": int [R, C, K],
    "image": uint8 [H, W, 3] or None} (image of `image_grid`; the pixels when the image tokenizer can decode)."""
    _check_target(target)
    if target == "image":
        return image_generate.decode_answer(tokens, vocab, image_grid, image_tokenizer)
    ids = np.asarray(tokens, np.int64)
    if target == "text":
        text_ids = ids[(ids >= vocab.text_offset) & (ids < vocab.text_offset + vocab.text_size)]
        return tokenizer.decode([int(t) - vocab.text_offset for t in text_ids])
    k = len(vocab.codebook_sizes)
    codes = unflatten_codes(ids, vocab, audio_layout) if k else np.zeros((0, 0), np.int64)
    sizes = np.asarray(vocab.codebook_sizes)
    codes = np.where((codes >= 0) & (codes < sizes[None]), codes, 0)  # a stray <delay> inside a frame -> code 0
    wave, rate = None, getattr(codec, "sample_rate", None)
    if codec is not None and rate is not None and len(codes):
        try:
            wave = np.asarray(codec.decode(codes), np.float32)
        except ValueError:
            wave = None
    return {"codes": codes, "wave": wave, "sample_rate": rate}
