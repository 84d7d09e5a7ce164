"""Sampling image codes from DalleBart, one compiled `lax` loop over a fixed-size cache.

What the original `generate` did (`../shared/dalle-mini-facts.md` §4), reorganised for speed:
- conditional and unconditional rows run as one batch of 2B rows through the decoder;
- cross-attention keys/values are computed once per request, not once per token, and the
  unconditional prompt, when every image shares it, is encoded once, not once per image;
- the self-attention cache is held in blocks of positions (`cache_block_length`), and the loop
  runs one segment per block: while position p is sampled, only the blocks up to p's are read
  (5/8 of the cache on average with four blocks, instead of all of it at every step; small
  decoders only, where the cache is most of a step's reading);
- the self-attention cache is written in place, one position per step, and every decoder
  weight matrix is read in place (`split_decoder_layers`; layout and reasons:
  `models/bart_stacks.py`, `decode_step`), so a step moves little more than the weights and
  the cache once;
- top-k up to `TOP_K_CAP` (the default is 50) takes a partial sort (`lax.top_k`) of the
  logits instead of a full sort of the vocabulary, while k stays a traced value, and the draw
  is made among those best ids only (`draw`), not over the whole vocabulary;
- the knobs (condition scale, temperature, top-k, top-p) are traced per-row arrays, so moving a
  slider never recompiles and rows of one batch may carry different knobs;
- every row has its own PRNG key, so an image does not depend on what else is in the batch;
- on CPU at float32 the loop is compiled with YNNPACK's fusions off (`compiler_options`): its
  few-row matrix products run faster through XLA's other CPU paths.

Per step, as the original: `logits = uncond + condition_scale * (cond - uncond)` on raw logits,
then (optionally) non-code ids masked, then temperature, top-k, top-p, categorical sampling.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from dalle_mini.models import bart, bart_stacks

Array = jax.Array


@flax.struct.dataclass
class Knobs:
    """Per-row sampling settings, each (B,).

    top_k <= 0 disables top-k; top_p >= 1 disables top-p."""

    condition_scale: Array
    temperature: Array
    top_k: Array
    top_p: Array

    @classmethod
    def broadcast(cls, batch_size: int, *, condition_scale, temperature, top_k, top_p) -> Knobs:
        def column(value, dtype):
            return jnp.broadcast_to(jnp.asarray(value, dtype), (batch_size,))

        return cls(
            condition_scale=column(condition_scale, jnp.float32),
            temperature=column(temperature, jnp.float32),
            top_k=column(top_k, jnp.int32),
            top_p=column(top_p, jnp.float32),
        )


TOP_K_CAP = 128  # a batch whose every top-k is 1..TOP_K_CAP needs only a partial sort


@flax.struct.dataclass
class SamplerState:
    """Everything the loop carries. B images; R = B rows, or 2B when unconditional rows ride
    along; R' cross-attention rows: R, or B + 1 when all unconditional rows share one prompt."""

    step: Array  # () int32: how many codes are written
    sequences: Array  # (B, image_length + 1) int32, start token in column 0
    cache_keys: tuple[tuple[Array, ...], ...]  # per layer, per block (R, H, S_block, Dh)
    cache_values: tuple[tuple[Array, ...], ...]  # per layer, per block (R, H, S_block, Dh)
    cross_keys: tuple[Array, ...]  # per layer (R', H, T, Dh)
    cross_values: tuple[Array, ...]  # per layer (R', H, T, Dh)
    cross_bias: Array  # (R', 1, T): 0 where the prompt has a token, -inf on padding
    row_keys: Array  # (B, 2) uint32: one PRNG key per image
    knobs: Knobs


