"""VQGAN: conformance with the original vqgan-jax, the published f16_16384 tree, checkpoint
loading and saving, input checks, and the training forward pass.

Fixtures in tests/fixtures/vqgan/ come from ../shared/reference/vqgan (written by the original
code: a tiny random VQGAN, its config.json, and its outputs in reference.npz).
"""

import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dalle_mini.checkpoint import count_params, flatten, load_msgpack, save_msgpack, unflatten
from dalle_mini.hub import CheckpointError
from dalle_mini.models.vqgan import VQGANConfig, VQModel

FIXTURES = Path(__file__).parent / "fixtures"
VQGAN_FOLDER = FIXTURES / "vqgan"


@pytest.fixture(scope="module")
def reference():
    return dict(np.load(VQGAN_FOLDER / "reference.npz"))


@pytest.fixture(scope="module")
def loaded():
    return VQModel.from_pretrained(VQGAN_FOLDER, _do_init=False)


# --- conformance with the original -------------------------------------------------------


def test_loads_reference_checkpoint_with_all_its_parameters(loaded):
    vqgan, params = loaded
    assert count_params(params) == 1_037_875
    assert vqgan.num_codes_per_image == 64  # 32² pixels, f4 → 8×8 codes
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree_util.tree_leaves(params))


def test_encode_matches_original(loaded, reference):
    vqgan, params = loaded
    quant, codes = vqgan.encode(reference["images"], params=params)
    assert codes.shape == (4, 64) and codes.dtype == jnp.int32
    agree = np.asarray(codes) == reference["indices"]
    assert agree.mean() >= 0.99
    assert quant.shape == (4, 8, 8, 16)
    quant_error = np.abs(np.asarray(quant) - reference["quant"]).reshape(4, 64, 16)
    assert quant_error[agree].max() <= 1e-3


@pytest.mark.parametrize(
    "expected, method, source",
    [
        ("decoded", "decode_code", "indices"),
        ("decoded_random", "decode_code", "random_indices"),
        ("decoded_from_images", "decode", "quant"),
    ],
)
def test_decode_matches_original(loaded, reference, expected, method, source):
    vqgan, params = loaded
    images = getattr(vqgan, method)(reference[source], params=params)
    assert images.shape == (4, 32, 32, 3) and images.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(images), reference[expected], atol=1e-3, rtol=0)


def test_decode_code_accepts_a_grid_and_returns_raw_unclipped_output(loaded, reference):
    vqgan, params = loaded
    grid = reference["indices"].reshape(4, 8, 8)
    images = np.asarray(vqgan.decode_code(grid, params=params))
    np.testing.assert_allclose(images, reference["decoded"], atol=1e-3, rtol=0)
    assert images.max() > 1.0  # the reference output leaves [0, 1]: callers clip, not us


def test_compiles_once_per_shape_and_shares_code_between_instances(loaded, reference):
    vqgan, params = loaded
    vqgan.decode_code(reference["indices"], params=params)
    compiled = vqgan._decode_code._cache_size()
    vqgan.decode_code(reference["random_indices"], params=params)
    same_config = VQModel(vqgan.config)
    same_config.decode_code(reference["indices"], params=params)
    assert same_config._decode_code._cache_size() == compiled


def test_decoder_only_loading_decodes_the_same_and_refuses_to_encode(loaded, reference):
    vqgan, params = loaded
    decoder_vqgan, decoder_params = VQModel.from_pretrained(VQGAN_FOLDER, decoder_only=True)
    assert "encoder" in params and "encoder" not in decoder_params
    assert count_params(decoder_params) < count_params(params)
    codes = reference["indices"][:1]
    np.testing.assert_array_equal(
        decoder_vqgan.decode_code(codes, params=decoder_params),
        vqgan.decode_code(codes, params=params),
    )
    with pytest.raises(ValueError, match="decoder_only"):
        decoder_vqgan.encode(reference["images"][:1], params=decoder_params)


def test_bfloat16_compute_keeps_float32_params_and_close_outputs(reference):
    vqgan, params = VQModel.from_pretrained(VQGAN_FOLDER, dtype=jnp.bfloat16)
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree_util.tree_leaves(params))
    _, codes = vqgan.encode(reference["images"], params=params)
    assert (np.asarray(codes) == reference["indices"]).mean() >= 0.9
    images = np.asarray(vqgan.decode_code(reference["indices"], params=params))
    assert images.dtype == np.float32
    assert np.abs(images - reference["decoded"]).mean() < 0.05


# --- the published f16_16384 architecture ------------------------------------------------


