"""The workdir: one run at a time, writable before any compute, files replaced whole.

- `hold(workdir)` takes an exclusive lock on `<workdir>/.omni-lock` (fcntl.flock) for the life of the process:
  a second `omni train` on the same workdir exits with WorkdirError naming the host and pid that hold it. The
  OS releases the lock when the holder dies, SIGKILL included, so a stale lock never blocks a restart. In a
  multi-process job only process 0 takes it. flock needs a filesystem that supports it (local disks, most NFS
  v4 mounts); where it is not supported the lock is skipped with a warning.
- `check_writable(workdir)` fails before any compute when the folder cannot take a file.
- `write_atomic(path, text)` writes a sibling temp file and renames it over `path`: a failed write (a full disk)
  never leaves a truncated file, and the previous content stays.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import time
from pathlib import Path

from omni.errors import WorkdirError

LOCK_FILE = ".omni-lock"
_held: dict[str, object] = {}  # resolved workdir -> its open lock file, kept open while the process runs


def hold(workdir: str | Path, what: str = "omni train") -> None:
    """Locks `workdir` for this process (idempotent); WorkdirError if another process holds it."""
    workdir = Path(workdir)
    key = str(workdir.resolve())
    if key in _held:
        return
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
            print(f"omni: warning: cannot lock {path} ({e.strerror}); nothing stops a second run on this workdir")
            return
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise WorkdirError(f"workdir {workdir} is in use by {holder}; wait for it to finish (or stop it), or choose "
                           "another --workdir") from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"{what} (pid {os.getpid()} on host {socket.gethostname()}, since "
                 f"{time.strftime('%Y-%m-%d %H:%M:%S')})\n")
    handle.flush()
    _held[key] = handle


def release(workdir: str | Path) -> None:
    """Gives the lock back before the process ends (a caller that trains several runs in one process)."""
    handle = _held.pop(str(Path(workdir).resolve()), None)
    if handle is not None:
        handle.close()  # closing the file releases the flock


def check_writable(workdir: str | Path) -> None:
    """WorkdirError unless a file can be created, written and removed in `workdir` (created if missing)."""
    workdir = Path(workdir)
    probe = workdir / f".omni-write-test-{os.getpid()}"
    try:
        workdir.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"omni")
        probe.unlink()
    except OSError as e:
        raise WorkdirError(f"cannot write to workdir {workdir}: {e.strerror}; free space there or choose another "
                           "--workdir") from None


def write_atomic(path: str | Path, text: str) -> None:
    """Replaces `path` with `text` whole, or leaves it as it was (WorkdirError naming it)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise WorkdirError(f"cannot write {path}: {e.strerror}; free space there or choose another --workdir") \
            from None
