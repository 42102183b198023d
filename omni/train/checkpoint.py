"""One Orbax CheckpointManager per run: train state, data position and run metadata, saved together.

Layout: `<workdir>/checkpoints/<step>/{state,data,meta}`; `data` holds one grain iterator state per reading
shard (`shard-<s>-of-<S>.json`, omni.data), `meta` the resolved config, the step, the dataset and the
tokenizer and codec identities.

What protects a run:
- Orbax writes a step into `<step>.orbax-checkpoint-tmp-*` and renames it when complete, so a save killed
  half-way never looks like a checkpoint; leftovers are cleaned when the next run starts. Old checkpoints are
  deleted (keep-N) only after a newer one is finalised, and not while a reader holds a lease on it
  (omni.train.readers: eval, export and generate beside a training run).
- `restore_latest` walks back from the newest checkpoint: one that cannot be read (a file truncated, missing
  or garbled) is reported, moved to `<workdir>/checkpoints.rejected/` and the previous one is tried. An error
  that says the storage is not answering (a timeout, a refused connection, HTTP 429/5xx: omni.storage.is_transient)
  is not damage: the read is tried again with backoff, and if the storage stays away the run stops with a
  StorageError and every checkpoint stays where it is.
- On a bucket (gs://) Orbax marks a finished step with `commit_success.txt` instead of renaming it; the same
  rules hold, and only process 0 moves a rejected checkpoint (a copy of each object, then their deletion).
- A checkpoint whose parameter shapes differ from the current config is not skipped: it fails with
  `CheckpointMismatchError` naming the first mismatching parameter and the config keys that changed.
- Restoring onto the shardings of the current state means a run saved on one mesh resumes on another.
"""

from __future__ import annotations

import dataclasses
import json
import re
import threading
import time

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from omni import storage
from omni.config import TrainConfig, changed_keys, get_key
from omni.errors import CheckpointMismatchError, NoUsableCheckpointError, OmniError, StorageError, WorkdirError
from omni.train import readers

REJECTED_DIR = "checkpoints.rejected"


class DataStateHandler(grain.checkpoint.CheckpointHandler):
    """The train iterator's position (omni.data.pipeline.ShardedBatches): one `shard-<s>-of-<S>.json` per reading shard,
    written by the process that reads it, so any process count that splits the S shards can restore them."""

    def save(self, directory, item=None, args=None):
        state = (item or args.item).get_state()
        for shard, shard_state in state["shards"].items():
            storage.write_text(storage.path(directory) / f"shard-{shard}-of-{state['num_shards']}.json",
                               json.dumps(shard_state))

    def restore(self, directory, item=None, args=None):
        item = item or args.item
        shards = {}
        for s in item.shard_ids:
            path = storage.path(directory) / f"shard-{s}-of-{item.num_shards}.json"
            if not path.exists():  # written before reading shards: grain's file of process s (one shard each)
                path = storage.path(directory) / f"process_{s}-of-{item.num_shards}.json"
            if not path.exists():
                raise FileNotFoundError(f"{path.parent}/shard-{s}-of-{item.num_shards}.json is missing")
            shards[str(s)] = json.loads(path.read_text())
        item.set_state({"num_shards": item.num_shards, "shards": shards})
        return item


@ocp.args.register_with_handler(DataStateHandler, for_save=True)
@dataclasses.dataclass
class DataSave(ocp.args.CheckpointArgs):
    item: object


@ocp.args.register_with_handler(DataStateHandler, for_restore=True)
@dataclasses.dataclass
class DataRestore(ocp.args.CheckpointArgs):
    item: object


def saved_shard_count(step_dir) -> int | None:
    """S of the `shard-<s>-of-<S>.json` files in a checkpoint's data item (None when there are none)."""
    data = storage.path(step_dir) / "data"
    names = storage.listdir(data) if data.exists() else []
    counts = {int(m.group(1)) for name in names
              if (m := re.fullmatch(r"(?:shard-|process_)\d+-of-(\d+)\.json", name))}
    return counts.pop() if len(counts) == 1 else None


