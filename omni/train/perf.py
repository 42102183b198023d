"""What a step costs against what the devices can do: a matmul peak measured in the run, datasheet peaks, MFU."""

from __future__ import annotations

import re
import time

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec

# Datasheet dense bf16 peaks per chip, FLOP/s, for the 'mfu_datasheet' figure.
DATASHEET_PEAK = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "TPU v4": 275e12, "TPU v5 lite": 197e12,
                  "TPU v5p": 459e12, "TPU v6 lite": 918e12}


def measure_matmul_peak(mesh, dtype: str, n: int = 1024, reps: int = 5) -> float:
    """FLOP/s of a matmul on every device of the mesh at once (batch of per-device matmuls), measured now."""
    devices = mesh.devices.size
    sh = NamedSharding(mesh, PartitionSpec(tuple(mesh.axis_names)))
    a = jax.device_put(jnp.ones((devices, n, n), dtype), sh)
    f = jax.jit(lambda x: jnp.einsum("bij,bjk->bik", x, x))
    f(a).block_until_ready()
    start = time.perf_counter()
    for _ in range(reps):
        out = f(a)
    out.block_until_ready()
    return 2.0 * devices * n**3 * reps / (time.perf_counter() - start)


def datasheet_peak(mesh) -> float | None:
    kind = mesh.devices.flat[0].device_kind
    for name, peak in DATASHEET_PEAK.items():
        if name in kind:
            return peak * mesh.devices.size
    return None



def utilisation(flops: float, seconds: float, peak_flops_per_s: float) -> float:
    """MFU: the FLOP/s achieved (flops done in seconds) as a share of a peak (measured or datasheet)."""
    return flops / seconds / peak_flops_per_s


def time_steps(step_fn, state, batches: list, warmup: int, steps: int, profile_dir=None):
    """Runs step_fn(state, batch) over `batches` in turn: once (compile), `warmup` more, then `steps` timed
    (traced with jax.profiler into `profile_dir` when given: omni.train.profile.trace_into).
    Returns (state, last metrics, compile seconds, seconds per timed step)."""
    import contextlib

    from omni.train.profile import trace_into

    start = time.perf_counter()
    state, metrics = step_fn(state, batches[0])
    jax.block_until_ready(metrics)
    compile_s = time.perf_counter() - start
    for i in range(warmup):
        state, metrics = step_fn(state, batches[i % len(batches)])
    jax.block_until_ready(metrics)
    with trace_into(profile_dir) if profile_dir else contextlib.nullcontext():
        start = time.perf_counter()
        for i in range(steps):
            state, metrics = step_fn(state, batches[i % len(batches)])
        jax.block_until_ready(metrics)
        seconds = time.perf_counter() - start
    return state, metrics, compile_s, seconds / steps


# --- compiled cost: what XLA says one step costs, read from the compiled program (no step is run) -------------

_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4,
                "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16, "s4": 0.5, "u4": 0.5}
_ARRAY = r"([a-z]+[0-9a-z]*)\[([0-9,]*)\]"
# Instructions that launch no work: they name, group or alias buffers (a while loop's work is its body's).
_FREE = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast", "after-all", "partition-id",
         "replica-id", "opt-barrier", "add-dependency", "domain", "while", "call", "conditional"}


def _shape_bytes(shape: str) -> float:
    """Bytes of an HLO shape string (an array or a tuple of arrays); f8 types count 1 byte."""
    total = 0.0
    for dtype, dims in re.findall(_ARRAY, shape):
        n = 1
        for d in filter(None, dims.split(",")):
            n *= int(d)
        total += n * _DTYPE_BYTES.get(dtype, 1 if dtype.startswith("f8") else 4)
    return total


def _dims(shape: str) -> list[int]:
    m = re.search(_ARRAY, shape)
    return [int(d) for d in filter(None, m.group(2).split(","))] if m else []


