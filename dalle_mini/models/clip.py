"""CLIP (ViT image tower + causal text tower) in flax.linen, loading open_clip state dicts.

The architecture is open_clip's `CLIP` class with a `VisionTransformer` image tower: pre-LN
residual blocks (`x + attn(ln_1(x))`, `x + mlp(ln_2(x))`), packed q/k/v projections, a class
token pooled after `ln_post`, and a text tower pooled at the EOT token (`argmax(tokens)`) after
`ln_final`, under a causal mask. Parameter names mirror open_clip's state-dict keys, so
conversion (`models/clip_weights.py`) is a fixed renaming plus transposes. The specification is
`shared/reference/clip-vit/README.md`; `tests/test_clip.py` matches open_clip's outputs on it.

Any open_clip `model_cfg` of this family loads (OpenAI ViT-B/32, ViT-L/14, the LAION models,
the embedded CLIP); options that change the computation and are not implemented here
(LayerScale, projection bias, attentional pooling, ...) are refused by name.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from dalle_mini.hub import CheckpointError


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    image_size: int = 224
    patch_size: int = 32
    width: int = 768
    layers: int = 12
    head_width: int = 64
    mlp_ratio: float = 4.0
    layer_norm_eps: float = 1e-5

    def __post_init__(self):
        if self.width % self.head_width:
            raise ValueError(f"vision width {self.width} is not a multiple of {self.head_width=}")

    @property
    def num_heads(self) -> int:
        return self.width // self.head_width

    @property
    def mlp_dim(self) -> int:
        return int(self.width * self.mlp_ratio)

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size


@dataclasses.dataclass(frozen=True)
class TextConfig:
    context_length: int = 77
    vocab_size: int = 49408
    width: int = 512
    heads: int = 8
    layers: int = 12
    mlp_ratio: float = 4.0
    layer_norm_eps: float = 1e-5

    def __post_init__(self):
        if self.width % self.heads:
            raise ValueError(f"text width {self.width} is not a multiple of {self.heads=}")

    @property
    def num_heads(self) -> int:
        return self.heads

    @property
    def mlp_dim(self) -> int:
        return int(self.width * self.mlp_ratio)


# open_clip options accepted only at the value that gives the architecture implemented here,
# and options with no effect on it at inference (patch dropout is off in eval, ...).
# fmt: off
_VISION_FIXED = {
    "ls_init_value": None, "attentional_pool": False, "no_ln_pre": False,
    "pos_embed_type": "learnable", "final_ln_after_pool": False, "pool_type": "tok",
    "act_kwargs": None, "timm_model_name": None, "input_patchnorm": False,
    "global_average_pool": False, "in_chans": 3,
}
_TEXT_FIXED = {
    "ls_init_value": None, "embed_cls": False, "no_causal_mask": False,
    "final_ln_after_pool": False, "pool_type": "argmax", "proj_bias": False,
    "proj_type": "linear", "act_kwargs": None, "hf_model_name": None, "hf_tokenizer_name": None,
}
_VISION_IGNORED = {"patch_dropout", "output_tokens", "attn_pooler_queries", "attn_pooler_heads",
                   "timm_model_pretrained", "timm_pool", "timm_proj", "timm_proj_bias",
                   "timm_drop", "timm_drop_path"}
_TEXT_IGNORED = {"output_tokens", "pad_id", "hf_model_pretrained", "hf_proj_type", "hf_pooler_type"}
_TOP_IGNORED = {"cast_dtype", "nonscalar_logit_scale", "custom_text", "init_logit_scale"}
# fmt: on


@dataclasses.dataclass(frozen=True)
class CLIPConfig:
    """One CLIP: both towers, the shared embedding width and the activation."""

    embed_dim: int = 512
    vision: VisionConfig = VisionConfig()
    text: TextConfig = TextConfig()
    use_quick_gelu: bool = False  # OpenAI-trained weights need True
    init_logit_scale: float = math.log(1 / 0.07)  # used only by fresh initialisation

    @classmethod
    def from_open_clip(cls, model_cfg: Mapping[str, Any]) -> CLIPConfig:
        """Reads open_clip's `model_cfg` (the `open_clip_config.json` entry or a zoo json)."""
        model_cfg = dict(model_cfg)
        vision_cfg, text_cfg = model_cfg.pop("vision_cfg", {}), model_cfg.pop("text_cfg", {})
        vision = _tower(VisionConfig, vision_cfg, "vision_cfg", _VISION_FIXED, _VISION_IGNORED)
        text = _tower(TextConfig, text_cfg, "text_cfg", _TEXT_FIXED, _TEXT_IGNORED)
        if model_cfg.pop("init_logit_bias", None) is not None:
            _refuse("init_logit_bias", "a SigLIP-style logit bias")
        if "multimodal_cfg" in model_cfg:
            _refuse("multimodal_cfg", "a CoCa captioning head")
        fields = {
            "embed_dim": model_cfg.pop("embed_dim", 512),
            "use_quick_gelu": bool(model_cfg.pop("quick_gelu", False)),
        }
        if model_cfg.get("init_logit_scale") is not None:
            fields["init_logit_scale"] = float(model_cfg["init_logit_scale"])
        unknown = sorted(set(model_cfg) - _TOP_IGNORED)
        if unknown:
            _refuse(unknown[0], "an option this implementation does not know")
        return cls(vision=vision, text=text, **fields)

    def to_open_clip(self) -> dict[str, Any]:
        """The `model_cfg` open_clip builds this same model from."""
        towers = {}
        for name, tower in (("vision_cfg", self.vision), ("text_cfg", self.text)):
            cfg = {f.name: getattr(tower, f.name) for f in dataclasses.fields(tower)}
            eps = cfg.pop("layer_norm_eps")
            if eps != 1e-5:
                cfg["norm_kwargs"] = {"eps": eps}
            towers[name] = cfg
        return {"embed_dim": self.embed_dim, "quick_gelu": self.use_quick_gelu, **towers}


