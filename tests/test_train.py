import json

import jax
import numpy as np
import pytest

from omni import sharding
from omni.data import pipeline as data
from omni.demo import scorer
from omni.train import loop
from omni.train.metrics import read_metrics
from omni.train.step import build_optimizer, init_state, make_train_step
from tests.conftest import tiny_config

REQUIRED_KEYS = {"step", "loss", "loss/text", "loss/audio", "acc/text", "acc/audio", "tokens/text", "tokens/audio",
                 "lr", "grad_norm", "step_time_s", "tokens_per_s", "mfu"}


def test_tiny_model_overfits_one_batch():
    cfg = tiny_config(data=1, fsdp=1, tensor=1)
    cfg.model.d, cfg.train.lr, cfg.train.warmup_steps, cfg.train.steps = 64, 1e-2, 10, 150
    cfg.train.weight_decay = 0.0
    mesh = sharding.make_mesh(cfg.mesh, jax.devices()[:1])
    tx, schedule = build_optimizer(cfg)
    graphdef, state, shardings = init_state(cfg, mesh, tx, data.vocab_for(cfg))
    step = make_train_step(cfg, graphdef, tx, schedule, mesh, shardings)
    batch = sharding.global_batch(next(iter(data.train_dataset(cfg))), mesh, cfg.mesh.rules)
    first = None
    for _ in range(cfg.train.steps):
        state, metrics = step(state, batch)
        first = first if first is not None else float(metrics["loss"])
    assert first > 4.0
    assert float(metrics["loss"]) < 0.05
    assert float(metrics["acc"]) > 0.99


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("run")
    cfg = tiny_config()  # the default mesh: all 8 devices on 'data'
    cfg.train.steps, cfg.train.eval_every, cfg.demo.scored_examples = 60, 30, 4
    result = loop.train(cfg, workdir, progress=False, end_of_run=scorer.end_of_run_for(cfg))
    return cfg, workdir, result


def test_training_improves_held_out_loss_per_modality(trained):
    _, workdir, result = trained
    rows = read_metrics(workdir)
    evals = [r for r in rows if "eval/loss" in r]
    assert [r["step"] for r in evals] == [0, 30, 60]
    for modality in ("text", "audio"):
        assert evals[-1][f"eval/loss/{modality}"] < 0.6 * evals[0][f"eval/loss/{modality}"], modality
    assert result["eval"]["loss"] == pytest.approx(evals[-1]["eval/loss"])
    assert set(result["demo_tasks"]) == {"caption", "describe", "synth"}


def test_workdir_holds_config_metrics_events_and_checkpoints(trained):
    cfg, workdir, _ = trained
    saved = json.loads((workdir / "config.json").read_text())
    assert saved["train"]["steps"] == 60 and saved["model"]["d"] == cfg.model.d
    logged = [r for r in read_metrics(workdir) if "loss" in r]
    assert [r["step"] for r in logged] == [5, 10, 15, 20, 25, 30, 35, 40, 45, 50, 55, 60]
    for row in logged:
        assert REQUIRED_KEYS <= set(row), REQUIRED_KEYS - set(row)
        assert row["tokens_per_s"] > 0 and 0 < row["mfu"] and row["tokens/text"] > 0
    assert list((workdir / "tensorboard").glob("events.out.tfevents.*"))
    assert sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()) == [40, 50, 60]
    assert json.loads((workdir / "eval.json").read_text())["step"] == 60


def test_running_again_resumes_from_the_last_checkpoint(trained, capsys):
    cfg, workdir, _ = trained
    cfg.train.steps = 70
    loop.train(cfg, workdir, progress=False)
    assert "resumed from" in capsys.readouterr().out
    steps = [r["step"] for r in read_metrics(workdir) if "loss" in r]
    assert steps[-3:] == [60, 65, 70] and steps.count(60) == 1  # no step of the first run was redone
    assert sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()) == [50, 60, 70]


def test_checkpoint_holds_the_worker_pipeline_position(tmp_path):
    """With grain worker processes, a checkpoint at step 3 restores the iterator to the 4th batch."""
    import orbax.checkpoint as ocp

    from omni.train import checkpoint

    cfg = tiny_config()
    cfg.data.num_workers = 2
    cfg.train.steps, cfg.train.checkpoint_every, cfg.train.eval_batches = 6, 3, 1
    loop.train(cfg, tmp_path, progress=False)
    reference = iter(data.train_dataset(cfg))
    want = [next(reference) for _ in range(4)][-1]
    reference.close()
    resumed = iter(data.train_dataset(cfg))
    manager = checkpoint.make_manager(tmp_path, cfg.train)
    manager.restore(3, args=ocp.args.Composite(data=checkpoint.DataRestore(resumed)))
    got = next(resumed)
    resumed.close()
    assert all(np.array_equal(got[k], want[k]) for k in want)


# Logged by the loop before it deferred fetching a logging step's metrics until the next step was dispatched
# (tiny_config, train.steps=12, log_every=4, no checkpoints; 8 CPU devices on 'data'): the rows must not change.
GOLDEN_ROWS = {
    4: {"loss": 6.1979475021362305, "loss/text": 6.023528575897217, "loss/audio": 6.68363618850708,
        "grad_norm": 7.69803524017334, "lr": 0.0018000000854954123},
    8: {"loss": 4.401545524597168, "loss/text": 4.429492473602295, "loss/audio": 4.3407111167907715,
        "grad_norm": 4.944973945617676, "lr": 0.002491710940375924},
    12: {"loss": 3.879817008972168, "loss/text": 4.001904010772705, "loss/audio": 3.4448814392089844,
         "grad_norm": 3.7952094078063965, "lr": 0.0004336919810157269},
}


def test_deferred_metric_fetch_logs_the_same_rows(tmp_path):
    cfg = tiny_config()
    cfg.train.steps, cfg.train.log_every, cfg.train.checkpoint_every = 12, 4, 0
    loop.train(cfg, tmp_path, progress=False)
    logged = {r["step"]: r for r in read_metrics(tmp_path) if "loss" in r}
    assert sorted(logged) == [4, 8, 12]  # each logging step once, the last one flushed at the end
    for step, want in GOLDEN_ROWS.items():
        for key, value in want.items():
            assert logged[step][key] == pytest.approx(value, rel=1e-5), (step, key)
        assert logged[step]["step_time_s"] > 0 and 0 <= logged[step]["host_wait_frac"] <= 1