@pytest.mark.parametrize("height", [8, 32, 48])  # below and above SUBPIXEL_MIN_PIXELS
def test_upsampled_conv_equals_a_conv_of_the_repeated_image(height):
    import flax.linen as nn

    from dalle_mini.models.vqgan_layers import UpsampledConv

    x = jax.random.normal(jax.random.PRNGKey(0), (2, height, 40, 6))
    repeated = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    plain = nn.Conv(5, (3, 3), padding="SAME")
    params = UpsampledConv(5).init(jax.random.PRNGKey(1), x)
    # same parameter names, shapes and initial values as nn.Conv: checkpoints load unchanged
    reference_params = plain.init(jax.random.PRNGKey(1), repeated)
    assert jax.tree.structure(params) == jax.tree.structure(reference_params)
    assert all(map(np.array_equal, jax.tree.leaves(params), jax.tree.leaves(reference_params)))
    params = jax.tree.map(lambda a: a + jax.random.normal(jax.random.PRNGKey(2), a.shape), params)
    out = UpsampledConv(5).apply(params, x)
    assert out.shape == (2, 2 * height, 80, 5)
    np.testing.assert_allclose(out, plain.apply(params, repeated), atol=2e-5, rtol=0)
    # and the gradients the VQGAN trainer takes through it
    loss = lambda p, module, inputs: jnp.sum(module.apply(p, inputs) ** 2)  # noqa: E731
    grads = jax.grad(loss)(params, UpsampledConv(5), x)
    expected = jax.grad(loss)(params, plain, repeated)
    for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(expected), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-2)


def test_published_config_builds_exactly_the_published_tree():
    config = VQGANConfig.from_json(FIXTURES / "config_vqgan_f16_16384.json")
    assert config == VQGANConfig.f16_16384()
    published = json.loads((FIXTURES / "param_trees.json").read_text())["vqgan_f16_16384"]
    abstract = VQModel(config).abstract_params()
    assert {path: list(leaf.shape) for path, leaf in flatten(abstract).items()} == published[
        "params"
    ]
    assert count_params(abstract) == published["total_params"] == 76_073_859
    assert VQModel(config).num_codes_per_image == 256


def test_config_round_trips_through_json_and_ignores_unknown_keys(tmp_path):
    config = VQGANConfig.f16_16384()
    config.to_json(tmp_path / "config.json")
    written = json.loads((tmp_path / "config.json").read_text())
    assert written["num_resolutions"] == 5 and written["ch_mult"] == [1, 1, 2, 2, 4]
    assert VQGANConfig.from_json(tmp_path / "config.json") == config
    assert VQGANConfig.from_dict({**written, "transformers_version": "4.25.1"}) == config


def test_inconsistent_config_is_refused():
    with pytest.raises(ValueError, match="num_resolutions=3 disagrees"):
        VQGANConfig.from_dict({"ch_mult": [1, 2], "num_resolutions": 3})
    with pytest.raises(ValueError, match="multiple of 32"):
        VQGANConfig(ch=48, ch_mult=(1, 2))


# --- checkpoint errors and round trip ----------------------------------------------------


def _copy_checkpoint(tmp_path: Path) -> Path:
    folder = tmp_path / "vqgan"
    shutil.copytree(VQGAN_FOLDER, folder)
    (folder / "reference.npz").unlink()
    return folder


def test_checkpoint_that_does_not_match_its_config_names_the_paths(tmp_path):
    folder = _copy_checkpoint(tmp_path)
    flat = flatten(load_msgpack(folder / "flax_model.msgpack"))
    flat["quantize/embedding/embedding"] = np.zeros((100, 16), np.float32)
    del flat["decoder/conv_out/bias"]
    save_msgpack(folder / "flax_model.msgpack", unflatten(flat))
    with pytest.raises(CheckpointError) as error:
        VQModel.from_pretrained(folder)
    message = str(error.value)
    assert "flax_model.msgpack" in message
    assert "quantize/embedding/embedding (100, 16)" in message
    assert "decoder/conv_out/bias" in message


def test_missing_or_truncated_weights_name_the_file(tmp_path):
    folder = _copy_checkpoint(tmp_path)
    weights = folder / "flax_model.msgpack"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="flax_model.msgpack is truncated"):
        VQModel.from_pretrained(folder)
    weights.unlink()
    with pytest.raises(CheckpointError, match="lacks flax_model.msgpack"):
        VQModel.from_pretrained(folder)


def test_save_then_load_gives_identical_outputs(tmp_path, loaded, reference):
    vqgan, params = loaded
    vqgan.save_pretrained(tmp_path / "saved", params)
    reloaded, reloaded_params = VQModel.from_pretrained(tmp_path / "saved")
    assert reloaded.config == vqgan.config
    before = vqgan.decode_code(reference["random_indices"], params=params)
    after = reloaded.decode_code(reference["random_indices"], params=reloaded_params)
    np.testing.assert_array_equal(np.asarray(before), np.asarray(after))


