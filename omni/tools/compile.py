"""`omni compile`: the programs a config runs, compiled for hardware that is not here, and what they cost there.

    omni compile --config configs/bench/omni_1b.py --target h100 [--reference] [--json]
    omni compile --config configs/bench/omni_1b.py --target v5p-8 --set mesh.fsdp=-1 --set mesh.data=1
    omni compile --config C --target h100 --devices 8            # one 8-GPU host
    omni compile --config C --target v5e-256 --slices 2          # TPU multislice: the dcn_* mesh axes span slices

The target's devices are described, not present (omni.tools.targets): XLA builds the mesh from them, lowers the
real train step (and the eval step, and generation's prefill and decode for one batch) with shapes only, and
compiles each as it would on the device. Per device and per program it reports:

- memory: arguments, temporaries, outputs, aliased (donated buffers reused) and their peak against the device's
  memory (GPU: times the share JAX's allocator takes, XLA_PYTHON_CLIENT_MEM_FRACTION, default 0.75); fits or
  not and by how much. A TPU program that does not fit fails to compile (RESOURCE_EXHAUSTED); that is
  reported the same way. When the train step does not fit, settings that might are compiled too (stronger
  remat, more gradient-accumulation micro-batches, FSDP over every device) and the report says which fit.
- work: matmul FLOPs, bytes accessed, kernels per step (omni.train.perf.hlo_step_counts: loop bodies times their
  trip counts), library kernels (cuDNN attention, cuBLAS, Triton gemm fusions), collectives by kind with bytes
  per step, split into those within a slice (ICI / NVLink) and across slices (DCN).
- an estimate: the roofline step time max(FLOPs / peak, bytes / bandwidth) and the MFU it implies against the
  datasheet peak (FLOPs: the larger of the program's matmul FLOPs and the model's training FLOPs of
  omni.model.counting, which include attention computed inside cuDNN kernels). Labelled an estimate: it ignores
  collectives, launch gaps and imperfect kernels, so a measured step is slower and its MFU lower.

For `generate` the decode loop's trip count is not known when compiling (rows stop at their stop id): its body
is counted once, so its figures are prefill plus one decode step.

With --reference the plain-JAX step of the same size (omni.tools.reference) is compiled for the same devices
and reported beside it, with omni / reference ratios. --json prints one JSON object instead of the table.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import re
import time

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from omni import sharding
from omni.batch import FIELDS, padding_rows, patch_dim, row_patches
from omni.config import Config, ConfigError, apply_overrides, validate
from omni.model.attention import attention_implementation
from omni.model.counting import flops_per_token
from omni.tools import reference as reference_step
from omni.tools import targets as targets_lib
from omni.tools.bench import bench_vocab
from omni.train.perf import compiled_stats, group_members, hlo_step_counts
from omni.train.step import abstract_state, build_optimizer, make_eval_step, make_train_step

GIB = 2.0**30
DEFAULT_GPU_MEMORY_FRACTION = 0.75  # what JAX's GPU allocator preallocates unless XLA_PYTHON_CLIENT_MEM_FRACTION


@dataclasses.dataclass
class Options:
    target: str
    devices: int = 1                 # GPUs on the host
    slices: int = 1                  # TPU slices (multislice)
    reference: bool = False
    programs: tuple = ("train", "eval", "generate")
    vocab_size: int = 32768
    codebooks: int = 8
    codebook_size: int = 1024
    generate_batch: int = 8          # rows of the compiled generate call
    prompt_len: int = 256            # its prompt width
    new_tokens: int = 256            # and the tokens it generates
    memory_fraction: float | None = None  # GPU: share of device memory the allocator may use
    suggest: bool = True             # when the train step does not fit, compile settings that might


def run(cfg: Config, options: Options) -> dict:
    """Compiles cfg's programs for options.target; returns the report (module docstring) as a dict."""
    target = targets_lib.resolve(options.target, options.devices)
    devices = target.devices(options.slices)
    vocab = bench_vocab(options.vocab_size, options.codebooks, options.codebook_size)
    capacity = _capacity(target, options.memory_fraction)
    report = {"what": "compile", "config": cfg.name, "target": target.name, "device": target.kind,
              "platform": target.platform, "devices": len(devices), "slices": options.slices,
              "target_source": target.source, "device_memory_gib": target.memory_bytes / GIB,
              "usable_memory_gib": capacity / GIB, "peak_tflops": (target.peak_flops or 0) / 1e12 or None,
              "bandwidth_tb_s": target.bandwidth / 1e12, "programs": {}}
    mesh = sharding.make_mesh(cfg.mesh, devices)
    sharding.check_batch_fits_mesh(cfg, mesh)
    report["mesh"] = dict(mesh.shape)
    report["attention"] = attention_implementation(cfg.model, target.platform)
    tokens = cfg.train.batch_size * cfg.data.seq_len
    model_flops = flops_per_token(cfg.model, vocab.size, cfg.data.seq_len) * tokens / len(devices)
    with targets_lib.cudnn_answers_for(target):
        for name in options.programs:
            lower = {"train": _lower_train, "eval": _lower_eval, "generate": _lower_generate}[name]
            report["programs"][name] = _compile(lambda: lower(cfg, mesh, vocab, options), target, capacity,
                                                model_flops if name == "train" else None, mesh)
        train = report["programs"].get("train")
        if train and not train["fits"] and options.suggest:
            report["suggestions"] = _suggestions(cfg, devices, vocab, options, target, capacity)
        if options.reference:
            ref = _compile(lambda: _lower_reference(cfg, mesh, vocab.size), target, capacity, model_flops, mesh)
            report["reference"] = ref
            if train:
                report["ratios"] = {f"{k}_ratio": _ratio(train[k], ref[k]) for k in RATIO_FIELDS}
    return report