def make_manager(workdir, tc: TrainConfig) -> ocp.CheckpointManager:
    # keep-N, except the steps a reader (eval, export, generate beside this run) holds a lease on: omni.train.readers
    keep = ocp.checkpoint_managers.AnyPreservationPolicy(
        [ocp.checkpoint_managers.LatestN(n=tc.keep_checkpoints), readers.KeepLeased(workdir)])
    options = ocp.CheckpointManagerOptions(
        preservation_policy=keep, save_interval_steps=1, enable_async_checkpointing=tc.async_checkpoint,
        create=True, cleanup_tmp_directories=True)
    # Handlers registered up front, so a fresh manager can read metadata before its first save or restore.
    registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
    registry.add("state", ocp.args.StandardSave, ocp.StandardCheckpointHandler)
    registry.add("state", ocp.args.StandardRestore, ocp.StandardCheckpointHandler)
    registry.add("data", DataSave, DataStateHandler)
    registry.add("data", DataRestore, DataStateHandler)
    registry.add("meta", ocp.args.JsonSave, ocp.JsonCheckpointHandler)
    registry.add("meta", ocp.args.JsonRestore, ocp.JsonCheckpointHandler)
    quiet_background_noise()
    manager = ocp.CheckpointManager(storage.absolute(workdir) / "checkpoints", options=options,
                                    handler_registry=registry)
    if hasattr(manager, "_checkpoint_deleter"):  # Orbax's own; without it the policy above still keeps leases
        manager._checkpoint_deleter = LeaseAwareDeleter(manager._checkpoint_deleter, workdir)
    return manager


class LeaseAwareDeleter:
    """Orbax decides which steps keep-N drops when a save starts, and deletes them when that save is finalised,
    seconds later in the background: the newest complete step, the one a reader picks, is already doomed meanwhile.
    This deleter looks at the read leases again at deletion time; a step leased since is left for a later save
    (`delete_deferred`, called by `save`) once its lease is gone. Everything else is Orbax's deleter."""

    def __init__(self, inner, workdir):
        self._inner, self._workdir = inner, workdir
        self._deferred: set[int] = set()
        self._lock = threading.Lock()

    def delete_steps(self, steps) -> None:
        leased = self._leased()
        with self._lock:
            self._deferred.update(s for s in steps if s in leased)
        self._inner.delete_steps([s for s in steps if s not in leased])

    def delete_deferred(self) -> None:
        with self._lock:
            if not self._deferred:
                return
            free = self._deferred - self._leased()
            self._deferred -= free
        for step in sorted(free):
            self._inner.delete(step)

    def _leased(self) -> set[int]:
        try:
            return readers.leased_steps(self._workdir)
        except Exception:  # noqa: BLE001 - an unlistable lease folder must not stop a save
            return set()

    def __getattr__(self, name):
        return getattr(self._inner, name)


def save(manager: ocp.CheckpointManager, step: int, state, data_iterator, meta: dict) -> None:
    deleter = getattr(manager, "_checkpoint_deleter", None)
    if isinstance(deleter, LeaseAwareDeleter):
        deleter.delete_deferred()  # steps keep-N dropped while a reader held them, now free
    manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data=DataSave(data_iterator),
        meta=ocp.args.JsonSave(meta)), force=True)