def _parse_hlo(text: str) -> tuple[dict, str | None]:
    """{computation: [instruction dicts]} and the ENTRY computation's name, from HloModule text."""
    comps, entry, current = {}, None, None
    for line in text.splitlines():
        head = re.match(r"^(ENTRY )?%?([\w.\-]+) \(.*\{\s*$", line)
        if head and not line.startswith(" "):
            current = head.group(2)
            comps[current] = []
            if head.group(1):
                entry = current
            continue
        if line.startswith("}"):
            current = None
            continue
        body = re.match(r"^\s+(?:ROOT )?%([\w.\-]+) = (.*)$", line)
        if current is None or not body:
            continue
        name, rest = body.groups()
        if rest.startswith("("):  # a tuple shape: up to its closing parenthesis
            depth = 0
            for i, ch in enumerate(rest):
                depth += ch == "("
                depth -= ch == ")"
                if depth == 0:
                    break
            shape, rest = rest[:i + 1], rest[i + 2:]
        else:
            shape, _, rest = rest.partition(" ")
        op = re.match(r"([\w\-]+)\(", rest)
        if not op:
            continue
        depth, start = 0, op.end() - 1
        for j in range(start, len(rest)):
            depth += rest[j] == "("
            depth -= rest[j] == ")"
            if depth == 0:
                break
        attrs = rest[j + 1:]
        ins = {"name": name, "shape": shape, "op": op.group(1),
               "operands": re.findall(r"%([\w.\-]+)", rest[start:j + 1]), "attrs": attrs,
               "args": rest[start + 1:j].strip(),
               "root": line.lstrip().startswith("ROOT ")}
        for key in ("calls", "body", "condition", "to_apply"):
            m = re.search(key + r"=%([\w.\-]+)", attrs)
            ins[key] = m.group(1) if m else None
        trip = re.search(r'"known_trip_count":\{"n":"(\d+)"', attrs)
        ins["trip"] = int(trip.group(1)) if trip else None
        comps[current].append(ins)
    return comps, entry


def _dot_flops(ins: dict, shapes: dict) -> float:
    """2 x output elements x contracted size of a dot (or a cuBLAS gemm custom-call), else 0."""
    if ins["op"] == "convolution":
        return _convolution_flops(ins, shapes)
    if ins["op"] == "dot":
        m = re.search(r"lhs_contracting_dims=\{([0-9,]*)\}", ins["attrs"])
    elif ins["op"] == "custom-call" and re.search(r'custom_call_target="[^"]*(gemm|matmul)', ins["attrs"]):
        m = re.search(r'"lhs_contracting_dimensions":\[([^\]]*)\]', ins["attrs"])
    else:
        return 0.0
    lhs = _dims(shapes.get(ins["operands"][0], "")) if ins["operands"] else []
    contracted = 1
    for d in (m.group(1).replace('"', "").split(",") if m else []):
        if d.strip() and int(d) < len(lhs):
            contracted *= lhs[int(d)]
    out = 1
    for d in _dims(ins["shape"]):
        out *= d
    return 2.0 * out * contracted


def _convolution_flops(ins: dict, shapes: dict) -> float:
    """2 x output elements x (kernel input features x window) of a convolution: how TPU programs express matmuls
    (dim_labels like `0bf_io0->0bf`, a window of size 1)."""
    labels = re.search(r"dim_labels=([0-9a-z]+)_([0-9a-z]+)->", ins["attrs"])
    kernel = _dims(shapes.get(ins["operands"][1], "")) if len(ins["operands"]) > 1 else []
    if not labels or "i" not in labels.group(2) or len(kernel) != len(labels.group(2)):
        return 0.0
    contracted = kernel[labels.group(2).index("i")]
    window = re.search(r"window=\{([^}]*)\}", ins["attrs"])
    fields = dict(re.findall(r"(\w+)=([0-9_x\-]+)", window.group(1))) if window else {}
    sizes = [int(x) for x in fields.get("size", "").split("x") if x]

    def per_dim(key, neutral):
        values = fields.get(key, "").split("x") if key in fields else []
        return values + [neutral] * (len(sizes) - len(values))

    # libtpu writes batched matmuls and transposes as convolutions whose window slides over padding or a dilated
    # input (each output reads one window position); only a plain window (no padding, stride or dilation) is a
    # contraction over that dimension.
    for size, pad, stride, lhs, rhs in zip(sizes, per_dim("pad", "0_0"), per_dim("stride", "1"),
                                           per_dim("lhs_dilate", "1"), per_dim("rhs_dilate", "1")):
        if pad in ("0_0", "0") and stride == "1" and lhs == "1" and rhs == "1":
            contracted *= size
    out = 1
    for d in _dims(ins["shape"]):
        out *= d
    return 2.0 * out * contracted