RATIO_FIELDS = ("peak_memory_gib", "flops", "bytes", "kernels", "estimated_step_s")


def _ratio(a, b):
    return a / b if a is not None and b not in (None, 0) else None


def _capacity(target: targets_lib.Target, fraction: float | None) -> float:
    if target.platform != "gpu":
        return float(target.memory_bytes)
    if fraction is None:
        fraction = float(os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION", DEFAULT_GPU_MEMORY_FRACTION))
    if not 0 < fraction <= 1:
        raise ConfigError(f"--memory-fraction must be in (0, 1]; got {fraction}")
    return target.memory_bytes * fraction


# ------------------------------------------------------------------------------------------ the programs

def batch_shapes(cfg: Config, mesh, rows: int | None = None) -> dict:
    """The train batch (omni.batch fields) as ShapeDtypeStructs sharded as the trainer shards it."""
    rows = rows or cfg.train.batch_size
    example = padding_rows(1, cfg.data.seq_len, row_patches(cfg.data), patch_dim(cfg.data))
    return {k: jax.ShapeDtypeStruct((rows,) + example[k].shape[1:], example[k].dtype,
                                    sharding=sharding.batch_sharding(mesh, cfg.mesh.rules, example[k].ndim, k))
            for k in FIELDS}


def _lower_train(cfg, mesh, vocab, options):
    tx, schedule = build_optimizer(cfg)
    graphdef, state, shardings = abstract_state(cfg, mesh, tx, vocab)
    step = make_train_step(cfg, graphdef, tx, schedule, mesh, shardings)
    return step.lower(state, batch_shapes(cfg, mesh))


def _abstract_params(cfg, mesh, vocab):
    tx, _ = build_optimizer(cfg)
    graphdef, state, _ = abstract_state(cfg, mesh, tx, vocab)
    return graphdef, state["params"]


def _lower_eval(cfg, mesh, vocab, options):
    graphdef, params = _abstract_params(cfg, mesh, vocab)
    return make_eval_step(cfg, graphdef, mesh).lower(params, batch_shapes(cfg, mesh))


def _lower_generate(cfg, mesh, vocab, options):
    """Generation's prefill and decode loop for one batch of options.generate_batch prompts of
    options.prompt_len positions continued by options.new_tokens text tokens, as `omni generate` compiles them;
    lowered as one program (prefill then the loop), so the report counts both."""
    from omni.tools import generate as gen

    graphdef, params = _abstract_params(cfg, mesh, vocab)
    rows, width, steps = options.generate_batch, options.prompt_len, options.new_tokens
    spec = gen._Spec(vocab, "text", cfg.data.audio_layout, steps, True, False, tuple(gen.DEFAULT_STOP["text"]),
                     repr(cfg.model))
    pdim = patch_dim(cfg.data)
    prefill, decode = gen._make_fns(graphdef, cfg.model, spec, width + steps, pdim)
    replicated = NamedSharding(mesh, PartitionSpec())
    host = gen.prompt_batch([{"tokens": np.ones(width, np.int32), "modality": np.zeros(width, np.int32),
                              "patches": np.zeros((1, pdim), np.uint8), "patch_positions": np.zeros(1, np.int32)}],
                            rows, width)

    def shaped(x):
        return jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype, sharding=replicated)

    key = jax.eval_shape(lambda: jax.random.key(0))
    args = (params, jax.tree.map(shaped, host), shaped(np.ones(rows, np.int32)), shaped(np.ones(rows, np.int32)),
            jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=replicated),
            (shaped(np.float32(1)), shaped(np.int32(0))))

    def prefill_and_decode(params, batch, lengths, limits, key, sampling):
        return decode(params, prefill(params, batch, lengths, limits, key, sampling), steps)["out"]

    with sharding.activate(mesh, cfg.mesh.rules):
        return jax.jit(prefill_and_decode).lower(*args)


