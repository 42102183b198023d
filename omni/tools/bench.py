"""`omni bench`: the real train step's speed on this machine, beside a matmul measured in the same run.

    omni bench --config configs/bench/omni_1b.py [--set ...] [--text-only] [--out bench.jsonl]
    omni bench --config configs/bench/omni_cpu.py --reference [--compile-only]

One run: (1) a matmul in the model's compute dtype on every device, the measured peak; (2) the real train
step (the model, masked loss, optimizer, sharded on the configured mesh) on packed batches of synthetic
examples in realistic proportions, timed after compile and warm-up. It prints one JSON line and appends it to
--out: step time, tokens/s, TFLOP/s, MFU against the measured peak and against the datasheet, peak device
memory, compile time, and the share of positions per modality.

FLOPs (the same formula the training logs use, omni.model.counting.flops_per_token): 6 x matmul params x tokens +
causal attention 6 x layers x seq x heads x head_dim per token. Matmul params are the attention and MLP
weights of every layer plus the unembedding; the input embedding lookup and the patch projection are not
counted, as MaxText and ../shared/bench/plain_jax_step.py count. The attention term counts every row as one
causal sequence of seq_len; `attention_in_segments` is the share of it inside packed segments, the part the
packed (cuDNN) kernel computes, so a reader can discount the rest.

Attention: `attention` is the kernel used (omni.model.attention.attend: cudnn = packed-sequence flash attention, rows
described by segment offsets; xla = dense segment mask), `segments_per_row` the most runs a row held against
model.max_segments.

The synthetic batch (no dataset needed, so it runs on a bare accelerator host): image + caption examples
(max_image_patches patches, 10-60 byte caption, text target), speech (2-10 s of codes at 12.5 frames/s with a
transcript; ASR or TTS target) and text documents (0.1 to 1.5 x seq_len bytes), tokenized with the real encode_example
and first-fit packed into rows of seq_len, the next example always of the kind furthest below its share of
positions (MIX: 35% image examples, 35% speech, 30% text); --text-only packs text documents only. Token
ids only use the first 256 text ids (bytes); the vocabulary size, which sets the unembedding cost, is --vocab.

Compiled figures (omni.train.perf.compiled_stats, per device, from the lowered and compiled step that is then
timed): `flops_per_step` (dot FLOPs read from the HLO, loop bodies times their trip count), `bytes_per_step`,
`kernels_per_step`, `dot_kernels_per_step`, `loop_trip_counts`, XLA's own `xla_cost_flops`/`xla_cost_bytes`
(a scanned body counted once), `compiled_peak_memory_gib` (temporaries + arguments + outputs - aliased) and
its parts; `lower_compile_s` is lowering + compiling, `compile_s` that plus the first step. --compile-only
stops there (the state is shapes only, nothing is allocated or run): the timed fields, `loss`, the matmul peak
and `peak_memory_gib` are null and `compile_only` is true. --reference then does the same for the plain-JAX
step of the same size (omni.tools.reference) and prints a third line, "ratios": omni / reference for each
field in RATIOS (`step_time_ratio`, `peak_memory_ratio` from the compiled peaks, `kernels_ratio`,
`bytes_ratio`, `flops_ratio`, ...).
"""

from __future__ import annotations

import json
import time

import jax
import numpy as np

from omni import sharding, storage
from omni.batch import AUDIO, IMAGE, PAD, TEXT, padding_rows, patch_dim, row_patches, runs_per_row
from omni.config import Config, ConfigError
from omni.data.text_tokenizer import ByteTokenizer
from omni.model.attention import attention_implementation
from omni.model.counting import flops_per_token, matmul_params
from omni.tokens import Vocab, encode_example, fit_to_length
from omni.tools import reference
from omni.train.perf import compiled_stats, datasheet_peak, measure_matmul_peak, time_steps, utilisation
from omni.train.step import abstract_state, build_optimizer, check_host_batch, init_state, make_train_step

MIX = {"image": 0.35, "speech": 0.35, "text": 0.30}  # shares of the packed positions each kind of example fills


def bench_vocab(vocab_size: int, codebooks: int, codebook_size: int) -> Vocab:
    """A vocabulary of `vocab_size` ids: specials, `codebooks` x `codebook_size` audio codes, text the rest."""
    text_size = vocab_size - 16 - codebooks * codebook_size
    if text_size < 256:
        raise ConfigError(f"--vocab {vocab_size} leaves {text_size} text ids after {codebooks} x {codebook_size} "
                         "audio codes; at least 256 are needed")
    return Vocab(text_size=text_size, codebook_sizes=(codebook_size,) * codebooks)


