"""The workdir: one run at a time, writable before any compute, files replaced whole; on disk or on a bucket.

- `hold(workdir)` takes the workdir's lock `<workdir>/.omni-lock` for the life of the process; a second
  `omni train` on the same workdir exits with WorkdirError naming the host and pid that hold it. Only process 0
  of a multi-process job takes it.
  - On disk: an exclusive fcntl.flock. The OS releases it when the holder dies, SIGKILL included, so a stale lock
    never blocks a restart. Where flock is not supported the lock is skipped with a warning.
  - On gs://: an object created with the precondition `if_generation_match=0` (a second creator gets HTTP 412),
    renewed every HEARTBEAT_S seconds by a background thread (a rewrite conditioned on its own generation). A
    lock not renewed for STALE_AFTER_S (4 heartbeats: its holder was killed or lost the network), or one whose
    holder ran on this host as a process that no longer exists (a SIGKILL, then the same command), is stale: the
    next run takes it over, conditioned on the stale generation (so of two runs taking over, one wins), and says
    so in one line naming the old holder. A holder whose lock was taken over stops at its next checkpoint
    (`check_held`) instead of writing beside the new holder. The age is the object's update time (the
    server's clock) against this host's clock: hosts must keep their clocks synchronised (NTP, as cloud VMs do).
  - On s3:// there is no lock (a warning says so).
- `check_writable(workdir)` fails before any compute when the folder cannot take a file (a full disk, a
  read-only mount, a bucket that does not exist, missing credentials).
- `write_atomic(path, text)`: the file appears whole or not at all (omni.storage.write_text), the previous
  content stays on failure.
"""

from __future__ import annotations

import datetime
import errno
import fcntl
import json
import os
import socket
import threading
import time

from omni import storage
from omni.errors import StorageError, WorkdirError

LOCK_FILE = ".omni-lock"
HEARTBEAT_S = float(os.environ.get("OMNI_LOCK_HEARTBEAT_S", 30))
STALE_AFTER_S = 4 * HEARTBEAT_S
_held: dict[str, object] = {}  # workdir key -> its open lock file (disk) or _BucketLock (gs://)


def _key(workdir) -> str:
    return str(storage.absolute(workdir)).rstrip("/")


def _holder(what: str) -> str:
    return (f"{what} (pid {os.getpid()} on host {socket.gethostname()}, since "
            f"{time.strftime('%Y-%m-%d %H:%M:%S')})")


def hold(workdir, what: str = "omni train", log=print) -> None:
    """Locks `workdir` for this process (idempotent); WorkdirError if another process holds it."""
    key = _key(workdir)
    if key in _held:
        return
    if storage.scheme(workdir) == "gs":
        _held[key] = _BucketLock(storage.path(workdir) / LOCK_FILE, _holder(what), log)
    elif storage.is_remote(workdir):
        log(f"omni: warning: {workdir} is on {storage.scheme(workdir)}://, where omni takes no lock; nothing stops "
            "a second run on this workdir")
    else:
        handle = _flock(storage.path(workdir), what, log)
        if handle is not None:
            _held[key] = handle


def release(workdir) -> None:
    """Gives the lock back before the process ends (a caller that trains several runs in one process)."""
    held = _held.pop(_key(workdir), None)
    if held is not None:
        held.close()  # closing the file releases the flock; a bucket lock stops its heartbeat and deletes itself


def check_held(workdir) -> None:
    """WorkdirError when this process's lock on `workdir` was taken over (a bucket lock it could not renew for
    STALE_AFTER_S): another run now writes there, so this one must stop before it writes a checkpoint."""
    held = _held.get(_key(workdir))
    lost = getattr(held, "lost", None)
    if lost:
        raise WorkdirError(f"workdir {workdir}: {lost}; this run stops here so the two runs do not write over "
                           "each other (its last checkpoint is kept)")


def _flock(workdir, what: str, log):
    path = workdir / LOCK_FILE
    try:
        handle = open(path, "a+")
    except OSError as e:
        raise WorkdirError(f"cannot create {path}: {e.strerror}; choose a writable --workdir") from None
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            handle.close()
            log(f"omni: warning: cannot lock {path} ({e.strerror}); nothing stops a second run on this workdir")
            return None
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise WorkdirError(f"workdir {workdir} is in use by {holder}; wait for it to finish (or stop it), or choose "
                           "another --workdir") from None
    handle.seek(0)
    handle.truncate()
    handle.write(_holder(what) + "\n")
    handle.flush()
    return handle