def test_float16_checkpoint_loads_as_float32(tmp_path, loaded, reference):
    vqgan, params = loaded
    half = jax.tree_util.tree_map(lambda leaf: np.asarray(leaf, np.float16), params)
    vqgan.save_pretrained(tmp_path / "half", half)
    assert load_msgpack(tmp_path / "half" / "flax_model.msgpack")["quant_conv"]["bias"].dtype == (
        np.float16
    )
    model, loaded_half = VQModel.from_pretrained(tmp_path / "half")
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree_util.tree_leaves(loaded_half))
    images = model.decode_code(reference["indices"], params=loaded_half)
    np.testing.assert_allclose(np.asarray(images), reference["decoded"], atol=0.05, rtol=0)


def test_do_init_true_keeps_the_weights_on_the_model(reference):
    vqgan = VQModel.from_pretrained(VQGAN_FOLDER, _do_init=True)
    _, codes = vqgan.encode(reference["images"])
    assert (np.asarray(codes) == reference["indices"]).mean() >= 0.99


# --- bad input ---------------------------------------------------------------------------


def test_bad_inputs_raise_clear_errors(loaded, reference):
    vqgan, params = loaded
    codes = reference["indices"].copy()
    codes[0, 0] = 128  # the decoder start token of a 128-code model, not a code
    with pytest.raises(ValueError, match="code 128 is outside the codebook"):
        vqgan.decode_code(codes, params=params)
    with pytest.raises(ValueError, match="pass sequences\\[:, 1:\\]"):
        vqgan.decode_code(np.zeros((4, 65), np.int32), params=params)
    with pytest.raises(ValueError, match="divide uint8 images by 255"):
        vqgan.encode((reference["images"] * 255).astype(np.uint8), params=params)
    with pytest.raises(ValueError, match="multiples of 4"):
        vqgan.encode(reference["images"][:, :30, :30], params=params)
    with pytest.raises(ValueError, match="no params"):
        vqgan.decode_code(reference["indices"])


# --- training forward --------------------------------------------------------------------


def test_training_forward_matches_inference(loaded, reference):
    vqgan, params = loaded
    forward = jax.jit(lambda p, x: vqgan.module.apply({"params": p}, x, train=True))
    out = forward(params, jnp.asarray(reference["images"]))
    assert (np.asarray(out.codes) == reference["indices"]).mean() >= 0.99
    np.testing.assert_allclose(np.asarray(out.quantized), reference["quant"], atol=1e-3, rtol=0)
    np.testing.assert_allclose(
        np.asarray(out.reconstruction), reference["decoded_from_images"], atol=1e-3, rtol=0
    )
    # Both terms are the mean squared latent-to-code distance; they differ only in gradients.
    assert float(out.codebook_loss) > 0
    np.testing.assert_allclose(float(out.codebook_loss), float(out.commitment_loss), rtol=1e-5)


def test_fresh_weights_train_with_straight_through_gradients():
    config = VQGANConfig(
        ch=32,
        ch_mult=(1,),
        num_res_blocks=1,
        resolution=8,
        z_channels=8,
        attn_resolutions=(),
        n_embed=32,
        embed_dim=4,
    )
    vqgan = VQModel(config)
    params = vqgan.init_params(jax.random.PRNGKey(0))
    assert {path: leaf.shape for path, leaf in flatten(params).items()} == {
        path: leaf.shape for path, leaf in flatten(vqgan.abstract_params()).items()
    }
    images = jax.random.uniform(jax.random.PRNGKey(1), (2, 8, 8, 3))

    def losses(p):
        out = vqgan.module.apply({"params": p}, images, train=True)
        assert out.reconstruction.shape == images.shape and out.codes.shape == (2, 64)
        return jnp.stack([jnp.mean(out.reconstruction), out.codebook_loss, out.commitment_loss])

    grads = jax.jit(jax.jacrev(losses))(params)  # each leaf: (3, *shape), one row per loss

    def norm(tree, row):
        return float(sum(jnp.sum(leaf[row] ** 2) for leaf in jax.tree_util.tree_leaves(tree)))

    encoder, codebook = grads["encoder"], grads["quantize"]
    assert norm(encoder, 0) > 0 and norm(codebook, 0) == 0  # straight-through to the encoder
    assert norm(codebook, 1) > 0 and norm(encoder, 1) == 0  # codebook loss moves the codebook
    assert norm(encoder, 2) > 0 and norm(codebook, 2) == 0  # commitment moves the encoder