def synthetic_example(rng: np.random.Generator, kind: str, cfg: Config, vocab: Vocab, frame_rate: float) -> dict:
    """One raw example (omni.tokens) of the given kind, random content of realistic length."""
    def text(lo, hi):
        return "".join(rng.choice(list("abcdefghijklmnopqrstuvwxyz     "), size=int(rng.integers(lo, hi))))

    if kind == "image":
        side = int(np.sqrt(cfg.data.max_image_patches)) * cfg.data.patch_size
        image = rng.integers(0, 256, (side, side, 3), dtype=np.uint8)
        return {"segments": [{"image": image}, {"text": text(10, 60)}], "targets": ["text"]}
    if kind == "speech":
        frames = int(rng.uniform(2, 10) * frame_rate)
        codes = rng.integers(0, min(vocab.codebook_sizes), (frames, len(vocab.codebook_sizes)))
        if rng.random() < 0.5:
            return {"segments": [{"audio": codes}, {"text": text(30, 150)}], "targets": ["text"]}
        return {"segments": [{"text": text(30, 150), "target": False}, {"audio": codes}], "targets": ["audio"]}
    seq_len = cfg.data.seq_len
    return {"segments": [{"text": text(seq_len // 10, seq_len * 3 // 2)}], "targets": ["text"]}


def synthetic_batch(cfg: Config, vocab: Vocab, rng: np.random.Generator, text_only: bool = False,
                    frame_rate: float = 12.5) -> dict:
    """A packed batch (omni.batch fields) of cfg.train.batch_size rows, filled first-fit to seq_len."""
    rows, seq_len, slots = cfg.train.batch_size, cfg.data.seq_len, row_patches(cfg.data)
    filled = dict.fromkeys(MIX, 0)
    tokenizer = ByteTokenizer()
    batch = padding_rows(rows, seq_len, slots, patch_dim(cfg.data))
    fill = np.zeros(rows, int)
    patch_fill = np.zeros(rows, int)
    segments = np.zeros(rows, int)
    misses = dict.fromkeys(MIX, 0)
    kinds = ["text"] if text_only else list(MIX)
    while True:  # stop once pieces of every kind keep failing to fit: the rows (or their patch slots) are full
        open_kinds = [k for k in kinds if misses[k] < 32]
        if not open_kinds:
            break
        total = sum(filled.values())
        kind = max(open_kinds, key=lambda k: MIX[k] * total - filled[k])
        encoded = encode_example(synthetic_example(rng, kind, cfg, vocab, frame_rate), vocab, tokenizer,
                                 cfg.data.patch_size, cfg.data.audio_layout)
        for piece in fit_to_length(encoded, seq_len, "split", "synthetic"):
            n, p = len(piece["tokens"]), len(piece["patches"])
            row = next((r for r in range(rows) if fill[r] + n <= seq_len and patch_fill[r] + p <= slots), None)
            if row is None:
                misses[kind] += 1
                continue
            span = slice(fill[row], fill[row] + n)
            segments[row] += 1
            for name in ("tokens", "modality", "is_target"):
                batch[name][row, span] = piece[name]
            batch["segment_ids"][row, span] = segments[row]
            batch["positions"][row, span] = np.arange(n)
            batch["patches"][row, patch_fill[row]:patch_fill[row] + p] = piece["patches"]
            batch["patch_positions"][row, patch_fill[row]:patch_fill[row] + p] = fill[row] + piece["patch_positions"]
            fill[row] += n
            patch_fill[row] += p
            filled[kind] += n
    return batch


def attention_in_segments(batch: dict) -> float:
    """The share of the counted causal attention (every row attending over all seq_len positions) that lies
    inside packed segments: sum of segment length^2 over rows x seq_len^2. Packed-sequence attention (cuDNN)
    computes only this part, so the FLOP formula credits the rest without it being done."""
    ids = batch["segment_ids"]
    inside = sum(int(np.sum(row == s)) ** 2 for row in ids for s in np.unique(row[row > 0]))
    return round(inside / (ids.shape[0] * ids.shape[1] ** 2), 4)


def modality_shares(batch: dict) -> dict:
    total = batch["modality"].size
    names = {"text": TEXT, "image": IMAGE, "audio": AUDIO, "pad": PAD}
    return {name: round(float(np.sum(batch["modality"] == m)) / total, 4) for name, m in names.items()}


def run(cfg: Config, *, text_only: bool = False, warmup: int = 2, steps: int = 5, vocab_size: int = 32768,
        codebooks: int = 8, codebook_size: int = 1024, frame_rate: float = 12.5, matmul_size: int | None = None,
        out=None, seed: int = 0, reference: bool = False, compile_only: bool = False, profile=None):
    """Times cfg's train step; returns (and prints, and appends to `out`) the result dict. With `reference`,
    then times the plain-JAX step of the same size (omni.tools.reference) and returns [omni, reference, ratios]
    (three lines printed). With `compile_only`, lowers and compiles without running anything: the timed
    figures are null and the compiled ones (perf.compiled_stats) are there. With `profile` (a folder), omni's timed
    steps are traced with jax.profiler into it (TensorBoard's profile plugin, Perfetto)."""
    mesh = sharding.make_mesh(cfg.mesh)
    sharding.check_batch_fits_mesh(cfg, mesh)
    platform = mesh.devices.flat[0].platform
    vocab = bench_vocab(vocab_size, codebooks, codebook_size)
    n = None if compile_only else matmul_size or (8192 if platform in ("gpu", "tpu") else 1024)
    peak = None if compile_only else measure_matmul_peak(mesh, cfg.model.dtype, n=n, reps=10)
    sheet = datasheet_peak(mesh)

    tx, schedule = build_optimizer(cfg)
    rng = np.random.default_rng(seed)
    host_batches = [synthetic_batch(cfg, vocab, rng, text_only, frame_rate) for _ in range(2)]
    for batch in host_batches:
        check_host_batch(cfg, batch)
    batches = [sharding.global_batch(b, mesh, cfg.mesh.rules) for b in host_batches]
    if compile_only:
        graphdef, state, shardings = abstract_state(cfg, mesh, tx, vocab)
    else:
        graphdef, state, shardings = init_state(cfg, mesh, tx, vocab)
    step_fn = make_train_step(cfg, graphdef, tx, schedule, mesh, shardings)
    start = time.perf_counter()
    compiled = step_fn.lower(state, batches[0]).compile()  # compiled once here; this program is what is timed
    lower_compile_s = time.perf_counter() - start
    stats = compiled_stats(compiled)
    params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state["params"]))

    tokens = cfg.train.batch_size * cfg.data.seq_len
    flops_tok = flops_per_token(cfg.model, vocab.size, cfg.data.seq_len)
    if compile_only:
        step_time = loss = None
        compile_s = lower_compile_s
    else:
        state, metrics, first_s, step_time = time_steps(compiled, state, batches, warmup, steps, profile)
        compile_s = lower_compile_s + first_s
        loss = float(metrics["loss"])
        del state
    result = {
        "what": "bench", "config": cfg.name, "text_only": text_only, "platform": platform,
        "device": mesh.devices.flat[0].device_kind, "devices": int(mesh.devices.size), "mesh": dict(mesh.shape),
        "batch": [cfg.train.batch_size, cfg.data.seq_len], "dtype": cfg.model.dtype, "remat": cfg.model.remat,
        "attention": attention_implementation(cfg.model), "max_segments": cfg.model.max_segments,
        "segments_per_row": int(max(runs_per_row(b["segment_ids"]).max() for b in host_batches)),
        "params": params, "matmul_params": int(matmul_params(cfg.model, vocab.size)),
        "vocab": vocab.size, "flops_per_token": flops_tok,
        **_timed(tokens, flops_tok, step_time, peak, sheet, mesh, n),
        "compile_s": compile_s, "warmup_steps": warmup, "timed_steps": 0 if compile_only else steps, "loss": loss,
        "positions": modality_shares(host_batches[0]),
        "target_fraction": round(float(host_batches[0]["is_target"].mean()), 4),
        "attention_in_segments": attention_in_segments(host_batches[0]),
        "compile_only": compile_only, "lower_compile_s": lower_compile_s, **stats,
    }
    lines = [result]
    if reference:
        ref = run_reference(cfg, mesh, vocab.size, warmup=warmup, steps=steps, peak=peak, sheet=sheet,
                            matmul_size=n, compile_only=compile_only, seed=seed)
        lines += [ref, ratios(result, ref)]
    for line in lines:
        text = json.dumps(line)
        print(text)
        if out:
            storage.path(out).parent.mkdir(parents=True, exist_ok=True)
            storage.append_text(out, text + "\n")
    return lines if reference else result


def run_reference(cfg: Config, mesh, vocab_size: int, *, warmup: int, steps: int, peak: float | None,
                  sheet: float | None, matmul_size: int | None, compile_only: bool, seed: int = 0) -> dict:
    """The plain-JAX step of cfg's size (omni.tools.reference) compiled, and unless compile_only timed, on
    the same mesh: the same fields as omni's line where they apply ("what": "reference").
    `peak_memory_gib` is null: the process's peak already holds omni's run; compare
    `compiled_peak_memory_gib`."""
    step, create, state_sh, tokens_sh = reference.make_step(cfg, vocab_size, mesh)
    tokens = jax.device_put(reference.synthetic_tokens(cfg, vocab_size, seed), tokens_sh)
    if compile_only:
        shapes = jax.eval_shape(create, jax.random.PRNGKey(seed))
        state = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=state_sh), shapes)
    else:
        state = create(jax.random.PRNGKey(seed))
    start = time.perf_counter()
    compiled = step.lower(state, tokens).compile()
    lower_compile_s = time.perf_counter() - start
    stats = compiled_stats(compiled)
    params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state["params"]))
    n_tokens = cfg.train.batch_size * cfg.data.seq_len
    flops_tok = flops_per_token(cfg.model, vocab_size, cfg.data.seq_len)
    matmuls = reference.matmul_params(cfg, vocab_size)
    if compile_only:
        step_time = loss = None
        compile_s = lower_compile_s
    else:
        state, loss, first_s, step_time = time_steps(compiled, state, [tokens], warmup, steps)
        compile_s, loss = lower_compile_s + first_s, float(loss)
        del state
    timed = _timed(n_tokens, flops_tok, step_time, peak, sheet, mesh, matmul_size)
    timed["peak_memory_gib"] = None
    return {
        "what": "reference", "config": cfg.name, "platform": mesh.devices.flat[0].platform,
        "device": mesh.devices.flat[0].device_kind, "devices": int(mesh.devices.size),
        "batch": [cfg.train.batch_size, cfg.data.seq_len], "dtype": cfg.model.dtype, "remat": cfg.model.remat,
        "attention": "cudnn" if attention_implementation(cfg.model) == "cudnn" else "xla",
        "params": params, "matmul_params": matmuls, "vocab": vocab_size, "flops_per_token": flops_tok, **timed,
        "compile_s": compile_s, "warmup_steps": warmup, "timed_steps": 0 if compile_only else steps, "loss": loss,
        "compile_only": compile_only, "lower_compile_s": lower_compile_s, **stats,
    }


