"""Readers beside a writer: eval, export, generate and init_from read a workdir's checkpoint while its run trains.

A run deletes old checkpoints (train.keep_checkpoints) as soon as a newer one is complete, and any step a reader
picked may be the next to go. Two things make reading safe anyway:

- A read lease. `read_checkpoint` writes `<workdir>/checkpoints.readers/<step>.<host>.<pid>.<hex>.json` before it
  reads step N, renews it every HEARTBEAT_S seconds while it reads, and deletes it after. The trainer's keep-N
  rotation (KeepLeased, in its Orbax preservation policy) keeps every step with a live lease and deletes it at a
  later save, once the lease is gone. A lease is dead when it was not renewed for STALE_AFTER_S (its reader was
  killed or lost the network) or when its reader ran on this host as a process that no longer exists (SIGKILL), so
  a killed reader never pins a checkpoint for long. Where the workdir cannot take a file (a read-only copy,
  read-only credentials) the reader reads without a lease.
- A fallback. The lease lands after the reader listed the steps, so a step may still vanish between the two (the
  trainer decided its rotation a moment before). A read that fails because its step is gone starts over from the
  newest step, saying so in one line. A read that fails on a step that is still there is damage (a file missing,
  truncated, garbled): without --step the reader says so in one line and reads the previous step, as train does,
  but moves nothing (the checkpoints are the run's); with --step it stops with a one-line error.

In a multi-process job process 0 picks the step and every process reads that one, without fallback (a process that
went on alone would read another step than the others).
"""

from __future__ import annotations

import json
import os
import re
import socket
import threading
import time
import uuid

import jax
import numpy as np

from omni import storage
from omni.errors import NoUsableCheckpointError, OmniError

LEASE_DIR = "checkpoints.readers"
HEARTBEAT_S = float(os.environ.get("OMNI_LEASE_HEARTBEAT_S", 30))
STALE_AFTER_S = 4 * HEARTBEAT_S
# How often a read starts over because its step was deleted under it before giving up (each start-over leases the
# newest step first, so a second loss needs the trainer to ignore the lease: a clock off by minutes).
MAX_STARTS = 6
_NAME = re.compile(r"(\d+)\.([A-Za-z0-9_.-]+)\.(\d+)\.([0-9a-f]{8})\.json")


