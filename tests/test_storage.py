"""omni.storage: one way locations are opened, on local disk and on a real GCS server (fake-gcs-server)."""

import errno
import os
import sys

import pytest

from omni import storage
from omni.errors import OmniError, StorageError
from omni.train import workdir as workdir_lib


@pytest.mark.parametrize("text, why", [
    ("gs:/bucket/runs/x", "write gs://bucket/runs/x"),   # one slash missing
    ("gs:bucket/x", "write gs://bucket/x"),
    ("gs://", "write gs://BUCKET/..."),
    ("s3:/b/k", "write s3://b/k"),
    ("http://example.com/data.jsonl", "not http://"),
    ("file:relative", "not file:"),
])
def test_a_mistyped_or_unsupported_url_is_refused_and_never_becomes_a_local_folder(text, why, tmp_path,
                                                                                      monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(StorageError, match=why) as caught:
        storage.path(text)
    assert isinstance(caught.value, OmniError)  # the CLI prints it as one line
    assert os.listdir(tmp_path) == []


def test_local_paths_and_urls():
    assert str(storage.path("gs://b/runs/x")) == "gs://b/runs/x" and storage.is_remote("gs://b/runs/x")
    assert str(storage.path("GS://b/x")) == "gs://b/x"
    assert str(storage.path("gs://b/runs") / "x" / "y.json") == "gs://b/runs/x/y.json"
    assert str(storage.path("~/runs")) == os.path.expanduser("~/runs") and not storage.is_remote("~/runs")
    assert str(storage.path("run:1")) == "run:1"  # a colon in a local name is not a URL
    assert str(storage.absolute("gs://b/x")) == "gs://b/x"  # epath's absolute() would prepend the cwd
    assert str(storage.absolute("x")) == os.path.abspath("x")
    assert storage.bucket("gs://b/runs/x") == "b" and storage.bucket("runs/x") is None
    assert storage.same("gs://b/x/", "gs://b/x") and not storage.same("gs://b/x", "gs://b/y")


def test_a_failed_local_write_keeps_the_previous_file(tmp_path, monkeypatch):
    target = tmp_path / "eval.json"
    storage.write_text(target, "one")

    def disk_full(*_):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "replace", disk_full)
    with pytest.raises(OSError, match="No space left"):
        storage.write_text(target, "two")
    assert target.read_text() == "one" and os.listdir(tmp_path) == ["eval.json"]


def test_staged_folder_publishes_whole_or_not_at_all(tmp_path):
    out = tmp_path / "export"
    with pytest.raises(KeyboardInterrupt):
        with storage.staged_folder(out) as work:
            (work / "a.txt").write_text("a")
            raise KeyboardInterrupt
    assert os.listdir(tmp_path) == []  # no folder, no temporary folder
    with storage.staged_folder(out) as work:
        (work / "a.txt").write_text("a")
    assert os.listdir(out) == ["a.txt"]