def disk_error(workdir, error: BaseException):
    """For a run stopped by a full, read-only or forbidden disk (omni.storage.os_errno, also in tensorstore's words):
    deletes the unfinished step folders Orbax left (`<step>.orbax-checkpoint-tmp*`, which would hold the space) and
    returns the one-line WorkdirError to raise; None for any other error. Call it after the manager is closed."""
    line = storage.os_error_line(error, "--workdir")
    if line is None or isinstance(error, OmniError):
        return None
    root = storage.path(workdir) / "checkpoints"
    unfinished = [name for name in storage.listdir(root) if ".orbax-checkpoint-tmp" in name]
    if jax.process_index() == 0:
        for name in unfinished:
            storage.remove_tree(root / name)
    steps = checkpoint_steps(workdir)
    failed = sorted({int(m.group(1)) for name in unfinished if (m := re.match(r"(\d+)\.orbax", name))})
    what = f"save checkpoint {failed[-1]} in {root}" if failed else f"write in {workdir}"
    kept = (f"The last complete checkpoint, step {steps[-1]}, is intact: run the same command to resume from it"
            if steps else "No checkpoint was complete yet")
    return WorkdirError(f"cannot {what}: {line}. {kept}")


class _QuietDiskErrors:
    """A logging filter for Orbax's background threads, which log a disk-full write with its traceback (several
    times) before the error reaches the trainer; the trainer says it once, in one line (disk_error)."""

    def filter(self, record) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        return not (storage.os_errno(error) if error is not None else None) and \
            not storage.os_errno(RuntimeError(record.getMessage()))


def _closed_loop_noise(unraisable) -> bool:
    """Whether an unraisable error is tensorstore completing a read or write after Orbax closed the asyncio loop
    that awaited it: what follows an error that already reached the trainer or reader (a disk full, a checkpoint
    deleted under a reader), printed once per pending operation (28 tracebacks of nothing)."""
    tb = unraisable.exc_traceback
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return (isinstance(unraisable.exc_value, RuntimeError) and str(unraisable.exc_value) == "Event loop is closed"
            and tb is not None and tb.tb_frame.f_code.co_name == "_check_closed")


def quiet_background_noise() -> None:
    """Keeps what Orbax's background threads print after an error that omni reports in one line out of the output
    (idempotent): disk-condition tracebacks logged by absl and asyncio, and closed-loop callbacks (above)."""
    import logging
    import sys

    previous = sys.unraisablehook
    if getattr(previous, "omni_quiet", False) is False:
        def hook(unraisable):
            if not _closed_loop_noise(unraisable):
                previous(unraisable)
        hook.omni_quiet = True
        sys.unraisablehook = hook
    for name in ("absl", "asyncio"):  # asyncio: "exception was never retrieved" of the same write
        logger = logging.getLogger(name)
        if not any(isinstance(f, _QuietDiskErrors) for f in logger.filters):
            logger.addFilter(_QuietDiskErrors())


