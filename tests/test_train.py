import json

import jax
import numpy as np
import pytest

from omni import data, sharding, train
from omni.metrics import read_metrics
from tests.conftest import tiny_config

REQUIRED_KEYS = {"step", "loss", "loss/text", "loss/audio", "acc/text", "acc/audio", "tokens/text", "tokens/audio",
                 "lr", "grad_norm", "step_time_s", "tokens_per_s", "mfu"}


def test_tiny_model_overfits_one_batch():
    cfg = tiny_config(data=1, fsdp=1, tensor=1)
    cfg.model.d, cfg.train.lr, cfg.train.warmup_steps, cfg.train.steps = 64, 1e-2, 10, 150
    cfg.train.weight_decay = 0.0
    mesh = sharding.make_mesh(cfg.mesh, jax.devices()[:1])
    tx, schedule = train.build_optimizer(cfg)
    graphdef, state, shardings = train.init_state(cfg, mesh, tx)
    step = train.make_train_step(cfg, graphdef, tx, schedule, mesh, shardings)
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
    cfg.train.steps, cfg.train.eval_every, cfg.train.demo_eval_examples = 60, 30, 4
    result = train.train(cfg, workdir, progress=False)
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
    train.train(cfg, workdir, progress=False)
    assert "resumed from" in capsys.readouterr().out
    steps = [r["step"] for r in read_metrics(workdir) if "loss" in r]
    assert steps[-3:] == [60, 65, 70] and steps.count(60) == 1  # no step of the first run was redone
    assert sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()) == [50, 60, 70]


def test_checkpoint_holds_the_worker_pipeline_position(tmp_path):
    """With grain worker processes, a checkpoint at step 3 restores the iterator to the 4th batch."""
    import orbax.checkpoint as ocp

    from omni import checkpoint

    cfg = tiny_config()
    cfg.data.num_workers = 2
    cfg.train.steps, cfg.train.checkpoint_every, cfg.train.eval_batches = 6, 3, 1
    train.train(cfg, tmp_path, progress=False)
    reference = iter(data.train_dataset(cfg))
    want = [next(reference) for _ in range(4)][-1]
    reference.close()
    resumed = iter(data.train_dataset(cfg))
    manager = checkpoint.make_manager(tmp_path, cfg.train)
    manager.restore(3, args=ocp.args.Composite(data=checkpoint.DataRestore(resumed)))
    got = next(resumed)
    resumed.close()
    assert all(np.array_equal(got[k], want[k]) for k in want)