def _refuse(option: str, what: str) -> None:
    raise CheckpointError(
        f"open_clip option {option} ({what}) is not supported by dalle_mini's flax CLIP; "
        "load this model with CLIPScorer.from_pretrained(..., backend='open_clip') instead"
    )


def _is_default(value: Any, default: Any) -> bool:
    return value == default or (default is None and value in ({}, False))


def _tower(cls, cfg: Mapping[str, Any], prefix: str, fixed: dict, ignored: set):
    fields = {f.name for f in dataclasses.fields(cls)} - {"layer_norm_eps"}
    values = {}
    for key, value in cfg.items():
        option = f"{prefix}.{key}={value!r}"
        if key == "layers" and not isinstance(value, int):
            _refuse(option, "a ResNet image tower")
        elif key in fields:
            values[key] = value
        elif key == "norm_kwargs":
            if set(value or {}) - {"eps"}:
                _refuse(option, "LayerNorm options other than eps")
            values["layer_norm_eps"] = float((value or {}).get("eps", 1e-5))
        elif key == "tokenizer_kwargs":
            if value and dict(value) != {"clean": "lower"}:
                _refuse(option, "a text cleaning other than open_clip's default 'lower'")
        elif key in fixed:
            if not _is_default(value, fixed[key]):
                _refuse(option, f"open_clip's default is {fixed[key]!r}")
        elif key not in ignored:
            _refuse(option, "an option this implementation does not know")
    return cls(**values)


VIT_B_32 = CLIPConfig(use_quick_gelu=True)  # OpenAI ViT-B/32 (LAION's ViT-B-32 uses GELU)
VIT_L_14 = CLIPConfig(
    embed_dim=768,
    vision=VisionConfig(patch_size=14, width=1024, layers=24),
    text=TextConfig(width=768, heads=12),
    use_quick_gelu=True,
)
PRESETS = {"ViT-B-32": VIT_B_32, "ViT-L-14": VIT_L_14}


def quick_gelu(x: jax.Array) -> jax.Array:
    return x * jax.nn.sigmoid(1.702 * x)


def _normal(std: float):
    return nn.initializers.normal(stddev=std)