def _lower_reference(cfg, mesh, vocab_size):
    step, create, state_sh, tokens_sh = reference_step.make_step(cfg, vocab_size, mesh)
    shapes = jax.eval_shape(create, jax.random.PRNGKey(0))
    state = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=state_sh), shapes)
    tokens = jax.ShapeDtypeStruct((cfg.train.batch_size, cfg.data.seq_len), np.int32, sharding=tokens_sh)
    return step.lower(state, tokens)


# ------------------------------------------------------------------------------------------ one compile

_OUT_OF_MEMORY = re.compile(r"RESOURCE_EXHAUSTED|Ran out of memory|out of memory", re.I)


def _compile(lower, target, capacity: float, model_flops: float | None, mesh) -> dict:
    """Lowers and compiles one program; its figures per device (module docstring)."""
    start = time.perf_counter()
    try:
        compiled = lower().compile()
    except Exception as error:  # noqa: BLE001 - XLA raises one runtime error type for every failure
        text = str(error)
        if not _OUT_OF_MEMORY.search(text):
            raise
        need = re.search(r"\(([0-9.]+)([KMGT])\) exceeds available", text)
        peak = float(need.group(1)) * {"K": 2**-20, "M": 2**-10, "G": 1, "T": 2**10}[need.group(2)] if need else None
        return {"fits": False, "peak_memory_gib": peak, "over_by_gib": None if peak is None else peak - capacity / GIB,
                "compile_error": text.strip().splitlines()[0][:400], "compile_s": time.perf_counter() - start,
                "flops": None, "bytes": None, "kernels": None, "estimated_step_s": None}
    seconds = time.perf_counter() - start
    stats = compiled_stats(compiled)
    counts = hlo_step_counts(compiled.as_text())
    peak = stats["compiled_peak_memory_gib"]
    result = {
        "fits": peak is None or peak * GIB <= capacity,
        "peak_memory_gib": peak, "over_by_gib": None if peak is None else max(0.0, peak - capacity / GIB),
        "headroom_gib": None if peak is None else max(0.0, capacity / GIB - peak),
        "argument_gib": stats["argument_memory_gib"], "temp_gib": stats["temp_memory_gib"],
        "output_gib": stats["output_memory_gib"], "alias_gib": stats["alias_memory_gib"],
        "flops": counts["flops"], "bytes": counts["bytes"], "kernels": counts["kernels"],
        "dot_kernels": counts["dot_kernels"], "copies": _copies(compiled.as_text()),
        "library_kernels": dict(sorted(counts["custom_calls"].items())),
        "collectives": _collectives(counts["collectives"], mesh),
        "xla_cost_flops": stats["xla_cost_flops"] or None, "compile_s": seconds,
    }
    # The program's matmul FLOPs miss attention inside cuDNN kernels; the model's count (counting.flops_per_token)
    # has it: the larger of the two is the compute the step must do.
    work = max(counts["flops"], model_flops or 0.0)
    compute_s = work / target.peak_flops if target.peak_flops else None
    memory_s = counts["bytes"] / target.bandwidth
    step_s = max(compute_s or 0.0, memory_s)
    result.update({"estimated_compute_s": compute_s, "estimated_memory_s": memory_s, "estimated_step_s": step_s,
                   "estimated_mfu": (model_flops / step_s / target.peak_flops
                                     if model_flops and target.peak_flops and step_s else None)})
    return result


