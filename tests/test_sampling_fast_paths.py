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


@pytest.mark.parametrize("block_length", [8, 16, 64])
def test_cache_blocks_change_no_code(tiny, block_length):
    """The cache in blocks of 8, 16 (default here) or 64 positions (one block, the whole
    cache): every sampled code the same, also when the chunks cross block boundaries."""
    model, params, batch = tiny
    count = len(batch["input_ids"])
    keys = sampling.row_keys_for(jax.random.PRNGKey(5), jnp.arange(count))
    knobs = sampling.Knobs.broadcast(count, condition_scale=3.0, temperature=1.0, top_k=50,
                                     top_p=1.0)  # fmt: skip

    def sample(length, chunk):
        state = model.start_sampling(batch["input_ids"], batch["attention_mask"], keys, knobs,
                                     params=params, block_length=length)  # fmt: skip
        assert len(state.cache_keys[0]) == model.config.image_length // length
        while int(state.step) < model.config.image_length:
            state = model.continue_sampling(state, chunk, params=params)
        return np.asarray(state.sequences)

    whole = sample(model.config.image_length, model.config.image_length)
    np.testing.assert_array_equal(sample(block_length, 24), whole)
    with pytest.raises(ValueError, match="block_length"):
        sample(model.config.image_length - 1, 1)


def _draws(logits, knobs, count):
    """`count` draws for each row of logits, (count, B), one key per draw and row."""
    keys = jax.random.split(jax.random.PRNGKey(0), count * len(logits)).reshape(count, -1, 2)
    return np.asarray(jax.vmap(lambda k: sampling.draw(logits, knobs, k))(keys))


def test_draw_among_the_best_follows_the_filtered_probabilities():
    vocab = 1000  # > TOP_K_CAP: rows with a small top-k draw among their best ids only
    logits = jax.random.normal(jax.random.PRNGKey(1), (1, vocab)) * 0.1
    logits = logits.at[0, [7, 300, 999]].set(jnp.asarray([3.0, 2.0, 1.0]))
    knobs = sampling.Knobs.broadcast(1, condition_scale=1.0, temperature=1.0, top_k=3, top_p=1.0)
    drawn = _draws(logits, knobs, 4000)[:, 0]
    assert set(drawn) == {7, 300, 999}
    expected = np.asarray(jax.nn.softmax(jnp.asarray([3.0, 2.0, 1.0])))  # .665 .245 .090
    frequencies = np.asarray([np.mean(drawn == i) for i in (7, 300, 999)])
    np.testing.assert_allclose(frequencies, expected, atol=0.03)


def test_a_rows_draw_does_not_depend_on_the_other_rows_top_k():
    logits = jax.random.normal(jax.random.PRNGKey(2), (2, 1000)) * 2.0
    keys = sampling.row_keys_for(jax.random.PRNGKey(3), jnp.arange(2))

    def knobs(top_ks):
        return sampling.Knobs.broadcast(2, condition_scale=1.0, temperature=1.0, top_k=0,
                                        top_p=1.0).replace(top_k=jnp.asarray(top_ks))  # fmt: skip

    small_pair = np.asarray(sampling.draw(logits, knobs([50, 50]), keys))
    mixed = np.asarray(sampling.draw(logits, knobs([50, 0]), keys))  # row 1 over all ids
    assert mixed[0] == small_pair[0]
    top50 = np.argsort(-np.asarray(logits[0]))[:50]
    assert small_pair[0] in top50
