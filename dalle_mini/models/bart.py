"""DalleBart: the BART-style text-to-image-codes transformer of DALL·E Mini / Mega, in flax.linen.

Follows the published architecture (normformer LayerNorm placement, GLU feed-forward, no biases,
separate text and image embeddings; `../shared/dalle-mini-facts.md` §1–2). This file holds the
configuration and the layers; `bart_stacks.py` runs them as encoder and decoder stacks over the
published checkpoints' parameters (scanned layout: every layer's leaves stacked along a leading
axis under `layers/FlaxBartEncoderLayers` and `FlaxBartDecoderLayers`).

Matrix products accumulate in float32 (`preferred_element_type`), which for bfloat16 inputs is
both more exact and, on CPUs, several times faster than a bfloat16-output product.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from dalle_mini import cpu_kernels

Array = jax.Array
Params = dict[str, Any]
_NEG_INF = -1e30  # finite, so a row with every key masked yields uniform weights, not NaN

# Options of the original configuration class that this implementation does not support, with
# the only value it accepts. Published DALL·E Mini / Mega use exactly these.
_FIXED_OPTIONS = {
    "ln_positions": "normformer",
    "ln_type": "layernorm",
    "use_glu": True,
    "use_bias": False,
    "activation_function": "gelu",
    "scale_embedding": False,
    "use_cosine_attention": False,
    "use_head_scale": False,
    "use_deepnet_scaling": False,
    "use_alibi": False,
    "use_swin_position_embeddings": False,
    "use_absolute_position_embeddings": True,
    "use_final_ln_encoder": True,
    "use_final_ln_decoder": True,
    "tie_word_embeddings": False,
    "force_ln_scale": False,
    "use_subln_init": False,
}


@dataclasses.dataclass(frozen=True)
class DalleBartConfig:
    """Sizes of one DalleBart. Field names are those of the published config.json."""

    encoder_vocab_size: int
    image_vocab_size: int  # the embedding and lm_head have image_vocab_size + 1 rows
    d_model: int
    encoder_layers: int
    decoder_layers: int
    encoder_attention_heads: int
    decoder_attention_heads: int
    encoder_ffn_dim: int
    decoder_ffn_dim: int
    decoder_start_token_id: int  # also the number of VQGAN codes: ids below it are codes
    bos_token_id: int
    eos_token_id: int
    pad_token_id: int
    max_text_length: int = 64
    image_length: int = 256
    init_std: float = 0.02
    normalize_text: bool = True
    top_k: int = 50  # what the original samples with when generate() is given top_k=None
    # what the pipeline samples with when given no condition scale (the published notebook's 10;
    # a small model trained briefly follows its prompt best at a lower scale)
    condition_scale: float = 10.0

    @property
    def num_codes(self) -> int:
        return self.decoder_start_token_id

    @property
    def head_dim(self) -> int:
        return self.d_model // self.decoder_attention_heads

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> DalleBartConfig:
        """Builds a config from a published config.json, refusing options it cannot honour."""
        for key, accepted in _FIXED_OPTIONS.items():
            if key in values and values[key] != accepted:
                raise ValueError(
                    f"config option {key}={values[key]!r} is not supported (only {accepted!r}, "
                    "as in the published DALL·E Mini / Mega checkpoints)"
                )
        names = {field.name for field in dataclasses.fields(cls)}
        missing = sorted(
            field.name
            for field in dataclasses.fields(cls)
            if field.default is dataclasses.MISSING and field.name not in values
        )
        if missing:
            raise ValueError(f"DalleBart config lacks {', '.join(missing)}")
        return cls(**{key: value for key, value in values.items() if key in names})

    def to_dict(self) -> dict[str, Any]:
        """The config.json of this model, readable by the original implementation too."""
        length = self.image_length + 1
        return {
            **dataclasses.asdict(self),
            **_FIXED_OPTIONS,
            "model_type": "dallebart",
            "architectures": ["DalleBart"],
            "min_length": length,
            "max_length": length,
            "do_sample": True,
            "dropout": 0.0,
            "attention_dropout": 0.0,
            "activation_dropout": 0.0,
            "use_scan": True,
            "is_encoder_decoder": True,
        }

    @classmethod
    def mini(cls) -> DalleBartConfig:
        """`dalle-mini/dalle-mini` (mini-1): 437,833,712 parameters."""
        return cls(
            encoder_vocab_size=50264, image_vocab_size=16384, d_model=1024,
            encoder_layers=12, decoder_layers=12,
            encoder_attention_heads=16, decoder_attention_heads=16,
            encoder_ffn_dim=2730, decoder_ffn_dim=2730,
            decoder_start_token_id=16384, bos_token_id=16385, eos_token_id=16385,
            pad_token_id=16385, init_std=0.02,
        )  # fmt: skip

    @classmethod
    def mega(cls) -> DalleBartConfig:
        """`dalle-mini/dalle-mega` (mega-1): 2,587,521,024 parameters."""
        return dataclasses.replace(
            cls.mini(), encoder_vocab_size=50272, image_vocab_size=16415, d_model=2048,
            encoder_layers=24, decoder_layers=24,
            encoder_attention_heads=32, decoder_attention_heads=32,
            encoder_ffn_dim=4096, decoder_ffn_dim=4096, init_std=0.01,
        )  # fmt: skip


def _layer_norm(dtype: Any, use_scale: bool = True) -> nn.LayerNorm:
    return nn.LayerNorm(epsilon=1e-5, use_scale=use_scale, dtype=dtype)


def _dot_float32(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None):
    """`lax.dot_general` accumulating (and returning) float32 whatever the input dtype."""
    del preferred_element_type
    return lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                           preferred_element_type=jnp.float32)  # fmt: skip


def _dot_accumulate_float32(lhs, rhs, dimension_numbers, precision=None,
                            preferred_element_type=None):  # fmt: skip
    """Accumulates in float32, returns the input dtype."""
    return _dot_float32(lhs, rhs, dimension_numbers, precision).astype(lhs.dtype)


class Projection(nn.Dense):
    """`nn.Dense` whose kernel may also come packed for the CPU kernel (`cpu_kernels`), as
    `pack_decoder` leaves the decoder's matrices on CPUs: then the product runs there."""

    float32_output: bool = False  # as `_dot_float32` gives: the packed product's own float32

    def __call__(self, inputs: Array) -> Array:
        kernel = self.get_variable("params", "kernel")
        if isinstance(kernel, cpu_kernels.PackedKernel):
            out = cpu_kernels.matmul(inputs, kernel)  # float32 sums, as _dot_accumulate_float32
            return out if self.float32_output else out.astype(self.dtype or inputs.dtype)
        return super().__call__(inputs)


