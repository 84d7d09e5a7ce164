"""The packed CPU matrix product (`dalle_mini.cpu_kernels`) and DalleBart with packed weights:
the same numbers as XLA's products, the original implementation's outputs, the same samples."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_dallebart import BATCH_KEYS, SCAN, _close

from dalle_mini import cpu_kernels, sampling
from dalle_mini.models import bart, bart_stacks
from dalle_mini.models.dallebart import DalleBart

needs_kernel = pytest.mark.skipif(
    not cpu_kernels.available(), reason=f"CPU kernel: {cpu_kernels.unavailable_reason()}"
)


@pytest.fixture(scope="module")
def reference():
    return dict(np.load(SCAN / "reference.npz"))


@pytest.fixture(scope="module")
def plain():
    return DalleBart.from_pretrained(SCAN, pack_weights=False)


@pytest.fixture(scope="module")
def packed():
    return DalleBart.from_pretrained(SCAN, pack_weights=True)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize(
    "rows, k, n", [(1, 3, 1), (5, 101, 70), (9, 64, 32), (18, 256, 1000), (40, 33, 65)]
)
def test_packed_product_equals_the_plain_one(rows, k, n, dtype):
    """Any rows, odd K, N not a multiple of the panel: XLA's product with float32 sums."""
    if not cpu_kernels.available(dtype):
        pytest.skip(f"CPU kernel: {cpu_kernels.unavailable_reason(dtype)}")
    rng = np.random.default_rng(rows * 1000 + n)
    x = jnp.asarray(rng.standard_normal((rows, k)), dtype)
    w = jnp.asarray(rng.standard_normal((k, n)), dtype)
    packed = cpu_kernels.pack(w)
    np.testing.assert_array_equal(packed.unpack(), np.asarray(w))
    assert packed.shape == (k, n) and packed.dtype == dtype
    out = jax.jit(cpu_kernels.matmul)(x, packed)
    expected = jax.lax.dot(x, w, preferred_element_type=jnp.float32)
    assert out.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(out), expected, rtol=1e-5, atol=1e-4 * np.sqrt(k))


@needs_kernel
def test_packed_product_takes_leading_axes_and_checks_shapes():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3, 48), np.float32)
    w = rng.standard_normal((48, 40), np.float32)
    out = cpu_kernels.matmul(jnp.asarray(x), cpu_kernels.pack(w))
    np.testing.assert_allclose(np.asarray(out), x @ w, rtol=1e-5, atol=1e-4)
    with pytest.raises(ValueError, match="x has 47 features; the matrix expects 48"):
        cpu_kernels.matmul(jnp.asarray(x[..., :47]), cpu_kernels.pack(w))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("length", [1, 7, 40])
def test_cached_attention_reads_only_the_filled_positions(dtype, length):
    """softmax(q . k) v over the first `length` positions; what lies past them (here NaN, in
    sampling the positions not written yet) changes nothing."""
    if not cpu_kernels.available(dtype):
        pytest.skip(f"CPU kernel: {cpu_kernels.unavailable_reason(dtype)}")
    rng = np.random.default_rng(length)
    q = jnp.asarray(rng.standard_normal((3, 2, 32)) / 6, jnp.float32)
    keys, values = (rng.standard_normal((3, 2, 40, 32)) for _ in range(2))
    for cache in (keys, values):
        cache[:, :, length:] = np.nan
    keys, values = jnp.asarray(keys, dtype), jnp.asarray(values, dtype)
    out = jax.jit(cpu_kernels.cached_attention)(q, keys, values, length)
    filled = lambda cache: cache[:, :, :length].astype(jnp.float32)  # noqa: E731
    weights = jax.nn.softmax(jnp.einsum("bhd,bhsd->bhs", q, filled(keys)), axis=-1)
    expected = jnp.einsum("bhs,bhsd->bhd", weights, filled(values))
    np.testing.assert_allclose(np.asarray(out), np.asarray(expected), rtol=1e-5, atol=1e-6)


def test_small_decoders_are_not_packed_by_default(plain):
    model, params = DalleBart.from_pretrained(SCAN)
    kernels = [leaf for leaf in jax.tree.leaves(params, is_leaf=_is_packed) if _is_packed(leaf)]
    assert kernels == []
    assert bart_stacks.should_pack(bart.DalleBartConfig.mini(), jnp.float32, jnp.float32) == (
        cpu_kernels.available()
    )
    assert not bart_stacks.should_pack(bart.DalleBartConfig.mini(), jnp.bfloat16, jnp.float32)


@needs_kernel
def test_packed_model_matches_the_original(packed, reference):
    model, params = packed
    kinds = {type(leaf) for leaf in jax.tree.leaves(params, is_leaf=_is_packed)}
    assert cpu_kernels.PackedKernel in kinds
    for suffix in ("", "_uncond"):
        logits = model(
            reference[f"input_ids{suffix}"], reference[f"attention_mask{suffix}"],
            reference["decoder_input_ids"], params=params,
        ).logits  # fmt: skip
        _close(logits, reference[f"logits{suffix}"])
    batch = {key: reference[key] for key in BATCH_KEYS}
    greedy = model.generate(**batch, params=params, top_k=1, condition_scale=10.0,
                            only_image_codes=False).sequences  # fmt: skip
    assert np.mean(np.asarray(greedy) == reference["greedy_cs10"]) >= 0.98


