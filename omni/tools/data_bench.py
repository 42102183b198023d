"""`omni data bench`: can the input pipeline feed the model? Throughput of the full pipeline beside a train step.

For each worker count it times the real train pipeline of the config (read from the built dataset, decode
images, tokenise, pack, batch; grain worker processes when workers > 0) after a warm-up batch, and reports

    examples_per_s   examples packed into batches per second on this host
    tokens_per_s     non-padding positions per second
    positions_per_s  batch x seq_len per second (what a train step consumes, padding included)

then times the config's own train step on this host's devices (same batch shape) and prints how many times
faster the pipeline is than the step ("headroom"). One JSON line per measurement, also saved with --out.
"""

from __future__ import annotations

import copy
import json
import time

import numpy as np

from omni import sharding, storage
from omni.config import Config
from omni.data import pipeline
from omni.train.perf import time_steps
from omni.train.step import build_optimizer, init_state, make_train_step


def pipeline_rate(cfg: Config, workers: int, batches: int) -> dict:
    cfg = copy.deepcopy(cfg)
    cfg.data.num_workers = workers
    it = iter(pipeline.train_dataset(cfg))
    start = time.perf_counter()
    next(it)  # start-up (worker processes, first reads) is timed apart
    startup = time.perf_counter() - start
    examples = tokens = positions = 0
    start = time.perf_counter()
    for _ in range(batches):
        batch = next(it)
        ids = batch["segment_ids"]
        examples += sum(len(np.unique(row[row > 0])) for row in ids)
        tokens += int((ids > 0).sum())
        positions += ids.size
    elapsed = time.perf_counter() - start
    if hasattr(it, "close"):
        it.close()
    return {"what": "pipeline", "workers": workers, "threads": cfg.data.worker_threads, "batches": batches,
            "batch": list(batch["tokens"].shape), "startup_s": round(startup, 3),
            "examples_per_s": examples / elapsed, "tokens_per_s": tokens / elapsed,
            "positions_per_s": positions / elapsed, "fill": tokens / positions}


def train_step_rate(cfg: Config, steps: int) -> dict:
    """Positions per second one jitted train step of the config consumes (a fixed real batch, after compile)."""
    mesh = sharding.make_mesh(cfg.mesh)
    tx, schedule = build_optimizer(cfg)
    graphdef, state, shardings = init_state(cfg, mesh, tx, pipeline.vocab_for(cfg))
    step_fn = make_train_step(cfg, graphdef, tx, schedule, mesh, shardings)
    batch = sharding.global_batch(next(iter(pipeline.train_dataset(cfg))), mesh, cfg.mesh.rules)
    _, _, _, step_s = time_steps(step_fn, state, [batch], warmup=0, steps=steps)
    return {"what": "train_step", "devices": mesh.devices.size, "platform": mesh.devices.flat[0].platform,
            "step_time_s": step_s, "positions_per_s": cfg.train.batch_size * cfg.data.seq_len / step_s}


def run(cfg: Config, workers: list[int], batches: int, steps: int, out=None, log=print) -> list[dict]:
    rows = [pipeline_rate(cfg, w, batches) for w in workers]
    if steps:
        rows.append(train_step_rate(cfg, steps))
        consume = rows[-1]["positions_per_s"]
        for row in rows[:-1]:
            row["headroom"] = row["positions_per_s"] / consume
    for row in rows:
        log(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}))
    if out:
        storage.append_text(out, "".join(json.dumps(row) + "\n" for row in rows))
    return rows
