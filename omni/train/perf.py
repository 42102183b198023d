"""What a step costs against what the devices can do: a matmul peak measured in the run, datasheet peaks, MFU."""

from __future__ import annotations

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


def time_steps(step_fn, state, batches: list, warmup: int, steps: int):
    """Runs step_fn(state, batch) over `batches` in turn: once (compile), `warmup` more, then `steps` timed.
    Returns (state, last metrics, compile seconds, seconds per timed step)."""
    start = time.perf_counter()
    state, metrics = step_fn(state, batches[0])
    jax.block_until_ready(metrics)
    compile_s = time.perf_counter() - start
    for i in range(warmup):
        state, metrics = step_fn(state, batches[i % len(batches)])
    jax.block_until_ready(metrics)
    start = time.perf_counter()
    for i in range(steps):
        state, metrics = step_fn(state, batches[i % len(batches)])
    jax.block_until_ready(metrics)
    return state, metrics, compile_s, (time.perf_counter() - start) / steps