def _fusion_flops(comps: dict, name: str) -> float:
    shapes = {i["name"]: i["shape"] for i in comps.get(name, [])}
    return sum(_dot_flops(i, shapes) + (_fusion_flops(comps, i["calls"]) if i["calls"] else 0.0)
               for i in comps.get(name, []))


def _kernel_bytes(ins: dict, shapes: dict, comps: dict) -> float:
    """Bytes one kernel reads and writes: its operands and its output, except that an operand only sliced
    (dynamic-slice, slice) counts as the slices read and a buffer updated in place (dynamic-update-slice)
    as the update written, as XLA's cost analysis counts them."""
    sizes = [_shape_bytes(shapes.get(o, "")) for o in ins["operands"]]
    out = _shape_bytes(ins["shape"])
    if ins["op"] in ("dynamic-slice", "slice") and sizes:
        sizes[0] = out
    elif ins["op"] == "dynamic-update-slice" and len(sizes) > 1:
        sizes[0], out = 0.0, sizes[1]
    elif ins["op"] == "fusion" and ins["calls"] in comps:
        body = comps[ins["calls"]]
        numbered = {i["name"]: int(i["args"]) for i in body if i["op"] == "parameter" and i["args"].isdigit()}
        users = {}
        for i in body:
            for o in i["operands"]:
                users.setdefault(o, []).append(i)
        body_shapes = {i["name"]: i["shape"] for i in body}
        for pname, k in numbered.items():
            if k >= len(sizes):
                continue
            use = users.get(pname, [])
            if use and all(u["op"] in ("dynamic-slice", "slice") and u["operands"][0] == pname for u in use):
                sizes[k] = sum(_shape_bytes(u["shape"]) for u in use)
            elif use and all(u["op"] == "dynamic-update-slice" and u["operands"][0] == pname for u in use):
                sizes[k] = 0.0
                if any(u["root"] for u in use):
                    out = sum(_shape_bytes(body_shapes.get(u["operands"][1], "")) for u in use)
    return out + sum(sizes)


COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute",
               "collective-broadcast", "ragged-all-to-all")


def _library_call(ins: dict) -> str | None:
    """The library kernel an instruction is: a custom-call's target (`__cudnn$fmhaSoftmax`, `__cublas$lt$matmul`,
    ...) or, for a fusion XLA hands to Triton or cuDNN, that backend's kind (`__triton_gemm`), else None."""
    if ins["op"] == "custom-call":
        m = re.search(r'custom_call_target="([^"]+)"', ins["attrs"])
        return m.group(1) if m else "custom-call"
    if ins["op"] == "fusion":
        m = re.search(r'"kind":"(__triton[\w$]*|__cudnn[\w$]*|__custom_fusion)"', ins["attrs"])
        return m.group(1) if m else None
    return None


def _collective(ins: dict, comps: dict) -> dict | None:
    """{kind, bytes, groups} of a collective (sync, `-start` or wrapped in an async-start; on TPU multislice the
    megascale runtime's DCN sends, with "dcn": True), else None. Bytes:
    its largest array (the gathered / reduced buffer), the size each device sends or receives at most."""
    op, attrs = ins["op"], ins["attrs"]
    if op == "send" and "xla_megascale_runtime" in attrs:
        # TPU multislice: what crosses slices leaves as host transfers the megascale runtime sends over DCN
        arrays = [_shape_bytes(f"{t}[{d}]") for t, d in re.findall(_ARRAY, ins["shape"])]
        return {"kind": "megascale-send", "bytes": max(arrays, default=0.0), "groups": "", "dcn": True}
    kind = op[:-len("-start")] if op.endswith("-start") else op
    if op == "async-start" and ins["calls"]:
        inner = next((i for i in comps.get(ins["calls"], []) if i["root"]), None)
        if inner is None:
            return None
        kind, attrs = inner["op"], inner["attrs"]
    if kind not in COLLECTIVES:
        return None
    arrays = [(_shape_bytes(f"{t}[{d}]")) for t, d in re.findall(_ARRAY, ins["shape"])]
    groups = re.search(r"(replica_groups|source_target_pairs)=(\{[{}0-9, ]*\}|\[[0-9,]+\]<=\[[0-9,]+\](?:T\([0-9,]+\))?"
                       r"|mesh\[[^\]]*\] \{[^}]*\})", attrs)
    return {"kind": kind, "bytes": max(arrays, default=0.0), "groups": groups.group(2) if groups else ""}


