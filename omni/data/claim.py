"""One writer per output folder: the claim `omni data build` takes on its --out before it reads a line.

`claim(out)` makes the marker `.<NAME>.omni-claim` beside `out` (in the folder that will hold `out`, never inside
it: `out` is replaced whole at the end) and holds it until `release()`; a second build of the same `out` stops at
once with one line naming the marker and the holder (command, pid, host, since when).

- On disk: the marker is created with O_CREAT|O_EXCL and held with an exclusive fcntl.flock. The OS drops the
  flock when its holder dies, SIGKILL included, so a marker left by a killed build is taken over by the next one
  (a flock that succeeds proves the holder gone). Where flock is not supported (some network file systems) the
  marker's content decides: a holder on this host whose process no longer exists is taken over; any other holder
  is refused, with the marker named so it can be deleted by hand once no build runs.
- On gs://: an object created with `if_generation_match=0` (a second creator gets HTTP 412), renewed every
  HEARTBEAT_S by a background thread; stale, and taken over (conditioned on its generation, so of two takers
  one wins), when not renewed for STALE_AFTER_S or when its holder ran on this host as a process that is gone.
  A holder whose claim was taken over learns it at `check_held()`, before it publishes anything.
- On s3:// there is no claim (a warning says so).

The same design as the workdir lock of `omni train` (omni/train/workdir.py, docs/storage.md), which the data layer
may not import (tests/test_layering.py).
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import os
import socket
import sys
import threading
import time

from omni import storage
from omni.errors import DatasetError, StorageError

SUFFIX = ".omni-claim"
HEARTBEAT_S = float(os.environ.get("OMNI_LOCK_HEARTBEAT_S", 30))
STALE_AFTER_S = 4 * HEARTBEAT_S
_NO_FLOCK = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)


def marker(out) -> storage.Path:
    """The claim file of `out`: `.<NAME>.omni-claim` beside it."""
    out = storage.path(out)
    return out.parent / f".{out.name}{SUFFIX}"


def _body(what: str) -> dict:
    return {"holder": what, "host": socket.gethostname(), "pid": os.getpid(),
            "since": time.strftime("%Y-%m-%d %H:%M:%S"), "renewed": time.time()}


def describe(body) -> str:
    """'omni data build (pid 12 on host h, since 2025-01-01 10:00:00)' from a marker's content."""
    if not isinstance(body, dict) or not body.get("pid"):
        return "another omni data build"
    return (f"{body.get('holder', 'omni data build')} (pid {body.get('pid')} on host {body.get('host', '?')}, "
            f"since {body.get('since', '?')})")


def _dead_here(body) -> bool:
    """Whether the marker's holder ran on this host and its process no longer exists."""
    if not isinstance(body, dict) or body.get("host") != socket.gethostname():
        return False
    pid = body.get("pid")
    if not isinstance(pid, int) or pid <= 0 or pid == os.getpid():
        return False
    return not storage.process_alive(pid)


def _busy(out, mark, body, extra: str = "") -> DatasetError:
    return DatasetError(f"--out {out} is being built by {describe(body)}, which holds its claim {mark}{extra}; "
                        f"wait for that build to finish (or stop it), or choose another --out")


class Claim:
    """A held claim on `out`; `release()` gives it back (idempotent)."""

    def __init__(self, out, mark, release, check=None):
        self.out, self.marker = out, mark
        self._release, self._check = release, check

    def check_held(self) -> None:
        """DatasetError when another build took this claim over (a bucket claim not renewed in time)."""
        if self._check is not None:
            self._check()

    def release(self) -> None:
        release, self._release = self._release, None
        if release is not None:
            release()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()


def claim(out, what: str = "omni data build", log=None) -> Claim:
    """Claims `out` for this process (module docstring); DatasetError naming the holder when another has it."""
    out = storage.path(out)
    if storage.scheme(out) == "gs":
        return _BucketClaim(out, what, log).claim
    if storage.is_remote(out):
        (log or _warn)(f"omni: warning: {out} is on {storage.scheme(out)}://, where omni takes no claim; nothing "
                       "stops a second build to this --out")
        return Claim(out, None, None)
    return _claim_local(out, what, log or _warn)


def _warn(line: str) -> None:
    print(line, file=sys.stderr)


def _read(fd) -> dict | None:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        return json.loads(os.read(fd, 65536).decode("utf-8", "replace") or "null")
    except (OSError, ValueError):
        return None


