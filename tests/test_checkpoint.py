"""The streaming msgpack reader: same trees as flax's reader, aligned buffers, cheap device_put."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import serialization

from dalle_mini import checkpoint
from dalle_mini.hub import CheckpointError


def _tree():
    rng = np.random.default_rng(0)
    return {
        "model": {
            "dense": {"kernel": rng.standard_normal((3, 70000), np.float32)},  # a long bin32
            "norm": {"scale": np.ones(5, np.float16), "bias": np.zeros(0, np.float32)},
            "step": np.array(7, np.int32),  # 0-d
        },
        "head": {"kernel": rng.standard_normal((2, 2, 2)).astype(jnp.bfloat16)},
    }


def _write(path, tree):
    path.write_bytes(serialization.msgpack_serialize(tree))
    return path


def test_reads_what_flax_reads_into_aligned_buffers(tmp_path):
    path = _write(tmp_path / "w.msgpack", _tree())
    ours = checkpoint.flatten(checkpoint.load_msgpack(path))
    flax = checkpoint.flatten(serialization.msgpack_restore(path.read_bytes()))
    assert ours.keys() == flax.keys()
    for name, leaf in ours.items():
        assert leaf.dtype == flax[name].dtype and leaf.shape == flax[name].shape, name
        np.testing.assert_array_equal(np.asarray(leaf, np.float64), flax[name].astype(np.float64))
        assert leaf.size == 0 or leaf.ctypes.data % 64 == 0, name


def test_casts_floating_leaves_only(tmp_path):
    path = _write(tmp_path / "w.msgpack", _tree())
    tree = checkpoint.load_msgpack(path, dtype=np.float32)
    assert tree["model"]["norm"]["scale"].dtype == np.float32
    assert tree["head"]["kernel"].dtype == np.float32
    assert tree["model"]["step"].dtype == np.int32
    assert tree["model"]["dense"]["kernel"].ctypes.data % 64 == 0


def test_other_msgpack_goes_through_flax(tmp_path):
    tree = {"layer": {"kernel": np.arange(6, dtype=np.float32)}, "count": 3}  # a plain int leaf
    loaded = checkpoint.load_msgpack(_write(tmp_path / "w.msgpack", tree))
    np.testing.assert_array_equal(loaded["layer"]["kernel"], tree["layer"]["kernel"])
    assert int(loaded["count"]) == 3


def test_truncated_file_is_named(tmp_path):
    data = serialization.msgpack_serialize(_tree())
    path = tmp_path / "w.msgpack"
    path.write_bytes(data[: len(data) - 100])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        checkpoint.load_msgpack(path)


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="buffer adoption is a CPU property")
def test_device_arrays_adopt_the_loaded_buffers(tmp_path):
    loaded = checkpoint.load_msgpack(_write(tmp_path / "w.msgpack", _tree()))
    host = loaded["model"]["dense"]["kernel"]
    device = checkpoint.to_device(loaded)["model"]["dense"]["kernel"]
    assert device.unsafe_buffer_pointer() == host.ctypes.data  # no second copy of the weights
