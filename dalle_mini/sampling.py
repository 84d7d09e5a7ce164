"""Sampling image codes from DalleBart, one compiled `lax` loop over a fixed-size cache.

What the original `generate` did (`../shared/dalle-mini-facts.md` §4), reorganised for speed:
- conditional and unconditional rows run as one batch of 2B rows through the decoder;
- cross-attention keys/values are computed once per request, not once per token;
- the self-attention cache is written in place, one position per step;
- the knobs (condition scale, temperature, top-k, top-p) are traced per-row arrays, so moving a
  slider never recompiles and rows of one batch may carry different knobs;
- every row has its own PRNG key, so an image does not depend on what else is in the batch.

Per step, as the original: `logits = uncond + condition_scale * (cond - uncond)` on raw logits,
then (optionally) non-code ids masked, then temperature, top-k, top-p, categorical sampling.
"""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
from jax import lax

from dalle_mini.models import bart

Array = jax.Array


@flax.struct.dataclass
class Knobs:
    """Per-row sampling settings, each (B,). top_k <= 0 disables top-k; top_p >= 1 disables top-p."""

    condition_scale: Array
    temperature: Array
    top_k: Array
    top_p: Array

    @classmethod
    def broadcast(cls, batch_size: int, *, condition_scale, temperature, top_k, top_p) -> "Knobs":
        def column(value, dtype):
            return jnp.broadcast_to(jnp.asarray(value, dtype), (batch_size,))

        return cls(
            condition_scale=column(condition_scale, jnp.float32),
            temperature=column(temperature, jnp.float32),
            top_k=column(top_k, jnp.int32),
            top_p=column(top_p, jnp.float32),
        )


@flax.struct.dataclass
class SamplerState:
    """Everything the loop carries. R = B rows, or 2B when unconditional rows ride along."""

    step: Array  # () int32: how many codes are written
    sequences: Array  # (B, image_length + 1) int32, start token in column 0
    cache_keys: Array  # (L, R, S, H, Dh)
    cache_values: Array  # (L, R, S, H, Dh)
    cross_keys: Array  # (L, R, T, H, Dh)
    cross_values: Array  # (L, R, T, H, Dh)
    cross_bias: Array  # (R, 1, 1, T)
    row_keys: Array  # (B, 2) uint32: one PRNG key per image
    knobs: Knobs


