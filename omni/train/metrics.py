"""Where metrics go: `metrics.jsonl` (one JSON object per logged step), TensorBoard event files, the console.

Only process 0 writes. A run resumed from step N first drops the rows after N that the interrupted run had
written (and TensorBoard purges them), so the files read as one run with no step twice. Keys use '/' groups
('loss/text', 'eval/acc/audio') so TensorBoard groups curves by modality. A value that is None (the loss of a
modality with no target tokens in those steps: absent, omni.loss.mark_absent) is null in metrics.jsonl and no
TensorBoard point.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np


class MetricWriter:
    def __init__(self, workdir: str | Path, resume_step: int = 0):
        self.enabled = jax.process_index() == 0
        self.path = Path(workdir) / "metrics.jsonl"
        self._tb = None
        if self.enabled:
            from tensorboardX import SummaryWriter

            if self.path.exists():
                kept = [r for r in read_metrics(workdir) if r.get("step", 0) <= resume_step]
                tmp = self.path.with_suffix(".jsonl.tmp")
                tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
                tmp.replace(self.path)  # a kill here leaves the old file or the new one, never half of one
            self._tb = SummaryWriter(str(Path(workdir) / "tensorboard"),
                                     purge_step=resume_step + 1 if resume_step else None)

    def write(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        row = {"step": int(step)}
        row.update({k: None if v is None else _scalar(v) for k, v in metrics.items()})
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        for key, value in row.items():
            if key != "step" and isinstance(value, (int, float)):
                self._tb.add_scalar(key, value, global_step=step)
        self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def _scalar(value):
    value = np.asarray(value)
    return value.item() if value.size == 1 else value.tolist()


def read_metrics(workdir: str | Path) -> list[dict]:
    path = Path(workdir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
