"""DalleBart's encoder and decoder stacks: pure functions over the stacked parameters.

The layers are flax modules (`bart.py`); the stacks are functions of the published checkpoint
tree. That keeps the decoder usable two ways with one set of weights: `decode` runs a whole
teacher-forced sequence (training, conformance) with `lax.scan` over the layers, and
`decode_step` runs one token against a fixed-size key/value cache (sampling), with
cross-attention keys and values computed once per request by `cross_keys_values`.

`decode_step` is the inner loop of sampling, so it is shaped for memory traffic (on a CPU a step
is bound by reading the weights and the cache): the layers are unrolled and every layer's cache
is its own arrays in heads-first layout (R, H, S, Dh), held in blocks of positions so a step
reads only the filled ones; the attention reads them in place, with no per-layer slice,
concatenation or transpose copies, and the new key/value is written in place. On CPUs, the
matrices a step multiplies by can be packed once for a dedicated product (`pack_decoder`,
`cpu_kernels`), which XLA's own products, made for many rows, are not.
"""

from __future__ import annotations

import re
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from dalle_mini import checkpoint, cpu_kernels
from dalle_mini.models.bart import (
    _NEG_INF,
    Array,
    DalleBartConfig,
    DecoderLayer,
    EncoderLayer,
    Params,
    StackEnds,
    _dense,
    _dot_float32,
)


def _ends(config: DalleBartConfig, side: str, dtype: Any) -> StackEnds:
    if side == "encoder":
        return StackEnds(config, config.encoder_vocab_size, config.max_text_length, dtype)
    return StackEnds(config, config.image_vocab_size + 1, config.image_length, dtype)


def key_bias(attention_mask: Array) -> Array:
    """(B, T) 1/0 mask -> additive bias (B, 1, 1, T) over the keys."""
    return jnp.where(attention_mask[:, None, None, :] > 0, 0.0, _NEG_INF)


def stacked_layers(params: Params, side: str) -> Params:
    stack = params["model"][side]["layers"]
    return stack["FlaxBartEncoderLayers" if side == "encoder" else "FlaxBartDecoderLayers"]


def init_params(config: DalleBartConfig, rng: Array) -> Params:
    """Fresh random parameters in the published (scanned) layout."""
    keys = jax.random.split(rng, 5)
    text = jnp.zeros((1, config.max_text_length), jnp.int32)
    codes = jnp.zeros((1, config.image_length), jnp.int32)
    hidden = jnp.zeros((1, config.max_text_length, config.d_model))
    bias = jnp.zeros((1, 1, 1, config.max_text_length))

    def stacked(layer, count, key, *args):
        init_one = lambda k: layer.init(k, *args)["params"]  # noqa: E731
        return jax.vmap(init_one)(jax.random.split(key, count))

    encoder = _ends(config, "encoder", jnp.float32).init(keys[0], text, method=StackEnds.init_all)
    decoder = _ends(config, "decoder", jnp.float32).init(keys[1], codes, method=StackEnds.init_all)
    image_hidden = jnp.zeros((1, config.image_length, config.d_model))
    encoder_layers = stacked(EncoderLayer(config), config.encoder_layers, keys[2], hidden, bias)
    decoder_layers = stacked(
        DecoderLayer(config), config.decoder_layers, keys[3], image_hidden, hidden, bias
    )
    lm_head = _dense(config, config.image_vocab_size + 1, jnp.float32).init(keys[4], hidden)
    return {
        "model": {
            "encoder": {**encoder["params"], "layers": {"FlaxBartEncoderLayers": encoder_layers}},
            "decoder": {**decoder["params"], "layers": {"FlaxBartDecoderLayers": decoder_layers}},
        },
        "lm_head": lm_head["params"],
    }


def _run_stack(params: Params, config: DalleBartConfig, side: str, ids: Array,
               layer: EncoderLayer | DecoderLayer, *layer_args: Array,
               unroll: bool = False) -> Array:  # fmt: skip
    """Embeds token ids (B, T), runs every layer of one side ("encoder" or "decoder") over them
    (`layer` applied with `layer_args` after the hidden states), then the side's final norms.
    `unroll` lays the layers out one after another instead of a loop: longer to compile, faster
    to run (training a 3-layer decoder: 12% per step)."""
    ends = _ends(config, side, layer.dtype)
    stack = params["model"][side]
    positions = jnp.arange(ids.shape[1])[None]
    hidden = ends.apply({"params": stack}, ids, positions, method=StackEnds.embed)

    def body(h, layer_params):
        return layer.apply({"params": layer_params}, h, *layer_args), None

    hidden, _ = lax.scan(body, hidden, stacked_layers(params, side), unroll=unroll)
    return ends.apply({"params": stack}, hidden, method=StackEnds.finish)


