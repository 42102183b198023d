"""Which parameters train: `train.trainable` and `train.frozen`, regular expressions over parameter paths.

A path is the parameter's place in the model's state, joined with "/": "embed", "unembed", "patch_proj",
"patch_bias", "final_norm/scale", "blocks/attn/wq", "blocks/mlp/w_gate", ... (`omni config --params` style
listing: `param_paths`). Each expression must match a whole path (re.fullmatch), so "blocks/attn/.*" names the
attention weights of every layer and "patch_.*" the image patch projection. A parameter trains when some
`trainable` expression matches it and no `frozen` one does; an expression that matches no parameter is a
ConfigError naming it (a typo must not silently train everything or nothing).

Frozen parameters get no update and no optimizer state (optax.multi_transform with set_to_zero: their Adam
moments are optax.MaskedNode, no memory), their gradients are zeroed before the global norm (so clipping and the
logged grad_norm see only what trains, and XLA drops the unused weight-gradient matmuls), and weight decay never
touches them. With everything trainable (the default) the optimizer is exactly the plain one, so checkpoints keep
their layout.
"""

from __future__ import annotations

import re

import jax
import numpy as np

from omni.config import TrainConfig
from omni.errors import ConfigError

EVERYTHING = [".*"]


def param_paths(params) -> list[str]:
    """The "/"-joined path of every parameter leaf of `params` (a pure dict, arrays or shapes), in tree order."""
    return [_path(p) for p, _ in jax.tree_util.tree_leaves_with_path(params)]


def _path(key_path) -> str:
    return jax.tree_util.keystr(key_path, simple=True, separator="/")


def freezes_anything(tc: TrainConfig) -> bool:
    return list(tc.trainable) != EVERYTHING or bool(tc.frozen)


def trainable_mask(tc: TrainConfig, params):
    """A tree like `params` of Python bools: True where the parameter trains. Raises ConfigError for an expression
    that is not a regular expression or matches no parameter."""
    paths = param_paths(params)
    trainable = _compiled(tc.trainable, "train.trainable")
    frozen = _compiled(tc.frozen, "train.frozen")
    for key, patterns in (("train.trainable", trainable), ("train.frozen", frozen)):
        for pattern in patterns:
            if not any(pattern.fullmatch(p) for p in paths):
                raise ConfigError(f"'{key}' entry {pattern.pattern!r} matches no parameter; the parameters are "
                                  f"{', '.join(paths)} (each entry must match a whole path)")

    def trains(key_path, _):
        path = _path(key_path)
        return any(p.fullmatch(path) for p in trainable) and not any(p.fullmatch(path) for p in frozen)

    mask = jax.tree_util.tree_map_with_path(trains, params)
    if not any(jax.tree.leaves(mask)):
        raise ConfigError("'train.trainable' and 'train.frozen' leave no parameter to train; the parameters are "
                          f"{', '.join(paths)}")
    return mask


def _compiled(patterns, key: str) -> list[re.Pattern]:
    if isinstance(patterns, str) or not all(isinstance(p, str) for p in patterns):
        raise ConfigError(f"'{key}' must be a list of regular expressions (strings), got {patterns!r}")
    compiled = []
    for pattern in patterns:
        try:
            compiled.append(re.compile(pattern))
        except re.error as e:
            raise ConfigError(f"'{key}' entry {pattern!r} is not a regular expression: {e}") from None
    return compiled


def summary(mask, params) -> str:
    """'1.23M of 10.5M parameters train (3 of 14 tensors; frozen: blocks/attn/wq, ...)'."""
    sizes = [int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(params)]
    trains = jax.tree.leaves(mask)
    paths = param_paths(params)
    n_train = sum(s for s, t in zip(sizes, trains) if t)
    frozen = [p for p, t in zip(paths, trains) if not t]
    text = f"{n_train / 1e6:.3g}M of {sum(sizes) / 1e6:.3g}M parameters train ({sum(trains)} of {len(trains)} tensors"
    return text + (f"; frozen: {', '.join(frozen)})" if frozen else ")")
