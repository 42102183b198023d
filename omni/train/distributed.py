"""Joining a multi-process JAX job before any device is touched.

Every `omni` verb that computes calls `initialize()` first. What it does depends on the environment:

    OMNI_COORDINATOR=host:port OMNI_NUM_PROCESSES=N OMNI_PROCESS_ID=i
        explicit: jax.distributed.initialize(host:port, N, i) (what `omni launch local` sets, and what any
        scheduler without JAX auto-detection can set)
    OMNI_DISTRIBUTED=auto
        jax.distributed.initialize() with JAX's own cluster detection: Cloud TPU VMs and GKE TPU pods, SLURM
        (srun), Kubernetes indexed jobs, Open MPI. The launch files `omni launch tpu|gke|slurm` render set it.
    neither
        a single process (nothing to do)

OMNI_HEARTBEAT_S (default 100) bounds how long the others wait for a process that died before the job fails
with JAX's error instead of hanging. A process that is alive but never joins a collective (different amounts of
work per process, say) is not caught by that: `bounded(phase, seconds)` ends the job with a message naming the
phase when a phase outside the step loop (the evals, the demo scoring, the last save) takes longer than
train.phase_timeout_s.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading

from omni.errors import DistributedError

ENV_COORDINATOR, ENV_NUM, ENV_ID = "OMNI_COORDINATOR", "OMNI_NUM_PROCESSES", "OMNI_PROCESS_ID"
ENV_AUTO, ENV_HEARTBEAT = "OMNI_DISTRIBUTED", "OMNI_HEARTBEAT_S"


def settings(env=None) -> dict | None:
    """The jax.distributed.initialize keyword arguments the environment asks for, or None (one process)."""
    env = os.environ if env is None else env
    heartbeat = _int(env, ENV_HEARTBEAT, 100)
    explicit = {name: env.get(name) for name in (ENV_COORDINATOR, ENV_NUM, ENV_ID)}
    if any(explicit.values()):
        missing = [name for name, value in explicit.items() if not value]
        if missing:
            raise DistributedError(f"{', '.join(missing)} not set: a multi-process run needs {ENV_COORDINATOR} "
                                   f"(host:port of process 0), {ENV_NUM} and {ENV_ID} together")
        if ":" not in explicit[ENV_COORDINATOR]:
            raise DistributedError(f"{ENV_COORDINATOR}={explicit[ENV_COORDINATOR]!r} is not host:port")
        num, pid = _int(env, ENV_NUM, 1), _int(env, ENV_ID, 0)
        if not 0 <= pid < num:
            raise DistributedError(f"{ENV_ID}={pid} must be in 0..{num - 1} ({ENV_NUM}={num})")
        return {"coordinator_address": explicit[ENV_COORDINATOR], "num_processes": num, "process_id": pid,
                "heartbeat_timeout_seconds": heartbeat}
    auto = env.get(ENV_AUTO, "")
    if auto == "auto":
        return {"heartbeat_timeout_seconds": heartbeat}
    if auto:
        raise DistributedError(f"{ENV_AUTO}={auto!r}: the only value is 'auto' (JAX detects the cluster)")
    return None


def _int(env, name: str, default: int) -> int:
    value = env.get(name)
    if not value:
        return default
    try:
        return int(value)
    except ValueError:
        raise DistributedError(f"{name}={value!r} is not an integer") from None


def initialize() -> bool:
    """Joins the job the environment describes (module docstring); True when it is multi-process."""
    kwargs = settings()
    if kwargs is None:
        return False
    import jax

    jax.distributed.initialize(**kwargs)
    return jax.process_count() > 1


@contextlib.contextmanager
def bounded(phase: str, seconds: float, processes: int | None = None):
    """Runs the block; in a multi-process job, if it has not finished after `seconds`, prints which phase on which
    process and ends the process with exit code 3, so the launcher (or scheduler) ends the job instead of every
    process waiting forever in a collective. A no-op in one process or with seconds <= 0."""
    import jax

    processes = jax.process_count() if processes is None else processes
    if processes == 1 or seconds <= 0:
        yield
        return
    done = threading.Event()

    def watch():
        if not done.wait(seconds):
            print(f"omni: error: {phase} did not finish within {seconds:g} s on process {jax.process_index()} of "
                  f"{processes}: a collective is waiting for a process that does not join it. Ending the job; raise "
                  "train.phase_timeout_s if the phase is just slow", file=sys.stderr, flush=True)
            os._exit(3)

    threading.Thread(target=watch, name=f"omni-bound-{phase}", daemon=True).start()
    try:
        yield
    finally:
        done.set()