def _copies(text: str) -> int:
    """copy instructions executed per step (loop bodies times their trip counts), fusions named copy included."""
    from omni.train import perf

    comps, entry = perf._parse_hlo(text)
    total = 0

    def walk(name, weight):
        nonlocal total
        for ins in comps.get(name, []):
            if ins["op"] == "while" and ins["body"]:
                walk(ins["body"], weight * (ins["trip"] or 1))
            elif ins["op"] == "call" and (ins["to_apply"] or ins["calls"]):
                walk(ins["to_apply"] or ins["calls"], weight)
            elif ins["op"] in ("copy", "copy-start"):
                total += weight

    if entry:
        walk(entry, 1)
    return total


def _collectives(found: list[dict], mesh) -> dict:
    """{kind: {count, bytes, ici_bytes, dcn_bytes}} per step; a collective whose device groups span several
    slices moves its bytes over DCN, the others over ICI (NVLink on a GPU host). libtpu compiles what crosses
    TPU slices into host transfers for its megascale runtime: those are kind "megascale-send", all DCN."""
    slice_of = [getattr(d, "slice_index", 0) or 0 for d in mesh.devices.flat]
    out: dict = {}
    for c in found:
        groups = group_members(c["groups"])
        crosses = c.get("dcn", False) or any(len({slice_of[i] for i in g if i < len(slice_of)}) > 1 for g in groups)
        entry = out.setdefault(c["kind"], {"count": 0, "bytes": 0.0, "ici_bytes": 0.0, "dcn_bytes": 0.0})
        moved = c["bytes"] * c["count"]
        entry["count"] += c["count"]
        entry["bytes"] += moved
        entry["dcn_bytes" if crosses else "ici_bytes"] += moved
    return out


# ------------------------------------------------------------------------------------------ when it does not fit

def candidate_settings(cfg: Config, devices: int) -> list[list[str]]:
    """Overrides that lower the train step's memory, mildest first: stronger remat, more micro-batches (same
    global batch), FSDP over every device."""
    out = []
    if cfg.model.remat != "full":
        out.append(["model.remat=full"])
    micro = cfg.train.batch_size // cfg.train.grad_accum
    for factor in (2, 4):
        if micro % factor == 0 and micro // factor >= 1:
            out.append([f"train.grad_accum={cfg.train.grad_accum * factor}"])
    if devices > 1 and cfg.mesh.fsdp != devices:
        out.append(["mesh.data=1", "mesh.fsdp=-1", "mesh.tensor=1"])
    if cfg.model.remat != "full" and micro % 2 == 0:
        out.append(["model.remat=full", f"train.grad_accum={cfg.train.grad_accum * 2}"])
    return out