def _claim_local(out, what: str, log) -> Claim:
    mark = marker(out)
    name = os.fspath(mark)
    try:
        mark.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise storage.os_error(e, out, "--out", "write") from None
    for _ in range(20):  # a marker released (deleted) between our open and our lock: try again
        try:
            fd = os.open(name, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
            created = True
        except FileExistsError:
            try:
                fd = os.open(name, os.O_RDWR | os.O_CLOEXEC)
            except FileNotFoundError:
                continue
            except OSError as e:
                raise storage.os_error(e, mark, "--out", "open") from None
            created = False
        except OSError as e:
            raise storage.os_error(e, out, "--out", "write") from None
        locked = True
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in _NO_FLOCK:  # EWOULDBLOCK: a live holder
                body = _read(fd)
                os.close(fd)
                raise _busy(out, mark, body) from None
            locked = False
        try:
            same = os.fstat(fd).st_ino == os.stat(name).st_ino
        except FileNotFoundError:
            same = False
        if not same:  # its holder released (deleted) it after we opened it: a fresh one is needed
            os.close(fd)
            continue
        if not created:
            body = _read(fd)
            if not locked and not _dead_here(body):
                os.close(fd)
                raise _busy(out, mark, body, extra=(" (this file system has no flock, so omni cannot tell whether "
                                                    f"that build still runs: if none does, delete {mark})"))
            if isinstance(body, dict):  # (an empty marker: its creator had not written it yet, and lost the race)
                log(f"omni: took over the claim {mark} on --out {out}: its holder {describe(body)} is no longer "
                    "running")
        try:
            os.ftruncate(fd, 0)
            os.lseek(fd, 0, os.SEEK_SET)
            os.write(fd, (json.dumps(_body(what)) + "\n").encode())
        except OSError as e:
            _drop_local(fd, name)
            raise storage.os_error(e, out, "--out", "write") from None
        if not locked:
            log(f"omni: warning: cannot flock {mark} (this file system does not support it); a build killed "
                "outright on another host leaves it behind, to be deleted by hand")
        return Claim(out, mark, lambda: _drop_local(fd, name))
    raise DatasetError(f"--out {out}: its claim {mark} keeps changing hands; another build is starting there, "
                       "wait for it or choose another --out")


def _drop_local(fd, name) -> None:
    with contextlib.suppress(OSError):
        os.unlink(name)  # while still locked: a waiting opener then sees another inode and starts over
    with contextlib.suppress(OSError):
        os.close(fd)


class _BucketClaim:
    """The claim object of a gs:// --out (module docstring)."""

    def __init__(self, out, what: str, log):
        from google.api_core import exceptions as gexc

        self.out, self.mark, self.lost = out, marker(out), None
        self.what, self.log = what, log or _warn
        self._precondition = gexc.PreconditionFailed
        try:
            self.blob = _blob(self.mark)
            self.generation = self._create()
            if self.generation is None:
                self.generation = self._take_over()
        except (StorageError, DatasetError):
            raise
        except Exception as e:  # noqa: BLE001 - the client's own errors: one line naming what is missing
            line = storage.describe_remote_error(self.mark, e) or storage._short(e)
            raise DatasetError(f"cannot take the claim {self.mark} on --out {out}: {line}") from None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="omni-claim-heartbeat", daemon=True)
        self._thread.start()
        self.claim = Claim(out, self.mark, self.close, self.check)

    def _text(self) -> str:
        return json.dumps({**_body(self.what), "heartbeat_s": HEARTBEAT_S, "stale_after_s": STALE_AFTER_S}) + "\n"

    def _create(self):
        try:
            storage.retry(lambda: self.blob.upload_from_string(self._text(), if_generation_match=0),
                          f"create the claim {self.mark}")
        except self._precondition:
            return None
        return self.blob.generation

    def _take_over(self) -> int:
        blob = self.blob.bucket.get_blob(self.blob.name)
        if blob is None:  # released between our create and this read
            generation = self._create()
            if generation is None:
                raise _busy(self.out, self.mark, None)
            return generation
        try:
            body = json.loads(blob.download_as_bytes())
        except ValueError:
            body = None
        age = (datetime.datetime.now(datetime.timezone.utc) - blob.updated).total_seconds()
        dead = _dead_here(body)
        if age < STALE_AFTER_S and not dead:
            raise _busy(self.out, self.mark, body, extra=f" (renewed {max(age, 0):.0f} s ago; a claim not renewed "
                                                         f"for {STALE_AFTER_S:.0f} s is taken over)")
        try:
            storage.retry(lambda: self.blob.upload_from_string(self._text(), if_generation_match=blob.generation),
                          f"take over the claim {self.mark}")
        except self._precondition:
            raise DatasetError(f"--out {self.out}: another build took over its stale claim {self.mark} first; wait "
                               "for that build or choose another --out") from None
        why = "is no longer running on this host" if dead else f"had not renewed it for {age:.0f} s"
        self.log(f"omni: took over the claim {self.mark} on --out {self.out}: its holder {describe(body)} {why}")
        return self.blob.generation

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                self.blob.upload_from_string(self._text(), if_generation_match=self.generation)
                self.generation = self.blob.generation
            except self._precondition:
                self.lost = f"its claim {self.mark} was taken over by another build"
                return
            except Exception:  # noqa: BLE001 - a missed beat is retried at the next one; stale only after 4
                continue

    def check(self) -> None:
        if self.lost:
            raise DatasetError(f"--out {self.out}: {self.lost} (this one could not renew it for "
                               f"{STALE_AFTER_S:.0f} s); nothing was written to --out, so the two builds do not "
                               "write over each other; build again once the other one has finished")

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        if self.lost:
            return
        with contextlib.suppress(Exception):  # a claim left behind goes stale and is taken over
            self.blob.delete(if_generation_match=self.generation)


def _blob(location):
    """The google-cloud-storage blob of a gs:// URL (the client reads STORAGE_EMULATOR_HOST in tests)."""
    from google.cloud import storage as gcs

    client = gcs.Client(project=os.environ.get("GOOGLE_CLOUD_PROJECT") or None)
    bucket_name, _, name = str(location).split("://", 1)[1].partition("/")
    return client.bucket(bucket_name).blob(name)