def encode(params: Params, config: DalleBartConfig, input_ids: Array, attention_mask: Array,
           dtype: Any = jnp.float32, unroll: bool = False) -> Array:  # fmt: skip
    """Prompt tokens (B, T) -> encoder hidden states (B, T, D), padding positions included."""
    layer = EncoderLayer(config, dtype)
    return _run_stack(params, config, "encoder", input_ids, layer, key_bias(attention_mask),
                      unroll=unroll)  # fmt: skip


def _lm_head(params: Params, config: DalleBartConfig, hidden: Array, dtype: Any) -> Array:
    """Logits in float32, accumulated in float32 whatever the compute dtype."""
    head = _dense(config, config.image_vocab_size + 1, dtype, dot_general=_dot_float32,
                  float32_output=True)  # fmt: skip
    return head.apply({"params": params["lm_head"]}, hidden).astype(jnp.float32)


def decode(params: Params, config: DalleBartConfig, decoder_input_ids: Array,
           encoder_hidden: Array, attention_mask: Array,
           dtype: Any = jnp.float32, unroll: bool = False) -> Array:  # fmt: skip
    """Teacher-forced logits (B, T, image_vocab_size + 1) for decoder inputs (B, T)."""
    layer = DecoderLayer(config, dtype)
    hidden = _run_stack(params, config, "decoder", decoder_input_ids, layer, encoder_hidden,
                        key_bias(attention_mask), unroll=unroll)  # fmt: skip
    return _lm_head(params, config, hidden, dtype)


# The decoder matrices a sampling step multiplies by (the cross-attention's keys and values are
# computed once per prompt, by the plain products, which are faster for that many rows).
_STEP_MATRIX = re.compile(
    r"^(FlaxBartAttention_0/(q|k|v|out)_proj|FlaxBartAttention_1/(q|out)_proj|GLU_0/Dense_\d)/kernel$"
)
# Below this width the decoder's matrices stay in the CPU's caches and XLA's products keep up.
PACK_MIN_D_MODEL = 512


def pack_problem(dtype: Any, param_dtype: Any) -> str | None:
    """Why `pack_decoder`'s weights could not be used here, or None: the CPU kernel for
    `param_dtype` must be available (float32, or bfloat16 on CPUs with AVX-512 BF16) and the
    model compute in that dtype."""
    problem = cpu_kernels.unavailable_reason(param_dtype)
    if problem is None and jnp.dtype(dtype) != jnp.dtype(param_dtype):
        return "the CPU kernel computes in its weights' dtype"
    return problem


def should_pack(config: DalleBartConfig, dtype: Any, param_dtype: Any) -> bool:
    """Whether `pack_decoder` pays here: it can be used (`pack_problem`) and the decoder is at
    least `PACK_MIN_D_MODEL` wide."""
    return config.d_model >= PACK_MIN_D_MODEL and pack_problem(dtype, param_dtype) is None


def pack_decoder(params: Params) -> Params:
    """Packs the matrices a sampling step multiplies by (every decoder layer's self-attention
    projections, cross-attention query and output, GLU, and the lm_head) for
    `cpu_kernels.matmul`. The numbers are unchanged and every function here accepts the result.

    Works in place, one stacked matrix at a time, so each plain matrix is released as soon as
    its packed copy exists (the weights are not held twice); returns `params`. Accepts a tree
    of `jax.ShapeDtypeStruct` (giving the packed shapes) as well.
    """
    layers = stacked_layers(params, "decoder")
    if isinstance(layers, (tuple, list)):
        raise ValueError("pack_decoder needs the stacked layout (before split_decoder_layers)")
    for path in checkpoint.flatten(layers):
        if _STEP_MATRIX.match(path):
            _pack_in_place(layers, path)
    _pack_in_place(params, "lm_head/kernel")
    return params


def is_packed(params: Params) -> bool:
    """Whether `pack_decoder` packed these weights."""
    return isinstance(params["lm_head"]["kernel"], cpu_kernels.PackedKernel)


def uses_cpu_kernels(params: Params, config: DalleBartConfig) -> bool:
    """Whether sampling steps run on the CPU kernels: the weights are packed (`pack_decoder`)
    and the heads' width suits the attention kernel (a multiple of 16, at most 256)."""
    return is_packed(params) and config.head_dim % 16 == 0 and config.head_dim <= 256