def _dense(config: DalleBartConfig, features: int, dtype: Any, **kwargs) -> Projection:
    init = nn.initializers.normal(config.init_std)
    kwargs.setdefault("dot_general", _dot_accumulate_float32)
    return Projection(features, use_bias=False, dtype=dtype, kernel_init=init, **kwargs)


def _split_heads(x: Array, num_heads: int) -> Array:
    return x.reshape(*x.shape[:-1], num_heads, -1)  # (B, T, H, Dh)


def _softmax_attend(q: Array, keys: Array, values: Array, bias: Array) -> Array:
    """Scaled dot-product attention; softmax in float32 whatever the compute dtype."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    scores = jnp.einsum("bqhd,bkhd->bhqk", q * scale, keys)  # (B, H, Tq, Tk)
    weights = jax.nn.softmax(scores.astype(jnp.float32) + bias, axis=-1)
    return jnp.einsum("bhqk,bkhd->bqhd", weights.astype(values.dtype), values)


def _attend_one(q: Array, keys, values, bias) -> Array:
    """One query per row against heads-first keys/values held in one or more blocks of
    positions: q (B, H, Dh); keys and values each a tuple of blocks (B, H, S_j, Dh), or
    (H, S_j, Dh) shared by every row; bias a tuple with, per block, None (every position
    visible) or an array broadcasting to (B, H, S_j). The softmax runs over all blocks together;
    each block is read whole, in place (a slice of one big array would be copied first)."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    rows = "bhsd" if keys[0].ndim == 4 else "hsd"
    scores = []
    for block_keys, block_bias in zip(keys, bias, strict=True):
        block = jnp.einsum(f"bhd,{rows}->bhs", q * scale, block_keys,
                           preferred_element_type=jnp.float32)  # (B, H, S_j)  # fmt: skip
        scores.append(block if block_bias is None else block + block_bias)
    weights = jax.nn.softmax(jnp.concatenate(scores, axis=-1) if len(scores) > 1 else scores[0],
                             axis=-1).astype(values[0].dtype)  # fmt: skip
    parts, start = [], 0
    for block_values in values:
        length = block_values.shape[-2]
        parts.append(jnp.einsum(f"bhs,{rows}->bhd", weights[..., start : start + length],
                                block_values, preferred_element_type=jnp.float32))  # fmt: skip
        start += length
    return sum(parts[1:], parts[0]).astype(q.dtype)  # (B, H, Dh)


def split_shared(array: Array | tuple[Array, Array], own: int) -> tuple[Array, Array]:
    """(R, ...) rows -> (the first `own` rows, the shared last row); a pair passes as it is."""
    return array if isinstance(array, tuple) else (array[:own], array[own])


