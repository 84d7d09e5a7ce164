"""The sampler's knobs on hand-made logits, and its guarantees on a real (tiny) checkpoint."""

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dalle_mini import sampling
from dalle_mini.models.dallebart import DalleBart

FIXTURES = Path(__file__).parent / "fixtures"

NUM_KEYS = 200


def _state(batch, *, condition_scale=1.0, temperature=1.0, top_k=0, top_p=1.0, step=0):
    """Only the fields `next_codes` reads: keys, knobs and the step."""
    knobs = sampling.Knobs.broadcast(
        batch, condition_scale=condition_scale, temperature=temperature, top_k=top_k, top_p=top_p
    )
    keys = sampling.row_keys_for(jax.random.PRNGKey(0), jnp.arange(batch))
    empty = jnp.zeros((0,))
    return sampling.SamplerState(
        step=jnp.asarray(step),
        sequences=empty,
        cache_keys=empty,
        cache_values=empty,
        cross_keys=empty,
        cross_values=empty,
        cross_bias=empty,
        row_keys=keys,
        knobs=knobs,
    )


class StubConfig:
    """The two ids the sampler masks: codes are 0..5, eos is 7 (inside the 8 logits)."""

    num_codes = 6
    eos_token_id = 7


def _sampled(logits, uncond=None, only_image_codes=True, **knobs):
    """Tokens drawn for NUM_KEYS rows of the same logits, each row with its own key."""
    logits = jnp.broadcast_to(jnp.asarray(logits, jnp.float32), (NUM_KEYS, len(logits)))
    if uncond is not None:
        uncond = jnp.broadcast_to(jnp.asarray(uncond, jnp.float32), logits.shape)
    state = _state(NUM_KEYS, **knobs)
    return set(np.asarray(sampling.next_codes(logits, uncond, state, StubConfig, only_image_codes)))


LOGITS = [2.0, 1.0, 0.0, -1.0, -2.0, -3.0, -9.0, -9.0]  # probabilities ~.66 .24 .09 .03 ...


def test_top_k_keeps_exactly_the_k_best():
    assert _sampled(LOGITS, top_k=1) == {0}
    assert _sampled(LOGITS, top_k=2, temperature=5.0) == {0, 1}
    assert _sampled(LOGITS, top_k=3, temperature=50.0) == {0, 1, 2}


def test_top_p_keeps_the_smallest_set_reaching_p():
    assert _sampled(LOGITS, top_p=0.6) == {0}  # p(0) = .66 already reaches .6
    assert _sampled(LOGITS, top_p=0.8) == {0, 1}  # .66 < .8 <= .66 + .24
    assert _sampled(LOGITS, top_p=0.95) == {0, 1, 2}


def test_temperature_acts_before_top_p():
    # at temperature 10 the first three are nearly equal, so p=.6 needs two of them
    assert _sampled(LOGITS[:3] + [-99.0] * 5, temperature=10.0, top_p=0.6) == {0, 1}
    assert _sampled(LOGITS, temperature=0.05) == {0}


def test_condition_scale_pushes_away_from_the_unconditional_logits():
    cond = [0.0, 1.0, 0.5, -5, -5, -5, -5, -5]
    uncond = [0.0, 2.0, 0.0, -5, -5, -5, -5, -5]
    assert _sampled(cond, uncond, condition_scale=1.0, top_k=1) == {1}
    # 3 * (cond - uncond) + uncond = [0, -1, 1.5, ...]: the scale flips the choice
    assert _sampled(cond, uncond, condition_scale=3.0, top_k=1) == {2}


def test_non_code_ids_are_masked_unless_asked_not_to():
    favours_special = [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 5.0, 5.0]
    assert _sampled(favours_special) <= set(range(6))
    # as the original: only eos (the min-length processor) is masked
    assert 6 in _sampled(favours_special, only_image_codes=False)
    assert 7 not in _sampled(favours_special, only_image_codes=False)


def test_rows_with_different_knobs_in_one_batch():
    logits = jnp.asarray([LOGITS, LOGITS], jnp.float32)
    state = _state(2, top_k=0, temperature=1.0)
    state = state.replace(knobs=state.knobs.replace(top_k=jnp.asarray([1, 0])))
    first = {
        int(
            sampling.next_codes(logits, None, state.replace(step=jnp.asarray(s)), StubConfig, True)[
                0
            ]
        )
        for s in range(50)
    }
    assert first == {0}


@pytest.fixture(scope="module")
def tiny():
    model, params = DalleBart.from_pretrained(FIXTURES / "dallebart-scan")
    batch = dict(np.load(FIXTURES / "dallebart-scan" / "reference.npz"))
    batch = {
        k: batch[k]
        for k in ("input_ids", "attention_mask", "input_ids_uncond", "attention_mask_uncond")
    }
    return model, params, batch


