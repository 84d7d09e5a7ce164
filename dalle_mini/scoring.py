"""Scoring generated images against their prompt with CLIP, and keeping the best ones.

`CLIPScorer` loads an open_clip hub folder (`open_clip_config.json` +
`open_clip_model.safetensors`) into the project's flax CLIP (`models/clip.py`) and applies
open_clip's own preprocessing (Pillow resize of the shortest side, center crop, RGB, /255,
normalise) and tokenizer (`clip_tokenizer.py`), so scores match open_clip's. All candidates
are scored in one jit-compiled call. With `backend="open_clip"` the same interface runs
open-clip-torch itself (`scoring_torch.py`, needs `pip install .[open_clip]`).

    scorer = CLIPScorer.from_pretrained("ViT-B-32")  # OpenAI ViT-B/32, as the original notebook
    best = scorer.rerank(prompt, images, keep=9)     # [RankedImage(index, score, image), ...]
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from dalle_mini.checkpoint import cast_floating, read_json
from dalle_mini.clip_tokenizer import PACKAGED_VOCAB, VOCAB_NAME, CLIPTokenizer
from dalle_mini.hub import EMBEDDED_NAME, CheckpointError, resolve_folder
from dalle_mini.models.clip import CLIP, CLIPConfig, l2_normalize
from dalle_mini.models.clip_weights import params_from_state_dict, state_dict_from_params

CONFIG_NAME = "open_clip_config.json"
WEIGHTS_NAME = "open_clip_model.safetensors"
# Short names -> open_clip hub folders on the Hugging Face hub.
KNOWN_MODELS = {
    "ViT-B-32": "timm/vit_base_patch32_clip_224.openai",  # OpenAI weights (the notebook's)
    "ViT-B-32-laion2b": "laion/CLIP-ViT-B-32-laion2B-s34B-b79K",
    "ViT-L-14": "timm/vit_large_patch14_clip_224.openai",
    "ViT-L-14-laion2b": "laion/CLIP-ViT-L-14-laion2B-s32B-b82K",
}
DEFAULT_MODEL = "ViT-B-32"
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
_RESAMPLING = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}
_FLOAT_SLACK = 1 / 255  # float images may overshoot [0, 1] by rounding, not by more


@dataclasses.dataclass(frozen=True)
class PreprocessConfig:
    """open_clip's eval transform: resize, crop, to [0, 1], normalise per channel."""

    image_size: int = 224
    mean: tuple[float, float, float] = OPENAI_MEAN
    std: tuple[float, float, float] = OPENAI_STD
    interpolation: str = "bicubic"
    resize_mode: str = "shortest"  # or "squash"

    def __post_init__(self):
        if self.interpolation not in _RESAMPLING:
            raise CheckpointError(
                f"preprocess_cfg.interpolation={self.interpolation!r} is not supported; "
                f"use one of {sorted(_RESAMPLING)} or backend='open_clip'"
            )
        if self.resize_mode not in ("shortest", "squash"):
            raise CheckpointError(
                f"preprocess_cfg.resize_mode={self.resize_mode!r} is not supported; use "
                "'shortest' or 'squash', or backend='open_clip'"
            )

    @classmethod
    def from_open_clip(cls, cfg: Mapping[str, Any], image_size: int) -> PreprocessConfig:
        """Reads `preprocess_cfg`; like open_clip, the model's image size wins over `size`."""
        return cls(
            image_size=image_size,
            mean=tuple(cfg.get("mean", OPENAI_MEAN)),
            std=tuple(cfg.get("std", OPENAI_STD)),
            interpolation=cfg.get("interpolation", "bicubic"),
            resize_mode=cfg.get("resize_mode", "shortest"),
        )

    def to_open_clip(self) -> dict[str, Any]:
        return {
            "mean": list(self.mean),
            "std": list(self.std),
            "interpolation": self.interpolation,
            "resize_mode": self.resize_mode,
        }