def abstract_like(state):
    """ShapeDtypeStructs with the shardings of `state`: the restore target (restores onto the current mesh)."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)


def restore(manager: ocp.CheckpointManager, step: int, abstract_state, data_iterator):
    """Restores state (onto the shardings in `abstract_state`) and the iterator position; returns (state, meta)."""
    restored = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state),
        data=DataRestore(data_iterator),
        meta=ocp.args.JsonRestore()))
    return restored["state"], restored["meta"]


def restore_latest(manager: ocp.CheckpointManager, abstract_state, data_iterator, config: dict | None = None,
                   log=print):
    """Restores the newest readable checkpoint; returns (step, state, meta), or None when there is none.

    Unreadable checkpoints are reported and moved aside; a shape mismatch raises CheckpointMismatchError; storage
    that does not answer is waited for (with backoff), then a StorageError, with nothing moved.
    `config` (the current resolved config as a dict) only serves to name what changed in that error.
    """
    storage.refresh(manager.directory)
    manager.reload()
    steps = sorted(manager.all_steps(), reverse=True)
    if not steps:
        return None
    for step in steps:
        path = step_path(manager, step)
        try:
            saved = _patiently(lambda: manager.item_metadata(step)["state"], f"read the metadata of {path}", log)
            has_metadata = _patiently(lambda: (path / "state" / "_METADATA").is_file(), f"read {path}", log)
        except StorageError:
            raise
        except Exception as e:  # noqa: BLE001 - any other read failure means this checkpoint is unusable
            _reject(manager, step, f"its metadata cannot be read ({_short(e)})", log)
            continue
        if not has_metadata or not _leaves(_metadata_tree(saved)):
            # Damage, not another model: only a checkpoint that reads fine can be compared with this config.
            _reject(manager, step, "its state metadata (state/_METADATA) is missing or empty", log)
            continue
        check_shapes(_metadata_tree(saved), abstract_state, path, config, _saved_config(manager, step))
        saved_shards, reading = saved_shard_count(path), getattr(data_iterator, "num_shards", None)
        if saved_shards and reading and saved_shards != reading:
            raise CheckpointMismatchError(
                f"checkpoint {path} holds the data position of {saved_shards} reading shards, but this run reads "
                f"{reading} (data.shards, or one per process when it is 0). Resume with --set "
                f"data.shards={saved_shards} (it must be a multiple of the process count) to keep the data order")
        try:
            state, meta = _patiently(lambda: restore(manager, step, abstract_state, data_iterator),
                                     f"restore {path}", log)
        except StorageError:
            raise
        except Exception as e:  # noqa: BLE001
            _reject(manager, step, _short(e), log)
            continue
        return step, state, meta
    raise NoUsableCheckpointError(
        f"none of the checkpoints in {manager.directory} ({', '.join(map(str, steps))}) could be read; they were "
        f"moved to {storage.path(manager.directory).parent / REJECTED_DIR}. Start a new run with another --workdir, "
        f"or move a good checkpoint back")


# How long a restore waits for storage that does not answer before it gives up (and moves nothing).
RESTORE_ATTEMPTS = 6


def _patiently(operation, what: str, log):
    """operation(), retried on transient storage errors (omni.storage.retry): a timeout is not damage."""
    return storage.retry(operation, what, attempts=RESTORE_ATTEMPTS, log=log)


def step_path(manager: ocp.CheckpointManager, step: int):
    return storage.path(manager.directory) / str(step)


def check_shapes(saved_tree, abstract_state, path, config: dict | None, saved_config: dict | None) -> None:
    """Raises CheckpointMismatchError at the first parameter whose name or shape differs."""
    saved = {_name(p): tuple(getattr(leaf, "shape", ())) for p, leaf in _leaves(saved_tree)}
    # Parameters first: their names say more than the optimizer moments that mirror them.
    wanted = {_name(p): tuple(leaf.shape) for p, leaf in _leaves(abstract_state)}
    wanted = dict(sorted(wanted.items(), key=lambda item: not item[0].startswith("params.")))
    problem = None
    for name, shape in wanted.items():
        if name not in saved:
            problem = f"parameter '{name}' (shape {list(shape)}) is not in the checkpoint"
        elif saved[name] != shape:
            problem = f"parameter '{name}' has shape {list(saved[name])} in the checkpoint but {list(shape)} in this config"
        if problem:
            break
    if problem is None:
        extra = sorted(set(saved) - set(wanted))
        if not extra:
            return
        problem = f"the checkpoint has parameter '{extra[0]}' that this config does not"
    changed = _changed_keys(saved_config, config)
    hint = f" Config keys that differ from the checkpoint's: {', '.join(changed)}." if changed else ""
    raise CheckpointMismatchError(
        f"checkpoint {path} does not fit this model: {problem}.{hint} Resume with the config the run was "
        f"started with (it is saved in the workdir as config.json), or use a new --workdir")


def _leaves(tree):
    return jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: hasattr(x, "shape"))[0]


def _name(path) -> str:
    return jax.tree_util.keystr(path, simple=True, separator=".")


def _metadata_tree(metadata):
    return getattr(metadata, "tree", metadata)


def _saved_config(manager, step) -> dict | None:
    try:
        return read_meta(storage.path(manager.directory).parent, step).get("config")
    except Exception:  # noqa: BLE001 - only used to make an error message better
        return None


def _changed_keys(saved: dict | None, now: dict | None) -> list[str]:
    """'key (saved -> now)' for every config key both configs hold with different values."""
    if not isinstance(saved, dict) or not isinstance(now, dict):
        return []
    return [f"{k} ({get_key(saved, k)!r} -> {get_key(now, k)!r})" for k in changed_keys(saved, now)
            if get_key(saved, k) is not None]  # a key added to the schema since the checkpoint: nothing to compare


def _short(e: Exception) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text[:300]}{'...' if len(text) > 300 else ''}"


def _reject(manager: ocp.CheckpointManager, step: int, why: str, log) -> None:
    """Moves an unreadable checkpoint out of the way (so the run can save that step again) and says so."""
    src = step_path(manager, step)
    dst = storage.path(manager.directory).parent / REJECTED_DIR / f"{step}-{time.strftime('%Y%m%d-%H%M%S')}"
    log(f"omni: checkpoint {src} is unreadable and is skipped: {why}. Moved to {dst}; trying the previous one")
    if jax.process_index() == 0:
        storage.move_tree(src, dst)
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(f"omni_reject_checkpoint_{step}")
    storage.refresh(manager.directory)
    manager.reload()


def agree(flag: bool) -> bool:
    """Process 0's decision, on every process (a save must happen on all hosts or none)."""
    if jax.process_count() == 1:
        return flag
    return bool(multihost_utils.broadcast_one_to_all(np.asarray(flag)))


