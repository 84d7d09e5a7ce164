"""CPU kernels for sampling steps (XLA FFI custom calls, `packed_matmul.cc`).

A sampling step multiplies 2 rows per image by every decoder matrix. XLA:CPU's products copy
(pack) the weight matrix on every call, which for so few rows costs more than the arithmetic:
measured on this project's CPU, one core, (18, 1024) x (1024, 8192) ran at 43-50 GFLOP/s
through XLA against 77-80 GFLOP/s with the weights packed once, at load time, into panels of
32 columns (`pack`, `matmul`; float32, and bfloat16 with AVX-512 BF16), each read as one
contiguous stream. `cached_attention` attends one query per row over a key/value cache reading
only its filled positions (XLA's batched products read the whole cache at every step). Both
run on XLA's own thread pool.

The library is compiled on first use with the system's C++ compiler into the user cache
(`~/.cache/dalle-mini/kernels`, or `$DALLE_MINI_KERNEL_CACHE`), keyed by its source and the
JAX version. `available()` is False, with `unavailable_reason()` saying why, where there is no
compiler, the CPU lacks AVX-512, the backend is not the CPU or `$DALLE_MINI_CPU_KERNELS=0`:
callers then keep the plain weights and XLA's products.
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from dalle_mini import checkpoint

PANEL = 32  # columns per panel, as packed_matmul.cc
KERNELS = {"packed_matmul": "DalleMiniPackedMatmul", "cached_attention": "DalleMiniCachedAttention"}
# per weight (or cache) dtype: the suffixes of its custom call names and library symbols
SUFFIXES = {jnp.dtype(jnp.float32): ("", ""), jnp.dtype(jnp.bfloat16): ("_bf16", "Bf16")}
ENV_SWITCH = "DALLE_MINI_CPU_KERNELS"  # "0"/"off" keeps XLA's products everywhere
ENV_CACHE = "DALLE_MINI_KERNEL_CACHE"
_SOURCE = Path(__file__).with_name("packed_matmul.cc")


@jax.tree_util.register_pytree_node_class
@dataclasses.dataclass(frozen=True)
class PackedKernel:
    """A (K, N) weight matrix as panels of 32 columns, zero past N (`packed_matmul.cc` has the
    layouts): float32 (..., P, K, 32); bfloat16 (..., P, ceil(K/2), 64), pairs of rows
    interleaved. Leading axes (stacked layers) are allowed; the product needs one matrix."""

    panels: jax.Array
    in_features: int  # K
    features: int  # N

    @property
    def shape(self) -> tuple[int, ...]:
        """The plain matrix's shape (..., K, N)."""
        return (*self.panels.shape[:-3], self.in_features, self.features)

    @property
    def dtype(self):
        return self.panels.dtype

    def tree_flatten(self):
        return (self.panels,), (self.in_features, self.features)

    @classmethod
    def tree_unflatten(cls, sizes, children):
        return cls(children[0], *sizes)

    def unpack(self) -> np.ndarray:
        """The plain (..., K, N) matrix, on the host."""
        panels = np.asarray(self.panels)
        *lead, count, rows, width = panels.shape
        pairs = width // PANEL  # rows of w per panel row: 1 (float32) or 2 (bfloat16)
        # split[i, p, j, c, t] is row j * pairs + t, column 32 p + c of matrix i
        split = panels.reshape(-1, count, rows, PANEL, pairs)
        plain = split.transpose(0, 2, 4, 1, 3).reshape(-1, rows * pairs, count * PANEL)
        return plain[:, : self.in_features, : self.features].reshape(self.shape)


