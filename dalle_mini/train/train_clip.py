"""Training a small CLIP contrastively on (image, caption) pairs, saved in open_clip's format.

Each batch of B matching pairs is scored B×B (cosine similarity × exp(logit_scale)) and trained
with CLIP's symmetric cross-entropy (`models.clip.contrastive_loss`), the temperature learned
and clipped at 100 as in open_clip. Images are preprocessed as `CLIPScorer` preprocesses them
(OpenAI mean/std at the model's image size), captions are tokenized by the CLIP BPE, so the
trained model scores through `CLIPScorer` exactly as it was trained. Half of the images are
lightly degraded (blur, noise, banding) so the scorer also reads the softer images a small
VQGAN decodes.

`embedded_config()` is the CLIP shipped in `dalle_mini/assets/embedded/clip`.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from dalle_mini.clip_tokenizer import CLIPTokenizer
from dalle_mini.models import clip
from dalle_mini.scoring import OPENAI_MEAN, OPENAI_STD, CLIPScorer, PreprocessConfig
from dalle_mini.train import common
from dalle_mini.train.scene_check import degrade

MAX_LOGIT_SCALE = math.log(100.0)


def embedded_config(image_size: int = 64) -> clip.CLIPConfig:
    """The embedded CLIP: ViT 8×8 patches, width 128 × 3 layers; text width 64 × 3 layers."""
    return clip.CLIPConfig(
        embed_dim=64,
        vision=clip.VisionConfig(
            image_size=image_size, patch_size=8, width=128, layers=3, head_width=32
        ),
        text=clip.TextConfig(context_length=32, width=64, heads=2, layers=3),
    )


@dataclasses.dataclass(frozen=True)
class CLIPTrainConfig:
    model: clip.CLIPConfig = dataclasses.field(default_factory=embedded_config)
    optimizer: common.OptimizerConfig = common.OptimizerConfig(
        learning_rate=1e-3, warmup_steps=50, weight_decay=0.05, beta2=0.98
    )
    num_steps: int = 300
    batch_size: int = 128
    degrade_fraction: float = 0.5  # share of training images softened like a VQGAN output
    seed: int = 0
    log_every: int = 25
    checkpoint_every: int = 100


def pixels_for_clip(images: np.ndarray) -> np.ndarray:
    """uint8 (N, S, S, 3) at the model's size -> normalized float32, as CLIPScorer.preprocess."""
    mean, std = np.asarray(OPENAI_MEAN, np.float32), np.asarray(OPENAI_STD, np.float32)
    return (images.astype(np.float32) / np.float32(255) - mean) / std


def soften(images: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """A copy where `fraction` of the images (chosen by seed) are blurred, noised and banded."""
    rng = np.random.default_rng(seed)
    out = images.copy()
    for index in np.flatnonzero(rng.random(len(images)) < fraction):
        blur = float(rng.uniform(0.3, 1.2))
        out[index] = np.asarray(
            degrade(Image.fromarray(images[index]), rng, blur=blur, noise=4.0, levels=16)
        )
    return out


def make_step(module: clip.CLIP, optimizer):
    def loss_fn(params, pixels, tokens):
        image_features, text_features, scale = module.apply({"params": params}, pixels, tokens)
        loss = clip.contrastive_loss(image_features, text_features, scale)
        logits = image_features @ text_features.T  # (B, B)
        accuracy = jnp.mean(jnp.argmax(logits, axis=1) == jnp.arange(logits.shape[0]))
        return loss, {"accuracy": accuracy, "logit_scale": scale}

    @jax.jit
    def step(state: common.TrainState, batch, rng):
        (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state.params, batch["pixels"], batch["tokens"]
        )
        state = common.apply_gradients(state, grads, optimizer)
        params = dict(state.params)
        params["logit_scale"] = jnp.clip(params["logit_scale"], 0.0, MAX_LOGIT_SCALE)
        return state.replace(params=params), {"loss": loss, **metrics}

    return step


def train(
    images: np.ndarray, captions: list[str], config: CLIPTrainConfig, workdir: str | Path
) -> tuple[CLIPScorer, Any]:
    """Trains on uint8 images (N, S, S, 3) and their captions; returns a scorer and params."""
    size = config.model.vision.image_size
    if images.ndim != 4 or images.shape[1:] != (size, size, 3):
        raise ValueError(
            f"images must be (N, {size}, {size}, 3) uint8 for this CLIP; got {images.shape}"
        )
    if len(images) != len(captions):
        raise ValueError(f"{len(images)} images but {len(captions)} captions")
    pixels = pixels_for_clip(soften(images, config.degrade_fraction, config.seed))
    tokens = CLIPTokenizer(context_length=config.model.text.context_length)(captions).astype(
        np.int32
    )
    optimizer = common.make_optimizer(config.optimizer, config.num_steps)
    state = common.create_state(
        clip.init_params(config.model, jax.random.PRNGKey(config.seed)), optimizer
    )

    def batches(start):
        for indices in common.batch_order(len(images), config.batch_size, config.seed, start):
            yield {"pixels": jnp.asarray(pixels[indices]), "tokens": jnp.asarray(tokens[indices])}

    info = {"stage": "clip", "model": config.model.to_open_clip()}
    state = common.run_steps(
        state,
        make_step(clip.CLIP(config.model), optimizer),
        batches,
        config.num_steps,
        workdir,
        info,
        name="clip",
        seed=config.seed,
        log_every=config.log_every,
        checkpoint_every=config.checkpoint_every,
    )
    preprocess = PreprocessConfig(image_size=size)
    return CLIPScorer.from_params(config.model, state.params, preprocess), state.params
