"""Train steps of every fusion variant at configs/bench/omni_cpu.py's size, timed interleaved (one step of each in
turn, ROUNDS rounds) so that a change in a shared machine's load hits every variant alike; prints one JSON line per
variant (best and median tokens/s, the compiled step's matmul FLOPs against early's) and the load average.

    PYTHONPATH=. python launch/bench_fusions.py VOCAB ROUNDS      # e.g. 32768 12 (the bench vocabulary) or 4096 12
"""
import json
import sys
import time

import jax
import numpy as np

from omni import sharding
from omni.config import apply_overrides
from omni.tools.bench import bench_vocab, synthetic_batch
from omni.train.perf import compiled_stats
from omni.train.step import build_optimizer, init_state, make_train_step
from configs.bench.omni_cpu import get_config

VARIANTS = {"early": [], "late:1": ["model.fusion=late", "model.late_layers=1"],
            "late:2": ["model.fusion=late", "model.late_layers=2"], "mot": ["model.fusion=mot"],
            "cross": ["model.fusion=cross"],
            "late:2 masked": ["model.fusion=late", "model.late_layers=2", "model.modality_matmul=masked"],
            "mot masked": ["model.fusion=mot", "model.modality_matmul=masked"]}
vocab_size, rounds = int(sys.argv[1]), int(sys.argv[2])
codebooks = 8 if vocab_size >= 16384 else 2
runs = {}
for name, sets in VARIANTS.items():
    cfg = apply_overrides(get_config(), sets)
    mesh = sharding.make_mesh(cfg.mesh)
    vocab = bench_vocab(vocab_size, codebooks, 1024)
    tx, schedule = build_optimizer(cfg)
    batch = sharding.global_batch(synthetic_batch(cfg, vocab, np.random.default_rng(0)), mesh, cfg.mesh.rules)
    graphdef, state, shardings = init_state(cfg, mesh, tx, vocab)
    step = make_train_step(cfg, graphdef, tx, schedule, mesh, shardings)
    compiled = step.lower(state, batch).compile()
    stats = compiled_stats(compiled)
    for _ in range(2):
        state, m = compiled(state, batch)
    jax.block_until_ready(m)
    runs[name] = dict(step=compiled, state=state, batch=batch, times=[], flops=stats["flops_per_step"],
                      tokens=cfg.train.batch_size * cfg.data.seq_len)
load = [open("/proc/loadavg").read().split()[:3]]
for _ in range(rounds):
    for r in runs.values():
        t = time.perf_counter()
        r["state"], m = r["step"](r["state"], r["batch"])
        jax.block_until_ready(m)
        r["times"].append(time.perf_counter() - t)
load.append(open("/proc/loadavg").read().split()[:3])
base = runs["early"]
for name, r in runs.items():
    t = np.array(r["times"])
    print(json.dumps({"variant": name, "vocab": vocab_size, "rounds": rounds,
                      "tokens_per_s_best": round(r["tokens"] / t.min()),
                      "tokens_per_s_median": round(r["tokens"] / np.median(t)),
                      "step_s_min": round(t.min(), 3), "step_s_median": round(float(np.median(t)), 3),
                      "matmul_flops_vs_early": round(r["flops"] / base["flops"], 3)}))
print(json.dumps({"loadavg_before": load[0], "loadavg_after": load[1]}))
