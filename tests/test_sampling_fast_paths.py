"""The sampler's fast paths give exactly what the plain paths give."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import FIXTURES

from dalle_mini import sampling
from dalle_mini.models.dallebart import DalleBart


@pytest.fixture(scope="module")
def tiny():
    model, params = DalleBart.from_pretrained(FIXTURES / "dallebart-scan")
    batch = dict(np.load(FIXTURES / "dallebart-scan" / "reference.npz"))
    return model, params, batch


def _sample(model, params, batch, uncond_rows, sampling_params):
    count = len(batch["input_ids"])
    keys = sampling.row_keys_for(jax.random.PRNGKey(3), jnp.arange(count))
    knobs = sampling.Knobs.broadcast(count, condition_scale=10.0, temperature=1.0, top_k=50,
                                     top_p=1.0)  # fmt: skip
    state = model.start_sampling(
        batch["input_ids"], batch["attention_mask"], keys, knobs,
        batch["input_ids_uncond"][:uncond_rows], batch["attention_mask_uncond"][:uncond_rows],
        params=params,
    )  # fmt: skip
    return np.asarray(model.continue_sampling(state, params=sampling_params).sequences)


def test_shared_unconditional_row_and_split_layers_change_nothing(tiny):
    model, params, batch = tiny
    count = len(batch["input_ids"])
    assert np.all(batch["input_ids_uncond"] == batch["input_ids_uncond"][:1])  # one prompt
    plain = _sample(model, params, batch, count, params)
    shared = _sample(model, params, batch, 1, params)
    split = _sample(model, params, batch, 1, sampling.split_decoder_layers(params))
    np.testing.assert_array_equal(shared, plain)
    np.testing.assert_array_equal(split, plain)


def test_split_layers_are_the_stacked_layers(tiny):
    _, params, _ = tiny
    stacked = params["model"]["decoder"]["layers"]["FlaxBartDecoderLayers"]
    split = sampling.split_decoder_layers(params)["model"]["decoder"]["layers"]
    layers = split["FlaxBartDecoderLayers"]
    assert len(layers) == jax.tree.leaves(stacked)[0].shape[0]
    for i, layer in enumerate(layers):
        jax.tree.map(lambda a, b, i=i: np.testing.assert_array_equal(a[i], b), stacked, layer)
    assert sampling.split_decoder_layers(sampling.split_decoder_layers(params)) is not None


@pytest.mark.parametrize("top_k", [1, 50, sampling.TOP_K_CAP, sampling.TOP_K_CAP + 1, 0])
@pytest.mark.parametrize("top_p", [1.0, 0.9])
def test_partial_sort_filters_as_the_full_sort(top_k, top_p):
    logits = jax.random.normal(jax.random.PRNGKey(0), (3, 1000)) * 3.0
    logits = logits.at[0, :20].set(1.5)  # ties at the threshold are all kept by both
    knobs = sampling.Knobs.broadcast(3, condition_scale=1.0, temperature=0.8, top_k=top_k,
                                     top_p=top_p)  # fmt: skip
    filtered = sampling.filter_logits(logits, knobs)
    scaled = logits / 0.8
    k = jnp.where(knobs.top_k <= 0, 1000, knobs.top_k)
    threshold = sampling._threshold(-jnp.sort(-scaled, axis=-1), k, knobs.top_p)
    expected = jnp.where(scaled >= threshold, scaled, -jnp.inf)
    np.testing.assert_array_equal(filtered, expected)
    kept = np.isfinite(np.asarray(filtered)).sum(-1)
    assert np.all(kept >= 1) and (top_k == 0 or top_p < 1 or np.all(kept >= top_k))