def panel_count(features: int) -> int:
    return -(-features // PANEL)


def pack(kernel) -> PackedKernel:
    """Packs a (..., K, N) float32 or bfloat16 matrix (or a stack of them) for `matmul`, on the
    host, one matrix at a time: the only extra memory is one matrix's padding and copy. A
    `jax.ShapeDtypeStruct` gives the packed shapes."""
    *lead, k, n = kernel.shape
    dtype = jnp.dtype(kernel.dtype)
    if dtype not in SUFFIXES or len(kernel.shape) < 2:
        raise ValueError(f"pack needs a float32 or bfloat16 (..., K, N) matrix; got {dtype} "
                         f"{kernel.shape}")  # fmt: skip
    pairs = 1 if dtype == jnp.float32 else 2
    rows = -(-k // pairs)
    shape = (*lead, panel_count(n), rows, PANEL * pairs)
    if isinstance(kernel, jax.ShapeDtypeStruct):
        return PackedKernel(jax.ShapeDtypeStruct(shape, dtype), k, n)
    host = np.asarray(kernel)
    # 64-byte aligned, so that the CPU device adopts the buffer instead of copying it
    panels = checkpoint.aligned_empty(shape, dtype)
    flat_out = panels.reshape(-1, panel_count(n), rows, PANEL, pairs)
    padded = np.zeros((rows * pairs, panel_count(n) * PANEL), dtype)  # one matrix at a time
    for matrix, out in zip(host.reshape(-1, k, n), flat_out, strict=True):
        padded[:k, :n] = matrix
        out[...] = padded.reshape(rows, pairs, -1, PANEL).transpose(2, 0, 3, 1)
    return PackedKernel(jax.device_put(panels), k, n)


def matmul(x: jax.Array, kernel: PackedKernel) -> jax.Array:
    """x (..., K) @ the packed (K, N) matrix -> (..., N) float32. float32 weights: computed in
    float32; bfloat16: x rounded to bfloat16, products summed in float32 (as XLA's bfloat16
    products with float32 accumulation)."""
    if kernel.panels.ndim != 3:
        raise ValueError(f"matmul needs one packed matrix; got panels {kernel.panels.shape}")
    if x.shape[-1] != kernel.in_features:
        raise ValueError(f"x has {x.shape[-1]} features; the matrix expects {kernel.in_features}")
    register(kernel.dtype)
    out = jax.ShapeDtypeStruct((*x.shape[:-1], kernel.features), jnp.float32)
    target = _target("packed_matmul", kernel.dtype)
    return jax.ffi.ffi_call(target, out)(x.astype(kernel.dtype), kernel.panels)


def cached_attention(q: jax.Array, keys: jax.Array, values: jax.Array, length) -> jax.Array:
    """One query per row against a key/value cache, reading only its filled positions.

    Args:
      q: (B, H, Dh), already scaled by 1/sqrt(Dh).
      keys, values: (B, H, S, Dh), float32, or bfloat16 (as such or as its bits in uint16,
        the form a cache is updated in place in: `to_cache`); Dh a multiple of 16, at most 256.
      length: how many positions (from the first) are filled, a traced int.
    Returns:
      (B, H, Dh) float32: softmax over the filled positions of q . k, times v.
    """
    values_dtype = jnp.float32 if keys.dtype == jnp.float32 else jnp.bfloat16
    keys, values = (to_cache(cache, cache_dtype(cache.dtype)) for cache in (keys, values))
    register(values_dtype)
    out = jax.ShapeDtypeStruct(q.shape, jnp.float32)
    target = _target("cached_attention", values_dtype)
    return jax.ffi.ffi_call(target, out)(
        q.astype(jnp.float32), keys, values, jnp.asarray(length, jnp.int32)
    )


def cache_dtype(dtype):
    """How `cached_attention` wants a cache of `dtype` values held: float32 as itself, bfloat16
    as its bits in uint16 (XLA:CPU converts a whole bfloat16 array to float32 and back to update
    one position of it; a uint16 one it updates in place)."""
    return jnp.dtype(jnp.float32) if jnp.dtype(dtype) == jnp.float32 else jnp.dtype(jnp.uint16)


def to_cache(values: jax.Array, dtype) -> jax.Array:
    """`values` as a cache of `dtype` holds them (`cache_dtype`: float32, or bfloat16 bits in
    uint16; values already in uint16 are such bits)."""
    if jnp.dtype(dtype) == jnp.uint16 and values.dtype != jnp.uint16:
        return jax.lax.bitcast_convert_type(values.astype(jnp.bfloat16), jnp.uint16)
    return values.astype(dtype)


def available(dtype=jnp.float32) -> bool:
    """True where `matmul` can run here for weights of `dtype` (see the module docstring)."""
    return unavailable_reason(dtype) is None


def unavailable_reason(dtype=jnp.float32) -> str | None:
    """Why the kernels for `dtype` weights cannot run here, or None where they can."""
    if os.environ.get(ENV_SWITCH, "").strip().lower() in ("0", "off", "false", "no"):
        return f"${ENV_SWITCH} turns them off"
    if jax.default_backend() != "cpu":
        return f"the default backend is {jax.default_backend()}, not the CPU"
    if jnp.dtype(dtype) not in SUFFIXES:
        return f"there is no kernel for {jnp.dtype(dtype)} weights (float32 and bfloat16 only)"
    return _build_problem(jnp.dtype(dtype).name)


def register(dtype=jnp.float32) -> None:
    """Registers the custom call for `dtype` weights with XLA (building the library if needed);
    idempotent."""
    problem = _build_problem(jnp.dtype(dtype).name)
    if problem is not None:
        raise RuntimeError(f"the CPU kernels are not available: {problem}")


@functools.cache
def _build_problem(dtype_name: str) -> str | None:
    # checked before the library is loaded: code built for AVX-512 may not even load without it
    flags = _cpu_flags()
    if not {"avx512f", "fma"} <= flags:
        return "this CPU has no AVX-512" if flags else "this CPU's features are unknown here"
    if dtype_name == "bfloat16" and "avx512_bf16" not in flags:
        return "this CPU has no AVX-512 BF16 instructions"
    library = _library()
    if isinstance(library, str):
        return library
    symbol_suffix = SUFFIXES[jnp.dtype(dtype_name)][1]
    for name, symbol in KERNELS.items():
        capsule = jax.ffi.pycapsule(getattr(library, symbol + symbol_suffix))
        jax.ffi.register_ffi_target(_target(name, dtype_name), capsule, platform="cpu")
    return None


def _target(name: str, dtype) -> str:
    """The custom call name of kernel `name` for weights (or cache values) of `dtype`."""
    return f"dalle_mini_{name}{SUFFIXES[jnp.dtype(dtype)][0]}"


@functools.cache
def _library() -> ctypes.CDLL | str:
    """The loaded library, or why it could not be built or loaded."""
    try:
        return ctypes.CDLL(str(_library_path()))
    except (OSError, subprocess.CalledProcessError, subprocess.TimeoutExpired) as error:
        return f"could not build or load {_SOURCE.name}: {_first_line(error)}"


def _cpu_flags() -> set[str]:
    """The x86 CPU's feature flags (Linux); empty elsewhere."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return set()
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def _first_line(error: Exception) -> str:
    text = getattr(error, "stderr", None) or str(error)
    if isinstance(text, bytes):
        text = text.decode(errors="replace")
    return text.strip().splitlines()[0] if text.strip() else type(error).__name__


def cache_dir() -> Path:
    value = os.environ.get(ENV_CACHE, "").strip()
    if value:
        return Path(value).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg) if xdg else Path("~/.cache").expanduser()
    return base / "dalle-mini" / "kernels"


def _library_path() -> Path:
    """The built library, compiled now if this source and JAX version have none yet."""
    source = _SOURCE.read_bytes()
    key = hashlib.sha256(source + jax.__version__.encode()).hexdigest()[:16]
    target = cache_dir() / f"packed_matmul-{key}.so"
    if target.exists():
        return target
    compiler = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if compiler is None:
        raise FileNotFoundError("no C++ compiler (g++ or $CXX) on PATH")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
        built = Path(scratch) / target.name
        subprocess.run(
            [compiler, "-O3", "-std=c++17", "-mavx512f", "-mfma", "-mavx512bf16", "-fPIC",
             "-shared", f"-I{jax.ffi.include_dir()}", str(_SOURCE), "-o", str(built)],
            check=True, capture_output=True, timeout=300,
        )  # fmt: skip
        os.replace(built, target)  # atomic: a concurrent build of the same key is harmless
    return target