class Lease:
    """A live read lease on one step of a workdir (module docstring); a context manager."""

    def __init__(self, workdir, step: int):
        self.step = step
        self.path = storage.path(workdir) / LEASE_DIR / f"{step}.{storage.host_name()}.{os.getpid()}.{uuid.uuid4().hex[:8]}.json"
        self._stop = threading.Event()
        self._thread = None

    def __enter__(self) -> "Lease":
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._write()
        except OSError:  # StorageError included: a read-only workdir is read without a lease
            self.path = None
            return self
        self._thread = threading.Thread(target=self._renew, name=f"omni-read-lease-{self.step}", daemon=True)
        self._thread.start()
        return self

    def _write(self) -> None:
        storage.write_text(self.path, json.dumps({"step": self.step, "host": socket.gethostname(), "pid": os.getpid(),
                                                  "renewed": time.time()}) + "\n")

    def _renew(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                self._write()
            except OSError:
                pass  # the next renewal tries again; a lease not renewed for STALE_AFTER_S is dead

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self.path is not None:
            try:
                self.path.unlink()
            except OSError:
                pass  # dead once stale anyway


def leased_steps(workdir, now: float | None = None) -> set[int]:
    """Steps of `workdir` that a live reader holds a lease on."""
    folder = storage.path(workdir) / LEASE_DIR
    now = time.time() if now is None else now
    steps = set()
    for name in storage.listdir(folder):
        m = _NAME.fullmatch(name)
        if not m:
            continue
        step, host, pid = int(m.group(1)), m.group(2), int(m.group(3))
        if host == storage.host_name() and not storage.process_alive(pid):
            continue
        try:
            renewed = float(json.loads((folder / name).read_text())["renewed"])
        except (OSError, ValueError, KeyError, TypeError):
            continue  # deleted while listed, or not a lease
        if now - renewed <= STALE_AFTER_S:
            steps.add(step)
    return steps


class KeepLeased:
    """An Orbax preservation policy: keep every checkpoint a live reader holds a lease on (omni.train.checkpoint
    combines it with LatestN(train.keep_checkpoints))."""

    def __init__(self, workdir):
        self.workdir = workdir

    def should_preserve(self, checkpoints, *, context=None):
        try:
            leased = leased_steps(self.workdir)
        except Exception:  # noqa: BLE001 - an unlistable lease folder must not stop a save; keep-N decides alone
            leased = set()
        return [info.step in leased for info in checkpoints]


def read_checkpoint(workdir, step: int | None, read, log=print):
    """(step, read(step)) for `step`, or the newest readable checkpoint of `workdir`, with the step leased while
    `read` runs (module docstring). `read` must do all reading of that checkpoint. One-line OmniErrors from `read`
    (a dataset gone, a config that does not fit) pass through; other failures count as a vanished or damaged step."""
    from omni.train import checkpoint

    checkpoint.quiet_background_noise()
    workdir = storage.path(workdir)
    root = workdir / "checkpoints"
    explicit = step is not None
    skipped: list[str] = []
    starts = 0
    while True:
        steps = checkpoint.checkpoint_steps(workdir)
        if explicit:
            target = checkpoint.pick_step(workdir, step)
        else:
            candidates = [s for s in steps if str(s) not in skipped]
            if not candidates:
                if not steps:
                    checkpoint.pick_step(workdir, None)  # the one-line "train first" error
                raise NoUsableCheckpointError(
                    f"none of the checkpoints in {root} ({', '.join(skipped)}) can be read; the lines above say why. "
                    f"Train again (the run resumes from none of them), or read an export")
            target = _agreed(candidates[-1])
        with Lease(workdir, target):
            if target not in checkpoint.checkpoint_steps(workdir) and jax.process_count() == 1:
                starts += 1  # deleted between the listing and the lease
                _check_starts(starts, root)
                continue
            try:
                return target, read(target)
            except OmniError:
                raise
            except Exception as e:  # noqa: BLE001 - which of vanished and damaged it was is decided below
                error = e
        where = root / str(target)
        if jax.process_count() > 1:
            raise NoUsableCheckpointError(f"checkpoint {where} cannot be read ({_short(error)}); in a multi-process "
                                          "job every process must read the same step: choose another --step") from None
        if target not in checkpoint.checkpoint_steps(workdir):
            starts += 1
            _check_starts(starts, root)
            log(f"omni: checkpoint {where} was deleted by the run training there while it was read (keep-N "
                f"rotation); reading the newest one again")
            continue
        if explicit:
            raise NoUsableCheckpointError(
                f"checkpoint {where} cannot be read ({_short(error)}); choose another --step (the steps there are "
                f"{', '.join(map(str, steps))}), or leave --step out to read the newest readable one") from None
        log(f"omni: checkpoint {where} cannot be read and is skipped ({_short(error)}); reading the previous one")
        skipped.append(str(target))


def _check_starts(starts: int, root) -> None:
    if starts >= MAX_STARTS:
        raise NoUsableCheckpointError(
            f"the run training in {root.parent} deleted every checkpoint this command picked before it could be read "
            f"({starts} tries), though each was leased ({LEASE_DIR}/): check that the hosts' clocks agree, or read "
            "after the run, or raise train.keep_checkpoints")


def _agreed(step: int) -> int:
    """Process 0's pick on every process."""
    if jax.process_count() == 1:
        return step
    from jax.experimental import multihost_utils

    return int(multihost_utils.broadcast_one_to_all(np.asarray(step, np.int64)))


def _short(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return f"{type(e).__name__}: {text[:240]}{'...' if len(text) > 240 else ''}"
