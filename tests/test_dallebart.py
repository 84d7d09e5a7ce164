"""DalleBart against the original implementation's outputs, and the loader's guarantees."""

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dalle_mini import checkpoint
from dalle_mini.hub import CheckpointError
from dalle_mini.models import bart
from dalle_mini.models.dallebart import DalleBart

FIXTURES = Path(__file__).parent / "fixtures"

SCAN = FIXTURES / "dallebart-scan"
BATCH_KEYS = ("input_ids", "attention_mask", "input_ids_uncond", "attention_mask_uncond")


def _close(actual, expected):
    """The conformance tolerance: |a - e| <= 2e-4 + 1e-3 |e| everywhere."""
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.shape == expected.shape
    excess = np.abs(actual - expected) - (2e-4 + 1e-3 * np.abs(expected))
    assert excess.max() <= 0, f"worst excess {excess.max():.3g}"


@pytest.fixture(scope="module")
def reference():
    return dict(np.load(SCAN / "reference.npz"))


@pytest.fixture(scope="module")
def loaded():
    return DalleBart.from_pretrained(SCAN, _do_init=False)


@pytest.fixture(scope="module")
def batch(reference):
    return {key: reference[key] for key in BATCH_KEYS}


def test_loads_with_recorded_parameter_count(loaded):
    model, params = loaded
    assert checkpoint.count_params(params) == 264_448
    assert model.config.num_codes == 256 and model.config.image_length == 64


def test_encoder_states_match_original(loaded, reference):
    model, params = loaded
    for suffix in ("", "_uncond"):
        hidden = model.encode(
            reference[f"input_ids{suffix}"], reference[f"attention_mask{suffix}"], params=params
        ).last_hidden_state
        _close(hidden, reference[f"encoder_hidden{suffix}"])


def test_teacher_forced_logits_match_original(loaded, reference):
    model, params = loaded
    for suffix in ("", "_uncond"):
        out = model(
            input_ids=reference[f"input_ids{suffix}"],
            attention_mask=reference[f"attention_mask{suffix}"],
            decoder_input_ids=reference["decoder_input_ids"],
            params=params,
        )
        _close(out.logits, reference[f"logits{suffix}"])
        _close(out.encoder_last_hidden_state, reference[f"encoder_hidden{suffix}"])


@pytest.mark.parametrize("scale", [1, 3, 10])
def test_greedy_generation_matches_original(loaded, reference, batch, scale):
    model, params = loaded
    sequences = model.generate(
        **batch,
        prng_key=jax.random.PRNGKey(0),
        params=params,
        top_k=1,
        condition_scale=float(scale),
        only_image_codes=False,
    ).sequences
    expected = reference[f"greedy_cs{scale}"]
    assert sequences.shape == expected.shape
    assert np.mean(np.asarray(sequences) == expected) >= 0.98


def test_step_decoding_agrees_with_teacher_forcing(loaded, reference, batch):
    """The cached one-token-at-a-time path computes the same logits as the full pass."""
    model, params = loaded
    sequences = model.generate(
        **batch, prng_key=jax.random.PRNGKey(5), params=params, condition_scale=1.0
    ).sequences
    logits = model(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        decoder_input_ids=sequences[:, :-1],
        params=params,
    ).logits
    # with top-k 50 every sampled token must be among the 50 best of the teacher-forced logits
    rank = (logits > np.take_along_axis(logits, sequences[:, 1:, None], -1)).sum(-1)
    assert rank.max() < 50


def test_mini_tree_loads_with_published_parameter_count(tmp_path):
    """Random float32 weights at every path of the real mini tree load as a checkpoint."""
    trees = json.loads((FIXTURES / "param_trees.json").read_text())["mini"]
    rng = np.random.default_rng(0)
    flat = {
        path: rng.standard_normal(shape, dtype=np.float32) * 0.02
        for path, shape in trees["params"].items()
    }
    (tmp_path / "config.json").write_text((FIXTURES / "config_mini.json").read_text())
    checkpoint.save_msgpack(tmp_path / "flax_model.msgpack", checkpoint.unflatten(flat))
    del flat
    model, params = DalleBart.from_pretrained(tmp_path)
    assert checkpoint.count_params(params) == 437_833_712 == trees["total_params"]
    assert model.config == bart.DalleBartConfig.mini()


@pytest.mark.parametrize("name", ["mini", "mega"])
def test_presets_have_the_published_trees(name):
    trees = json.loads((FIXTURES / "param_trees.json").read_text())[name]
    config = bart.DalleBartConfig.from_dict(
        json.loads((FIXTURES / f"config_{name}.json").read_text())
    )
    assert config == getattr(bart.DalleBartConfig, name)()
    shapes = DalleBart(config).param_shapes()  # jax.eval_shape: nothing is allocated
    flat = {path: list(leaf.shape) for path, leaf in checkpoint.flatten(shapes).items()}
    assert flat == trees["params"]
    assert checkpoint.count_params(shapes) == trees["total_params"]