def group_members(groups: str) -> list[list[int]]:
    """Device groups of a collective's replica_groups / source_target_pairs text: the explicit form
    `{{0,1},{2,3}}` or XLA's iota form `[2,4]<=[8]` / `[4,2]<=[2,4]T(1,0)`."""
    import numpy as np

    if not groups:
        return []
    named = re.fullmatch(r"mesh\[([^\]]*)\] \{([^}]*)\}", groups)
    if named:  # mesh['a'=4,'b'=2] {'a'}: the devices that differ only along the listed axes form a group
        axes = re.findall(r"'([^']+)'=(\d+)", named.group(1))
        sizes = [int(n) for _, n in axes]
        names = [a for a, _ in axes]
        within = [names.index(a) for a in re.findall(r"'([^']+)'", named.group(2)) if a in names]
        ids = np.arange(int(np.prod(sizes))).reshape(sizes)
        ids = ids.transpose([i for i in range(len(sizes)) if i not in within] + within)
        return ids.reshape(-1, int(np.prod([sizes[i] for i in within])) if within else 1).tolist()
    iota = re.fullmatch(r"\[([0-9,]+)\]<=\[([0-9,]+)\](?:T\(([0-9,]+)\))?", groups)
    if iota:
        shape = [int(x) for x in iota.group(1).split(",")]
        dims = [int(x) for x in iota.group(2).split(",")]
        ids = np.arange(int(np.prod(dims))).reshape(dims)
        if iota.group(3):
            ids = ids.transpose([int(x) for x in iota.group(3).split(",")])
        return ids.reshape(shape[0], -1).tolist()
    return [[int(x) for x in g.split(",") if x.strip()] for g in re.findall(r"\{([0-9, ]*)\}", groups[1:-1])]


def _trip_from_condition(comps: dict, condition: str | None) -> int | None:
    """The trip count of a scan-like loop whose backend config does not say it (libtpu's HLO): its condition is
    `counter < N` with N a constant and the counter a tuple element starting at 0, as jax's scans and fori_loops
    lower. None when the condition is anything else (a while_loop that stops on data)."""
    body = comps.get(condition or "", [])
    named = {i["name"]: i for i in body}
    compares = [i for i in body if i["op"] == "compare" and "direction=LT" in i["attrs"]]
    if len(compares) != 1 or len(compares[0]["operands"]) != 2:
        return None
    counter, limit = (named.get(o) for o in compares[0]["operands"])
    if not counter or not limit or counter["op"] != "get-tuple-element" or limit["op"] != "constant":
        return None
    return int(limit["args"]) if limit["args"].lstrip("-").isdigit() and int(limit["args"]) > 0 else None


