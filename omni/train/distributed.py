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
with JAX's error instead of hanging.
"""

from __future__ import annotations

import os

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