def cache_dtype(params: Params, config: DalleBartConfig, dtype: Any) -> Any:
    """The self-attention cache's dtype: where the CPU kernel reads it, the compute dtype's
    values, as the original keeps them (bfloat16 as its bits in uint16:
    `cpu_kernels.cache_dtype`); else float32, since XLA:CPU has no bfloat16 kernel for the
    attention's batched products and would convert a bfloat16 cache at every step."""
    if uses_cpu_kernels(params, config):
        return cpu_kernels.cache_dtype(dtype)
    return jnp.float32


def unpack(params: Params) -> Params:
    """The tree with every packed matrix back in its plain (..., K, N) form (a new tree)."""
    return jax.tree.map(
        lambda leaf: leaf.unpack() if isinstance(leaf, cpu_kernels.PackedKernel) else leaf,
        params,
        is_leaf=lambda leaf: isinstance(leaf, cpu_kernels.PackedKernel),
    )


def _pack_in_place(tree: dict, path: str) -> None:
    """Packs the leaf at `path` ("a/b/kernel"), dropping the tree's reference to the plain
    matrix before the packed copy is made; a packed leaf stays as it is."""
    *parents, name = path.split("/")
    for key in parents:
        tree = tree[key]
    leaf = tree.pop(name)
    tree[name] = leaf if isinstance(leaf, cpu_kernels.PackedKernel) else cpu_kernels.pack(leaf)


def _layer_params(params: Params, side: str, index: int) -> Params:
    """One layer's parameters, from the stacked layout or a tuple of layers (as
    `sampling.split_decoder_layers` makes)."""
    layers = stacked_layers(params, side)
    if isinstance(layers, (tuple, list)):
        return layers[index]
    return jax.tree.map(lambda leaf: leaf[index], layers)


def cross_keys_values(params: Params, config: DalleBartConfig, encoder_hidden: Array,
                      dtype: Any = jnp.float32) -> tuple[tuple[Array, Array], ...]:  # fmt: skip
    """Every decoder layer's cross-attention (keys, values), heads first: (B, H, T, Dh) each."""
    layer = DecoderLayer(config, dtype)
    return tuple(
        layer.apply({"params": _layer_params(params, "decoder", i)}, encoder_hidden,
                    method=lambda module, h: module.FlaxBartAttention_1.heads_first_keys_values(h))
        for i in range(config.decoder_layers)
    )  # fmt: skip


def decode_step(params: Params, config: DalleBartConfig, tokens: Array, index: Array,
                cache_kv: tuple[tuple[tuple[Array, ...], tuple[Array, ...]], ...],
                cross_kv: tuple[tuple[Array, Array], ...],
                cross_bias: Array, dtype: Any = jnp.float32, shared_rows: int = 0):  # fmt: skip
    """Logits for the token after `tokens` (R,) at position `index`, and the updated cache.

    Args:
      cache_kv: per layer, self-attention (key blocks, value blocks): the layer's cache split
        along positions into blocks of one length, (R, H, S_block, Dh) each, from position 0
        up to the block holding `index` (the blocks after it are not read). This token's key
        and value are written into that last block (in place inside a compiled loop).
      cross_kv: per layer, from `cross_keys_values`; cross_bias (R', 1, T): 0 or -inf per
        prompt position, one row per cross_kv row.
      shared_rows: when > 0, the last `shared_rows` rows share the last cross_kv row; the
        keys, values and cross_bias may then come as `bart.split_shared` pairs.
    Returns:
      logits (R, image_vocab_size + 1) in float32 and, per layer, the updated last
      (keys, values) block.
    """
    ends = _ends(config, "decoder", dtype)
    decoder = params["model"]["decoder"]
    positions = jnp.broadcast_to(index, tokens.shape)
    hidden = ends.apply({"params": decoder}, tokens, positions, method=StackEnds.embed)  # (R, D)
    block_keys = cache_kv[0][0]
    block_length = block_keys[-1].shape[2]
    offset = index - (len(block_keys) - 1) * block_length
    cache_bias = jnp.where(jnp.arange(block_length) <= offset, 0.0, _NEG_INF)  # (S_block,)
    layer = DecoderLayer(config, dtype)
    use_kernel = uses_cpu_kernels(params, config)  # then the cache is one block (init_state)
    new_cache = []
    for i in range(config.decoder_layers):  # unrolled: each layer's cache is read in place
        hidden, layer_cache = layer.apply(
            {"params": _layer_params(params, "decoder", i)}, hidden, offset, cache_kv[i],
            cache_bias, cross_kv[i], cross_bias, shared_rows, use_kernel, method=DecoderLayer.step,
        )  # fmt: skip
        new_cache.append(layer_cache)
    hidden = ends.apply({"params": decoder}, hidden, method=StackEnds.finish)
    return _lm_head(params, config, hidden, dtype), tuple(new_cache)
