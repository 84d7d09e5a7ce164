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

import jax
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


def load_msgpack(path: str | os.PathLike, dtype: Any = None) -> dict[str, Any]:
    """Reads a flax msgpack parameter tree into nested dicts of numpy arrays.

    The arrays are read one at a time, straight from the file into 64-byte-aligned buffers:
    the file's bytes are never held whole (flax's reader holds them, a copy of every array and
    whatever the caller converts, at once), and `to_device` adopts the buffers without a copy.
    A file that is not a plain tree of arrays (flax's chunked leaves over 1 GiB, scalars) or is
    damaged goes through flax's reader, which names the damage.

    Args:
      dtype: if given, floating leaves are cast to it as they are read (one leaf at a time).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(
            f"{path} is missing: expected the weights there (flax msgpack, as written by "
            "save_pretrained)"
        )
    try:
        with path.open("rb") as stream:
            tree = _read_node(stream, _read_byte(stream), dtype)
            if stream.read(1):
                raise _NotPlainTree("bytes after the tree")
    except (_NotPlainTree, ValueError, TypeError):  # also an unknown dtype name, bad UTF-8
        tree = _map_leaves(_flax_restore(path), lambda leaf: _cast(np.asarray(leaf), dtype))
    if not isinstance(tree, dict) or not tree:
        raise CheckpointError(f"{path} holds no parameter tree (read {type(tree).__name__})")
    return tree


def _flax_restore(path: Path) -> Any:
    try:
        return serialization.msgpack_restore(path.read_bytes())
    except Exception as error:  # msgpack raises several unrelated types on bad bytes
        raise CheckpointError(
            f"{path} is truncated or corrupt ({type(error).__name__}: {error}); expected a "
            "flax msgpack parameter tree. Download or save it again."
        ) from error


def to_device(tree: Any) -> Any:
    """`jax.device_put` of every leaf. On CPU, JAX adopts a 64-byte-aligned numpy buffer (as
    `load_msgpack` makes) instead of copying it, so loading does not hold the weights twice."""
    return _map_leaves(tree, jax.device_put)


def aligned_empty(shape: tuple[int, ...], dtype: Any) -> np.ndarray:
    """An uninitialised array whose data starts on a 64-byte boundary."""
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    raw = np.empty(nbytes + _ALIGNMENT, np.uint8)
    start = -raw.ctypes.data % _ALIGNMENT
    return raw[start : start + nbytes].view(dtype).reshape(shape)


# -- a streaming reader for the msgpack that flax.serialization writes ----------------------------
# Only what a parameter tree uses: maps with string keys, whose leaves are flax's ndarray
# extension, an (shape, dtype name, bytes) msgpack triple. Anything else raises _NotPlainTree.

_ALIGNMENT = 64  # what JAX's CPU client needs to use a host buffer in place
_NDARRAY_EXT = 1  # flax.serialization._MsgpackExtType.ndarray
_FIXEXT_SIZES = {0xD4: 1, 0xD5: 2, 0xD6: 4, 0xD7: 8, 0xD8: 16}
# bytes of the length that follows a bin, ext, str, array or map header byte
_SIZED = {0xC4: 1, 0xC5: 2, 0xC6: 4, 0xC7: 1, 0xC8: 2, 0xC9: 4, 0xD9: 1, 0xDA: 2, 0xDB: 4,
          0xDC: 2, 0xDD: 4, 0xDE: 2, 0xDF: 4}  # fmt: skip


class _NotPlainTree(Exception):
    pass


def _read_byte(stream) -> int:
    byte = stream.read(1)
    if not byte:
        raise _NotPlainTree("truncated")
    return byte[0]


def _read_exact(stream, size: int) -> bytes:
    data = stream.read(size)
    if len(data) != size:
        raise _NotPlainTree("truncated")
    return data


def _read_uint(stream, size: int) -> int:
    return int.from_bytes(_read_exact(stream, size), "big")


def _length(stream, head: int, fix_low: int, fix_count: int, kinds: tuple[int, ...]) -> int:
    """The length of a str/array/map/bin whose header byte is `head`."""
    if fix_low <= head < fix_low + fix_count:
        return head - fix_low
    if head in kinds:
        return _read_uint(stream, _SIZED[head])
    raise _NotPlainTree(f"unexpected msgpack type 0x{head:02x}")


def _read_str(stream) -> str:
    size = _length(stream, _read_byte(stream), 0xA0, 32, (0xD9, 0xDA, 0xDB, 0xC4, 0xC5, 0xC6))
    return _read_exact(stream, size).decode()


def _read_node(stream, head: int, dtype: Any) -> Any:
    if 0x80 <= head <= 0x8F or head in (0xDE, 0xDF):
        size = _length(stream, head, 0x80, 16, (0xDE, 0xDF))
        return {_read_str(stream): _read_node(stream, _read_byte(stream), dtype)
                for _ in range(size)}  # fmt: skip
    if head in _FIXEXT_SIZES:
        size = _FIXEXT_SIZES[head]
    elif head in (0xC7, 0xC8, 0xC9):
        size = _read_uint(stream, _SIZED[head])
    else:
        raise _NotPlainTree(f"unexpected msgpack type 0x{head:02x}")
    if _read_uint(stream, 1) != _NDARRAY_EXT:
        raise _NotPlainTree("an extension other than flax's ndarray")
    return _read_array(stream, size, dtype)


def _read_array(stream, size: int, dtype: Any) -> np.ndarray:
    """One ndarray extension of `size` bytes: reads the data into an aligned buffer."""
    start = stream.tell()
    if _read_byte(stream) != 0x93:  # a 3-element array: shape, dtype name, data
        raise _NotPlainTree("an ndarray extension that is not a triple")
    ndim = _length(stream, _read_byte(stream), 0x90, 16, (0xDC, 0xDD))
    shape = tuple(_read_int(stream) for _ in range(ndim))
    leaf_dtype = jnp.dtype(_read_str(stream))  # jnp knows bfloat16 as well as numpy's names
    nbytes = _length(stream, _read_byte(stream), 0x100, 0, (0xC4, 0xC5, 0xC6))
    leaf = aligned_empty(shape, leaf_dtype)
    if nbytes != leaf.nbytes or stream.tell() - start + nbytes != size:
        raise _NotPlainTree("an ndarray extension whose sizes disagree")
    buffer = memoryview(leaf.reshape(-1).view(np.uint8))
    if stream.readinto(buffer) != nbytes:
        raise _NotPlainTree("truncated")
    return _cast(leaf, dtype)


def _read_int(stream) -> int:
    head = _read_byte(stream)
    if head <= 0x7F:
        return head
    if head in (0xCC, 0xCD, 0xCE, 0xCF):
        return _read_uint(stream, 1 << (head - 0xCC))
    raise _NotPlainTree(f"unexpected msgpack type 0x{head:02x} in a shape")


def _cast(leaf: np.ndarray, dtype: Any) -> np.ndarray:
    # jnp.issubdtype also counts ml_dtypes' bfloat16 as floating; numpy's does not
    if dtype is None or leaf.dtype == dtype or not jnp.issubdtype(leaf.dtype, jnp.floating):
        return leaf
    cast = aligned_empty(leaf.shape, dtype)
    cast[...] = leaf
    return cast


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
    """Casts floating leaves to `dtype` (float16 checkpoints load as float32 by default) and
    puts every leaf on the default device. Leaves that `load_msgpack` read, already of `dtype`,
    are not copied: on CPU the device adopts their buffers (`to_device`)."""
    return to_device(_map_leaves(tree, lambda leaf: _cast(np.asarray(leaf), dtype)))