@needs_kernel
@pytest.mark.parametrize("scale", [1.0, 10.0])
def test_packed_model_samples_the_same_codes(plain, packed, reference, scale):
    batch = {key: reference[key] for key in BATCH_KEYS}
    codes = [
        np.asarray(model.generate(**batch, params=params, prng_key=jax.random.PRNGKey(7),
                                  top_k=50, condition_scale=scale).sequences)
        for model, params in (plain, packed)
    ]  # fmt: skip
    np.testing.assert_array_equal(codes[1], codes[0])


def test_packed_bfloat16_model_stays_close_to_the_original(plain, reference):
    if not cpu_kernels.available(jnp.bfloat16):
        pytest.skip(f"CPU kernel: {cpu_kernels.unavailable_reason(jnp.bfloat16)}")
    model, params = DalleBart.from_pretrained(SCAN, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16,
                                              pack_weights=True)  # fmt: skip
    assert params["lm_head"]["kernel"].dtype == jnp.bfloat16
    args = reference["input_ids"], reference["attention_mask"], reference["decoder_input_ids"]
    logits = model(*args, params=params).logits
    assert logits.dtype == jnp.float32
    assert np.mean(np.argmax(logits, -1) == np.argmax(reference["logits"], -1)) > 0.9
    unpacked = DalleBart(model.config, dtype=jnp.bfloat16)(*args, params=bart_stacks.unpack(params))
    np.testing.assert_allclose(logits, unpacked.logits, atol=0.05)
    # sampling: the kernels' steps over a bfloat16 cache pick what XLA's steps at bfloat16 pick
    batch = {key: reference[key] for key in BATCH_KEYS}
    plain_bfloat16 = DalleBart(model.config, jnp.bfloat16), bart_stacks.unpack(params)
    greedy = [
        np.asarray(
            sampler.generate(
                **batch, params=weights, top_k=1, condition_scale=10.0, only_image_codes=False
            ).sequences
        )  # fmt: skip
        for sampler, weights in ((model, params), plain_bfloat16)
    ]
    assert np.mean(greedy[0] == greedy[1]) >= 0.95


@needs_kernel
def test_packed_model_keeps_its_cache_in_one_block(packed, reference):
    model, params = packed
    batch = {key: reference[key] for key in BATCH_KEYS}
    count = len(batch["input_ids"])
    keys = sampling.row_keys_for(jax.random.PRNGKey(0), jnp.arange(count))
    knobs = sampling.Knobs.broadcast(count, condition_scale=3.0, temperature=1.0, top_k=5,
                                     top_p=1.0)  # fmt: skip
    state = model.start_sampling(**batch, row_keys=keys, knobs=knobs, params=params)
    assert [len(blocks) for blocks in state.cache_keys] == [1] * model.config.decoder_layers
    with pytest.raises(ValueError, match="one block of 64; pass block_length=None"):
        model.start_sampling(**batch, row_keys=keys, knobs=knobs, params=params, block_length=16)


@needs_kernel
def test_packed_model_saves_the_published_tree(tmp_path, plain, packed):
    model, params = packed
    model.save_pretrained(tmp_path, params)
    _, again = DalleBart.from_pretrained(tmp_path, pack_weights=False)
    jax.tree.map(np.testing.assert_array_equal, again, plain[1])


@needs_kernel
def test_sampler_compiled_ahead_for_packed_weights_is_reused(reference):
    """compile_sampler(pack_weights=True) compiles for the packed shapes: sampling after it
    compiles nothing."""
    batch = {key: reference[key] for key in BATCH_KEYS}
    count, length = batch["input_ids"].shape
    knobs = sampling.Knobs.broadcast(count, condition_scale=3.0, temperature=1.0, top_k=5,
                                     top_p=1.0)  # fmt: skip
    row_keys = sampling.row_keys_for(jax.random.PRNGKey(7), jnp.arange(count))
    model = DalleBart.from_config(SCAN)
    model.compile_sampler(count, text_length=length, pack_weights=True)
    params = model.load_params(SCAN, pack_weights=True)
    compiles = []

    def listener(event, duration, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            compiles.append(duration)

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        state = model.start_sampling(**batch, row_keys=row_keys, knobs=knobs, params=params)
        codes = np.asarray(model.continue_sampling(state, params=params).sequences)
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert compiles == []
    assert codes.shape == (count, model.config.image_length + 1)


def test_without_a_compiler_the_plain_products_are_used(tmp_path):
    """No C++ compiler: the reason is given, the default loads plain weights and samples, and
    insisting on packing names the problem."""
    script = f"""
from dalle_mini import cpu_kernels
from dalle_mini.models.dallebart import DalleBart
print("reason:", cpu_kernels.unavailable_reason())
model, params = DalleBart.from_pretrained({str(SCAN)!r})
import numpy as np
ids = np.ones((1, model.config.max_text_length), np.int32); ids[0, :3] = (0, 5, 2)
print("codes:", model.generate(ids, (ids != 1).astype(np.int32), params=params).sequences.shape)
try:
    DalleBart.from_pretrained({str(SCAN)!r}, pack_weights=True)
except ValueError as error:
    print("error:", error)
"""
    env = {**os.environ, "CXX": str(tmp_path / "no-such-compiler"),
           "DALLE_MINI_KERNEL_CACHE": str(tmp_path / "kernels")}  # fmt: skip
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "codes: (1, 65)" in done.stdout
    if {"avx512f", "fma"} <= cpu_kernels._cpu_flags():  # else the CPU is the reason, not g++
        assert "reason: could not build or load packed_matmul.cc" in done.stdout
        assert "no-such-compiler" in done.stdout
        assert "error: pack_weights=True, but could not build" in done.stdout
    else:
        assert "error: pack_weights=True, but this CPU" in done.stdout


def _is_packed(leaf):
    return isinstance(leaf, cpu_kernels.PackedKernel)
