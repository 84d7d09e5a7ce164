"""The VQGAN's building blocks: ResnetBlock, AttnBlock, Up/Downsample, Encoder, Decoder, quantizer.

Follows taming-transformers (`taming/modules/diffusionmodules/model.py`, `VectorQuantizer`) as
ported to Flax by vqgan-jax, which produced the published `dalle-mini/vqgan_imagenet_f16_16384`
checkpoint. Submodule names are those of that checkpoint (`down_0/block_1/norm1`, `mid/attn_1/q`,
`up_4/upsample/conv`, `quantize/embedding/embedding`, ...) so it loads without renaming.

Everything is NHWC. Convolutions, norms and attention compute in `dtype` (float32 or bfloat16);
parameters are always float32, and the quantizer's distances are always float32 so that bfloat16
compute cannot flip which code is nearest through rounding alone.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

if TYPE_CHECKING:
    from dalle_mini.models.vqgan import VQGANConfig

NUM_GROUPS = 32  # taming's Normalize(): GroupNorm(32, eps=1e-6) everywhere
GROUP_NORM_EPSILON = 1e-6

Dtype = Any


def _group_norm(dtype: Dtype, name: str, num_groups: int = NUM_GROUPS) -> nn.GroupNorm:
    # Two-pass variance: E[x²] − E[x]² loses digits on the large activations of the decoder.
    return nn.GroupNorm(
        num_groups=num_groups,
        epsilon=GROUP_NORM_EPSILON,
        use_fast_variance=False,
        dtype=dtype,
        name=name,
    )


def _conv(features: int, kernel: int, dtype: Dtype, name: str, strides: int = 1, padding="SAME"):
    return nn.Conv(
        features,
        kernel_size=(kernel, kernel),
        strides=(strides, strides),
        padding=padding,
        dtype=dtype,
        name=name,
    )


class ResnetBlock(nn.Module):
    """GroupNorm → swish → 3×3 conv, twice (dropout before the second), plus the residual.

    A 1×1 `nin_shortcut` maps the residual when the channel count changes.
    """

    out_channels: int
    dropout_rate: float = 0.0
    dtype: Dtype = jnp.float32
    norm_groups: int = NUM_GROUPS

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        h = nn.swish(_group_norm(self.dtype, "norm1", self.norm_groups)(x))
        h = _conv(self.out_channels, 3, self.dtype, "conv1")(h)  # (B, H, W, C_out)
        h = nn.swish(_group_norm(self.dtype, "norm2", self.norm_groups)(h))
        h = nn.Dropout(self.dropout_rate)(h, deterministic=not train)
        h = _conv(self.out_channels, 3, self.dtype, "conv2")(h)
        if x.shape[-1] != self.out_channels:
            x = _conv(self.out_channels, 1, self.dtype, "nin_shortcut")(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all H×W positions, 1×1 convs for q, k, v and output."""

    dtype: Dtype = jnp.float32
    norm_groups: int = NUM_GROUPS

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        batch, height, width, channels = x.shape
        h = _group_norm(self.dtype, "norm", self.norm_groups)(x)
        q, k, v = (_conv(channels, 1, self.dtype, name)(h) for name in ("q", "k", "v"))
        q, k, v = (t.reshape(batch, height * width, channels) for t in (q, k, v))  # (B, N, C)
        scores = jnp.einsum("bqc,bkc->bqk", q, k) * channels**-0.5  # (B, N, N)
        weights = jax.nn.softmax(scores.astype(jnp.float32), axis=-1).astype(v.dtype)
        h = jnp.einsum("bqk,bkc->bqc", weights, v).reshape(batch, height, width, channels)
        return x + _conv(channels, 1, self.dtype, "proj_out")(h)


class Downsample(nn.Module):
    """Halves H and W: pad one row/column at the bottom/right, then a 3×3 stride-2 VALID conv
    (taming's asymmetric padding), or a 2×2 average pool when `use_conv` is false."""

    use_conv: bool = True
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if not self.use_conv:
            return nn.avg_pool(x, window_shape=(2, 2), strides=(2, 2), padding="VALID")
        x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
        return _conv(x.shape[-1], 3, self.dtype, "conv", strides=2, padding="VALID")(x)


class Upsample(nn.Module):
    """Doubles H and W by nearest-neighbour repetition, then a 3×3 conv when `use_conv`."""

    use_conv: bool = True
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if self.use_conv:
            return UpsampledConv(x.shape[-1], self.dtype, name="conv")(x)
        return _repeat_twice(x)


