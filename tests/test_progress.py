"""omni.progress: a tqdm bar on a terminal; counts and rates in periodic lines otherwise (--no-progress, logs)."""

import io
import re

from omni import progress


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_lines_when_not_a_terminal_or_without_a_bar():
    for stream, bar in ((io.StringIO(), True), (_Terminal(), False)):
        with progress.reporter(bar=bar, stream=stream, every=0.0)("data build: eval", total=3, unit="line") as p:
            for _ in range(3):
                p.update(1, skipped=1)
        lines = stream.getvalue().splitlines()
        assert len(lines) == 4, lines  # one per update (every=0), then the last one
        for count, line in enumerate(lines[:3], start=1):
            assert re.fullmatch(rf"data build: eval: {count}/3 line \([\d.]+ line/s, skipped 1\)", line), line
        assert re.fullmatch(r"data build: eval: 3/3 line in [\d.]+ s \([\d.]+ line/s, skipped 1\)", lines[3])


def test_lines_come_every_so_often_and_once_at_the_end():
    stream = io.StringIO()
    with progress.reporter(bar=False, stream=stream, every=3600.0)("eval", unit="batch") as p:
        for _ in range(500):
            p.update(1, tokens=7)
    lines = stream.getvalue().splitlines()
    assert len(lines) == 1 and re.fullmatch(r"eval: 500 batch in [\d.]+ s \([\d.]+ batch/s, tokens 7\)", lines[0])


def test_a_bar_on_a_terminal_and_silence_by_default():
    stream = _Terminal()
    with progress.reporter(bar=True, stream=stream)("export", total=2, unit="tensor") as p:
        p.update(2, MiB=1.5)
    assert "export: 100%" in stream.getvalue() and "2/2" in stream.getvalue() and "MiB=1.5" in stream.getvalue()
    with progress.silent("anything", total=2) as p:
        p.update(2)


def test_work_that_fails_ends_without_a_last_line_so_its_error_is_the_one_line():
    stream = io.StringIO()
    try:
        with progress.reporter(bar=False, stream=stream)("data build: train", total=5, unit="line") as p:
            p.update(2)
            raise ValueError("line 3 is bad")
    except ValueError:
        pass
    assert stream.getvalue() == ""