class Attention(nn.Module):
    """Multi-head attention with bias-free q/k/v/out projections (`FlaxBartAttention_i`)."""

    config: DalleBartConfig
    num_heads: int
    dtype: Any = jnp.float32

    def setup(self):
        d = self.config.d_model
        self.q_proj = _dense(self.config, d, self.dtype)
        self.k_proj = _dense(self.config, d, self.dtype)
        self.v_proj = _dense(self.config, d, self.dtype)
        self.out_proj = _dense(self.config, d, self.dtype)

    def keys_values(self, x: Array) -> tuple[Array, Array]:
        return _split_heads(self.k_proj(x), self.num_heads), _split_heads(
            self.v_proj(x), self.num_heads
        )

    def attend(self, x: Array, keys: Array, values: Array, bias: Array) -> Array:
        q = _split_heads(self.q_proj(x), self.num_heads)  # (B, T, H, Dh)
        context = _softmax_attend(q, keys, values, bias)  # (B, T, H, Dh)
        return self.out_proj(context.reshape(*x.shape[:-1], -1))

    def __call__(self, x: Array, kv_input: Array, bias: Array) -> Array:
        return self.attend(x, *self.keys_values(kv_input), bias)

    def heads_first_keys_values(self, x: Array) -> tuple[Array, Array]:
        """Keys and values (B, H, T, Dh): the layout the cached attention reads in place."""
        return tuple(kv.transpose(0, 2, 1, 3) for kv in self.keys_values(x))

    def attend_one(self, x: Array, keys: Array, values: Array, bias: Array,
                   shared_rows: int = 0) -> Array:  # fmt: skip
        """One token per row, x (B, D), against heads-first keys/values (R, H, S, Dh).

        With `shared_rows` > 0, R = B - shared_rows + 1: the last `shared_rows` rows of x all
        attend to the last row of keys/values (the unconditional prompt, stored once). keys,
        values and bias may then also come as `split_shared` pairs, split once outside a loop
        (inside one, each step would copy the rows out of the array).
        """
        q = self.q_proj(x).reshape(x.shape[0], self.num_heads, -1)  # (B, H, Dh)
        if shared_rows:
            own = x.shape[0] - shared_rows
            (keys, shared_keys), (values, shared_values), (bias, shared_bias) = (
                split_shared(array, own) for array in (keys, values, bias)
            )
            context = jnp.concatenate([
                _attend_one(q[:own], (keys,), (values,), (bias,)),
                _attend_one(q[own:], (shared_keys,), (shared_values,), (shared_bias,)),
            ])  # fmt: skip
        else:
            context = _attend_one(q, (keys,), (values,), (bias,))  # (B, H, Dh)
        return self.out_proj(context.reshape(x.shape))

    def attend_one_blocks(self, x: Array, keys: tuple[Array, ...], values: tuple[Array, ...],
                          bias: tuple[Array | None, ...]) -> Array:  # fmt: skip
        """One token per row, x (B, D), against keys/values in blocks (B, H, S_j, Dh) each."""
        q = self.q_proj(x).reshape(x.shape[0], self.num_heads, -1)  # (B, H, Dh)
        return self.out_proj(_attend_one(q, keys, values, bias).reshape(x.shape))

    def attend_one_filled(self, x: Array, keys: Array, values: Array, length: Array) -> Array:
        """One token per row, x (B, D), against the first `length` positions of keys/values
        (B, H, S, Dh), by the CPU kernel, which reads no position past them."""
        q = self.q_proj(x).reshape(x.shape[0], self.num_heads, -1)  # (B, H, Dh)
        q = q.astype(jnp.float32) * (1.0 / math.sqrt(q.shape[-1]))
        context = cpu_kernels.cached_attention(q, keys, values, length)  # (B, H, Dh)
        return self.out_proj(context.astype(x.dtype).reshape(x.shape))


class GLU(nn.Module):
    """Gated feed-forward with normformer's inner LayerNorms (`GLU_0`)."""

    config: DalleBartConfig
    ffn_dim: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        x = _layer_norm(self.dtype, use_scale=False)(x)
        dense = lambda features, i: _dense(self.config, features, self.dtype, name=f"Dense_{i}")  # noqa: E731
        gate = nn.gelu(dense(self.ffn_dim, 0)(x), approximate=False)
        x = gate * dense(self.ffn_dim, 1)(x)  # (B, T, F)
        x = _layer_norm(self.dtype, use_scale=False)(x)
        return dense(self.config.d_model, 2)(x)


class EncoderLayer(nn.Module):
    config: DalleBartConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array, bias: Array) -> Array:
        c = self.config
        h = _layer_norm(self.dtype, use_scale=False)(x)
        h = Attention(c, c.encoder_attention_heads, self.dtype, name="FlaxBartAttention_0")(
            h, h, bias
        )
        x = x + _layer_norm(self.dtype)(h)
        return x + GLU(c, c.encoder_ffn_dim, self.dtype, name="GLU_0")(x)


