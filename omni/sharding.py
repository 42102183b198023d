"""The device mesh and logical-axis sharding: everything about where arrays live, in one file.

Parameters and the main activations are named with logical axes ('batch', 'embed', 'heads', ...); the
config's `mesh.rules` table maps each to mesh axes ('data', 'fsdp', 'tensor'), as in MaxText. Here: the mesh
(and the error that lists the shapes that fit), the rules -> PartitionSpec mapping, the constraint model code
calls, the train state's and the batch's shardings, and the check that a batch splits over the mesh.
"""

from __future__ import annotations

import contextlib
import contextvars
import itertools
import json
import math

import jax
import numpy as np
from flax import nnx
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from omni.batch import PER_PATCH_SLOT
from omni.config import Config, MeshConfig
from omni.errors import ConfigError, MeshError

AXES = ("data", "fsdp", "tensor")


_active: contextvars.ContextVar = contextvars.ContextVar("omni_sharding", default=None)




def mesh_shape(cfg: MeshConfig, num_devices: int) -> tuple[int, int, int]:
    """Resolves -1 and checks the product against the device count; the error says what would fit."""
    sizes = [getattr(cfg, a) for a in AXES]
    fixed = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if num_devices % fixed:
            raise MeshError(_mismatch(cfg, num_devices, f"the fixed axes multiply to {fixed}, "
                                                        f"which does not divide {num_devices} devices"))
        sizes = [num_devices // fixed if s == -1 else s for s in sizes]
    elif fixed != num_devices:
        raise MeshError(_mismatch(cfg, num_devices, f"it needs {fixed} devices but {num_devices} are available"))
    return tuple(sizes)


def _mismatch(cfg: MeshConfig, num_devices: int, why: str) -> str:
    fits = [shape for shape in itertools.product(range(1, num_devices + 1), repeat=3)
            if math.prod(shape) == num_devices]
    examples = ", ".join(f"data={d} fsdp={f} tensor={t}" for d, f, t in fits[:6])
    return (f"mesh data={cfg.data} fsdp={cfg.fsdp} tensor={cfg.tensor} does not fit: {why}. "
            f"Shapes that fit {num_devices} devices: {examples}{', ...' if len(fits) > 6 else ''}. "
            f"Set them with --set mesh.data=.. --set mesh.fsdp=.. --set mesh.tensor=.. (one of them may be -1).")


def make_mesh(cfg: MeshConfig, devices=None) -> Mesh:
    """The (data, fsdp, tensor) mesh; with mesh.dcn_* > 1 a hybrid mesh whose dcn part spans slices (TPU
    multislice) or, where all devices are in one slice (GPU and CPU hosts), processes."""
    devices = list(devices if devices is not None else jax.devices())
    shape = mesh_shape(cfg, len(devices))
    dcn = tuple(getattr(cfg, f"dcn_{a}") for a in AXES)
    if dcn == (1, 1, 1):
        return jax.make_mesh(shape, AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)
    for axis, total, across in zip(AXES, shape, dcn):
        if total % across:
            raise MeshError(f"mesh.{axis} = {total} does not divide into mesh.dcn_{axis} = {across} slices")
    slices = {getattr(d, "slice_index", None) for d in devices}
    has_slices = len(slices) > 1  # several TPU slices; otherwise each process counts as one (GPU/CPU hosts)
    granules = len(slices) if has_slices else len({d.process_index for d in devices})
    if math.prod(dcn) != granules:
        kind = "slices" if has_slices else "processes"
        raise MeshError(f"mesh.dcn_data x dcn_fsdp x dcn_tensor = {math.prod(dcn)} but the job has {granules} "
                        f"{kind}; make their product {granules}")
    ici = tuple(total // across for total, across in zip(shape, dcn))
    grid = mesh_utils.create_hybrid_device_mesh(ici, dcn, devices, process_is_granule=not has_slices)
    return Mesh(grid, AXES, axis_types=(AxisType.Auto,) * 3)


def rules_tuple(rules) -> tuple:
    """Config rules (lists, for JSON) -> the tuple form flax's logical_axis_rules takes."""
    return tuple((name, tuple(axes) if isinstance(axes, list) else axes) for name, axes in rules)


def logical_to_spec(names, rules) -> PartitionSpec:
    table = dict(rules_tuple(rules))
    return PartitionSpec(*(table.get(n) if n is not None else None for n in names))


def named(mesh: Mesh, rules, *names) -> NamedSharding:
    return NamedSharding(mesh, logical_to_spec(names, rules))


@contextlib.contextmanager
def activate(mesh: Mesh, rules):
    """Makes `constrain` in model code place activations on this mesh with these rules (while tracing)."""
    token = _active.set((mesh, rules))
    try:
        yield
    finally:
        _active.reset(token)


def active_mesh_key():
    """A hashable description of the mesh and rules `activate` set (None outside it): part of a cache key for
    functions compiled while tracing under it."""
    active = _active.get()
    return None if active is None else (active[0], json.dumps(active[1]))


def active_platform() -> str | None:
    """The platform ("gpu", "tpu", "cpu") of the mesh `activate` set, None outside it: backend choices made
    while tracing (the attention kernel) follow the devices the program is for, not the host's backend."""
    active = _active.get()
    return None if active is None else active[0].devices.flat[0].platform


def constrain(x, *names):
    """with_sharding_constraint by logical axis names; a no-op outside `activate` (plain single-device use)."""
    active = _active.get()
    if active is None:
        return x
    mesh, rules = active
    return jax.lax.with_sharding_constraint(x, named(mesh, rules, *names))


def batch_sharding(mesh: Mesh, rules, ndim: int, field: str = "tokens") -> NamedSharding:
    """A batch field's sharding: rows on 'batch', positions on 'length'; patch slots are not split."""
    second = None if field in PER_PATCH_SLOT else "length"
    return named(mesh, rules, "batch", second, *([None] * (ndim - 2)))


def global_batch(local_batch: dict, mesh: Mesh, rules) -> dict:
    """Process-local numpy batch -> global jax arrays sharded on the batch axis (works for one or many hosts)."""
    return {k: jax.make_array_from_process_local_data(batch_sharding(mesh, rules, np.ndim(v), k), v)
            for k, v in local_batch.items()}


def state_shardings(cfg: Config, mesh: Mesh, abstract_params, tx) -> dict:
    """NamedShardings of the train state {step, params, opt_state}: params from their logical names and the mesh
    rules, optimizer moments like their params, scalars replicated."""
    specs = nnx.to_pure_dict(nnx.get_partition_spec(abstract_params))
    shapes = nnx.to_pure_dict(abstract_params)

    def param_sharding(path, spec, shape):
        return NamedSharding(mesh, _divisible(_logical_spec(spec, cfg.mesh.rules), shape.shape, mesh))

    param_sh = jax.tree_util.tree_map_with_path(param_sharding, specs, shapes,
                                                is_leaf=lambda x: isinstance(x, PartitionSpec))
    replicated = NamedSharding(mesh, PartitionSpec())
    abstract_opt = jax.eval_shape(tx.init, nnx.to_pure_dict(abstract_params))
    return {"step": replicated, "params": param_sh, "opt_state": _like_params(abstract_opt, param_sh, shapes,
                                                                              replicated)}


def undivided(cfg: Config, mesh: Mesh, abstract_params) -> list[str]:
    """The parameters kept whole along a mesh axis their logical names ask for, because the mesh does not divide
    that dimension (more memory per device, not an error): one 'name [shape]: wanted SPEC, using SPEC' each, for
    the trainer to say at start-up (it went to a logger nobody configured)."""
    specs = nnx.to_pure_dict(nnx.get_partition_spec(abstract_params))
    shapes = nnx.to_pure_dict(abstract_params)
    out = []

    def check(path, spec, shape):
        wanted = _logical_spec(spec, cfg.mesh.rules)
        fitted = _divisible(wanted, shape.shape, mesh)
        if fitted != wanted:
            out.append(f"{jax.tree_util.keystr(path, simple=True, separator='.')} {list(shape.shape)}: wanted "
                       f"{tuple(wanted)}, using {tuple(fitted)}")

    jax.tree_util.tree_map_with_path(check, specs, shapes, is_leaf=lambda x: isinstance(x, PartitionSpec))
    return out


def describe_undivided(lines: list[str], mesh: Mesh, shown: int = 4) -> str | None:
    """One line for the start of a run naming what `undivided` found (None when nothing)."""
    if not lines:
        return None
    more = f"; and {len(lines) - shown} more" if len(lines) > shown else ""
    return (f"omni: {len(lines)} parameter(s) stay whole along a mesh axis that does not divide them (mesh "
            f"{dict(mesh.shape)}; more memory per device, set the sizes or mesh.rules to shard them): "
            + "; ".join(lines[:shown]) + more)


def _like_params(opt_state, param_sh, param_shapes, replicated):
    """Each optimizer state leaf sharded like the parameter it belongs to (Adam's moments), others replicated.

    A moment's place in the state ends with its parameter's dict keys (under optax.multi_transform too, where the
    frozen ones are MaskedNode and hold nothing), so it is found by its longest key suffix that names a parameter
    of the same shape."""
    def keys(path):
        return tuple(k.key for k in path if isinstance(k, jax.tree_util.DictKey))

    params = {keys(p): (sh, shape.shape) for (p, sh), (_, shape) in
              zip(jax.tree_util.tree_leaves_with_path(param_sh), jax.tree_util.tree_leaves_with_path(param_shapes))}

    def leaf_sharding(path, leaf):
        names = keys(path)
        for i in range(len(names)):
            found = params.get(names[i:])
            if found is not None and found[1] == leaf.shape:
                return found[0]
        return replicated

    return jax.tree_util.tree_map_with_path(leaf_sharding, opt_state)


def _logical_spec(spec: PartitionSpec, rules) -> PartitionSpec:
    known = {name for name, _ in rules}
    for name in spec:
        if name is not None and name not in known:
            raise ConfigError(f"parameter axis '{name}' has no entry in 'mesh.rules'; add "
                              f"['{name}', <mesh axis or None>]")
    return logical_to_spec(spec, rules)


def _divisible(spec: PartitionSpec, shape, mesh: Mesh) -> PartitionSpec:
    """Replicates a dimension its mesh axes do not divide (2 KV heads on tensor=4, say), instead of failing:
    the usual GQA practice of repeating KV heads across tensor shards (logged by state_shardings)."""
    out = []
    for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        names = axes if isinstance(axes, tuple) else (axes,) if axes else ()
        out.append(axes if dim % int(np.prod([mesh.shape[a] for a in names] or [1])) == 0 else None)
    return PartitionSpec(*out)


def check_batch_fits_mesh(cfg: Config, mesh: Mesh) -> None:
    """ConfigError unless each micro-batch splits evenly over the mesh axes the 'batch' rule maps to."""
    spec = logical_to_spec(("batch",), cfg.mesh.rules)[0]
    axes = spec if isinstance(spec, tuple) else (spec,) if spec else ()
    shards = int(np.prod([mesh.shape[a] for a in axes])) if axes else 1
    micro = cfg.train.batch_size // cfg.train.grad_accum
    if micro % shards:
        raise ConfigError(
            f"'train.batch_size' / 'train.grad_accum' = {micro} sequences per micro-batch cannot be split over "
            f"{shards} batch shards (mesh axes {axes}); use a multiple of {shards}")