def _unscanned(params):
    flat = {}
    for path, leaf in checkpoint.flatten(params).items():
        for side in ("Encoder", "Decoder"):
            marker = f"/FlaxBart{side}Layers/"
            if marker in path:
                for i, layer_leaf in enumerate(np.asarray(leaf)):
                    flat[path.replace(marker, f"/FlaxBart{side}Layer_{i}/")] = layer_leaf
                break
        else:
            flat[path] = np.asarray(leaf)
    return checkpoint.unflatten(flat)


def _checkpoint_copy(folder, params):
    folder.mkdir()
    for name in ("config.json",):
        (folder / name).write_text((SCAN / name).read_text())
    checkpoint.save_msgpack(folder / "flax_model.msgpack", params)
    return folder


def test_unscanned_and_float16_checkpoints_load(tmp_path, loaded, reference):
    _, params = loaded
    unscanned = _unscanned(params)
    assert any("FlaxBartEncoderLayer_1" in path for path in checkpoint.flatten(unscanned))
    model, loaded_params = DalleBart.from_pretrained(_checkpoint_copy(tmp_path / "u", unscanned))
    _close(
        model(
            reference["input_ids"],
            reference["attention_mask"],
            reference["decoder_input_ids"],
            params=loaded_params,
        ).logits,
        reference["logits"],
    )

    half = checkpoint.cast_floating(params, np.float16)
    model, half_params = DalleBart.from_pretrained(_checkpoint_copy(tmp_path / "h", half))
    assert jax.tree.leaves(half_params)[0].dtype == jnp.float32
    logits = model(
        reference["input_ids"],
        reference["attention_mask"],
        reference["decoder_input_ids"],
        params=half_params,
    ).logits
    assert np.abs(logits - reference["logits"]).max() < 0.1


def test_bfloat16_compute_stays_close(loaded, reference):
    _, params = loaded
    model = DalleBart(loaded[0].config, dtype=jnp.bfloat16)
    logits = model(
        reference["input_ids"],
        reference["attention_mask"],
        reference["decoder_input_ids"],
        params=params,
    ).logits
    assert logits.dtype == jnp.float32
    agree = np.mean(np.argmax(logits, -1) == np.argmax(reference["logits"], -1))
    assert agree > 0.9


def test_mismatched_tensor_is_named(tmp_path, loaded):
    _, params = loaded
    flat = checkpoint.flatten(jax.tree.map(np.asarray, params))
    path = "model/decoder/embed_positions/embedding"
    flat[path] = flat[path][:10]
    del flat["lm_head/kernel"]
    folder = _checkpoint_copy(tmp_path / "bad", checkpoint.unflatten(flat))
    with pytest.raises(CheckpointError, match="embed_positions/embedding") as error:
        DalleBart.from_pretrained(folder)
    assert "lm_head/kernel" in str(error.value) and "missing" in str(error.value)


def test_missing_or_truncated_weights_name_the_file(tmp_path):
    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / "config.json").write_text((SCAN / "config.json").read_text())
    with pytest.raises(CheckpointError, match="flax_model.msgpack"):
        DalleBart.from_pretrained(folder)
    data = (SCAN / "flax_model.msgpack").read_bytes()
    (folder / "flax_model.msgpack").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="flax_model.msgpack.*truncated or corrupt"):
        DalleBart.from_pretrained(folder)


def test_unknown_source_errors_say_what_to_do(tmp_path):
    with pytest.raises(CheckpointError, match="not a folder"):
        DalleBart.from_pretrained(str(tmp_path / "nowhere" / "model"))
    with pytest.raises(CheckpointError, match="local cache"):
        DalleBart.from_pretrained("dalle-mini/not-a-real-model-for-tests")


def test_unsupported_config_option_is_refused(tmp_path):
    folder = tmp_path / "ckpt"
    folder.mkdir()
    config = json.loads((SCAN / "config.json").read_text())
    config["use_cosine_attention"] = True
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "flax_model.msgpack").write_bytes((SCAN / "flax_model.msgpack").read_bytes())
    with pytest.raises(CheckpointError, match="use_cosine_attention"):
        DalleBart.from_pretrained(folder)


def test_save_and_reload_round_trip(tmp_path, loaded, reference):
    model, params = loaded
    model.save_pretrained(tmp_path, params)
    again = DalleBart.from_pretrained(tmp_path, _do_init=True)
    logits = again(
        reference["input_ids"], reference["attention_mask"], reference["decoder_input_ids"]
    ).logits
    _close(logits, reference["logits"])