class _BucketLock:
    """The lock object of a gs:// workdir, held while this process runs (module docstring)."""

    def __init__(self, location, holder: str, log):
        from google.api_core import exceptions as gexc

        self.location, self.holder, self.lost = location, holder, None
        self._precondition = gexc.PreconditionFailed
        try:
            self.blob = _blob(location)
            self.generation = self._create()
            if self.generation is None:
                self.generation = self._take_over(log)
        except (StorageError, WorkdirError):
            raise
        except Exception as e:  # noqa: BLE001 - the client's own errors: one line naming what is missing
            line = storage.describe_remote_error(location, e) or storage._short(e)
            raise WorkdirError(f"cannot take the lock {location}: {line}") from None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="omni-lock-heartbeat", daemon=True)
        self._thread.start()

    def _body(self) -> str:
        return json.dumps({"holder": self.holder, "host": socket.gethostname(), "pid": os.getpid(),
                           "heartbeat_s": HEARTBEAT_S, "stale_after_s": STALE_AFTER_S, "renewed": time.time()}) + "\n"

    def _create(self) -> int | None:
        """The new lock's generation, or None when another holder's lock is there."""
        try:
            storage.retry(lambda: self.blob.upload_from_string(self._body(), if_generation_match=0),
                          f"create the lock {self.location}")
        except self._precondition:
            return None
        return self.blob.generation

    def _take_over(self, log) -> int:
        """Takes a stale lock (one whose holder stopped renewing it); WorkdirError while it is alive."""
        blob = self.blob.bucket.get_blob(self.blob.name)
        if blob is None:  # released between our create and this read: create it again
            generation = self._create()
            if generation is None:
                raise WorkdirError(f"workdir {self.location.parent} is being taken by another run; try again")
            return generation
        try:
            body = json.loads(blob.download_as_bytes())
        except ValueError:
            body = {}
        old = body.get("holder", "another process") if isinstance(body, dict) else "another process"
        age = (datetime.datetime.now(datetime.timezone.utc) - blob.updated).total_seconds()
        dead = isinstance(body, dict) and _dead_here(body.get("host"), body.get("pid"))
        if age < STALE_AFTER_S and not dead:
            raise WorkdirError(
                f"workdir {self.location.parent} is in use by {old} (its lock {self.location} was renewed "
                f"{max(age, 0):.0f} s ago); wait for it to finish (or stop it), or choose another --workdir. A lock "
                f"not renewed for {STALE_AFTER_S:.0f} s is taken over")
        try:
            storage.retry(lambda: self.blob.upload_from_string(self._body(), if_generation_match=blob.generation),
                          f"take over the lock {self.location}")
        except self._precondition:
            raise WorkdirError(f"workdir {self.location.parent}: another run took over its stale lock first; "
                               "choose another --workdir or wait for that run") from None
        why = ("is no longer running on this host" if dead else
               f"had not renewed it for {age:.0f} s (stale after {STALE_AFTER_S:.0f} s)")
        log(f"omni: took over the lock of workdir {self.location.parent}: its holder {old} {why}")
        return self.blob.generation

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                self.blob.upload_from_string(self._body(), if_generation_match=self.generation)
                self.generation = self.blob.generation
            except self._precondition:
                self.lost = f"its lock {self.location} was taken over by another run"
                return
            except Exception:  # noqa: BLE001 - a missed beat is retried at the next one; stale only after 4
                continue

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        if self.lost:
            return
        try:
            self.blob.delete(if_generation_match=self.generation)
        except Exception:  # noqa: BLE001 - a lock left behind goes stale and is taken over
            pass


def _dead_here(host, pid) -> bool:
    """Whether the lock's holder ran on this host and its process is gone (then its lock is stale at once)."""
    if host != socket.gethostname() or not isinstance(pid, int) or pid == os.getpid() or pid <= 0:
        return False
    return not storage.process_alive(pid)


def _blob(location):
    """The google-cloud-storage blob of a gs:// URL (the client reads STORAGE_EMULATOR_HOST in tests)."""
    from google.cloud import storage as gcs

    client = gcs.Client(project=os.environ.get("GOOGLE_CLOUD_PROJECT") or None)
    bucket_name, _, name = str(location).split("://", 1)[1].partition("/")
    return client.bucket(bucket_name).blob(name)


def check_writable(workdir) -> None:
    """WorkdirError unless a file can be created, written and removed in `workdir` (created if missing)."""
    workdir = storage.path(workdir)
    probe = workdir / f".omni-write-test-{socket.gethostname()}-{os.getpid()}"
    try:
        storage.check_reachable(workdir, "--workdir")
        workdir.mkdir(parents=True, exist_ok=True)
        storage.write_bytes(probe, b"omni")
        probe.unlink()
    except StorageError as e:
        raise WorkdirError(str(e)) from None
    except OSError as e:  # read-only, not ours, full: each its own advice (storage.os_error_line)
        line = (storage.describe_remote_error(workdir, e) or storage.os_error_line(e, "--workdir")
                or f"{e.strerror or e}; choose another --workdir")
        raise WorkdirError(f"cannot write to workdir {workdir}: {line}") from None


def write_atomic(path, text: str) -> None:
    """Replaces `path` with `text` whole, or leaves it as it was (WorkdirError naming it)."""
    try:
        storage.write_text(path, text)
    except OSError as e:
        line = storage.os_error_line(e, "--workdir") or f"{e.strerror or e}; choose another --workdir"
        raise WorkdirError(f"cannot write {path}: {line}") from None
