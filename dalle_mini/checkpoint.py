"""Reading and writing parameter trees in the published checkpoint format.

A checkpoint folder holds `config.json` and `flax_model.msgpack` (`flax.serialization` msgpack
of the parameter tree, the root holding the top-level modules, not wrapped in "params").
Loaders compare the tree they read with the tree the config implies and refuse a mismatch,
naming the first offending paths (the habit of nanoGPT's `from_pretrained`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import serialization

from dalle_mini.hub import CheckpointError

WEIGHTS_NAME = "flax_model.msgpack"
CONFIG_NAME = "config.json"
_SHOWN_PATHS = 5


def read_json(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path} is missing: expected the model's JSON config there")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CheckpointError(f"{path} is not valid JSON ({error})") from error


def load_msgpack(path: str | os.PathLike) -> dict[str, Any]:
    """Reads a flax msgpack parameter tree into nested dicts of numpy arrays."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(
            f"{path} is missing: expected the weights there (flax msgpack, as written by "
            "save_pretrained)"
        )
    try:
        tree = serialization.msgpack_restore(path.read_bytes())
    except Exception as error:  # msgpack raises several unrelated types on bad bytes
        raise CheckpointError(
            f"{path} is truncated or corrupt ({type(error).__name__}: {error}); expected a "
            "flax msgpack parameter tree. Download or save it again."
        ) from error
    if not isinstance(tree, dict) or not tree:
        raise CheckpointError(f"{path} holds no parameter tree (read {type(tree).__name__})")
    return tree


def save_msgpack(path: str | os.PathLike, params: Any) -> None:
    state = serialization.to_state_dict(params)
    state = _map_leaves(state, np.asarray)
    Path(path).write_bytes(serialization.msgpack_serialize(state))


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": x}} -> {"a/b": x}."""
    if not isinstance(tree, dict):
        return {prefix: tree}
    flat = {}
    for key, value in tree.items():
        flat.update(flatten(value, f"{prefix}/{key}" if prefix else str(key)))
    return flat


def unflatten(flat: dict[str, Any]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for path, value in flat.items():
        *parents, leaf = path.split("/")
        node = tree
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return tree


def _map_leaves(tree: Any, fn) -> Any:
    if isinstance(tree, dict):
        return {key: _map_leaves(value, fn) for key, value in tree.items()}
    return fn(tree)


def count_params(tree: Any) -> int:
    return int(sum(np.prod(np.shape(leaf)) for leaf in flatten(tree).values()))


def check_tree(params: Any, expected: Any, source: str | os.PathLike) -> None:
    """Raises CheckpointError unless `params` has exactly the paths and shapes of `expected`.

    `expected` may hold arrays or `jax.ShapeDtypeStruct`s (from `jax.eval_shape`).
    """
    got = {path: tuple(np.shape(leaf)) for path, leaf in flatten(params).items()}
    want = {path: tuple(leaf.shape) for path, leaf in flatten(expected).items()}
    missing = sorted(set(want) - set(got))
    unused = sorted(set(got) - set(want))
    mismatched = [
        f"{path} {got[path]} (config expects {want[path]})"
        for path in sorted(set(got) & set(want))
        if got[path] != want[path]
    ]
    problems = []
    for label, items in (("missing", missing), ("unused", unused), ("mis-shaped", mismatched)):
        if items:
            shown = ", ".join(items[:_SHOWN_PATHS])
            more = f" and {len(items) - _SHOWN_PATHS} more" if len(items) > _SHOWN_PATHS else ""
            problems.append(f"{len(items)} {label}: {shown}{more}")
    if problems:
        raise CheckpointError(
            f"the weights in {source} do not match their config: " + "; ".join(problems)
        )


def cast_floating(tree: Any, dtype) -> Any:
    """Casts floating leaves to `dtype` (float16 checkpoints load as float32 by default)."""

    def cast(leaf):
        leaf = np.asarray(leaf)
        # jnp.issubdtype also counts ml_dtypes' bfloat16 as floating; numpy's does not
        return leaf.astype(dtype) if jnp.issubdtype(leaf.dtype, jnp.floating) else leaf

    return _map_leaves(tree, cast)