def _repeat_twice(x: jax.Array) -> jax.Array:
    """Exact ×2 nearest neighbour, written as a broadcast (cheaper than jax.image.resize)."""
    batch, height, width, channels = x.shape
    x = jnp.broadcast_to(x[:, :, None, :, None, :], (batch, height, 2, width, 2, channels))
    return x.reshape(batch, 2 * height, 2 * width, channels)  # (B, 2H, 2W, C)


# Which of the 3 taps of a kernel row (column) fall on each of the 2 input rows (columns) an
# output row of phase p sees: (phase, tap, kernel index). Output row 2i reads repeated rows
# 2i - 1, 2i, 2i + 1 = input rows i - 1, i, i; output row 2i + 1 reads input rows i, i, i + 1.
_PHASE_TAPS = np.array([[[1, 0, 0], [0, 1, 1]], [[1, 1, 0], [0, 0, 1]]], np.float32)
SUBPIXEL_MIN_PIXELS = 32 * 32  # below this the plain path measured faster (16×16, 512 channels)


class UpsampledConv(nn.Module):
    """The 3×3 SAME convolution of x's ×2 nearest-neighbour repetition, with `nn.Conv`'s
    parameters (`kernel` (3, 3, C, F), `bias` (F,)), so published checkpoints load unchanged.

    Every output pixel of phase (p, q) (row 2i + p, column 2j + q) sees just 2×2 input pixels,
    so from 32×32 inputs up it runs as one 2×2 convolution of x with the taps folded per phase
    and 4F outputs: 16 products per input pixel and output channel instead of 36, and the
    repeated image is never built. Equal to the plain path up to float rounding.
    """

    features: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.param(
            "kernel",
            nn.initializers.lecun_normal(),
            (3, 3, x.shape[-1], self.features),
            jnp.float32,
        )
        bias = self.param("bias", nn.initializers.zeros_init(), (self.features,), jnp.float32)
        batch, height, width, channels = x.shape
        if height * width < SUBPIXEL_MIN_PIXELS:
            x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
            return _conv_nhwc(_repeat_twice(x), kernel, "SAME") + bias
        # taps folded in float32, then cast like nn.Conv's kernel (bfloat16 sums would round)
        folded = jnp.einsum("pai,qbj,ijcf->abcpqf", _PHASE_TAPS, _PHASE_TAPS, kernel)
        folded = folded.reshape(2, 2, channels, 4 * self.features)  # (2, 2, C, 4F)
        x, folded, bias = nn.dtypes.promote_dtype(x, folded, bias, dtype=self.dtype)
        padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
        out = _conv_nhwc(padded, folded, "VALID")  # (B, H + 1, W + 1, 4F)
        out = out.reshape(batch, height + 1, width + 1, 2, 2, self.features)
        # phase (p, q) of output pixel (i, j) sits at (i + p, j + q): interleave the four
        rows = [
            jnp.stack([out[:, p : p + height, q : q + width, p, q] for q in (0, 1)], axis=3)
            for p in (0, 1)
        ]  # each (B, H, W, 2, F)
        y = jnp.stack(rows, axis=2).reshape(batch, 2 * height, 2 * width, self.features)
        return y + bias


def _conv_nhwc(x: jax.Array, kernel: jax.Array, padding: str) -> jax.Array:
    return jax.lax.conv_general_dilated(
        x, kernel, (1, 1), padding, dimension_numbers=("NHWC", "HWIO", "NHWC")
    )


class ResolutionLevel(nn.Module):
    """One resolution of the encoder (`down_i`) or decoder (`up_i`): `num_blocks` ResnetBlocks,
    each followed by an AttnBlock at attention resolutions, then an optional resampling."""

    out_channels: int
    num_blocks: int
    use_attention: bool
    resample: str | None  # "down", "up" or None
    config: VQGANConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        for i in range(self.num_blocks):
            name = f"block_{i}"
            x = ResnetBlock(
                self.out_channels,
                self.config.dropout,
                self.dtype,
                self.config.norm_groups,
                name=name,
            )(x, train)
            if self.use_attention:
                x = AttnBlock(self.dtype, self.config.norm_groups, name=f"attn_{i}")(x)
        if self.resample == "down":
            x = Downsample(self.config.resamp_with_conv, self.dtype, name="downsample")(x)
        elif self.resample == "up":
            x = Upsample(self.config.resamp_with_conv, self.dtype, name="upsample")(x)
        return x


class MidBlock(nn.Module):
    """ResnetBlock → AttnBlock → ResnetBlock at the lowest resolution
    (`block_1`, `attn_1`, `block_2`)."""

    config: VQGANConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        channels = x.shape[-1]
        groups = self.config.norm_groups
        x = ResnetBlock(channels, self.config.dropout, self.dtype, groups, name="block_1")(x, train)
        x = AttnBlock(self.dtype, groups, name="attn_1")(x)
        return ResnetBlock(channels, self.config.dropout, self.dtype, groups, name="block_2")(
            x, train
        )