def filter_logits(logits: Array, knobs: Knobs) -> Array:
    """Temperature, then top-k, then top-p (nucleus), as the original's warpers; logits (B, V).

    Both filters come from one descending sort. Ties at a top-k threshold are all kept.
    """
    logits = logits / knobs.temperature[:, None]
    vocab = logits.shape[-1]
    ranked = -jnp.sort(-logits, axis=-1)  # (B, V), descending
    ranks = jnp.arange(vocab)
    k = jnp.where(knobs.top_k <= 0, vocab, jnp.minimum(knobs.top_k, vocab))  # (B,)
    in_top_k = ranks[None] < k[:, None]
    probs = jax.nn.softmax(jnp.where(in_top_k, ranked, -jnp.inf), axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs  # exclusive cumulative probability
    in_top_p = (mass_before < knobs.top_p[:, None]) | (knobs.top_p[:, None] >= 1.0)
    keep_count = jnp.maximum(jnp.sum(in_top_k & in_top_p, axis=-1), 1)  # (B,)
    threshold = jnp.take_along_axis(ranked, keep_count[:, None] - 1, axis=-1)  # (B, 1)
    return jnp.where(logits >= threshold, logits, -jnp.inf)


def mask_ids(logits: Array, config: bart.DalleBartConfig, only_image_codes: bool) -> Array:
    """Ids the sampler may not pick. The original masked only eos (its min_length processor,
    a no-op when eos lies beyond the logits); `only_image_codes` also masks the start token and
    padded rows, which the VQGAN cannot decode."""
    ids = jnp.arange(logits.shape[-1])
    banned = ids >= config.num_codes if only_image_codes else ids == config.eos_token_id
    return jnp.where(banned[None], -jnp.inf, logits)


def next_codes(logits: Array, uncond_logits: Array | None, state: SamplerState,
               config: bart.DalleBartConfig, only_image_codes: bool) -> Array:  # fmt: skip
    """One step's choice for every row, from raw conditional (and unconditional) logits."""
    if uncond_logits is not None:
        scale = state.knobs.condition_scale[:, None]
        logits = uncond_logits + scale * (logits - uncond_logits)
    logits = filter_logits(mask_ids(logits, config, only_image_codes), state.knobs)
    step_keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(state.row_keys, state.step)
    return jax.vmap(jax.random.categorical)(step_keys, logits).astype(jnp.int32)


def init_state(params, config: bart.DalleBartConfig, input_ids: Array, attention_mask: Array,
               row_keys: Array, knobs: Knobs, uncond_ids: Array | None = None,
               uncond_mask: Array | None = None, dtype: Any = jnp.float32) -> SamplerState:  # fmt: skip
    """Encodes the prompts (and the unconditional prompt) and sets up an empty cache."""
    if uncond_ids is not None:
        input_ids = jnp.concatenate([input_ids, uncond_ids], axis=0)
        attention_mask = jnp.concatenate([attention_mask, uncond_mask], axis=0)
    encoder_hidden = bart.encode(params, config, input_ids, attention_mask, dtype)
    cross_keys, cross_values = bart.cross_keys_values(params, config, encoder_hidden, dtype)
    rows, batch = input_ids.shape[0], row_keys.shape[0]
    cache_shape = (config.decoder_layers, rows, config.image_length,
                   config.decoder_attention_heads, config.head_dim)  # fmt: skip
    sequences = jnp.full((batch, config.image_length + 1), config.decoder_start_token_id, jnp.int32)
    return SamplerState(
        step=jnp.zeros((), jnp.int32),
        sequences=sequences,
        cache_keys=jnp.zeros(cache_shape, cross_keys.dtype),
        cache_values=jnp.zeros(cache_shape, cross_keys.dtype),
        cross_keys=cross_keys,
        cross_values=cross_values,
        cross_bias=bart._key_bias(attention_mask),
        row_keys=row_keys,
        knobs=knobs,
    )


def run_steps(params, config: bart.DalleBartConfig, state: SamplerState, num_steps: int,
              only_image_codes: bool = True, dtype: Any = jnp.float32) -> SamplerState:  # fmt: skip
    """Samples the next `num_steps` codes (fewer if the image completes first)."""
    batch = state.sequences.shape[0]
    use_uncond = state.cross_keys.shape[1] != batch

    def body(state: SamplerState) -> SamplerState:
        step = state.step
        tokens = lax.dynamic_index_in_dim(state.sequences, step, axis=1, keepdims=False)  # (B,)
        if use_uncond:
            tokens = jnp.concatenate([tokens, tokens])
        logits, (new_keys, new_values) = bart.decode_step(
            params, config, tokens, step,
            (state.cache_keys, state.cache_values),
            (state.cross_keys, state.cross_values), state.cross_bias, dtype,
        )  # fmt: skip
        cond, uncond = (logits[:batch], logits[batch:]) if use_uncond else (logits, None)
        codes = next_codes(cond, uncond, state, config, only_image_codes)
        write = lambda cache, new: lax.dynamic_update_slice_in_dim(cache, new, step, axis=2)  # noqa: E731
        return state.replace(
            step=step + 1,
            sequences=lax.dynamic_update_index_in_dim(state.sequences, codes, step + 1, axis=1),
            cache_keys=write(state.cache_keys, new_keys),
            cache_values=write(state.cache_values, new_values),
        )

    end = jnp.minimum(state.step + num_steps, config.image_length)
    return lax.while_loop(lambda state: state.step < end, body, state)


def python_run_steps(params, config, state, num_steps, only_image_codes=True, dtype=jnp.float32):
    """Debug twin of `run_steps`: a Python loop, one step at a time, for printing and pdb."""
    for _ in range(min(num_steps, config.image_length - int(state.step))):
        state = run_steps(params, config, state, 1, only_image_codes, dtype)
    return state


def row_keys_for(prng_key: Array, image_indices: Array) -> Array:
    """Image i's key is fold_in(prng_key, i): the same whatever the batch size or position."""
    return jax.vmap(jax.random.fold_in, in_axes=(None, 0))(prng_key, image_indices)