def _layer_norm(tower: VisionConfig | TextConfig, dtype, name: str | None = None) -> nn.LayerNorm:
    # two-pass variance, as torch computes it
    return nn.LayerNorm(tower.layer_norm_eps, dtype=dtype, use_fast_variance=False, name=name)


class Attention(nn.Module):
    """torch `nn.MultiheadAttention`: packed q/k/v projection, heads as contiguous slices."""

    tower: VisionConfig | TextConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array | None) -> jax.Array:
        batch, length, width = x.shape  # (B, T, W)
        num_heads = self.tower.num_heads
        head_dim = width // num_heads
        proj_std = width**-0.5 * (2 * self.tower.layers) ** -0.5
        dense = functools.partial(nn.Dense, dtype=self.dtype)
        qkv = dense(3 * width, kernel_init=_normal(width**-0.5), name="in_proj")(x)  # (B, T, 3W)
        q, k, v = (a.reshape(batch, length, num_heads, head_dim) for a in jnp.split(qkv, 3, -1))
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(head_dim)  # (B, H, T, T)
        if mask is not None:
            scores = jnp.where(mask, scores, -jnp.inf)
        weights = jax.nn.softmax(scores.astype(jnp.float32), axis=-1).astype(v.dtype)
        context = jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(batch, length, width)
        return dense(width, kernel_init=_normal(proj_std), name="out_proj")(context)


class Mlp(nn.Module):
    tower: VisionConfig | TextConfig
    use_quick_gelu: bool
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        width = x.shape[-1]
        proj_std = width**-0.5 * (2 * self.tower.layers) ** -0.5
        dense = functools.partial(nn.Dense, dtype=self.dtype)
        h = dense(self.tower.mlp_dim, kernel_init=_normal((2 * width) ** -0.5), name="c_fc")(x)
        h = quick_gelu(h) if self.use_quick_gelu else nn.gelu(h, approximate=False)
        return dense(width, kernel_init=_normal(proj_std), name="c_proj")(h)


class ResidualAttentionBlock(nn.Module):
    tower: VisionConfig | TextConfig
    use_quick_gelu: bool
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array | None) -> jax.Array:
        x = x + Attention(self.tower, self.dtype, name="attn")(
            _layer_norm(self.tower, self.dtype, "ln_1")(x), mask
        )
        h = _layer_norm(self.tower, self.dtype, "ln_2")(x)
        return x + Mlp(self.tower, self.use_quick_gelu, self.dtype, name="mlp")(h)


class Transformer(nn.Module):
    tower: VisionConfig | TextConfig
    use_quick_gelu: bool
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        for i in range(self.tower.layers):
            block = ResidualAttentionBlock(
                self.tower, self.use_quick_gelu, self.dtype, name=f"resblocks_{i}"
            )
            x = block(x, mask)  # (B, T, W)
        return x


class VisionTransformer(nn.Module):
    config: CLIPConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, pixels: jax.Array) -> jax.Array:
        v = self.config.vision
        scale = v.width**-0.5
        patch = (v.patch_size, v.patch_size)
        conv = nn.Conv(
            v.width, patch, patch, "VALID", use_bias=False, dtype=self.dtype, name="conv1"
        )
        x = conv(pixels.astype(self.dtype))  # (B, g, g, W)
        batch = x.shape[0]
        x = x.reshape(batch, -1, v.width)  # (B, g*g, W), row-major grid
        cls = self.param("class_embedding", _normal(scale), (v.width,))
        positions = self.param(
            "positional_embedding", _normal(scale), (v.grid_size**2 + 1, v.width)
        )
        cls = jnp.broadcast_to(cls.astype(x.dtype), (batch, 1, v.width))
        x = jnp.concatenate([cls, x], axis=1) + positions.astype(x.dtype)  # (B, 1+g*g, W)
        x = _layer_norm(v, self.dtype, "ln_pre")(x)
        x = Transformer(v, self.config.use_quick_gelu, self.dtype, name="transformer")(x)
        pooled = _layer_norm(v, self.dtype, "ln_post")(x)[:, 0]  # (B, W) class token
        proj = self.param("proj", _normal(scale), (v.width, self.config.embed_dim))
        return pooled @ proj.astype(pooled.dtype)  # (B, E)


