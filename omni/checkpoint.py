"""One Orbax CheckpointManager per run: train state, grain iterator state and run metadata, saved together.

Layout: `<workdir>/checkpoints/<step>/{state,data,meta}`. Orbax writes into `<step>.orbax-checkpoint-tmp-*`
and renames when complete, so a save killed half-way never replaces the last good checkpoint, and
`latest_step()` only sees complete ones. Old checkpoints are deleted only after a newer one is finalised.
"""

from __future__ import annotations

from pathlib import Path

import grain
import jax
import orbax.checkpoint as ocp

from omni.config import TrainConfig


def make_manager(workdir: str | Path, tc: TrainConfig) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(
        max_to_keep=tc.keep_checkpoints, save_interval_steps=1, enable_async_checkpointing=tc.async_checkpoint,
        create=True)
    return ocp.CheckpointManager(Path(workdir).absolute() / "checkpoints", options=options,
                                 item_names=("state", "data", "meta"))


def save(manager: ocp.CheckpointManager, step: int, state, data_iterator, meta: dict) -> None:
    manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data=grain.checkpoint.CheckpointSave(data_iterator),
        meta=ocp.args.JsonSave(meta)), force=True)


def abstract_like(state):
    """ShapeDtypeStructs with the shardings of `state`: the restore target (restores onto the current mesh)."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)


def restore(manager: ocp.CheckpointManager, step: int, abstract_state, data_iterator):
    """Restores state (onto the shardings in `abstract_state`) and the iterator position; returns (state, meta)."""
    restored = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state),
        data=grain.checkpoint.CheckpointRestore(data_iterator),
        meta=ocp.args.JsonRestore()))
    return restored["state"], restored["meta"]
