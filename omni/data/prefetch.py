"""Batches made ready ahead of the train step on a background thread (data.prefetch)."""

from __future__ import annotations

import queue
import threading


class Prefetched:
    """Batches of `source` (omni.data.pipeline.ShardedBatches) made ready `size` ahead on a background thread: next(source) and put(batch) (the trainer's put sends
    it to the devices) run while the devices compute the steps before, so the training loop only waits when the
    pipeline is slower than the step. get_state() is the source's state after the last batch handed out (not after
    the batches waiting in the queue), so a checkpoint resumes at the first batch the trainer has not taken."""

    def __init__(self, source, put, size: int):
        self.source, self._put, self._size = source, put, size
        self._queue = queue.Queue(maxsize=size)
        self._stop = threading.Event()
        self._thread = None
        self._state = None  # after the last batch handed out; None: nothing taken since set_state / the start

    shard_ids = property(lambda self: self.source.shard_ids)
    num_shards = property(lambda self: self.source.num_shards)

    def __iter__(self):
        return self

    def __next__(self):
        if self._thread is None:
            self._thread = threading.Thread(target=self._fill, name="omni-prefetch", daemon=True)
            self._thread.start()
        item = self._queue.get()
        if isinstance(item, BaseException):  # the pipeline's error (a corrupt file, say) surfaces in the loop
            self._thread.join()
            self._thread = None
            raise item
        batch, self._state = item
        return batch

    def _fill(self) -> None:
        while not self._stop.is_set():
            try:
                host_batch = next(self.source)
                item = (self._put(host_batch), self.source.get_state())
            except BaseException as e:  # noqa: BLE001 - handed to the consumer, which raises it
                item = e
            while not self._stop.is_set():
                try:
                    self._queue.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if isinstance(item, BaseException):
                return

    def get_state(self) -> dict:
        return self.source.get_state() if self._state is None else self._state

    def set_state(self, state: dict) -> None:
        if self._thread is not None:
            raise RuntimeError("set_state after batches were taken: restore before the first next()")
        self.source.set_state(state)
        self._state = None

    def close(self) -> None:
        """Stops the thread (dropping the batches it made ahead) and the source's worker processes."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.source.close()