class Encoder(nn.Module):
    """Images (B, R, R, in_channels) → latents (B, R/f, R/f, z_channels), f = 2^(levels−1)."""

    config: VQGANConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        cfg = self.config
        x = _conv(cfg.ch, 3, self.dtype, "conv_in")(x)  # (B, R, R, ch)
        resolution = cfg.resolution
        for level, mult in enumerate(cfg.ch_mult):
            is_last = level == len(cfg.ch_mult) - 1
            x = ResolutionLevel(
                out_channels=cfg.ch * mult,
                num_blocks=cfg.num_res_blocks,
                use_attention=resolution in cfg.attn_resolutions,
                resample=None if is_last else "down",
                config=cfg,
                dtype=self.dtype,
                name=f"down_{level}",
            )(x, train)
            resolution = resolution if is_last else resolution // 2
        x = MidBlock(cfg, self.dtype, name="mid")(x, train)  # (B, h, w, ch * ch_mult[-1])
        x = nn.swish(_group_norm(self.dtype, "norm_out", cfg.norm_groups)(x))
        z_channels = 2 * cfg.z_channels if cfg.double_z else cfg.z_channels
        return _conv(z_channels, 3, self.dtype, "conv_out")(x)  # (B, h, w, z_channels)


class Decoder(nn.Module):
    """Latents (B, h, w, z_channels) → images (B, h·f, w·f, out_ch), raw (not clipped).

    With `give_pre_end` it returns the features before `norm_out`/`conv_out` (which then hold no
    parameters), as taming does.
    """

    config: VQGANConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        cfg = self.config
        num_levels = len(cfg.ch_mult)
        x = _conv(cfg.ch * cfg.ch_mult[-1], 3, self.dtype, "conv_in")(x)  # (B, h, w, C_top)
        x = MidBlock(cfg, self.dtype, name="mid")(x, train)
        resolution = cfg.resolution // 2 ** (num_levels - 1)
        for level in reversed(range(num_levels)):
            x = ResolutionLevel(
                out_channels=cfg.ch * cfg.ch_mult[level],
                num_blocks=cfg.num_res_blocks + 1,
                use_attention=resolution in cfg.attn_resolutions,
                resample="up" if level != 0 else None,
                config=cfg,
                dtype=self.dtype,
                name=f"up_{level}",
            )(x, train)
            resolution = resolution * 2 if level != 0 else resolution
        if cfg.give_pre_end:
            return x
        x = nn.swish(_group_norm(self.dtype, "norm_out", cfg.norm_groups)(x))
        return _conv(cfg.out_ch, 3, self.dtype, "conv_out")(x)  # (B, H, W, out_ch)


class VectorQuantizer(nn.Module):
    """The codebook `embedding/embedding` (n_embed, embed_dim) and nearest-code lookup."""

    config: VQGANConfig

    def setup(self):
        bound = 1.0 / self.config.n_embed  # taming's init: uniform(−1/n, 1/n)
        self.embedding = nn.Embed(
            self.config.n_embed,
            self.config.embed_dim,
            embedding_init=lambda key, shape, dtype: jax.random.uniform(
                key, shape, dtype, -bound, bound
            ),
            dtype=jnp.float32,
        )

    def nearest_codes(self, z: jax.Array, code_costs: jax.Array | None = None) -> jax.Array:
        """Latents (..., embed_dim) → int32 codes (...): argmin of |z|² + |e|² − 2 z·e, the
        first index on ties, all in float32. `code_costs` (n_embed,), if given, is added to
        every latent's squared distances first (an entropy-constrained choice: see
        `train_vqgan.code_costs`)."""
        codebook = self.embedding.embedding.astype(jnp.float32)  # (K, D)
        flat = z.reshape(-1, z.shape[-1]).astype(jnp.float32)  # (N, D)
        distances = (
            jnp.sum(flat**2, axis=1, keepdims=True)
            + jnp.sum(codebook**2, axis=1)
            - 2.0 * flat @ codebook.T
        )  # (N, K)
        if code_costs is not None:
            distances = distances + code_costs.astype(jnp.float32)
        return jnp.argmin(distances, axis=1).astype(jnp.int32).reshape(z.shape[:-1])

    def lookup(self, codes: jax.Array) -> jax.Array:
        """Codes (...) → codebook rows (..., embed_dim), float32."""
        return self.embedding(codes)
