"""VQGAN: turns 256×256 images into 16×16 grids of codebook ids and back.

The model is taming-transformers' VQGAN (f16, 16384 codes) as ported to Flax by vqgan-jax and
published as `dalle-mini/vqgan_imagenet_f16_16384`; its layers live in `vqgan_layers.py`. This
file holds the config (`VQGANConfig`, read from and written to `config.json` in the published
format), the flax module (`VQGANModule`, with the training forward pass) and the user-facing
`VQModel`, whose API mirrors vqgan-jax:

    vqgan, params = VQModel.from_pretrained("dalle-mini/vqgan_imagenet_f16_16384", _do_init=False)
    quant, codes = vqgan.encode(images, params=params)   # images NHWC in [0, 1]
    images = vqgan.decode_code(codes, params=params)     # raw output: clip to [0, 1] to display

Images are NHWC RGB floats in [0, 1] (no rescaling to [−1, 1]: the published weights were
trained that way). Codes are int32, flattened row-major: `codes[b, i * w + j]`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from dalle_mini import sampling
from dalle_mini.checkpoint import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    cast_floating,
    check_tree,
    load_msgpack,
    read_json,
    save_msgpack,
)
from dalle_mini.hub import CheckpointError, resolve_folder
from dalle_mini.models.vqgan_layers import NUM_GROUPS, Decoder, Encoder, VectorQuantizer

PUBLISHED_VQGAN = "dalle-mini/vqgan_imagenet_f16_16384"


@dataclasses.dataclass(frozen=True)
class VQGANConfig:
    """Hyper-parameters of a VQGAN, named as in the published config.json.

    Defaults are the published f16_16384 model. `num_resolutions` (= len(ch_mult)) is derived;
    it is written to config.json for the original loader and checked when read.
    """

    ch: int = 128  # base channel count; level i has ch * ch_mult[i]
    out_ch: int = 3
    in_channels: int = 3
    num_res_blocks: int = 2
    resolution: int = 256  # image side the model was built for (sets where attention sits)
    z_channels: int = 256
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    attn_resolutions: tuple[int, ...] = (16,)
    n_embed: int = 16384  # codebook size
    embed_dim: int = 256  # codebook vector size
    dropout: float = 0.0
    double_z: bool = False
    resamp_with_conv: bool = True
    give_pre_end: bool = False
    # taming's GroupNorm uses 32 groups; a narrow model (ch 32) then normalises each channel
    # alone, which erases flat colours, so small models may use fewer, wider groups
    norm_groups: int = NUM_GROUPS

    def __post_init__(self):
        object.__setattr__(self, "ch_mult", tuple(int(m) for m in self.ch_mult))
        object.__setattr__(self, "attn_resolutions", tuple(int(r) for r in self.attn_resolutions))
        sizes = ("ch", "out_ch", "in_channels", "num_res_blocks", "resolution", "z_channels")
        for name in (*sizes, "n_embed", "embed_dim"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"VQGANConfig.{name} must be a positive integer")
        if not self.ch_mult or min(self.ch_mult) < 1:
            raise ValueError("VQGANConfig.ch_mult must be a non-empty list of positive integers")
        if self.norm_groups < 1 or any((self.ch * m) % self.norm_groups for m in self.ch_mult):
            raise ValueError(
                f"every ch * ch_mult must be a multiple of {self.norm_groups} (the GroupNorm group "
                f"count); got ch={self.ch}, ch_mult={list(self.ch_mult)}"
            )
        if self.resolution % self.downsample_factor:
            raise ValueError(
                f"resolution {self.resolution} must be divisible by the downsampling factor "
                f"{self.downsample_factor} (2 ** (len(ch_mult) - 1))"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"VQGANConfig.dropout must be in [0, 1), got {self.dropout}")

    @classmethod
    def f16_16384(cls) -> VQGANConfig:
        """The published `dalle-mini/vqgan_imagenet_f16_16384`: 256² pixels → 16² codes."""
        return cls()

    @property
    def num_resolutions(self) -> int:
        return len(self.ch_mult)

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)

    @property
    def grid_size(self) -> int:
        """Side of the code grid for a `resolution`² image (16 for f16 at 256)."""
        return self.resolution // self.downsample_factor

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> VQGANConfig:
        """Builds a config from config.json's dict; unknown keys (`architectures`, ...) are
        ignored, missing ones take the published defaults."""
        names = {field.name for field in dataclasses.fields(cls)}
        config = cls(**{key: value for key, value in values.items() if key in names})
        stated = values.get("num_resolutions")
        if stated is not None and int(stated) != config.num_resolutions:
            raise ValueError(
                f"num_resolutions={stated} disagrees with ch_mult={list(config.ch_mult)} "
                f"({config.num_resolutions} levels); fix one of them"
            )
        return config

    def to_dict(self) -> dict[str, Any]:
        values = dataclasses.asdict(self)
        values["ch_mult"] = list(self.ch_mult)
        values["attn_resolutions"] = list(self.attn_resolutions)
        values["num_resolutions"] = self.num_resolutions
        if self.norm_groups == NUM_GROUPS:
            del values["norm_groups"]  # published configs do not carry it
        return values

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> VQGANConfig:
        try:
            return cls.from_dict(read_json(path))
        except (TypeError, ValueError) as error:
            if isinstance(error, CheckpointError):
                raise
            raise CheckpointError(f"{path} is not a valid VQGAN config: {error}") from error

    def to_json(self, path: str | os.PathLike) -> None:
        values = {"architectures": ["VQModel"], **self.to_dict()}
        Path(path).write_text(json.dumps(values, indent=2, sort_keys=True) + "\n")


@struct.dataclass
class VQGANOutput:
    """What `VQGANModule.__call__` returns for training.

    Attributes:
      reconstruction: decoded images (B, H, W, out_ch), raw (not clipped).
      quantized: quantized latents (B, h, w, embed_dim) with the straight-through estimator:
        the values are codebook rows, the gradient flows to the encoder as if unquantized.
      codes: int32 (B, h * w), row-major.
      codebook_loss: mean |sg(z) − e|², which moves the codebook toward the encoder outputs.
      commitment_loss: mean |z − sg(e)|², which keeps the encoder near its codes; taming weighs
        it by beta = 0.25 and adds it to `codebook_loss`.
    """

    reconstruction: jax.Array
    quantized: jax.Array
    codes: jax.Array
    codebook_loss: jax.Array
    commitment_loss: jax.Array


class VQGANModule(nn.Module):
    """The flax module. Top-level names (`encoder`, `quant_conv`, `quantize`, `post_quant_conv`,
    `decoder`) are those of the published parameter tree.

    `__call__(images, train)` is the training forward (dropout active when `train`, needing a
    "dropout" rng if `config.dropout > 0`); `encode`, `decode` and `decode_code` are inference.
    """

    config: VQGANConfig
    dtype: Any = jnp.float32

    def setup(self):
        cfg = self.config
        self.encoder = Encoder(cfg, self.dtype)
        self.quant_conv = nn.Conv(cfg.embed_dim, (1, 1), dtype=self.dtype)
        self.quantize = VectorQuantizer(cfg)
        self.post_quant_conv = nn.Conv(cfg.z_channels, (1, 1), dtype=self.dtype)
        self.decoder = Decoder(cfg, self.dtype)

    def latents(self, images: jax.Array, train: bool = False) -> jax.Array:
        """Images (B, H, W, C) in [0, 1] → unquantized latents (B, h, w, embed_dim), float32."""
        hidden = self.encoder(images.astype(self.dtype), train)  # (B, h, w, z_channels)
        return self.quant_conv(hidden).astype(jnp.float32)  # (B, h, w, embed_dim)

    def encode(
        self, images: jax.Array, code_costs: jax.Array | None = None
    ) -> tuple[jax.Array, jax.Array]:
        """Images → (quantized latents (B, h, w, embed_dim), codes (B, h * w) int32);
        `code_costs` as `VectorQuantizer.nearest_codes`."""
        codes = self.quantize.nearest_codes(self.latents(images), code_costs)  # (B, h, w)
        quant = self.quantize.lookup(codes)  # (B, h, w, embed_dim)
        return quant, codes.reshape(codes.shape[0], -1)

    def decode(self, quant: jax.Array, train: bool = False) -> jax.Array:
        """Quantized latents (B, h, w, embed_dim) → images (B, H, W, out_ch), float32, raw."""
        hidden = self.post_quant_conv(quant.astype(self.dtype))  # (B, h, w, z_channels)
        return self.decoder(hidden, train).astype(jnp.float32)

    def decode_code(self, codes: jax.Array) -> jax.Array:
        """Codes (B, h, w) int → images (B, H, W, out_ch), float32, raw."""
        return self.decode(self.quantize.lookup(codes))

    def __call__(self, images: jax.Array, train: bool = False) -> VQGANOutput:
        z = self.latents(images, train)  # (B, h, w, embed_dim)
        codes = self.quantize.nearest_codes(z)  # (B, h, w)
        e = self.quantize.lookup(codes)  # (B, h, w, embed_dim)
        quantized = z + jax.lax.stop_gradient(e - z)  # straight-through estimator
        return VQGANOutput(
            reconstruction=self.decode(quantized, train),
            quantized=quantized,
            codes=codes.reshape(codes.shape[0], -1),
            codebook_loss=jnp.mean((jax.lax.stop_gradient(z) - e) ** 2),
            commitment_loss=jnp.mean((z - jax.lax.stop_gradient(e)) ** 2),
        )


ENCODING_PARTS = frozenset({"encoder", "quant_conv"})  # parameters only `encode` reads


@functools.cache
def _jitted(config: VQGANConfig, dtype: Any, method: str):
    """One jitted `VQGANModule` method per (config, dtype): models loaded twice share the
    compiled code instead of compiling again. Compiled with `sampling.compiler_options`: on a
    CPU at float32 (YNNPACK's fusions off) the convolutions run 1.45x (f16_16384 decoding 9
    images) to 2.4x (the embedded VQGAN, 256 images) faster, `bench/bench_vqgan.py`."""
    module = VQGANModule(config, dtype=dtype)
    method_fn = getattr(VQGANModule, method)
    return jax.jit(
        lambda params, x, *more: module.apply({"params": params}, x, *more, method=method_fn),
        compiler_options=sampling.compiler_options(dtype),
    )


class VQModel:
    """Loads, runs and saves a VQGAN; the API of vqgan-jax's `VQModel`.

    Parameters are an explicit tree passed to every call (`params=`), float32 whatever `dtype`
    (the compute dtype: jnp.float32 or jnp.bfloat16). `encode`, `decode` and `decode_code` are
    jit-compiled once per (config, dtype, input shape), shared by every instance.
    """

    def __init__(self, config: VQGANConfig, dtype: Any = jnp.float32):
        self.config = config
        self.dtype = dtype
        self.module = VQGANModule(config, dtype=dtype)
        self.params = None  # set only by from_pretrained(..., _do_init=True), as in the original
        self._encode = _jitted(config, dtype, "encode")
        self._latents = _jitted(config, dtype, "latents")
        self._decode = _jitted(config, dtype, "decode")
        self._decode_code = _jitted(config, dtype, "decode_code")

    @property
    def num_codes_per_image(self) -> int:
        return self.config.grid_size**2

    def _dummy_images(self) -> jax.Array:
        size = self.config.resolution
        return jnp.zeros((1, size, size, self.config.in_channels), jnp.float32)

    def init_params(self, rng: jax.Array) -> dict[str, Any]:
        """Fresh random float32 weights (flax's default initialisers, taming's codebook init)."""
        init = jax.jit(lambda key, x: self.module.init(key, x)["params"])
        lowered = init.lower(rng, self._dummy_images())
        # On CPU, LLVM spends most of init's compile time optimising one threefry kernel per
        # parameter (about a minute for f16_16384 on 2 cores); the program runs once, so
        # compile it unoptimised: it then takes about half as long in all.
        options = (
            {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
            if jax.default_backend() == "cpu"
            else {}
        )
        return lowered.compile(compiler_options=options)(rng, self._dummy_images())

    def abstract_params(self) -> dict[str, Any]:
        """The parameter tree this config implies, as `jax.ShapeDtypeStruct`s (no allocation)."""
        init = lambda key, x: self.module.init(key, x)["params"]
        return jax.eval_shape(init, jax.random.PRNGKey(0), self._dummy_images())

    @classmethod
    def from_pretrained(
        cls,
        name_or_folder: str | os.PathLike = PUBLISHED_VQGAN,
        revision: str | None = None,
        dtype: Any = jnp.float32,
        _do_init: bool = False,
        decoder_only: bool = False,
    ):
        """Loads a checkpoint folder (config.json + flax_model.msgpack) or hub repo.

        Returns `(model, params)` with `_do_init=False` (the way the DALL·E Mini notebook calls
        it); with `_do_init=True` returns the model alone, its weights in `model.params`.
        float16 checkpoints load as float32 parameters; `dtype` sets the compute dtype.
        `decoder_only` keeps only what decoding needs (the image encoder is 117 MB of the
        published f16_16384's 304 MB): `encode` then refuses these params.
        Raises CheckpointError naming the file (missing, truncated) or the first parameter
        paths that do not match the config.
        """
        folder = resolve_folder(
            name_or_folder,
            component="vqgan",
            required_files=[CONFIG_NAME, WEIGHTS_NAME],
            revision=revision,
        )
        model = cls(VQGANConfig.from_json(folder / CONFIG_NAME), dtype=dtype)
        weights_path = folder / WEIGHTS_NAME
        params = load_msgpack(weights_path)
        check_tree(params, model.abstract_params(), weights_path)
        if decoder_only:
            params = {key: value for key, value in params.items() if key not in ENCODING_PARTS}
        params = cast_floating(params, np.float32)  # device arrays, float16 files as float32
        if _do_init:
            model.params = params
            return model
        return model, params

    def save_pretrained(self, folder: str | os.PathLike, params: Any = None) -> None:
        """Writes config.json and flax_model.msgpack in the published format."""
        params = self._params_or_own(params)
        check_tree(params, self.abstract_params(), "the params passed to save_pretrained")
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.config.to_json(folder / CONFIG_NAME)
        save_msgpack(folder / WEIGHTS_NAME, params)

    def _params_or_own(self, params: Any) -> Any:
        if params is not None:
            return params
        if self.params is None:
            raise ValueError(
                "no params: pass params=... (from `VQModel.from_pretrained(..., _do_init=False)` "
                "or `init_params`)"
            )
        return self.params

    def encode(
        self, images: Any, params: Any = None, code_costs: Any = None
    ) -> tuple[jax.Array, jax.Array]:
        """Images (B, H, W, in_channels) floats in [0, 1] → (quant (B, h, w, embed_dim) float32,
        codes (B, h * w) int32, row-major). H and W must be multiples of the downsample factor.

        Each latent takes its nearest code, as the original; given `code_costs` (n_embed,),
        the code minimising squared distance + cost instead (`train_vqgan.code_costs`)."""
        images, params = self._encoder_input(images, params)
        if code_costs is None:
            return self._encode(params, images)
        code_costs = jnp.asarray(code_costs, jnp.float32)
        if code_costs.shape != (self.config.n_embed,):
            raise ValueError(
                f"code_costs must be one float per code, shape ({self.config.n_embed},); got "
                f"{code_costs.shape}"
            )
        return self._encode(params, images, code_costs)

    def latents(self, images: Any, params: Any = None) -> jax.Array:
        """Images as `encode` takes them → the encoder's unquantized latents (B, h, w,
        embed_dim) float32, before the nearest-code choice."""
        images, params = self._encoder_input(images, params)
        return self._latents(params, images)

    def _encoder_input(self, images: Any, params: Any) -> tuple[jax.Array, Any]:
        images = jnp.asarray(images)
        self._check_images(images)
        params = self._params_or_own(params)
        if not params.keys() >= ENCODING_PARTS:
            raise ValueError(
                "these VQGAN params have no image encoder (loaded with decoder_only=True): "
                "load the checkpoint without decoder_only to encode images"
            )
        return images.astype(jnp.float32), params

    def decode(self, quant: Any, params: Any = None) -> jax.Array:
        """Quantized latents (B, h, w, embed_dim) → images (B, H, W, out_ch) float32.

        The output is the raw network output, NOT clipped: callers clip to [0, 1] (as the
        original notebook does) before converting to pixels.
        """
        quant = jnp.asarray(quant)
        if quant.ndim != 4 or quant.shape[-1] != self.config.embed_dim:
            raise ValueError(
                f"quant must be (batch, h, w, {self.config.embed_dim}); got shape {quant.shape}"
            )
        return self._decode(self._params_or_own(params), quant.astype(jnp.float32))

    def decode_code(self, codes: Any, params: Any = None) -> jax.Array:
        """Codes (B, h * w) (row-major, as `encode` returns) or (B, h, w) → images
        (B, H, W, out_ch) float32, raw output, NOT clipped: clip to [0, 1] before display."""
        codes = np.asarray(codes)
        grid = self.config.grid_size
        if codes.ndim == 2 and codes.shape[1] == grid * grid:
            codes = codes.reshape(codes.shape[0], grid, grid)
        if codes.ndim != 3 or not np.issubdtype(codes.dtype, np.integer):
            raise ValueError(
                f"codes must be integers shaped (batch, {grid * grid}) or (batch, {grid}, "
                f"{grid}); got {codes.dtype} {codes.shape}. Generated sequences start with the "
                "decoder start token: pass sequences[:, 1:]"
            )
        if codes.size and (codes.min() < 0 or codes.max() >= self.config.n_embed):
            bad = codes.max() if codes.max() >= self.config.n_embed else codes.min()
            raise ValueError(
                f"code {bad} is outside the codebook [0, {self.config.n_embed}); image "
                "token ids that are not codes (start, eos/pad, padded rows) cannot be decoded"
            )
        return self._decode_code(self._params_or_own(params), jnp.asarray(codes, jnp.int32))

    def _check_images(self, images: jax.Array) -> None:
        channels, factor = self.config.in_channels, self.config.downsample_factor
        if images.ndim != 4 or images.shape[-1] != channels:
            raise ValueError(
                f"images must be NHWC (batch, height, width, {channels}); got shape {images.shape}"
            )
        if not jnp.issubdtype(images.dtype, jnp.floating):
            raise ValueError(
                f"images must be floats in [0, 1]; got {images.dtype} (divide uint8 images by 255)"
            )
        if images.shape[1] % factor or images.shape[2] % factor:
            raise ValueError(
                f"image height and width must be multiples of {factor}; got "
                f"{images.shape[1]}×{images.shape[2]} (resize to {self.config.resolution}²)"
            )