@pytest.mark.parametrize("error, transient", [
    (TimeoutError("read timed out"), True),
    (ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused"), True),
    (ValueError("UNAVAILABLE: HTTP response code: 503"), True),
    (ValueError("DEADLINE_EXCEEDED: while reading gs://b/x"), True),
    (FileNotFoundError("gs://b/x/_METADATA"), False),
    (ValueError("NOT_FOUND: Error opening \"zarr\" driver"), False),
    (ValueError("DATA_LOSS: Error reading chunk"), False),
])
def test_transient_storage_errors_are_told_from_damage(error, transient):
    assert storage.is_transient(error) is transient
    wrapped = RuntimeError("restore failed")
    wrapped.__cause__ = error
    assert storage.is_transient(wrapped) is transient  # found anywhere in the cause chain


def test_retry_waits_out_transient_errors_and_passes_damage_through():
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionResetError(errno.ECONNRESET, "Connection reset by peer")
        return "ok"

    assert storage.retry(flaky, "read x", first_wait_s=0.01) == "ok" and len(calls) == 3
    with pytest.raises(StorageError, match="could not read x: the storage did not answer after 2 tries"):
        storage.retry(lambda: (_ for _ in ()).throw(TimeoutError("slow")), "read x", attempts=2, first_wait_s=0.01)
    with pytest.raises(FileNotFoundError):
        storage.retry(lambda: (_ for _ in ()).throw(FileNotFoundError("gone")), "read x", first_wait_s=0.01)


def test_missing_credentials_and_buckets_are_named_in_one_line():
    class HttpError(Exception):
        def __init__(self, code, text):
            super().__init__(text)
            self.code = code

    creds = storage.describe_remote_error("gs://b/run", HttpError(401, "Anonymous caller does not have access"))
    assert "no credentials for gs://b" in creds and "GOOGLE_APPLICATION_CREDENTIALS" in creds
    assert "Storage Object Admin" in storage.describe_remote_error("gs://b/run", HttpError(403, "Forbidden"))
    missing = storage.describe_remote_error("gs://nope/run", FileNotFoundError("b/nope/o"))
    assert "the bucket gs://nope does not exist" in missing and "gcloud storage buckets create gs://nope" in missing
    assert storage.describe_remote_error("runs/x", FileNotFoundError("x")) is None


# ---------------------------------------------------------------------------------------------- on a bucket


def test_files_and_folders_on_a_bucket(bucket, tmp_path):
    root = storage.path(bucket)
    storage.write_text(root / "a" / "x.json", "{}")
    assert (root / "a" / "x.json").read_text() == "{}" and storage.listdir(root / "a") == ["x.json"]
    assert storage.listdir(root / "nothing") == []  # a bucket has no empty folders
    storage.append_text(root / "log.jsonl", "1\n")
    storage.append_text(root / "log.jsonl", "2\n")
    assert (root / "log.jsonl").read_text() == "1\n2\n"
    with storage.local_file(root / "a" / "x.json") as local:
        assert not storage.is_remote(local) and open(local).read() == "{}"
    assert not os.path.exists(local)  # the download is gone afterwards
    storage.move_tree(root / "a", root / "b" / "moved")
    assert storage.listdir(root / "a") == [] and storage.listdir(root / "b" / "moved") == ["x.json"]
    storage.remove_tree(root / "b")
    assert storage.listdir(root / "b") == []


def test_a_staged_folder_reaches_the_bucket_with_its_marker_last(bucket, monkeypatch):
    out = storage.path(bucket) / "export"
    order = []
    real = storage.upload_folder

    def spy(local, remote, last=None):
        fs = storage._fs(remote)
        original = fs.put_file

        def put_file(src, dst, **kw):
            order.append(dst.rsplit("/", 1)[-1])
            return original(src, dst, **kw)

        monkeypatch.setattr(fs, "put_file", put_file)
        return real(local, remote, last=last)

    monkeypatch.setattr(storage, "upload_folder", spy)
    with storage.staged_folder(out, last="config.json") as work:
        for name in ("config.json", "a.bin", "z.bin"):
            (work / name).write_text(name)
    assert order[-1] == "config.json" and sorted(order) == ["a.bin", "config.json", "z.bin"]
    assert storage.listdir(out) == ["a.bin", "config.json", "z.bin"]


def test_a_missing_bucket_is_one_line_before_any_work(gcs_server):
    with pytest.raises(StorageError, match="the bucket gs://no-such-bucket does not exist"):
        storage.check_reachable("gs://no-such-bucket/runs/x", "--workdir")
    with pytest.raises(OmniError, match="the bucket gs://no-such-bucket does not exist"):
        workdir_lib.check_writable("gs://no-such-bucket/runs/x")


def test_disk_conditions_become_one_line_naming_the_path_and_what_to_do(tmp_path):
    full = OSError(errno.ENOSPC, "No space left on device")
    assert storage.os_error_line(full, "--workdir") == "the disk is full; free space there or choose another --workdir"
    # tensorstore (Orbax) puts the condition only in words
    words = RuntimeError('RESOURCE_EXHAUSTED: Error writing "opt_state.mu": [OS error 28: No space left on device]')
    assert storage.os_errno(words) == errno.ENOSPC
    assert str(storage.os_error(OSError(errno.EROFS, "x"), tmp_path / "o")).startswith(
        f"cannot write {tmp_path / 'o'}: the file system is read-only")
    assert storage.os_error_line(ValueError("something else")) is None
    (tmp_path / "file").write_text("x")
    with pytest.raises(StorageError, match="a part of the path is a file"):
        storage.check_writable(tmp_path / "file" / "out")
    storage.check_writable(tmp_path / "new" / "deeper")  # nothing exists yet below tmp_path: fine, and nothing made
    assert not (tmp_path / "new").exists()


def test_a_read_only_folder_is_refused_before_any_work(tmp_path):
    from conftest import run_in_namespace

    (tmp_path / "ro").mkdir()
    code = f"from omni import storage; storage.check_writable({str(tmp_path / 'ro' / 'out')!r}, '--out')"
    result = run_in_namespace(f"mount -o bind,ro {tmp_path / 'ro'} {tmp_path / 'ro'} && "
                              f"{sys.executable} -c \"{code}\"")
    assert result.returncode != 0
    assert "cannot write" in result.stderr and "read-only; choose another --out" in result.stderr


def test_a_full_disk_during_a_staged_folder_is_one_error_and_leaves_nothing(tmp_path):
    from conftest import run_in_namespace

    (tmp_path / "small").mkdir()
    script = tmp_path / "fill.py"
    script.write_text("from omni import storage\n"
                      "try:\n"
                      f"    with storage.staged_folder({str(tmp_path / 'small' / 'out')!r}) as w:\n"
                      "        (w / 'big').write_bytes(bytes(2**20))\n"
                      "except storage.StorageError as e:\n"
                      "    print('ERR', e)\n")
    result = run_in_namespace(f"mount -t tmpfs -o size=256k none {tmp_path / 'small'} && "
                              f"{sys.executable} {script} && ls -a {tmp_path / 'small'}")
    assert result.returncode == 0, result.stderr
    assert f"ERR cannot write {tmp_path / 'small' / 'out'}: the disk is full" in result.stdout
    assert ".tmp-" not in result.stdout  # the partial folder is gone


def test_staging_folders_of_killed_processes_are_swept_and_live_ones_kept(tmp_path):
    out = tmp_path / "export"
    dead = tmp_path / f"export.tmp-{storage.host_name()}-{2**22 + 12345}-0123abcd"
    live = tmp_path / f"export.tmp-{storage.host_name()}-{os.getpid()}-89abcdef"
    foreign = tmp_path / "export.tmp-mine"  # not a name omni makes: a user's
    for folder in (dead, live, foreign):
        folder.mkdir()
    with storage.staged_folder(out) as work:
        (work / "f").write_text("x")
    assert not dead.exists() and live.exists() and foreign.exists() and (out / "f").read_text() == "x"