def checkpoint_steps(workdir) -> list[int]:
    """Steps of the complete checkpoints of a workdir, oldest first (never `*.orbax-checkpoint-tmp-*`, nor on a
    bucket a step folder without its `commit_success.txt`)."""
    root = storage.absolute(workdir) / "checkpoints"
    storage.refresh(root)
    return sorted(ocp.utils.checkpoint_steps(root)) if root.is_dir() else []


def pick_step(workdir, step: int | None) -> int:
    """`step`, or the latest one; a clear error when the workdir has none or not that one."""
    steps = checkpoint_steps(workdir)
    root = storage.path(workdir) / "checkpoints"
    if not steps:
        raise NoUsableCheckpointError(f"no complete checkpoint in {root}; train first (omni train --workdir "
                                      f"{workdir} ...)")
    if step is None:
        return steps[-1]
    if step not in steps:
        raise NoUsableCheckpointError(f"there is no checkpoint of step {step} in {root}; the steps that exist "
                                      f"are {', '.join(map(str, steps))}")
    return step


def read_meta(workdir, step: int) -> dict:
    """The run metadata saved with a checkpoint (resolved config, dataset, tokenizer, codec, vocab, step)."""
    with ocp.Checkpointer(ocp.JsonCheckpointHandler()) as checkpointer:
        return checkpointer.restore(storage.absolute(workdir) / "checkpoints" / str(step) / "meta",
                                    args=ocp.args.JsonRestore())


def restore_params(workdir, step: int, abstract_params=None):
    """Only the parameters of a checkpoint: the state item also holds the optimizer moments (2x the params),
    but a partial restore reads just what its target names.

    With `abstract_params` (ShapeDtypeStructs with shardings, shapes checked first) each process reads only its
    shards; without, every array comes back whole on the host as numpy, whatever mesh wrote it.
    """
    step_dir = storage.absolute(workdir) / "checkpoints" / str(step)
    handler = ocp.PyTreeCheckpointHandler()
    saved = _metadata_tree(handler.metadata(step_dir / "state"))["params"]
    if abstract_params is None:
        target = saved
        restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), saved)
    else:
        check_shapes({"params": saved}, {"params": abstract_params}, step_dir, None, None)
        target = abstract_params
        restore_args = jax.tree.map(
            lambda leaf: ocp.ArrayRestoreArgs(sharding=leaf.sharding, global_shape=leaf.shape, dtype=leaf.dtype),
            abstract_params)
    with ocp.Checkpointer(handler) as checkpointer:
        restored = checkpointer.restore(step_dir / "state", args=ocp.args.PyTreeRestore(
            item={"params": target}, restore_args={"params": restore_args}, partial_restore=True))
    return restored["params"]
