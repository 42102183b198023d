"""Progress of long work (codec fit, data build, eval, export): counts and rates, on a bar or in log lines.

    progress = reporter(bar=True)                     # the CLI makes one (--no-progress: bar=False) ...
    with progress("data build: eval", total=412, unit="line") as p:   # ... library code only calls it
        p.update(1, error=0.12)                       # advance; keyword arguments are shown beside the count

On a terminal with bar=True this is a tqdm bar, the library the trainer's bar uses. With bar=False, or when
stderr is not a terminal (a log file, CI, a pipe), it is one line every `every` seconds and one at the end
(none when the work inside the `with` failed: its error is the line to read):

    data build: eval: 200/412 line (48.8 line/s)
    data build: eval: 412/412 line in 8.4 s (49.0 line/s)

Functions below the CLI take a `progress` argument that defaults to `silent`, so only the CLI decides how
progress is shown (and the data layer knows nothing of the command line). The bar draws on stderr (as tqdm
does); lines go to stdout with the command's other log lines, so that a failed command's stderr holds only its
error.
"""

from __future__ import annotations

import sys
import time


class _Silent:
    def __enter__(self):
        return self

    def __exit__(self, kind, *exc) -> None:
        self.close(failed=kind is not None)

    def update(self, n: int = 1, **shown) -> None:
        pass

    def close(self, failed: bool = False) -> None:
        pass


def silent(desc: str, total: int | None = None, unit: str = "it") -> _Silent:
    """The reporter that shows nothing (the default of every function that takes `progress`)."""
    return _Silent()


class _Bar(_Silent):
    def __init__(self, desc: str, total: int | None, unit: str, stream):
        from tqdm.auto import tqdm

        self._bar = tqdm(total=total, desc=desc, unit=f" {unit}", dynamic_ncols=True, file=stream)

    def update(self, n: int = 1, **shown) -> None:
        if shown:
            self._bar.set_postfix(_shown(shown), refresh=False)
        self._bar.update(n)

    def close(self, failed: bool = False) -> None:
        self._bar.close()


class _Lines(_Silent):
    def __init__(self, desc: str, total: int | None, unit: str, stream, every: float):
        self.desc, self.total, self.unit, self.stream, self.every = desc, total, unit, stream, every
        self.count, self.shown, self.closed = 0, {}, False
        self.start = self.last = time.monotonic()

    def update(self, n: int = 1, **shown) -> None:
        self.count += n
        self.shown.update(shown)
        now = time.monotonic()
        if now - self.last >= self.every:
            self.last = now
            self._line(now, done=False)

    def close(self, failed: bool = False) -> None:
        """The last line, unless the work failed: then the error is the one line the user reads."""
        if not self.closed:
            self.closed = True
            if not failed:
                self._line(time.monotonic(), done=True)

    def _line(self, now: float, done: bool) -> None:
        elapsed = max(now - self.start, 1e-9)
        count = f"{self.count}/{self.total}" if self.total is not None else f"{self.count}"
        took = f" in {elapsed:.1f} s" if done else ""
        extra = "".join(f", {k} {v}" for k, v in _shown(self.shown).items())
        print(f"{self.desc}: {count} {self.unit}{took} ({self.count / elapsed:.1f} {self.unit}/s{extra})",
              file=self.stream, flush=True)


def _shown(values: dict) -> dict:
    return {k: f"{v:.4g}" if isinstance(v, float) else str(v) for k, v in values.items()}


def reporter(bar: bool = True, stream=None, every: float = 10.0):
    """A reporter: reporter(...)(desc, total=None, unit="it") -> a context manager with update(n, **shown).
    A tqdm bar when `bar` and `stream` (default stderr) is a terminal, else a line every `every` seconds and
    one at the end, on `stream` or stdout."""
    lines_to = stream or sys.stdout  # taken now: library code may redirect stdout while it works (TFDS builds)

    def make(desc: str, total: int | None = None, unit: str = "it"):
        out = stream or sys.stderr
        if bar and hasattr(out, "isatty") and out.isatty():
            return _Bar(desc, total, unit, out)
        return _Lines(desc, total, unit, lines_to, every)

    return make