def hlo_step_counts(text: str) -> dict:
    """Work per executed step, read from compiled HLO text (`compiled.as_text()`), deterministic.

    Kernels: every instruction of the ENTRY computation that launches work (not parameter, constant, tuple,
    get-tuple-element, bitcast and other buffer bookkeeping; a fusion, dot, custom-call, copy, transpose,
    reduce, ... counts one), where a while loop counts its body's kernels times its trip count (XLA's
    `known_trip_count`; a loop without one counts once and is listed in `unknown_trip_loops`) and a call its
    callee's; loop conditions are not counted. `dot_kernels`: those kernels that are or contain a dot (or a
    cuBLAS gemm custom-call). `flops`: 2 x M x N x K of every dot inside them, with the same loop weights (only
    matmuls: elementwise work and attention custom-calls are not counted). `bytes`: each kernel's operands
    plus output (sliced operands as the slices, in-place updates as the update), with the same weights.
    XLA's own cost analysis counts a loop body once; these count it as often as it runs. `custom_calls`:
    {library kernel (_library_call): executions}; `collectives`: one entry per collective instruction
    ({kind, bytes, groups, count = executions per step})."""
    comps, entry = _parse_hlo(text)
    totals = {"kernels": 0, "dot_kernels": 0, "flops": 0.0, "bytes": 0.0, "loops": [], "unknown_trip_loops": 0,
              "custom_calls": {}, "collectives": []}

    def walk(name: str, weight: int, depth: int = 0):
        body = comps.get(name, [])
        shapes = {i["name"]: i["shape"] for i in body}
        for ins in body:
            op = ins["op"]
            if op == "while" and ins["body"]:
                trip = ins["trip"] or _trip_from_condition(comps, ins["condition"])
                if trip is None:
                    totals["unknown_trip_loops"] += 1
                totals["loops"].append(trip)
                walk(ins["body"], weight * (trip or 1), depth + 1)
                continue
            if op == "call" and (ins["to_apply"] or ins["calls"]):
                walk(ins["to_apply"] or ins["calls"], weight, depth + 1)
                continue
            if op in _FREE or op.endswith("-done"):
                continue
            flops = _dot_flops(ins, shapes) + (_fusion_flops(comps, ins["calls"]) if ins["calls"] else 0.0)
            library = _library_call(ins)
            if library:
                totals["custom_calls"][library] = totals["custom_calls"].get(library, 0) + weight
            collective = _collective(ins, comps)
            if collective:
                totals["collectives"].append({**collective, "count": weight})
            totals["kernels"] += weight
            totals["dot_kernels"] += weight if flops > 0 or op in ("dot", "convolution") else 0
            totals["flops"] += weight * flops
            totals["bytes"] += weight * _kernel_bytes(ins, shapes, comps)

    if entry:
        walk(entry, 1)
    return totals


def compiled_stats(compiled) -> dict:
    """Figures of one compiled step (`jax.jit(f).lower(*args).compile()`), per device (the program every device
    runs), nothing executed.

    `flops_per_step`, `bytes_per_step`, `kernels_per_step`, `dot_kernels_per_step`: hlo_step_counts (loop
    bodies weighted by their trip counts). `xla_cost_flops`, `xla_cost_bytes`: XLA's cost_analysis() as it
    reports them (a scanned layer body counted once, elementwise work included). Memory from
    memory_analysis(): `compiled_peak_memory_gib` = temporaries + arguments + outputs - aliased (donated
    buffers reused for outputs), i.e. every buffer the step needs live at once at worst; XLA's temporaries
    already overlap what it can, so this is an upper bound of what the step holds on the device, not counting
    the program's code."""
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):  # older jax: one dict per computation / device
        cost = cost[0] if cost else {}
    cost = cost or {}
    mem = compiled.memory_analysis()
    counts = hlo_step_counts(compiled.as_text())
    gib = 2.0**30

    def field(name):
        return float(getattr(mem, name, 0) or 0) if mem is not None else None

    temp, args, outs, alias = (field(n) for n in ("temp_size_in_bytes", "argument_size_in_bytes",
                                                  "output_size_in_bytes", "alias_size_in_bytes"))
    peak = None if mem is None else temp + args + outs - alias
    return {
        "flops_per_step": counts["flops"], "bytes_per_step": counts["bytes"],
        "kernels_per_step": counts["kernels"], "dot_kernels_per_step": counts["dot_kernels"],
        "loop_trip_counts": counts["loops"],
        "xla_cost_flops": float(cost.get("flops", 0.0)), "xla_cost_bytes": float(cost.get("bytes accessed", 0.0)),
        "compiled_peak_memory_gib": None if peak is None else peak / gib,
        "temp_memory_gib": None if temp is None else temp / gib,
        "argument_memory_gib": None if args is None else args / gib,
        "output_memory_gib": None if outs is None else outs / gib,
        "alias_memory_gib": None if alias is None else alias / gib,
    }