# omni / reference, each ratio from the two lines' field of the same name (null where either is null or 0).
RATIOS = {"step_time_ratio": "step_time_s", "tokens_per_s_ratio": "tokens_per_s",
          "peak_memory_ratio": "compiled_peak_memory_gib", "temp_memory_ratio": "temp_memory_gib",
          "kernels_ratio": "kernels_per_step", "dot_kernels_ratio": "dot_kernels_per_step",
          "bytes_ratio": "bytes_per_step", "flops_ratio": "flops_per_step",
          "xla_cost_flops_ratio": "xla_cost_flops", "xla_cost_bytes_ratio": "xla_cost_bytes",
          "compile_ratio": "lower_compile_s", "params_ratio": "params"}


def ratios(omni: dict, ref: dict) -> dict:
    """The third line of --reference: omni's figure / the reference's, for every field in RATIOS."""
    def ratio(field):
        a, b = omni.get(field), ref.get(field)
        return a / b if a is not None and b not in (None, 0) else None

    return {"what": "ratios", "config": omni["config"], "compile_only": omni["compile_only"],
            **{name: ratio(field) for name, field in RATIOS.items()}}


def _timed(tokens: int, flops_tok: float, step_time: float | None, peak, sheet, mesh, matmul_size) -> dict:
    """The figures that need a run (null with --compile-only)."""
    if step_time is None:
        return {"step_time_s": None, "tokens_per_s": None, "tflops_per_s": None, "tflops_per_s_per_device": None,
                "matmul_size": None, "matmul_peak_tflops": None, "mfu": None,
                "datasheet_peak_tflops": sheet / 1e12 if sheet else None, "mfu_datasheet": None,
                "peak_memory_gib": None}
    achieved = flops_tok * tokens / step_time
    return {"step_time_s": step_time, "tokens_per_s": tokens / step_time, "tflops_per_s": achieved / 1e12,
            "tflops_per_s_per_device": achieved / 1e12 / mesh.devices.size, "matmul_size": matmul_size,
            "matmul_peak_tflops": peak / 1e12, "mfu": utilisation(flops_tok * tokens, step_time, peak),
            "datasheet_peak_tflops": sheet / 1e12 if sheet else None,
            "mfu_datasheet": utilisation(flops_tok * tokens, step_time, sheet) if sheet else None,
            "peak_memory_gib": _peak_memory_gib(mesh)}


def _peak_memory_gib(mesh) -> float | None:
    stats = [d.memory_stats() for d in mesh.devices.flat]
    peaks = [s.get("peak_bytes_in_use") for s in stats if s]
    return max(peaks) / 2**30 if peaks and None not in peaks else None