class DecoderLayer(nn.Module):
    """Causal self-attention, cross-attention over the prompt, GLU; each normformer-wrapped."""

    config: DalleBartConfig
    dtype: Any = jnp.float32

    def setup(self):
        c, dtype = self.config, self.dtype
        self.LayerNorm_0 = _layer_norm(dtype, use_scale=False)
        self.FlaxBartAttention_0 = Attention(c, c.decoder_attention_heads, dtype)
        self.LayerNorm_1 = _layer_norm(dtype)
        self.LayerNorm_2 = _layer_norm(dtype, use_scale=False)
        self.FlaxBartAttention_1 = Attention(c, c.decoder_attention_heads, dtype)
        self.LayerNorm_3 = _layer_norm(dtype)
        self.GLU_0 = GLU(c, c.decoder_ffn_dim, dtype)

    def cross_keys_values(self, encoder_hidden: Array) -> tuple[Array, Array]:
        return self.FlaxBartAttention_1.keys_values(encoder_hidden)

    def _cross_and_ffn(self, x: Array, cross_kv, cross_bias: Array) -> Array:
        h = self.FlaxBartAttention_1.attend(self.LayerNorm_2(x), *cross_kv, cross_bias)
        x = x + self.LayerNorm_3(h)
        return x + self.GLU_0(x)

    def __call__(self, x: Array, encoder_hidden: Array, cross_bias: Array) -> Array:
        """Teacher-forced: the whole sequence at once, causal mask."""
        length = x.shape[1]
        causal = jnp.tril(jnp.ones((length, length), bool))
        self_bias = jnp.where(causal, 0.0, _NEG_INF)[None, None]  # (1, 1, T, T)
        h = self.LayerNorm_0(x)
        h = self.FlaxBartAttention_0(h, h, self_bias)
        x = x + self.LayerNorm_1(h)
        return self._cross_and_ffn(x, self.cross_keys_values(encoder_hidden), cross_bias)

    def step(self, x: Array, offset: Array, cache_kv, cache_bias: Array, cross_kv,
             cross_bias: Array, shared_rows: int = 0, use_kernel: bool = False):  # fmt: skip
        """One new token per row, x (B, D).

        `cache_kv` is (key blocks, value blocks): the blocks of this layer's cache (B, H, S_j, Dh)
        from the first position up to the block this token goes in, the last one. The token's
        key and value are written there at `offset`; the earlier blocks are all visible and the
        last one is masked past `offset` by `cache_bias` (S_last,). Then attends over the prompt.
        Returns the hidden state and the updated last (keys, values) block. `use_kernel`: one
        block, attended by the CPU kernel (`Attention.attend_one_filled`).
        """
        attention = self.FlaxBartAttention_0
        h = self.LayerNorm_0(x)
        new_kv = attention.keys_values(h)  # (B, H, Dh) each: one token, heads already split
        last = tuple(  # as the cache holds them (bfloat16 for the CPU kernel: its bits)
            lax.dynamic_update_index_in_dim(
                blocks[-1], cpu_kernels.to_cache(new, blocks[-1].dtype), offset, 2
            )
            for blocks, new in zip(cache_kv, new_kv, strict=True)
        )
        keys, values = (blocks[:-1] + (new,) for blocks, new in zip(cache_kv, last, strict=True))
        if use_kernel:
            context = attention.attend_one_filled(h, keys[0], values[0], offset + 1)
        else:
            bias = (None,) * (len(keys) - 1) + (cache_bias,)
            context = attention.attend_one_blocks(h, keys, values, bias)
        x = x + self.LayerNorm_1(context)
        h = self.FlaxBartAttention_1.attend_one(
            self.LayerNorm_2(x), *cross_kv, cross_bias, shared_rows
        )
        x = x + self.LayerNorm_3(h)
        return x + self.GLU_0(x), last


class StackEnds(nn.Module):
    """The non-layer parts of a stack: token and position embeddings, their LayerNorm, final_ln."""

    config: DalleBartConfig
    vocab_size: int
    num_positions: int
    dtype: Any = jnp.float32

    def setup(self):
        init = nn.initializers.normal(self.config.init_std)
        d = self.config.d_model
        self.embed_tokens = nn.Embed(self.vocab_size, d, embedding_init=init, dtype=self.dtype)
        self.embed_positions = nn.Embed(
            self.num_positions, d, embedding_init=init, dtype=self.dtype
        )
        self.layernorm_embedding = _layer_norm(self.dtype)
        self.final_ln = _layer_norm(self.dtype, use_scale=False)

    def embed(self, ids: Array, positions: Array) -> Array:
        return self.layernorm_embedding(self.embed_tokens(ids) + self.embed_positions(positions))

    def finish(self, x: Array) -> Array:
        return self.final_ln(x)

    def init_all(self, ids: Array) -> Array:
        return self.finish(self.embed(ids, jnp.zeros_like(ids)))
