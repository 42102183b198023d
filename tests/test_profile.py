"""train.profile_steps: a jax.profiler trace of the chosen steps lands in <workdir>/profile, where TensorBoard's
profile plugin looks (plugins/profile/<run>/<host>.xplane.pb), on disk and on a bucket."""

import os

import pytest

from omni import storage
from omni.config import ConfigError, validate
from tests.conftest import tiny_config
from tests.test_gcs import no_url_folders, omni, tiny


def _trace_files(folder) -> list[str]:
    return sorted(f for root, _, names in os.walk(folder) for f in names)


@pytest.mark.parametrize("spec, words", [("10", "is not START:STOP"), ("3:3", "START < STOP"), ("0:2", "1 <= START"),
                                         ("a:b", "is not START:STOP")])
def test_a_bad_profile_range_names_the_key(spec, words):
    cfg = tiny_config()
    cfg.train.profile_steps = spec
    with pytest.raises(ConfigError, match=f"'train.profile_steps'.*{words}"):
        validate(cfg)


def _train(tmp_path, workdir, profile="2:4"):
    cfg = tiny(steps=5, **{"train.profile_steps": profile, "train.checkpoint_every": 0})
    config = tmp_path / "c.json"
    from omni.config import save_config

    save_config(cfg, config)
    return omni("train", "--config", config, "--workdir", workdir, "--no-progress", cwd=tmp_path)


def test_the_profiled_steps_are_traced_into_the_workdir(tmp_path):
    run = _train(tmp_path, tmp_path / "run")
    assert run.returncode == 0, run.stderr[-2000:]
    assert f"profiled steps 2-3 into {tmp_path / 'run' / 'profile'}" in run.stdout
    runs = os.listdir(tmp_path / "run" / "profile" / "plugins" / "profile")
    assert len(runs) == 1
    files = _trace_files(tmp_path / "run" / "profile")
    assert any(f.endswith(".xplane.pb") for f in files) and any(f.endswith(".trace.json.gz") for f in files)


def test_a_bucket_workdir_gets_the_trace_uploaded(bucket, tmp_path):
    run = _train(tmp_path, f"{bucket}/run")
    assert run.returncode == 0, run.stderr[-2000:]
    runs = storage.listdir(f"{bucket}/run/profile/plugins/profile")
    assert len(runs) == 1
    names = storage.listdir(f"{bucket}/run/profile/plugins/profile/{runs[0]}")
    assert any(n.endswith(".xplane.pb") for n in names)
    no_url_folders(tmp_path)


def test_bench_traces_its_timed_steps(tmp_path):
    from omni.tools import bench

    result = bench.run(tiny_config(), warmup=0, steps=2, vocab_size=512, codebooks=2, codebook_size=16,
                       profile=tmp_path / "trace", out=None)
    assert result["timed_steps"] == 2
    assert any(f.endswith(".xplane.pb") for f in _trace_files(tmp_path / "trace"))