def test_an_image_does_not_depend_on_its_batch(tiny):
    model, params, batch = tiny
    key = jax.random.PRNGKey(42)
    full = model.generate(**batch, prng_key=key, params=params, condition_scale=10.0).sequences
    alone = model.generate(
        **{k: v[2:3] for k, v in batch.items()},
        prng_key=key,
        params=params,
        condition_scale=10.0,
        image_indices=[2],
    ).sequences
    np.testing.assert_array_equal(alone[0], full[2])
    pair = model.generate(
        **{k: v[[3, 0]] for k, v in batch.items()},
        prng_key=key,
        params=params,
        condition_scale=10.0,
        image_indices=[3, 0],
    ).sequences
    np.testing.assert_array_equal(pair, np.asarray(full)[[3, 0]])
    other_seed = model.generate(
        **batch, prng_key=jax.random.PRNGKey(43), params=params, condition_scale=10.0
    ).sequences
    assert np.mean(np.asarray(other_seed) == np.asarray(full)) < 0.5


def test_hot_temperature_never_yields_non_codes_by_default(tiny):
    model, params, batch = tiny
    kwargs = dict(params=params, temperature=50.0, top_k=0, condition_scale=1.0)
    masked = model.generate(**batch, prng_key=jax.random.PRNGKey(1), **kwargs).sequences
    assert np.all(np.asarray(masked)[:, 1:] < model.config.num_codes)
    unmasked = [
        model.generate(
            **batch, prng_key=jax.random.PRNGKey(s), only_image_codes=False, **kwargs
        ).sequences
        for s in range(4)
    ]
    assert np.any(np.asarray(unmasked)[:, :, 1:] >= model.config.num_codes)


def test_moving_a_knob_does_not_recompile(tiny):
    model, params, batch = tiny
    model.generate(**batch, params=params, condition_scale=4.0, temperature=1.0, top_k=5)
    sizes = model._init_state._cache_size(), model._run_steps._cache_size()
    for knobs in ({"temperature": 0.7}, {"top_k": 100}, {"top_p": 0.9}, {"condition_scale": 7.5}):
        settings = {"condition_scale": 4.0, "temperature": 1.0, "top_k": 5, **knobs}
        model.generate(**batch, params=params, **settings)
    assert (model._init_state._cache_size(), model._run_steps._cache_size()) == sizes


def test_chunked_sampling_equals_one_loop(tiny):
    model, params, batch = tiny
    keys = sampling.row_keys_for(jax.random.PRNGKey(7), jnp.arange(4))
    knobs = sampling.Knobs.broadcast(4, condition_scale=3.0, temperature=1.0, top_k=50, top_p=1.0)
    whole = model.continue_sampling(
        model.start_sampling(
            batch["input_ids"], batch["attention_mask"], keys, knobs, params=params
        ),
        params=params,
    )
    state = model.start_sampling(
        batch["input_ids"], batch["attention_mask"], keys, knobs, params=params
    )
    for _ in range(3):  # 3 chunks of 24 cover the 64 codes, the last one stops early
        state = model.continue_sampling(state, 24, params=params)
    assert int(state.step) == 64
    np.testing.assert_array_equal(state.sequences, whole.sequences)


@pytest.mark.parametrize(
    "knob, value",
    [
        ("temperature", 0.0),
        ("temperature", float("nan")),
        ("top_p", 0.0),
        ("top_k", -1),
        ("condition_scale", float("inf")),
    ],
)
def test_invalid_knobs_name_the_knob(tiny, knob, value):
    model, params, batch = tiny
    with pytest.raises(ValueError, match=knob):
        model.generate(**batch, params=params, **{knob: value})


def test_a_sampler_compiled_before_loading_is_used_without_compiling_again(tiny):
    model, params, batch = tiny
    count, length = batch["input_ids"].shape
    knobs = sampling.Knobs.broadcast(
        count, condition_scale=10.0, temperature=1.0, top_k=5, top_p=1.0
    )
    row_keys = sampling.row_keys_for(jax.random.PRNGKey(7), jnp.arange(count))
    compiles = []

    def listener(event, duration, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            compiles.append(duration)

    def sample(sampler):
        jax.monitoring.register_event_duration_secs_listener(listener)
        try:
            state = sampler.start_sampling(**batch, row_keys=row_keys, knobs=knobs, params=params)
            return np.asarray(sampler.continue_sampling(state, params=params).sequences)
        finally:
            jax.monitoring.unregister_event_duration_listener(listener)

    expected = sample(DalleBart(model.config))  # a fresh model compiles as it samples
    assert compiles
    compiles.clear()
    ahead = DalleBart(model.config)
    ahead.compile_sampler(count, text_length=length)  # shapes only: no weights yet
    np.testing.assert_array_equal(sample(ahead), expected)
    assert compiles == []
    with pytest.raises(ValueError, match="batch_size >= 1"):
        ahead.compile_sampler(0)