def _threshold(ranked: Array, k: Array, top_p: Array) -> Array:
    """The smallest logit kept by top-k then top-p, (B, 1), from the best logits in descending
    order, ranked (B, N), N >= every k."""
    in_top_k = jnp.arange(ranked.shape[-1])[None] < k[:, None]
    probs = jax.nn.softmax(jnp.where(in_top_k, ranked, -jnp.inf), axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs  # exclusive cumulative probability
    in_top_p = (mass_before < top_p[:, None]) | (top_p[:, None] >= 1.0)
    keep_count = jnp.maximum(jnp.sum(in_top_k & in_top_p, axis=-1), 1)  # (B,)
    return jnp.take_along_axis(ranked, keep_count[:, None] - 1, axis=-1)


def _scaled_and_k(logits: Array, knobs: Knobs) -> tuple[Array, Array]:
    """Logits over the temperature, (B, V), and each row's top-k as a count, (B,): the whole
    vocabulary where top-k is off (<= 0)."""
    vocab = logits.shape[-1]
    k = jnp.where(knobs.top_k <= 0, vocab, jnp.minimum(knobs.top_k, vocab))
    return logits / knobs.temperature[:, None], k


def _sorted_threshold(scaled: Array, k: Array, top_p: Array) -> Array:
    """`_threshold` from a full descending sort of the vocabulary (any k)."""
    return _threshold(-jnp.sort(-scaled, axis=-1), k, top_p)


def filter_logits(logits: Array, knobs: Knobs) -> Array:
    """Temperature, then top-k, then top-p (nucleus), as the original's warpers; logits (B, V).

    Both filters come from one descending ranking: the best TOP_K_CAP logits for rows whose
    top-k is that small, a full sort (done only when some row needs it) for the others. The
    choice is per row, so a row's result never depends on the other rows of its batch. Ties at
    a top-k threshold are all kept.
    """
    logits, k = _scaled_and_k(logits, knobs)
    vocab = logits.shape[-1]
    full_sort = lambda: _sorted_threshold(logits, k, knobs.top_p)  # noqa: E731
    if vocab <= TOP_K_CAP:
        threshold = full_sort()
    else:
        is_small = k <= TOP_K_CAP  # (B,)
        partial = _threshold(
            lax.top_k(logits, TOP_K_CAP)[0], jnp.minimum(k, TOP_K_CAP), knobs.top_p
        )
        full = lax.cond(jnp.all(is_small), lambda: partial, full_sort)
        threshold = jnp.where(is_small[:, None], partial, full)
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
        mixed = uncond_logits + scale * (logits - uncond_logits)
        # a row at scale 1 keeps its raw logits exactly, batched with other scales or not
        logits = jnp.where(scale == 1.0, logits, mixed)
    step_keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(state.row_keys, state.step)
    return draw(mask_ids(logits, config, only_image_codes), state.knobs, step_keys)


def draw(logits: Array, knobs: Knobs, keys: Array) -> Array:
    """One id per row, (B,), from logits (B, V) filtered as `filter_logits` does.

    A row whose top-k is 1..TOP_K_CAP draws among its TOP_K_CAP best ids only (the others are
    filtered out anyway), which needs TOP_K_CAP random numbers instead of V; the other rows draw
    over the whole filtered vocabulary. Which way a row goes depends only on its own knobs.
    """
    scaled, k = _scaled_and_k(logits, knobs)
    categorical = jax.vmap(jax.random.categorical)

    def over_vocabulary():  # filter_logits' full-sort path: any top-k, any vocabulary
        threshold = _sorted_threshold(scaled, k, knobs.top_p)
        return categorical(keys, jnp.where(scaled >= threshold, scaled, -jnp.inf)).astype(jnp.int32)

    if scaled.shape[-1] <= TOP_K_CAP:
        return over_vocabulary()
    is_small = k <= TOP_K_CAP
    ranked, ids = lax.top_k(scaled, TOP_K_CAP)  # (B, TOP_K_CAP), best first
    threshold = _threshold(ranked, jnp.minimum(k, TOP_K_CAP), knobs.top_p)
    picked = categorical(keys, jnp.where(ranked >= threshold, ranked, -jnp.inf))  # rank drawn
    from_best = jnp.take_along_axis(ids, picked[:, None], axis=-1)[:, 0].astype(jnp.int32)
    others = lax.cond(jnp.all(is_small), lambda: jnp.zeros_like(from_best), over_vocabulary)
    return jnp.where(is_small, from_best, others)


def cache_block_length(config: bart.DalleBartConfig) -> int:
    """Positions per block of the self-attention cache: a quarter of the image for decoders of
    up to `SMALL_DECODER_LAYERS` layers, the whole image (one block) for larger ones.

    Each block costs one more copy of the loop body to compile (a segment of `run_steps`) and
    saves reading the blocks after the current position: with four blocks a step reads on
    average 5/8 of the cache. Measured on a CPU (`bench/README.md`): the embedded model (3
    layers, d_model 128), where the cache is most of what a step reads, samples 1.45x faster
    (compile 7 -> 11 s); DALL·E Mini (12 layers, d_model 1024), whose steps are mostly weight
    products, gained 2-11% for twice the compile time (13 -> 27 s) and 0.34 GB more memory
    while compiling, so it keeps one block.
    """
    length = config.image_length
    if config.decoder_layers <= SMALL_DECODER_LAYERS and length % 4 == 0:
        return length // 4
    return length


SMALL_DECODER_LAYERS = 6


def init_state(params, config: bart.DalleBartConfig, input_ids: Array, attention_mask: Array,
               row_keys: Array, knobs: Knobs, uncond_ids: Array | None = None,
               uncond_mask: Array | None = None, dtype: Any = jnp.float32,
               block_length: int | None = None) -> SamplerState:  # fmt: skip
    """Encodes the prompts (and the unconditional prompt) and sets up an empty cache.

    `uncond_ids`/`uncond_mask` are (B, T), one unconditional prompt per image, or (1, T): one
    prompt shared by every image (the usual case), encoded and stored once. `block_length`
    (default `cache_block_length`; with packed weights, one block) must divide the image length.
    """
    if bart_stacks.uses_cpu_kernels(params, config):  # its attention reads one block
        if block_length not in (None, config.image_length):
            raise ValueError(
                f"block_length={block_length}: with weights packed for the CPU kernels the cache "
                f"is one block of {config.image_length}; pass block_length=None"
            )
        block_length = config.image_length
    block_length = block_length or cache_block_length(config)
    if config.image_length % block_length:
        raise ValueError(
            f"block_length={block_length} does not divide image_length={config.image_length}"
        )
    batch = row_keys.shape[0]
    rows = batch
    if uncond_ids is not None:
        if uncond_ids.shape[0] not in (1, batch):
            raise ValueError(f"uncond_ids has {uncond_ids.shape[0]} rows; expected 1 or {batch}")
        input_ids = jnp.concatenate([input_ids, uncond_ids], axis=0)
        attention_mask = jnp.concatenate([attention_mask, uncond_mask], axis=0)
        rows = 2 * batch
    encoder_hidden = bart_stacks.encode(params, config, input_ids, attention_mask, dtype)
    # the prompts' keys and values stay float32 whatever the compute dtype: XLA:CPU has no
    # bfloat16 kernel for the attention's batched products and would convert them at every step
    cross_kv = bart_stacks.cross_keys_values(params, config, encoder_hidden, dtype)
    cross_kv = jax.tree.map(lambda kv: kv.astype(jnp.float32), cross_kv)
    block_shape = (rows, config.decoder_attention_heads, block_length, config.head_dim)
    cache_dtype = bart_stacks.cache_dtype(params, config, dtype)
    empty_cache = lambda: tuple(  # noqa: E731
        tuple(jnp.zeros(block_shape, cache_dtype)
              for _ in range(config.image_length // block_length))
        for _ in range(config.decoder_layers)
    )  # fmt: skip
    sequences = jnp.full((batch, config.image_length + 1), config.decoder_start_token_id, jnp.int32)
    return SamplerState(
        step=jnp.zeros((), jnp.int32),
        sequences=sequences,
        cache_keys=empty_cache(),
        cache_values=empty_cache(),
        cross_keys=tuple(keys for keys, _ in cross_kv),
        cross_values=tuple(values for _, values in cross_kv),
        cross_bias=bart_stacks.key_bias(attention_mask)[:, 0],  # (R', 1, T)
        row_keys=row_keys,
        knobs=knobs,
    )


def run_steps(params, config: bart.DalleBartConfig, state: SamplerState, num_steps: int,
              only_image_codes: bool = True, dtype: Any = jnp.float32) -> SamplerState:  # fmt: skip
    """Samples the next `num_steps` codes (fewer if the image completes first).

    Pass params through `split_decoder_layers` first (outside `jit`): given stacked layers, the
    layers are split here, before the loop, which costs a copy of the decoder weights per call.
    """
    params = split_decoder_layers(params)
    batch = state.sequences.shape[0]
    use_uncond = state.cache_keys[0][0].shape[0] != batch
    cross_rows = state.cross_keys[0].shape[0]
    shared_rows = batch if use_uncond and cross_rows != 2 * batch else 0
    block_length = state.cache_keys[0][0].shape[2]
    cross_kv = tuple(zip(state.cross_keys, state.cross_values, strict=True))
    cross_bias = state.cross_bias
    if shared_rows:  # the prompts' rows and the shared row apart, once, not at every step
        own = cross_rows - 1
        cross_kv = tuple((bart.split_shared(keys, own), bart.split_shared(values, own))
                         for keys, values in cross_kv)  # fmt: skip
        cross_bias = bart.split_shared(cross_bias, own)

    def body(block: int, state: SamplerState) -> SamplerState:
        """A step whose position lies in `block`: reads blocks 0..block, writes `block`."""
        step = state.step
        tokens = lax.dynamic_index_in_dim(state.sequences, step, axis=1, keepdims=False)  # (B,)
        if use_uncond:
            tokens = jnp.concatenate([tokens, tokens])
        visible = tuple(
            (keys[: block + 1], values[: block + 1])
            for keys, values in zip(state.cache_keys, state.cache_values, strict=True)
        )  # fmt: skip
        logits, written = bart_stacks.decode_step(
            params, config, tokens, step, visible, cross_kv, cross_bias, dtype, shared_rows,
        )  # fmt: skip
        cond, uncond = (logits[:batch], logits[batch:]) if use_uncond else (logits, None)
        codes = next_codes(cond, uncond, state, config, only_image_codes)

        def replace(blocks: tuple[Array, ...], new: Array) -> tuple[Array, ...]:
            return blocks[:block] + (new,) + blocks[block + 1 :]

        return state.replace(
            step=step + 1,
            sequences=lax.dynamic_update_index_in_dim(state.sequences, codes, step + 1, axis=1),
            cache_keys=tuple(replace(keys, new) for keys, (new, _) in
                             zip(state.cache_keys, written, strict=True)),
            cache_values=tuple(replace(values, new) for values, (_, new) in
                               zip(state.cache_values, written, strict=True)),
        )  # fmt: skip

    end = jnp.minimum(state.step + num_steps, config.image_length)
    # one loop per block; the loops of blocks already filled (or not reached) run no step
    for block in range(len(state.cache_keys[0])):
        block_end = jnp.minimum(end, (block + 1) * block_length)
        state = lax.while_loop(lambda state, stop=block_end: state.step < stop,
                               functools.partial(body, block), state)  # fmt: skip
    return state


def split_decoder_layers(params: bart.Params, only_as_views: bool = False) -> bart.Params:
    """The same tree with the decoder layers as a tuple of per-layer trees.

    `bart_stacks.decode_step` accepts either layout. Inside a compiled loop, a layer sliced from the
    stacked arrays is a copy made at every step (XLA has no views), which on a CPU costs about as
    much as the step's own reading of the weights; split beforehand, each matrix is read in place.
    On CPU the pieces are views of the stacked buffers (no memory is added); on accelerators,
    and under tracing, they are copies, which `only_as_views` declines (returning `params`).
    """
    decoder = params["model"]["decoder"]
    stacked = bart_stacks.stacked_layers(params, "decoder")
    if isinstance(stacked, (tuple, list)):
        return params
    if only_as_views and not all(_is_on_cpu(leaf) for leaf in jax.tree.leaves(stacked)):
        return params
    count = jax.tree.leaves(stacked)[0].shape[0]
    pieces = jax.tree.map(lambda leaf: _unstack(leaf, count), stacked)
    layers = tuple(jax.tree.map(lambda leaf, i=i: leaf[i], pieces, is_leaf=_is_piece_list)
                   for i in range(count))  # fmt: skip
    return {
        **params,
        "model": {**params["model"],
                  "decoder": {**decoder, "layers": {"FlaxBartDecoderLayers": layers}}},
    }  # fmt: skip


def _is_piece_list(node) -> bool:
    return isinstance(node, list)


def _is_on_cpu(leaf) -> bool:
    return isinstance(leaf, np.ndarray) or (
        isinstance(leaf, jax.Array)
        and not isinstance(leaf, jax.core.Tracer)
        and all(device.platform == "cpu" for device in leaf.devices())
    )


def _unstack(leaf, count: int) -> list:
    if _is_on_cpu(leaf):
        host = np.asarray(leaf)  # on CPU a view of the array's buffer
        return [jax.device_put(host[i]) for i in range(count)]  # aligned pieces are not copied
    return [leaf[i] for i in range(count)]


def compiler_options(dtype: Any = jnp.float32) -> dict[str, Any]:
    """XLA options for the compiled sampling loop on this machine's default backend; the
    VQGAN's encode and decode and the DalleBart and VQGAN training steps take them too.

    On CPU, JAX 0.10 hands matrix products to YNNPACK. A sampling step multiplies a few rows
    (2 per image) by every weight matrix, and at float32 such products run 10-25% faster
    through XLA's other CPU paths (XNNPACK or Eigen; `bench/README.md` has the figures), with
    the same sampled codes; at bfloat16 YNNPACK is the faster one. Of the embedded models'
    float32 training steps (`bench/bench_train_step.py`, 2-core CPU), the VQGAN's runs
    1.19-1.25x faster with them and the DalleBart's 0.99-1.10x (within this machine's noise);
    the CLIP's runs slower (0.86x), so it keeps JAX's default. VQGAN decoding runs 1.45-2.4x
    faster (`bench/bench_vqgan.py`). The option only affects the executables it is passed to,
    never the rest of the process, and is left out where this JAX does not know it.
    """
    if jax.default_backend() != "cpu" or jnp.dtype(dtype) != jnp.float32:
        return {}
    return dict(_FLOAT32_CPU_OPTIONS) if _options_supported(_FLOAT32_CPU_OPTIONS) else {}


_FLOAT32_CPU_OPTIONS = (("xla_cpu_experimental_ynn_fusion_type", ""),)  # YNNPACK fusions off


@functools.cache
def _options_supported(options: tuple[tuple[str, Any], ...]) -> bool:
    try:
        jax.jit(jnp.negative).lower(jnp.zeros(1)).compile(compiler_options=dict(options))
    except Exception:  # an option unknown to this XLA: compile as JAX would by default
        return False
    return True


def python_run_steps(params, config, state, num_steps, only_image_codes=True, dtype=jnp.float32):
    """Debug twin of `run_steps`: a Python loop, one step at a time, for printing and pdb."""
    for _ in range(min(num_steps, config.image_length - int(state.step))):
        state = run_steps(params, config, state, 1, only_image_codes, dtype)
    return state


def row_keys_for(prng_key: Array, image_indices: Array) -> Array:
    """Image i's key is fold_in(prng_key, i): the same whatever the batch size or position."""
    return jax.vmap(jax.random.fold_in, in_axes=(None, 0))(prng_key, image_indices)
