"""Locations: every path a user names is a local path or an object-store URL, opened one way.

    storage.path("runs/demo")          a local folder (~ expanded)
    storage.path("gs://bucket/runs/x") Google Cloud Storage, through etils.epath (gcsfs), as Orbax opens it
    storage.path("s3://bucket/runs/x") S3 where the same code serves (epath + s3fs; install s3fs yourself)

Every location is an `etils.epath.Path`: pathlib's API (`/`, `read_text`, `iterdir`, `exists`, ...) on local disks
and buckets alike. Never `pathlib.Path(str(url))`: that turns `gs://b/x` into a local folder `gs:/b/x`, and
`path()` refuses such names (a first component like `gs:` or `http:`) so no local folder of that name is made.

Object stores have no rename and no append, so what omni writes goes through a few functions here that give the
same guarantees on both:

- `write_text` / `write_bytes`: the file appears whole or not at all (a temp file renamed on disk; one object
  upload on a bucket, which readers see whole).
- `staged_folder(out, last=...)`: a folder is built in a local temporary folder, then published: renamed into
  place on disk, uploaded on a bucket with the file `last` (the one readers look for) uploaded after all others.
- `local_file(path)`: a local file for libraries that only open file names (a download for a URL).

Remote errors: `retry` repeats an operation on errors that say "try again" (timeouts, connection refused, HTTP
408/429/5xx), with backoff; `describe_remote_error` turns a missing bucket or missing credentials into one line.
The libraries retry on their own first (gcsfs 6 tries, tensorstore up to 32).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import shutil
import tempfile
import time
import uuid
from typing import Callable, Iterator, TypeVar

# epath picks TensorFlow's gfile for gs:// whenever TensorFlow is importable; omni uses the fsspec backend (gcsfs)
# always, so what runs on a pod is what the tests run, whatever else is installed. Set before epath's first use.
os.environ.setdefault("EPATH_USE_TF", "false")

from etils import epath  # noqa: E402

# gcsfs and fsspec log every retried request with its traceback; omni says once what failed (retry, StorageError).
for _name in ("gcsfs", "fsspec"):
    logging.getLogger(_name).setLevel(logging.CRITICAL)

from omni.errors import OmniError, StorageError  # noqa: E402

Path = epath.Path
SCHEMES = ("gs", "s3")
# Schemes a mistyped or unsupported URL may have: refused rather than made a local folder ("run:1" stays local).
_OTHER_SCHEMES = {"gcs", "http", "https", "file", "az", "abfs", "hf", "ftp", "sftp", "hdfs", "memory", "s3a"}
_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*):(//)?(.*)$", re.S)
T = TypeVar("T")


def path(location) -> epath.Path:
    """The location `location` names (a str, os.PathLike or epath.Path): a local path or a gs:// / s3:// URL.

    StorageError for a URL of another scheme, a URL without a bucket, or a local name that starts like a URL
    (`gs:/b/x`, `gs:b`): a mistyped URL must not become a local folder."""
    text = os.fspath(location) if isinstance(location, os.PathLike) else str(location)
    if not text:
        raise StorageError("an empty path was given; name a folder or a gs:// URL")
    match = _URL.match(text)
    if match:
        scheme, slashes, rest = match.group(1).lower(), match.group(2), match.group(3)
        if scheme in SCHEMES and slashes and rest.split("/")[0]:
            return epath.Path(f"{scheme}://{rest}")
        if scheme in SCHEMES:
            hint = f"write {scheme}://{rest.lstrip('/')}" if rest.lstrip("/") else f"write {scheme}://BUCKET/..."
            raise StorageError(f"{text!r} is not a {scheme}:// URL ({hint}); omni never makes a local folder "
                               f"named '{scheme}:'")
        if slashes or scheme in _OTHER_SCHEMES:
            raise StorageError(f"{text!r}: omni reads and writes local paths, gs:// and s3:// URLs, not "
                               f"{scheme}:{slashes or ''}; copy the file to a local path or a bucket first")
    return epath.Path(os.path.expanduser(text))


def is_remote(location) -> bool:
    """Whether `location` is an object-store URL (no rename, no append, no flock)."""
    text = os.fspath(location) if isinstance(location, os.PathLike) else str(location)
    return text.split("://", 1)[0].lower() in SCHEMES and "://" in text


def absolute(location) -> epath.Path:
    """The location made absolute: a URL as it is (epath's own absolute() would prepend the cwd to a URL)."""
    p = path(location)
    return p if is_remote(p) else epath.Path(os.path.abspath(os.fspath(p)))


def scheme(location) -> str | None:
    return str(location).split("://", 1)[0].lower() if is_remote(location) else None


def bucket(location) -> str | None:
    """The bucket of a URL (None for a local path)."""
    return str(location).split("://", 1)[1].split("/", 1)[0] if is_remote(location) else None


def same(a, b) -> bool:
    """Whether two locations name the same place (local paths resolved, URLs compared as written)."""
    if is_remote(a) or is_remote(b):
        return str(path(a)).rstrip("/") == str(path(b)).rstrip("/")
    try:
        return os.path.realpath(os.path.expanduser(str(a))) == os.path.realpath(os.path.expanduser(str(b)))
    except (OSError, ValueError):
        return False


# ----------------------------------------------------------------------------------------------------------
# Whole files.


def write_bytes(location, data: bytes) -> None:
    """Replaces `location` with `data` whole, or leaves it as it was (an OSError says why)."""
    p = path(location)
    if is_remote(p):
        fs = _fs(p)
        # One request per try (gcsfs' simple upload, under 50 MiB): a retry starts over, where a file object's
        # resumable-upload session can be lost mid-write (a restarted server answers its next chunk with 404).
        write = (lambda: fs.pipe_file(os.fspath(p), data)) if hasattr(fs, "pipe_file") else (lambda: p.write_bytes(data))
        retry(write, f"write {p}")
        return
    tmp = p.with_name(f".{p.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:6]}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, p)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(e, OSError) and e.filename in (None, os.fspath(tmp)):
            e.filename = os.fspath(p)  # the file the user named, not the hidden temporary (which is gone)
        raise


def write_text(location, text: str) -> None:
    write_bytes(location, text.encode("utf-8"))


def append_text(location, text: str) -> None:
    """Adds `text` at the end of a file (made if missing): an append on disk; on a bucket, which has no append,
    the object is read and written again whole (for small logs such as bench.jsonl, not for growing run logs)."""
    p = path(location)
    if is_remote(p):
        old = p.read_bytes() if p.exists() else b""
        write_bytes(p, old + text.encode("utf-8"))
        return
    with open(p, "a", encoding="utf-8") as f:
        f.write(text)


@contextlib.contextmanager
def local_file(location) -> Iterator[str]:
    """A local file name with the content of `location` (for libraries that open names: sentencepiece, mmap'd
    safetensors): the path itself on disk, a temporary download of a URL (deleted afterwards)."""
    p = path(location)
    if not is_remote(p):
        yield os.fspath(p)
        return
    folder = tempfile.mkdtemp(prefix="omni-download-")
    try:
        local = os.path.join(folder, p.name or "file")
        retry(lambda: _fs(p).get(os.fspath(p), local), f"download {p}")
        yield local
    finally:
        shutil.rmtree(folder, ignore_errors=True)


# ----------------------------------------------------------------------------------------------------------
# Folders.


@contextlib.contextmanager
def staged_folder(out, last: str | None = None, what: str = "--out") -> Iterator[epath.Path]:
    """A local temporary folder to build `out` in; when the block ends without an error it is published at `out`.

    On disk: the folder `<out>.tmp-<host>-<pid>-<hex>` beside `out`, renamed onto `out` (rename(2) also replaces an
    empty folder); such folders of killed earlier runs on this host (their process is gone) are deleted first.
    On a bucket: a local temporary folder uploaded file by file under `out`, `last` (the file readers check for,
    e.g. omni_dataset.json) after every other one, so a reader never sees a folder with `last` but without the
    rest. An error (or Ctrl-C) leaves `out` as it was and removes the temporary folder; a full, read-only or
    forbidden disk becomes a StorageError naming `out` and `what` (the setting that chose it)."""
    out = path(out)
    try:
        if is_remote(out):
            work = epath.Path(tempfile.mkdtemp(prefix="omni-stage-"))
        else:
            out.parent.mkdir(parents=True, exist_ok=True)
            remove_dead_staging(out)
            work = out.parent / f"{out.name}{STAGING_MARK}{host_name()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
            work.mkdir()
    except OSError as e:
        raise os_error(e, out, what, "write") from None
    try:
        yield work
        if is_remote(out):
            upload_folder(work, out, last=last)
        else:
            os.rename(work, out)
    except Exception as e:  # noqa: BLE001 - OSError, and C++/Rust writers' own errors (safetensors, tensorstore)
        if isinstance(e, (StorageError, OmniError)) or os_error_line(e, what) is None:
            raise
        raise os_error(e, out, what, "write") from None
    finally:
        shutil.rmtree(work, ignore_errors=True)


STAGING_MARK = ".tmp-"


def host_name() -> str:
    """This host's name as file names made by omni hold it (temporary folders, claims, read leases)."""
    import socket

    return re.sub(r"[^A-Za-z0-9_.-]", "_", socket.gethostname()) or "host"


def process_alive(pid: int) -> bool:
    """Whether process `pid` exists on this host (one of another user's counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def remove_dead_staging(out) -> list[str]:
    """Deletes the `<out>.tmp-<host>-<pid>-<hex>` folders staged_folder left when its process was killed outright
    (SIGKILL, power loss): only those named so, made on this host, by a process that no longer exists (a live
    one may still be writing). Returns the names deleted."""
    out = path(out)
    if is_remote(out) or not out.parent.is_dir():
        return []
    pattern = re.compile(re.escape(out.name + STAGING_MARK + host_name()) + r"-(\d+)-[0-9a-f]{8}")
    removed = []
    for name in os.listdir(out.parent):
        m = pattern.fullmatch(name)
        if m and not process_alive(int(m.group(1))):
            shutil.rmtree(os.path.join(out.parent, name), ignore_errors=True)
            removed.append(name)
    return removed


def upload_folder(local, remote, last: str | None = None) -> None:
    """Copies the local folder `local` under the URL `remote`, file by file; the relative path `last` goes last."""
    local, remote = os.fspath(local), path(remote)
    files = sorted(os.path.relpath(os.path.join(root, name), local)
                   for root, _, names in os.walk(local) for name in names)
    if last in files:
        files.remove(last)
        files.append(last)
    fs = _fs(remote)
    for rel in files:
        target = f"{remote}/{rel}"
        retry(lambda: fs.put_file(os.path.join(local, rel), target), f"upload {target}")
    fs.invalidate_cache()


def listdir(location) -> list[str]:
    """Names in a folder, fresh (a bucket's listing is asked again, never served from gcsfs's cache); [] when
    there is no such folder (a bucket has no empty folders: one appears with its first object)."""
    p = path(location)
    refresh(p)
    try:
        return sorted(child.name for child in p.iterdir())
    except FileNotFoundError:
        return []


def stamp(location) -> tuple | None:
    """What changes when the file at `location` is written again (inode, size and mtime on disk; size and the
    object's generation or etag on a bucket), None when there is none: the key that lets a process reuse what it
    opened until someone rebuilds it at the same path."""
    if is_remote(location):
        fs = _fs(location)
        fs.invalidate_cache(os.fspath(path(location)))
        try:
            info = fs.info(os.fspath(path(location)))
        except FileNotFoundError:
            return None
        return (info.get("size"), info.get("generation") or info.get("etag") or info.get("updated"))
    try:
        st = os.stat(os.fspath(path(location)))
    except OSError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns)


def refresh(location) -> None:
    """Forgets cached listings of `location` (another process may have written there since)."""
    if is_remote(location):
        _fs(location).invalidate_cache()


def remove_tree(location) -> None:
    """Deletes a folder omni made (callers check it is theirs first); a missing one is fine."""
    p = path(location)
    if is_remote(p):
        fs = _fs(p)
        if fs.exists(os.fspath(p)):
            retry(lambda: fs.rm(os.fspath(p), recursive=True), f"delete {p}")
        fs.invalidate_cache()
    else:
        shutil.rmtree(p, ignore_errors=True)


def move_tree(src, dst) -> None:
    """Moves a folder (a rename on disk; a copy of every object, then their deletion, on a bucket)."""
    src, dst = path(src), path(dst)
    if is_remote(src) != is_remote(dst):
        raise StorageError(f"cannot move {src} to {dst}: one is local, the other a URL")
    if not is_remote(src):
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(os.fspath(src), os.fspath(dst))
        return
    fs = _fs(src)
    fs.invalidate_cache()
    for name in sorted(fs.find(os.fspath(src))):
        rel = name.split(_strip(src) + "/", 1)[1]
        retry(lambda: fs.copy(name, f"{dst}/{rel}"), f"copy {name}")
    remove_tree(src)


def _strip(p) -> str:
    return str(p).split("://", 1)[1].rstrip("/")


def _fs(location):
    """The fsspec filesystem epath itself uses for `location` (gcsfs for gs://): one instance, so one listing
    cache to invalidate (fsspec keeps an instance per set of arguments)."""
    from etils.epath import backend

    return backend.fsspec_backend.fs(os.fspath(path(location)))


# ----------------------------------------------------------------------------------------------------------
# Errors.

TRANSIENT_HTTP = (408, 429, 500, 502, 503, 504)
_TRANSIENT_WORDS = ("UNAVAILABLE", "DEADLINE_EXCEEDED", "Connection refused", "Connection reset", "timed out",
                    "Cannot connect to host", "Server disconnected", "Couldn't connect", "Could not connect",
                    "503 Service Unavailable", "Temporary failure", "RESOURCE_EXHAUSTED: rate", "ServerTimeout",
                    "Failed to connect", "Connection aborted", "RemoteDisconnected", "Broken pipe")
_TRANSIENT_ERRNOS = (errno.ECONNREFUSED, errno.ECONNRESET, errno.ECONNABORTED, errno.ETIMEDOUT, errno.EPIPE,
                     errno.EHOSTUNREACH, errno.ENETUNREACH)


def _chain(error: BaseException) -> Iterator[BaseException]:
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        yield error
        error = error.__cause__ or error.__context__


def is_transient(error: BaseException) -> bool:
    """Whether an error says "the storage is not answering now" (try again) rather than "this is what is there".

    Timeouts, refused or reset connections, HTTP 408/429/5xx, tensorstore's UNAVAILABLE / DEADLINE_EXCEEDED,
    anywhere in the exception's cause chain."""
    for e in _chain(error):
        if isinstance(e, (TimeoutError, ConnectionError)):
            return True
        if isinstance(e, OSError) and e.errno in _TRANSIENT_ERRNOS:
            return True
        code = getattr(e, "code", None) or getattr(e, "status", None) or getattr(e, "status_code", None)
        if isinstance(code, int) and code in TRANSIENT_HTTP:
            return True
        name = type(e).__name__
        if name in ("ClientConnectorError", "ServerDisconnectedError", "ServerTimeoutError", "ClientOSError",
                    "ServiceUnavailable", "TooManyRequests", "InternalServerError", "GatewayTimeout",
                    "BadGateway", "RetryError", "TransportError"):
            return True
        text = str(e)
        if any(word in text for word in _TRANSIENT_WORDS):
            return True
    return False


def retry(operation: Callable[[], T], what: str, attempts: int = 6, first_wait_s: float = 0.5,
          max_wait_s: float = 8.0, log=None) -> T:
    """operation(), repeated with exponential backoff while it fails with a transient error (is_transient); the
    last transient error becomes a StorageError naming `what`. Other errors pass through at once."""
    wait = first_wait_s
    for attempt in range(1, attempts + 1):
        try:
            return operation()
        except Exception as e:  # noqa: BLE001 - only transient ones are retried
            if not is_transient(e):
                raise
            if attempt == attempts:
                raise StorageError(f"could not {what}: the storage did not answer after {attempts} tries "
                                   f"({_short(e)}); check the network and the bucket, then run the command again") \
                    from e
            if log is not None:
                log(f"omni: {what} failed ({_short(e)}); trying again in {wait:.1f} s")
            time.sleep(wait)
            wait = min(2 * wait, max_wait_s)
    raise AssertionError("unreachable")


def describe_remote_error(location, error: BaseException) -> str | None:
    """One line for a missing bucket or missing credentials behind `error` at `location` (None: neither)."""
    if not is_remote(location):
        return None
    name = bucket(location)
    text = " ".join(str(e) for e in _chain(error))
    codes = {getattr(e, "code", None) for e in _chain(error)}
    if "DefaultCredentialsError" in {type(e).__name__ for e in _chain(error)} or 401 in codes or \
            "Anonymous caller" in text or "credentials" in text.lower() and "not found" in text.lower():
        return (f"no credentials for {scheme(location)}://{name}: set GOOGLE_APPLICATION_CREDENTIALS to a service "
                f"account key, or run `gcloud auth application-default login`; on a TPU VM or GKE node the VM's "
                f"service account needs the Storage Object Admin role on the bucket")
    if 403 in codes or "does not have storage." in text:
        return (f"the credentials in use may not read and write {scheme(location)}://{name}: grant their account "
                f"the Storage Object Admin role on the bucket, or use another bucket")
    if 404 in codes or "bucket does not exist" in text.lower() or "NoSuchBucket" in text or \
            isinstance(error, FileNotFoundError) and re.search(rf"(^|/)b/{re.escape(name)}(/|$)", text):
        return (f"the bucket {scheme(location)}://{name} does not exist (or these credentials cannot see it); "
                f"create it (gcloud storage buckets create {scheme(location)}://{name}) or fix the URL")
    return None


# What a local file system says when it cannot take a write, and what the user can do about it.
_OS_ADVICE = {
    errno.ENOSPC: ("the disk is full", "free space there or choose another {what}"),
    errno.EDQUOT: ("the disk quota is used up", "free space there or choose another {what}"),
    errno.EROFS: ("the file system is read-only", "choose another {what} on a writable disk"),
    errno.EACCES: ("permission denied", "choose another {what}, or fix the folder's permissions"),
    errno.EPERM: ("operation not permitted", "choose another {what}, or fix the folder's permissions"),
    errno.EISDIR: ("it is a folder, not a file", "give a file path for {what}"),
    errno.ENOTDIR: ("a part of the path is a file, not a folder", "choose another {what}"),
    errno.ENAMETOOLONG: ("the name is too long", "choose a shorter {what}"),
}
# The same conditions as tensorstore (Orbax) and other C++ libraries word them.
_OS_WORDS = {"No space left on device": errno.ENOSPC, "Disk quota exceeded": errno.EDQUOT,
             "Read-only file system": errno.EROFS, "Permission denied": errno.EACCES}


def os_errno(error: BaseException) -> int | None:
    """The errno of a disk condition omni explains (full, read-only, forbidden, ...) anywhere in `error`'s cause chain,
    also when a library only put it in words (tensorstore: `RESOURCE_EXHAUSTED: ... No space left on device`)."""
    for e in _chain(error):
        if isinstance(e, OSError) and e.errno in _OS_ADVICE:
            return e.errno
    for e in _chain(error):
        for words, number in _OS_WORDS.items():
            if words in str(e):
                return number
    return None


def os_error_line(error: BaseException, what: str = "--out") -> str | None:
    """'the disk is full: free space there or choose another --out' for the conditions in _OS_ADVICE, else None."""
    number = os_errno(error)
    if number is None:
        return None
    reason, advice = _OS_ADVICE[number]
    return f"{reason}; {advice.format(what=what)}"


def os_error(error: BaseException, location, what: str = "--out", doing: str = "write") -> StorageError:
    """A StorageError of one line: 'cannot write <location>: the disk is full; free space there or choose another
    --out' (the error's own words when it is not a condition omni knows)."""
    line = os_error_line(error, what) or f"{_short(error)}; choose another {what}"
    return StorageError(f"cannot {doing} {location}: {line}")


def check_writable(location, what: str = "--out") -> None:
    """StorageError now, before the expensive part, when `location` (a file or folder omni is about to create or
    replace) cannot be written: the nearest folder that exists above it is read-only, not this user's to write,
    or a file. A URL is checked for its bucket (check_reachable). Creates nothing."""
    if is_remote(location):
        check_reachable(location, what)
        return
    p = os.path.abspath(os.fspath(path(location)))
    parent = os.path.dirname(p)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise os_error(OSError(errno.ENOTDIR, "not a folder"), location, what)
    # The folder that gets the new entry, and the existing folder itself when omni writes inside it.
    for folder in [parent] + ([p] if os.path.isdir(p) else []):
        if not os.access(folder, os.W_OK | os.X_OK):
            number = errno.EROFS if _read_only(folder) else errno.EACCES
            raise os_error(OSError(number, os.strerror(number)), location, what)


def check_output_file(location, what: str = "--out", example: str = "out") -> None:
    """StorageError now, before the work, when `location` cannot become the file omni is asked to write: it is a
    folder, the folder it names does not exist (omni makes no folders the user did not ask for), or that folder
    cannot be written (check_writable). A URL needs only its bucket (a bucket has no folders to make)."""
    if is_remote(location):
        check_reachable(location, what)
        return
    p = os.path.abspath(os.fspath(path(location)))
    if os.path.isdir(p):
        raise StorageError(f"{what} {location} is a folder; name a file inside it, e.g. "
                           f"{os.path.join(str(location), example)}")
    parent = os.path.dirname(p)
    if not os.path.exists(parent):
        raise StorageError(f"{what} {location}: the folder {parent} does not exist; create it first or choose "
                           f"another {what} (omni makes no folders you did not ask for)")
    check_writable(location, what)


def _read_only(folder: str) -> bool:
    try:
        return bool(os.statvfs(folder).f_flag & os.ST_RDONLY)
    except OSError:
        return False


def check_reachable(location, what: str) -> None:
    """StorageError before any work when the bucket of a URL is missing or cannot be used with these credentials
    (nothing to check for a local path). `what` names the setting, e.g. "--workdir"."""
    if not is_remote(location):
        return
    p = path(location)
    fs = _fs(p)
    root = f"{scheme(p)}://{bucket(p)}"
    try:
        retry(lambda: fs.ls(root, refresh=True), f"reach {root}")
    except StorageError:
        raise
    except Exception as e:  # noqa: BLE001 - the store's own errors: named in one line
        line = describe_remote_error(p, e) or f"cannot reach {root} ({_short(e)})"
        raise StorageError(f"{what} {p}: {line}") from None


def _short(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return f"{type(e).__name__}: {text[:200]}{'...' if len(text) > 200 else ''}"