def _suggestions(cfg, devices, vocab, options, target, capacity) -> list[dict]:
    """Each candidate setting compiled (train step only): its peak and whether it fits."""
    found = []
    for overrides in candidate_settings(cfg, len(devices)):
        trial = apply_overrides(copy.deepcopy(cfg), overrides)
        try:
            validate(trial)
            mesh = sharding.make_mesh(trial.mesh, devices)
            sharding.check_batch_fits_mesh(trial, mesh)
        except ConfigError as error:
            found.append({"set": overrides, "fits": False, "why": str(error)})
            continue
        result = _compile(lambda: _lower_train(trial, mesh, vocab, options), target, capacity, None, mesh)
        found.append({"set": overrides, "fits": result["fits"], "peak_memory_gib": result["peak_memory_gib"]})
    return found


# ------------------------------------------------------------------------------------------ printing

def format_report(report: dict) -> str:
    """The report as a few aligned lines per program (what `omni compile` prints without --json)."""
    lines = [f"{report['config']} compiled for {report['devices']} x {report['device']} ({report['target']}, "
             f"mesh {report['mesh']}, attention {report['attention']}); device memory "
             f"{report['device_memory_gib']:.2f} GiB, usable {report['usable_memory_gib']:.2f} GiB"]
    programs = dict(report["programs"])
    if "reference" in report:
        programs["reference train step"] = report["reference"]
    for name, p in programs.items():
        lines.append(f"\n{name}:")
        if p["peak_memory_gib"] is not None:
            verdict = (f"fits, {p.get('headroom_gib', 0):.2f} GiB to spare" if p["fits"]
                       else f"DOES NOT FIT: {p['over_by_gib']:.2f} GiB over")
            lines.append(f"  memory per device  {p['peak_memory_gib']:.2f} GiB peak: {verdict}")
        else:
            lines.append(f"  memory per device  {'fits' if p['fits'] else 'DOES NOT FIT'}")
        if "compile_error" in p:
            lines.append(f"  compiler           {p['compile_error']}")
            continue
        lines.append(f"                     arguments {p['argument_gib']:.2f} + temporaries {p['temp_gib']:.2f} + "
                     f"outputs {p['output_gib']:.2f} - aliased {p['alias_gib']:.2f} GiB")
        lines.append(f"  work per step      {p['flops']:.3e} matmul FLOPs, {p['bytes']:.3e} bytes, "
                     f"{p['kernels']} kernels ({p['dot_kernels']} with matmuls), {p['copies']} copies")
        if p["library_kernels"]:
            lines.append("  library kernels    " + ", ".join(f"{k} x{v}" for k, v in p["library_kernels"].items()))
        for kind, c in p["collectives"].items():
            lines.append(f"  {kind:<18} x{c['count']}: {c['bytes'] / 2**20:.1f} MiB per step "
                         f"(ICI {c['ici_bytes'] / 2**20:.1f}, DCN {c['dcn_bytes'] / 2**20:.1f})")
        if p["estimated_step_s"] is not None:
            compute = f"{p['estimated_compute_s'] * 1e3:.1f} ms compute" if p["estimated_compute_s"] else "compute ?"
            mfu = f", MFU <= {p['estimated_mfu']:.0%}" if p.get("estimated_mfu") else ""
            lines.append(f"  estimate           {p['estimated_step_s'] * 1e3:.1f} ms per step ({compute}, "
                         f"{p['estimated_memory_s'] * 1e3:.1f} ms memory{mfu}; roofline, not measured)")
        lines.append(f"  compile            {p['compile_s']:.1f} s")
    for s in report.get("suggestions", []):
        verdict = "fits" if s["fits"] else "does not fit"
        peak = f" ({s['peak_memory_gib']:.2f} GiB)" if s.get("peak_memory_gib") is not None else ""
        lines.append(f"try --set {' --set '.join(s['set'])}: {verdict}{peak}{' - ' + s['why'] if 'why' in s else ''}")
    if "ratios" in report:
        lines.append("\nomni / reference: " + ", ".join(f"{k.removesuffix('_ratio')} {v:.3f}"
                                                       for k, v in report["ratios"].items() if v is not None))
    return "\n".join(lines)


def main(cfg: Config, options: Options, as_json: bool = False) -> dict:
    report = run(cfg, options)
    print(json.dumps(report) if as_json else format_report(report))
    return report