class CLIP(nn.Module):
    """Both towers. `apply(..., method="encode_image"|"encode_text")` gives raw features;
    `__call__(pixels, tokens)` gives what a contrastive trainer needs (see there)."""

    config: CLIPConfig
    dtype: Any = jnp.float32

    def setup(self):
        c, t = self.config, self.config.text
        self.visual = VisionTransformer(c, self.dtype)
        self.token_embedding = nn.Embed(
            t.vocab_size, t.width, embedding_init=_normal(0.02), dtype=self.dtype
        )
        self.positional_embedding = self.param(
            "positional_embedding", _normal(0.01), (t.context_length, t.width)
        )
        self.transformer = Transformer(t, c.use_quick_gelu, self.dtype)
        self.ln_final = _layer_norm(t, self.dtype)
        self.text_projection = self.param(
            "text_projection", _normal(t.width**-0.5), (t.width, c.embed_dim)
        )
        self.logit_scale = self.param(
            "logit_scale", nn.initializers.constant(c.init_logit_scale), ()
        )

    def encode_image(self, pixels: jax.Array) -> jax.Array:
        """(B, S, S, 3) normalised pixels -> (B, E) unnormalised image features."""
        return self.visual(pixels).astype(jnp.float32)

    def encode_text(self, tokens: jax.Array) -> jax.Array:
        """(B, T) token ids -> (B, E) unnormalised text features, pooled at argmax(tokens)."""
        length = tokens.shape[1]
        x = self.token_embedding(tokens) + self.positional_embedding[:length].astype(self.dtype)
        causal = jnp.tril(jnp.ones((length, length), dtype=bool))  # (T, T) query i sees keys <= i
        x = self.ln_final(self.transformer(x, causal))  # (B, T, W)
        pooled = x[jnp.arange(x.shape[0]), jnp.argmax(tokens, axis=-1)]  # (B, W)
        return (pooled @ self.text_projection.astype(pooled.dtype)).astype(jnp.float32)

    def __call__(self, pixels: jax.Array, tokens: jax.Array):
        """Returns (image_features, text_features, logit_scale) as open_clip's forward does:
        L2-normalised (B, E) features and the multiplier exp(logit_scale)."""
        image_features = l2_normalize(self.encode_image(pixels))
        text_features = l2_normalize(self.encode_text(tokens))
        return image_features, text_features, jnp.exp(self.logit_scale.astype(jnp.float32))


def l2_normalize(x: jax.Array) -> jax.Array:
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def contrastive_loss(image_features, text_features, logit_scale, count=None) -> jax.Array:
    """CLIP's symmetric cross-entropy over a batch of `count` matching (image, text) pairs
    (default: as many as there are images).

    Either side may hold more rows than `count`: text rows from `count` on are extra wrong
    captions (hard negatives) that each image must score below its own, image rows from
    `count` on extra wrong images that each caption must score below its own; they are not
    matched themselves.
    """
    count = image_features.shape[0] if count is None else count
    logits = logit_scale * image_features @ text_features.T  # (I, T), I and T >= count
    labels = jnp.arange(count)
    image_loss = -jnp.mean(jax.nn.log_softmax(logits[:count], axis=1)[labels, labels])
    text_loss = -jnp.mean(jax.nn.log_softmax(logits[:, :count], axis=0)[labels, labels])
    return (image_loss + text_loss) / 2


def init_params(config: CLIPConfig, rng: jax.Array) -> dict[str, Any]:
    """Fresh random parameters (open_clip's initialisation scheme for the transformer)."""
    pixels = jnp.zeros((1, config.vision.image_size, config.vision.image_size, 3), jnp.float32)
    tokens = jnp.zeros((1, config.text.context_length), jnp.int32)
    return jax.jit(CLIP(config).init)(rng, pixels, tokens)["params"]


def param_shapes(config: CLIPConfig) -> dict[str, Any]:
    """The parameter tree of `config` as ShapeDtypeStructs, without allocating it."""
    return jax.eval_shape(lambda: init_params(config, jax.random.PRNGKey(0)))
