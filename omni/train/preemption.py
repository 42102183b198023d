"""SIGTERM -> save at the next step boundary, on every host at the same step, then exit cleanly.

TPU VMs, GKE and SLURM send SIGTERM some time before they kill a job. In one process a Python handler sets a
flag that the loop reads between steps. With several processes, JAX's preemption sync manager (started by
`jax.distributed.initialize`) catches the signal and makes every process agree on one step;
`reached(step)` then turns true on all of them at that same step.
"""

from __future__ import annotations

import signal

import jax
from jax.experimental import multihost_utils


class PreemptionWatch:
    """Watches for SIGTERM from construction until `close()`."""

    def __init__(self):
        self.multiprocess = jax.process_count() > 1
        self.received = False
        self._previous = None
        if not self.multiprocess:
            try:
                self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)
            except ValueError:  # not the main thread (train() called from a worker thread): nothing to watch
                self._previous = None

    def _on_sigterm(self, signum, frame):
        self.received = True

    def reached(self, step: int) -> bool:
        """True once a SIGTERM arrived (every process agreeing on `step` when there are several)."""
        if not self.multiprocess:
            return self.received
        try:
            return bool(multihost_utils.reached_preemption_sync_point(step))
        except RuntimeError:  # the preemption service is disabled (jax_enable_preemption_service=False)
            return False

    def close(self) -> None:
        """Stops watching. Past the step loop a SIGTERM ends the process at once: the handler in force before is
        put back (one process), or, with several, the default action replaces JAX's preemption notifier, which
        would otherwise swallow the signal while the process waits in an end-of-run collective."""
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None
        elif self.multiprocess:
            try:
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
            except ValueError:  # not the main thread
                pass
