"""Where metrics go: `metrics.jsonl` (one JSON object per logged step), TensorBoard event files, the console.

Only process 0 writes. Keys use '/' groups ('loss/text', 'eval/acc/audio') so TensorBoard groups curves by
modality.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np


class MetricWriter:
    def __init__(self, workdir: str | Path):
        self.enabled = jax.process_index() == 0
        self.path = Path(workdir) / "metrics.jsonl"
        self._tb = None
        if self.enabled:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(str(Path(workdir) / "tensorboard"))

    def write(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        row = {"step": int(step)}
        row.update({k: _scalar(v) for k, v in metrics.items()})
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
