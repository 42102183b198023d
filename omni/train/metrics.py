"""Where metrics go: `metrics.jsonl` (one JSON object per logged step), TensorBoard event files, the console.

Only process 0 writes. A run resumed from step N first drops the rows after N that the interrupted run had
written (and TensorBoard purges them: the first event of the new file is a SessionLog START at step N+1, as
tensorboardX's purge_step writes it), so the files read as one run with no step twice. Keys use '/' groups
('loss/text', 'eval/acc/audio') so TensorBoard groups curves by modality. A value that is None (the loss of a
modality with no target tokens in those steps: absent, omni.loss.mark_absent) is null in metrics.jsonl and no
TensorBoard point.

Every row is on storage when write() returns, so a kill loses no logged step. On disk the two files are appended
to. Object stores have no append, so on a bucket each file is a series of chunk objects, read back in name order
by read_metrics and by TensorBoard (which reads every event file of the folder in name order):

    <workdir>/metrics/000000.jsonl, 000001.jsonl, ...          instead of metrics.jsonl
    <workdir>/tensorboard/events.out.tfevents.<time>.<host>.000000, .000001, ...

The newest chunk is rewritten whole at each write (an object upload is atomic: readers see the old or the new
chunk, never half of one) until it holds CHUNK_BYTES, then the next one starts; so the bytes uploaded per row stay
bounded however long the run.
"""

from __future__ import annotations

import json
import re
import socket
import struct
import time

import jax
import numpy as np

from omni import storage

METRICS_FILE = "metrics.jsonl"
METRICS_CHUNKS = "metrics"
TENSORBOARD_DIR = "tensorboard"
CHUNK_BYTES = 1 << 20
_CHUNK = re.compile(r"^\d{6}\.jsonl$")


class _Appender:
    """A file that grows: appended to on disk; on a bucket, chunk objects named by `chunk_name(index)` with the
    newest rewritten whole at each flush (module docstring)."""

    def __init__(self, path, chunk_name=None, first_index: int = 0):
        self.path, self.remote = storage.path(path), storage.is_remote(path)
        self.chunk_name, self.index, self.pending, self.chunk = chunk_name, first_index, b"", b""

    def append(self, data: bytes) -> None:
        self.pending += data

    def flush(self) -> None:
        if not self.pending:
            return
        if not self.remote:
            with open(self.path, "ab") as f:
                f.write(self.pending)
        else:
            if self.chunk and len(self.chunk) + len(self.pending) > CHUNK_BYTES:
                self.index, self.chunk = self.index + 1, b""
            storage.write_bytes(self.path.parent / self.chunk_name(self.index), self.chunk + self.pending)
            self.chunk += self.pending
        self.pending = b""


class MetricWriter:
    def __init__(self, workdir, resume_step: int = 0):
        self.enabled = jax.process_index() == 0
        self.workdir = storage.path(workdir)
        self.remote = storage.is_remote(workdir)
        if not self.enabled:
            return
        _drop_rows_after(self.workdir, resume_step)
        if self.remote:
            chunks = self.workdir / METRICS_CHUNKS
            chunks.mkdir(parents=True, exist_ok=True)
            first = max((int(n[:6]) for n in storage.listdir(chunks) if _CHUNK.match(n)), default=-1) + 1
            self._rows = _Appender(chunks / "rows", lambda i: f"{i:06d}.jsonl", first)
        else:
            self._rows = _Appender(self.workdir / METRICS_FILE)
        events = self.workdir / TENSORBOARD_DIR
        events.mkdir(parents=True, exist_ok=True)
        name = f"events.out.tfevents.{int(time.time()):010d}.{re.sub(r'[^A-Za-z0-9_.-]', '_', socket.gethostname())}"
        self._events = _Appender(events / name, (lambda i: f"{name}.{i:06d}") if self.remote else None)
        self._events.append(_record(_event(file_version="brain.Event:2", step=resume_step + 1 if resume_step else 0)))
        if resume_step:
            self._events.append(_record(_event(step=resume_step + 1, session_start=True)))
        self._events.flush()

    def write(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        row = {"step": int(step)}
        row.update({k: None if v is None else _scalar(v) for k, v in metrics.items()})
        self._rows.append((json.dumps(row) + "\n").encode())
        for key, value in row.items():
            if key != "step" and isinstance(value, (int, float)):
                self._events.append(_record(_event(step=step, tag=key, value=float(value))))
        self._rows.flush()
        self._events.flush()

    def close(self) -> None:
        if self.enabled:
            self._rows.flush()
            self._events.flush()


def _event(step: int, tag: str | None = None, value: float | None = None, file_version: str | None = None,
           session_start: bool = False):
    from tensorboardX.proto import event_pb2

    event = event_pb2.Event(wall_time=time.time(), step=int(step))
    if file_version:
        event.file_version = file_version
    if session_start:
        event.session_log.status = event_pb2.SessionLog.START
    if tag is not None:
        event.summary.value.add(tag=tag, simple_value=value)
    return event


def _record(event) -> bytes:
    """One TFRecord: length, its masked CRC32C, the serialized Event, its masked CRC32C (TensorBoard's framing)."""
    from tensorboardX.record_writer import masked_crc32c

    data = event.SerializeToString()
    header = struct.pack("Q", len(data))
    return header + struct.pack("I", masked_crc32c(header)) + data + struct.pack("I", masked_crc32c(data))


def _scalar(value):
    value = np.asarray(value)
    return value.item() if value.size == 1 else value.tolist()


def _chunk_files(workdir) -> list:
    folder = storage.path(workdir) / METRICS_CHUNKS
    if not folder.is_dir():
        return []
    return [folder / n for n in storage.listdir(folder) if _CHUNK.match(n)]


def _rows_of(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def read_metrics(workdir) -> list[dict]:
    """Every logged row of a run, in order, from metrics.jsonl on disk or the chunks on a bucket."""
    workdir = storage.path(workdir)
    storage.refresh(workdir)
    rows = []
    path = workdir / METRICS_FILE
    if path.exists():
        rows += _rows_of(path.read_text())
    for chunk in _chunk_files(workdir):
        rows += _rows_of(chunk.read_text())
    return rows


def _drop_rows_after(workdir, step: int) -> None:
    """Removes the rows after `step` (an interrupted run's, before a resume from `step`); a kill here leaves each
    file or chunk old or new, never half of one (a later resume drops what is left)."""
    path = workdir / METRICS_FILE
    if path.exists():
        kept = [r for r in _rows_of(path.read_text()) if r.get("step", 0) <= step]
        storage.write_text(path, "".join(json.dumps(r) + "\n" for r in kept))
    for chunk in reversed(_chunk_files(workdir)):  # newest first: rows are in step order
        rows = _rows_of(chunk.read_text())
        kept = [r for r in rows if r.get("step", 0) <= step]
        if len(kept) == len(rows):
            break
        if kept:
            storage.write_text(chunk, "".join(json.dumps(r) + "\n" for r in kept))
        else:
            chunk.unlink()