def to_pil_image(image: Any) -> Image.Image:
    """A PIL image (any mode) as is; a uint8 array HW / HW1 / HW3 / HW4, or a float array in
    [0, 1] with those shapes, as an 'L' / 'RGB' / 'RGBA' image."""
    if isinstance(image, Image.Image):
        return image
    array = np.asarray(image)
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (3, 4)):
        raise ValueError(
            f"cannot read an image array of shape {array.shape}: expected (H, W), (H, W, 1), "
            "(H, W, 3) or (H, W, 4), channels last; pass a list of images for a batch"
        )
    if np.issubdtype(array.dtype, np.floating):
        low, high = float(array.min()), float(array.max())
        if low < -_FLOAT_SLACK or high > 1 + _FLOAT_SLACK:
            raise ValueError(
                f"float image values span [{low:g}, {high:g}]; float images must lie in [0, 1] "
                "(pass uint8 arrays for 0..255 data)"
            )
        array = np.round(np.clip(array, 0, 1) * 255)
    elif array.dtype != np.uint8 and (array.min() < 0 or array.max() > 255):
        raise ValueError(f"integer image values must lie in 0..255, got dtype {array.dtype}")
    return Image.fromarray(array.astype(np.uint8))


def preprocess_image(image: Image.Image, config: PreprocessConfig) -> np.ndarray:
    """One PIL image -> (S, S, 3) float32, exactly open_clip's eval transform.

    Pillow resizes in the image's own mode (RGBA via premultiplied alpha, palette images with
    nearest neighbour), then the result is converted to RGB, which drops alpha (transparent
    pixels come out black, as in open_clip)."""
    size = config.image_size
    if image.mode == "La":  # the one mode Pillow cannot convert to RGB
        image = image.convert("LA")
    width, height = image.size
    if config.resize_mode == "squash":
        target = (size, size)
    else:  # torchvision Resize(int): short side -> size, long side truncated
        short, long = min(width, height), max(width, height)
        target = (
            (size, int(size * long / short))
            if width <= height
            else (int(size * long / short), size)
        )
    if target != image.size:
        image = image.resize(target, _RESAMPLING[config.interpolation])
    if config.resize_mode == "shortest":
        top, left = round((target[1] - size) / 2), round((target[0] - size) / 2)  # half to even
        image = image.crop((left, top, left + size, top + size))
    pixels = np.asarray(image.convert("RGB"), dtype=np.float32) / np.float32(255)  # (S, S, 3)
    mean, std = np.asarray(config.mean, np.float32), np.asarray(config.std, np.float32)
    return (pixels - mean) / std


def as_image_list(images: Any) -> list[Any]:
    """A list/tuple of images, or an (N, H, W[, C]) array batch -> list of single images."""
    if isinstance(images, Image.Image):
        return [images]
    if isinstance(images, (np.ndarray, jax.Array)) and images.ndim == 4:
        return list(np.asarray(images))
    if isinstance(images, (list, tuple)):
        if not images:
            raise ValueError("no images to score: got an empty list")
        return list(images)
    return [images]


@dataclasses.dataclass(frozen=True)
class RankedImage:
    index: int  # position in the input
    score: float
    image: Any = dataclasses.field(repr=False)


# Compiled once per (config, dtype) and input shapes, shared by every scorer of that model.
@functools.partial(jax.jit, static_argnums=(0, 1))
def _encode_image(config, dtype, params, pixels):  # (N, S, S, 3) -> (N, E)
    return CLIP(config, dtype).apply({"params": params}, pixels, method=CLIP.encode_image)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _encode_text(config, dtype, params, tokens):  # (N, T) -> (N, E)
    return CLIP(config, dtype).apply({"params": params}, tokens, method=CLIP.encode_text)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _score(config, dtype, params, pixels, tokens):  # (N, S, S, 3), (1, T) -> (N,)
    image = l2_normalize(_encode_image(config, dtype, params, pixels))
    text = l2_normalize(_encode_text(config, dtype, params, tokens))
    return jnp.exp(params["logit_scale"].astype(jnp.float32)) * (image @ text[0])


