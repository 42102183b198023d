"""`train.profile_steps`: a jax.profiler trace of a few training steps, into the workdir.

    omni train --config C --workdir W --set train.profile_steps=10:13     # steps 10, 11, 12 as metrics number them
    tensorboard --logdir W/profile                                        # the Profile tab; or ui.perfetto.dev

The trace starts before step START is dispatched and stops once step STOP-1 has finished on the device, on
process train.profile_process only (as MaxText and levanter profile one host by default). jax writes
`plugins/profile/<run>/<host>.xplane.pb` (+ a Perfetto trace) under the folder; on a gs:// workdir the trace
is written to a local temporary folder first and uploaded when it stops (the profiler writes local files).
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile

import jax

from omni import storage
from omni.config import profile_range


class StepProfiler:
    """Starts and stops jax.profiler around the configured steps (a no-op on other processes or without them)."""

    def __init__(self, spec: str, workdir, active: bool, log=print):
        self.steps = profile_range(spec) if active else None
        self.out = storage.path(workdir) / "profile"
        self.log = log
        self.local = None

    def before(self, step: int) -> None:
        """Call before step `step` (numbered from 1) is dispatched."""
        if self.steps and step == self.steps[0] and self.local is None:
            self.local = tempfile.mkdtemp(prefix="omni-profile-") if storage.is_remote(self.out) else str(self.out)
            storage.path(self.local).mkdir(parents=True, exist_ok=True)
            jax.profiler.start_trace(self.local)

    def after(self, step: int, metrics) -> None:
        """Call after step `step` was dispatched; the trace stops once step STOP-1 is done on the device."""
        if self.local is not None and step >= self.steps[1] - 1:
            jax.block_until_ready(metrics)
            self.close()

    def close(self) -> None:
        """Stops a running trace (at the last profiled step, or when the run ends before it) and publishes it."""
        if self.local is None:
            return
        jax.profiler.stop_trace()
        if storage.is_remote(self.out):
            storage.upload_folder(self.local, self.out)
            shutil.rmtree(self.local, ignore_errors=True)
        self.log(f"omni: profiled steps {self.steps[0]}-{self.steps[1] - 1} into {self.out} (tensorboard --logdir "
                 f"{self.out}, Profile tab)")
        self.local = None


@contextlib.contextmanager
def trace_into(out):
    """A jax.profiler trace of the block into the folder `out` (local or gs://, uploaded when the block ends):
    `omni bench --profile DIR` around its timed steps."""
    out = storage.path(out)
    local = tempfile.mkdtemp(prefix="omni-profile-") if storage.is_remote(out) else str(out)
    storage.path(local).mkdir(parents=True, exist_ok=True)
    jax.profiler.start_trace(local)
    try:
        yield
    finally:
        jax.profiler.stop_trace()
        if storage.is_remote(out):
            storage.upload_folder(local, out)
            shutil.rmtree(local, ignore_errors=True)