class FlaxCLIPBackend:
    """The project's flax CLIP: parameters, tokenizer, preprocessing and jitted encoders."""

    name = "flax"

    def __init__(self, config, params, preprocess, tokenizer, dtype=jnp.float32):
        if tokenizer.vocab_size > config.text.vocab_size:
            raise CheckpointError(
                f"the CLIP text tower has {config.text.vocab_size} token embeddings but its "
                f"tokenizer produces ids up to {tokenizer.vocab_size - 1}"
            )
        self.config, self.preprocess_config, self.tokenizer = config, preprocess, tokenizer
        self.dtype = jnp.dtype(dtype)
        self.module = CLIP(config, dtype=self.dtype)
        self.params = cast_floating(params, self.dtype)  # device arrays of self.dtype

    @property
    def logit_scale(self) -> float:
        return float(self.params["logit_scale"])

    def tokenize(self, texts: Sequence[str]) -> np.ndarray:
        return self.tokenizer(texts)

    def preprocess(self, images: Sequence[Image.Image]) -> np.ndarray:
        return np.stack([preprocess_image(image, self.preprocess_config) for image in images])

    def encode_pixels(self, pixels: np.ndarray) -> np.ndarray:
        pixels = jnp.asarray(pixels, jnp.float32)
        return np.asarray(_encode_image(self.config, self.dtype, self.params, pixels))

    def encode_tokens(self, tokens: np.ndarray) -> np.ndarray:
        tokens = jnp.asarray(tokens, jnp.int32)
        return np.asarray(_encode_text(self.config, self.dtype, self.params, tokens))

    def score_pixels(self, pixels: np.ndarray, tokens: np.ndarray) -> np.ndarray:
        pixels, tokens = jnp.asarray(pixels, jnp.float32), jnp.asarray(tokens, jnp.int32)
        scores = _score(self.config, self.dtype, self.params, pixels, tokens)
        return np.asarray(scores, dtype=np.float32)

    def save_pretrained(self, folder: str | os.PathLike) -> None:
        from safetensors.numpy import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        config = {
            "model_cfg": self.config.to_open_clip(),
            "preprocess_cfg": self.preprocess_config.to_open_clip(),
        }
        (folder / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
        save_file(state_dict_from_params(self.params), str(folder / WEIGHTS_NAME))
        vocab = Path(self.tokenizer.vocab_path)
        if (
            vocab.resolve() != PACKAGED_VOCAB.resolve()
            and vocab.parent.resolve() != folder.resolve()
        ):
            shutil.copyfile(vocab, folder / VOCAB_NAME)


def resolve_clip_folder(name_or_folder: str | os.PathLike, revision: str | None = None) -> Path:
    """A local open_clip folder for a short name, a hub repo id, a folder or "embedded"."""
    name = os.fspath(name_or_folder)
    is_other = name == EMBEDDED_NAME or name in KNOWN_MODELS or "/" in name or os.sep in name
    if not is_other and not Path(name).expanduser().is_dir():
        known = ", ".join(repr(n) for n in [*KNOWN_MODELS, EMBEDDED_NAME])
        raise CheckpointError(
            f"unknown CLIP model {name!r}. Known names: {known}; or pass a hub repo id or a "
            f"local folder holding {CONFIG_NAME} and {WEIGHTS_NAME} (open_clip's hub format)"
        )
    return resolve_folder(
        KNOWN_MODELS.get(name, name),
        component="clip",
        required_files=(CONFIG_NAME, WEIGHTS_NAME),
        optional_files=(VOCAB_NAME,),
        revision=revision,
    )


def load_flax_backend(folder: Path, dtype=jnp.float32) -> FlaxCLIPBackend:
    from safetensors.numpy import load_file

    cfg = read_json(folder / CONFIG_NAME)
    if "model_cfg" not in cfg:
        raise CheckpointError(
            f"{folder / CONFIG_NAME} has no 'model_cfg' entry; expected open_clip's hub layout "
            "{'model_cfg': {...}, 'preprocess_cfg': {...}}"
        )
    config = CLIPConfig.from_open_clip(cfg["model_cfg"])
    preprocess = PreprocessConfig.from_open_clip(
        cfg.get("preprocess_cfg", {}), config.vision.image_size
    )
    try:
        state_dict = load_file(str(folder / WEIGHTS_NAME))
    except Exception as error:  # safetensors raises its own error types on bad bytes
        raise CheckpointError(
            f"{folder / WEIGHTS_NAME} could not be read ({type(error).__name__}: {error}); "
            "download it again"
        ) from error
    params = params_from_state_dict(state_dict, config, folder / WEIGHTS_NAME)
    vocab = folder / VOCAB_NAME if (folder / VOCAB_NAME).is_file() else PACKAGED_VOCAB
    tokenizer = CLIPTokenizer(vocab, context_length=config.text.context_length)
    return FlaxCLIPBackend(config, params, preprocess, tokenizer, dtype)


class CLIPScorer:
    """Scores images against a prompt with CLIP: exp(logit_scale) * cosine similarity."""

    def __init__(self, backend):
        self.backend = backend

    @classmethod
    def from_pretrained(
        cls,
        name_or_folder: str | os.PathLike = DEFAULT_MODEL,
        revision: str | None = None,
        dtype=jnp.float32,
        backend: str = "flax",
        pretrained: str | None = None,
    ) -> CLIPScorer:
        """Loads a CLIP by short name (see KNOWN_MODELS), hub repo id, local folder or
        "embedded". `backend="open_clip"` runs open-clip-torch instead; only it accepts
        `pretrained` (an open_clip zoo tag, with `name_or_folder` an open_clip model name)."""
        if backend == "open_clip":
            from dalle_mini.scoring_torch import load_open_clip_backend

            if jnp.dtype(dtype) != jnp.float32:
                raise ValueError("the open_clip backend runs in float32; leave dtype unset")
            return cls(load_open_clip_backend(name_or_folder, revision, pretrained))
        if backend != "flax":
            raise ValueError(f"unknown CLIP backend {backend!r}; use 'flax' or 'open_clip'")
        if pretrained is not None:
            raise ValueError("`pretrained` tags are open_clip zoo names: use backend='open_clip'")
        return cls(load_flax_backend(resolve_clip_folder(name_or_folder, revision), dtype))

    @classmethod
    def from_params(
        cls,
        config: CLIPConfig,
        params,
        preprocess: PreprocessConfig | None = None,
        dtype=jnp.float32,
    ) -> CLIPScorer:
        """A scorer around parameters in memory (a CLIP being trained, or `init_params`)."""
        preprocess = preprocess or PreprocessConfig(image_size=config.vision.image_size)
        tokenizer = CLIPTokenizer(context_length=config.text.context_length)
        return cls(FlaxCLIPBackend(config, params, preprocess, tokenizer, dtype))

    @property
    def config(self) -> CLIPConfig:
        return self._flax_only("config")

    @property
    def params(self):
        return self._flax_only("params")

    @property
    def module(self) -> CLIP:
        return self._flax_only("module")

    def _flax_only(self, attribute: str):
        if not isinstance(self.backend, FlaxCLIPBackend):
            raise AttributeError(f"`{attribute}` exists only for the flax backend")
        return getattr(self.backend, attribute)

    def tokenize(self, texts: str | Sequence[str]) -> np.ndarray:
        """(N, 77) int64 token ids, as open_clip's tokenizer gives them."""
        return np.asarray(self.backend.tokenize([texts] if isinstance(texts, str) else list(texts)))

    def preprocess(self, images: Any) -> np.ndarray:
        """Images (PIL of any mode, uint8 or [0, 1] float arrays) -> (N, S, S, 3) float32."""
        return self.backend.preprocess([to_pil_image(image) for image in as_image_list(images)])

    def encode_images(self, images: Any) -> np.ndarray:
        """(N, D) unnormalised image features, as open_clip's encode_image."""
        return self.encode_pixels(self.preprocess(images))

    def encode_text(self, texts: str | Sequence[str]) -> np.ndarray:
        """(N, D) unnormalised text features, as open_clip's encode_text."""
        return self.encode_tokens(self.tokenize(texts))

    def encode_pixels(self, pixels: np.ndarray) -> np.ndarray:
        """Image features of already preprocessed (N, S, S, 3) pixels."""
        return self.backend.encode_pixels(np.asarray(pixels, np.float32))

    def encode_tokens(self, tokens: np.ndarray) -> np.ndarray:
        return self.backend.encode_tokens(np.asarray(tokens))

    def score(self, prompt: str, images: Any) -> np.ndarray:
        """(N,) float32 scores of every image against `prompt`, in one batched call."""
        if not isinstance(prompt, str):
            raise TypeError(f"prompt must be one string, got {type(prompt).__name__}")
        return self.backend.score_pixels(self.preprocess(images), self.tokenize([prompt]))

    def rerank(self, prompt: str, images: Any, keep: int = 9) -> list[RankedImage]:
        """The `keep` best images, best first (ties keep input order)."""
        if keep < 1:
            raise ValueError(f"keep must be at least 1, got {keep}")
        image_list = as_image_list(images)
        scores = self.score(prompt, image_list)
        order = np.argsort(-scores, kind="stable")[:keep]
        return [RankedImage(int(i), float(scores[i]), image_list[i]) for i in order]

    def save_pretrained(self, folder: str | os.PathLike) -> None:
        """Writes `folder` in open_clip's hub format (loadable here and by open_clip)."""
        if not isinstance(self.backend, FlaxCLIPBackend):
            raise TypeError("save_pretrained needs the flax backend (open_clip has its own)")
        self.backend.save_pretrained(folder)
