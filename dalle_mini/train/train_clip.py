"""Training a small CLIP contrastively on (image, caption) pairs, saved in open_clip's format.

Each batch of B matching pairs is scored B×B (cosine similarity × exp(logit_scale)) and trained
with CLIP's symmetric cross-entropy (`models.clip.contrastive_loss`), the temperature learned
and clipped at 100 as in open_clip. Images are preprocessed as `CLIPScorer` preprocesses them
(OpenAI mean/std at the model's image size), captions are tokenized by the CLIP BPE, so the
trained model scores through `CLIPScorer` exactly as it was trained. Half of the images are
shown as the generator will draw them: the VQGAN's decoding of their codes when the caller
passes it (`reconstruct`; the `clip` stage does), else lightly degraded copies (blur, noise,
banding), so the scorer reads the softer images a small VQGAN decodes.

Random in-batch captions mostly differ from the right one in colour, so a plain contrastive run
learns colours and little else, and reranking with it picked images with the wrong kind or
position (measured: kind 19.8% → 16.5% after reranking). With the world's scenes at hand, each
image therefore also gets `hard_negatives` captions of its own scene with one stated thing
changed (the kind, a colour, the background, a position, a size or the relation; places and
relations more often, HARD_NEGATIVE_WEIGHTS), which it must score below its own
caption. Wrong captions do not teach it to count, and a generator's commonest fault is an
object too many (three stars for two); optionally (`miscount_fraction`) some of each batch's
images also come drawn with one object too many or too few (`miscounted`), a wrong image that
their caption must score below them. The patch position embeddings start as row/column waves
as large as the patch embeddings (`new_params`).

`embedded_config()` is the CLIP shipped in `dalle_mini/assets/embedded/clip`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from dalle_mini.clip_tokenizer import CLIPTokenizer
from dalle_mini.models import clip
from dalle_mini.scoring import OPENAI_MEAN, OPENAI_STD, CLIPScorer, PreprocessConfig
from dalle_mini.train import common, world
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
    degrade_fraction: float = 0.5  # share of training images shown as a VQGAN would draw them
    hard_negatives: int = 2  # wrong captions per image (needs the scenes; 0 turns them off)
    # share of each batch's images that also come as a wrong drawing (an object too many or too
    # few) which their caption must score below them (needs the scenes). Off: measured on the
    # shipped DalleBart's candidates, it reranked right counts 4 points more often and right
    # kinds 1-3 points less often (model card, "A CLIP taught to count")
    miscount_fraction: float = 0.0
    # a new ViT's patch position embeddings start as row/column waves (common.grid_positions),
    # with this standard deviation: about that of the patch embeddings they are added to
    grid_positions: bool = True
    grid_position_scale: float = 1.0
    seed: int = 0
    log_every: int = 25
    checkpoint_every: int = 100


def pixels_for_clip(images: np.ndarray) -> np.ndarray:
    """uint8 (N, S, S, 3) at the model's size -> normalized float32, as CLIPScorer.preprocess."""
    mean, std = np.asarray(OPENAI_MEAN, np.float32), np.asarray(OPENAI_STD, np.float32)
    return (images.astype(np.float32) / np.float32(255) - mean) / std


def soften(
    images: np.ndarray,
    fraction: float,
    seed: int,
    reconstruct: Callable[[np.ndarray], np.ndarray] | None = None,
) -> np.ndarray:
    """A copy where `fraction` of the images (chosen by seed) look like a VQGAN's output:
    `reconstruct(indices)` (a VQGAN's decoding of those images' codes) when given, else
    blurred, noised and banded copies."""
    rng = np.random.default_rng(seed)
    out = images.copy()
    chosen = np.flatnonzero(rng.random(len(images)) < fraction)
    if reconstruct is not None:
        if not len(chosen):
            return out
        decoded = reconstruct(chosen)
        expected = (len(chosen), *images.shape[1:])
        if decoded.shape != expected:
            raise ValueError(f"reconstructions must be {expected} uint8; got {decoded.shape}")
        out[chosen] = decoded
        return out
    for index in chosen:
        blur = float(rng.uniform(0.3, 1.2))
        out[index] = np.asarray(
            degrade(Image.fromarray(images[index]), rng, blur=blur, noise=4.0, levels=16)
        )
    return out


def _changed_object(obj: world.SceneObject, attribute: str, background: str, rng):
    """`obj` with its kind, colour or size changed, or None when no change is allowed."""
    if attribute == "size":  # to a named size: an unnamed (medium) one is a weak negative
        sizes = [size for size in ("small", "big") if size != obj.size]
        return dataclasses.replace(obj, size=rng.choice(sizes))
    choices = [
        dataclasses.replace(obj, **{attribute: value})
        for value in (world.KINDS if attribute == "kind" else world.COLORS)
        if value != getattr(obj, attribute)
    ]
    allowed = [
        o
        for o in choices
        if o.color != background and (o.color, o.kind) not in world.HELD_OUT_PAIRS
    ]
    return rng.choice(allowed) if allowed else None


# How often each stated thing is the one a wrong caption changes (where the scene states it).
# Captions of other images, the in-batch negatives, nearly always differ in colours, kinds or
# background already; where things are is told apart only by these wrong captions, and a CLIP
# given as many of them as of the rest did not learn it (on clean images: the true caption
# beat one with another place half of the time).
HARD_NEGATIVE_WEIGHTS = {
    "kind": 1.0, "color": 1.0, "size": 1.0, "background": 1.0, "position": 4.0, "relation": 4.0,
}  # fmt: skip


def counterfactual(scene: world.Scene, rng: random.Random) -> world.Scene:
    """The request of `scene` with one stated thing changed: what a wrong caption describes
    (which thing: drawn by HARD_NEGATIVE_WEIGHTS among those the scene states).

    Never produces a held-out colour–shape pair, so training text stays free of them too.
    """
    scene = scene.request()
    options = ["kind", "color", "size", "background"]
    if any(obj.position for obj in scene.objects):
        options.append("position")
    if scene.relation:
        options.append("relation")
    weights = [HARD_NEGATIVE_WEIGHTS[option] for option in options]
    while True:
        attribute = rng.choices(options, weights)[0]
        if attribute == "relation":
            opposite = {"left of": "right of", "right of": "left of", "above": "below"}
            return dataclasses.replace(scene, relation=opposite.get(scene.relation, "above"))
        if attribute == "background":
            # never white: a white background often goes unnamed, leaving a true caption
            taken = {obj.color for obj in scene.objects} | {scene.background, "white"}
            colours = [colour for colour in world.COLORS if colour not in taken]
            return dataclasses.replace(scene, background=rng.choice(colours))
        objects = list(scene.objects)
        repeated = scene.is_repeated
        index = rng.randrange(len(objects))
        if attribute == "position":
            index = rng.choice([i for i, obj in enumerate(objects) if obj.position])
            taken = {obj.position for obj in objects}
            cells = [p for p in world.POSITIONS if p not in taken]
            objects[index] = dataclasses.replace(objects[index], position=rng.choice(cells))
        else:
            changed = _changed_object(objects[index], attribute, scene.background, rng)
            if changed is None:
                continue
            objects[index] = changed
            if repeated and scene.relation is None and changed.position is None:
                objects = [changed, changed]  # "two red circles" -> "two red squares"
        if len(objects) == 2 and objects[0] == objects[1] and not repeated:
            continue  # two different objects made equal: not a caption the world writes
        return dataclasses.replace(scene, objects=tuple(objects))


def hard_negative_captions(scenes, count: int, seed: int) -> list[list[str]]:
    """`count` wrong captions per scene (counterfactual scenes, freshly worded)."""
    rng = random.Random(seed)
    return [
        [world.caption(counterfactual(scene, rng), rng) for _ in range(count)] for scene in scenes
    ]


def miscounted(scene: world.Scene, rng: random.Random) -> list[tuple[world.SceneObject, Any]]:
    """`scene` (drawn, with its layout) with one object too many or, for two objects, as often
    one too few: (object, centre) pairs for `world.draw_objects`.

    An added object is, half of the time, another of one already drawn (what a generator that
    loses count draws: three stars for two), else a random one; it stands in a free cell, at a
    lattice point as the world's objects do, so only the count tells the drawing from its
    scene's. Never draws a held-out colour–shape pair.
    """
    if scene.layout is None:
        raise ValueError("miscounted drawings need the scene's layout (world data as written)")
    placed = list(zip(scene.objects, scene.layout, strict=True))
    if len(placed) == 2 and rng.random() < 0.5:
        del placed[rng.randrange(2)]
        return placed
    taken = {world.position_at(x, y) for _, (x, y) in placed}
    cell = rng.choice([position for position in world.POSITIONS if position not in taken])
    if rng.random() < 0.5:
        obj = rng.choice(placed)[0]
    else:
        obj = world.sample_object(rng, scene.background, held_out=False)
    return [*placed, (obj, world.centre_in(cell, obj.size, rng))]


def miscounted_images(scenes, seed: int, size: int) -> np.ndarray:
    """uint8 (N, size, size, 3): one `miscounted` drawing of each scene."""
    rng = random.Random(seed)
    return np.stack([
        np.asarray(world.draw_objects(scene.background, miscounted(scene, rng), size))
        for scene in scenes
    ])  # fmt: skip


def new_params(config: CLIPTrainConfig) -> dict[str, Any]:
    """The random init of `config.seed`; with `config.grid_positions` the image tower's patch
    position embeddings (not the class token's) start as row/column waves.

    Their size matters. At the random init's (width ** -0.5: 0.09 for the embedded CLIP) they
    are a fifteenth of the patch embeddings of normalized pixels (1.3 RMS at init), so after
    `ln_pre` a token barely says where it is, and the tower never learnt places: after 1,000
    steps a linear read-out of the drawn cell from its features was right 15% of the time, and
    the true caption beat one with another place 52–56% of the time. Started at about the patch
    embeddings' size (`grid_position_scale`), the same run reads places: 74% and 100%."""
    params = clip.init_params(config.model, jax.random.PRNGKey(config.seed))
    if config.grid_positions:
        vision = config.model.vision
        table = common.grid_positions(vision.grid_size**2, vision.width, config.grid_position_scale)
        positions = params["visual"]["positional_embedding"]
        params["visual"]["positional_embedding"] = positions.at[1:].set(jnp.asarray(table))
    return params


def make_step(module: clip.CLIP, optimizer, compiler_options=None):
    """The jitted `step(state, batch, rng) -> (state, metrics)`. Unlike the other trainers'
    steps it keeps XLA's default options (`compiler_options` None): with those of
    `sampling.compiler_options` it runs slower on a CPU (`bench/bench_train_step.py`)."""

    def loss_fn(params, pixels, tokens, count):
        image_features, text_features, scale = module.apply({"params": params}, pixels, tokens)
        loss = clip.contrastive_loss(image_features, text_features, scale, count)
        logits = image_features @ text_features.T  # (B + wrong images, B + wrong captions)
        pairs = jnp.arange(count)
        metrics = {
            "accuracy": jnp.mean(jnp.argmax(logits[:count], axis=1) == pairs),
            "logit_scale": scale,
        }
        wrong = jnp.arange(pixels.shape[0] - count)  # the first images' wrong drawings
        if len(wrong):  # how often a caption scores its image above the miscounted drawing
            metrics["count_accuracy"] = jnp.mean(
                logits[wrong, wrong] > logits[count + wrong, wrong]
            )
        return loss, metrics

    @functools.partial(jax.jit, compiler_options=compiler_options)
    def step(state: common.TrainState, batch, rng):
        tokens = batch["tokens"]  # (B, T) own captions, then (B, K, T) wrong ones flattened
        if "negative_tokens" in batch:
            negatives = batch["negative_tokens"]
            tokens = jnp.concatenate([tokens, negatives.reshape(-1, negatives.shape[-1])])
        pixels = batch["pixels"]  # (B, S, S, 3), then the first images' wrong drawings
        if "wrong_pixels" in batch:
            pixels = jnp.concatenate([pixels, batch["wrong_pixels"]])
        (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state.params, pixels, tokens, batch["pixels"].shape[0]
        )
        state = common.apply_gradients(state, grads, optimizer)
        params = dict(state.params)
        params["logit_scale"] = jnp.clip(params["logit_scale"], 0.0, MAX_LOGIT_SCALE)
        return state.replace(params=params), {"loss": loss, **metrics}

    return step


def train(
    images: np.ndarray,
    captions: list[str],
    config: CLIPTrainConfig,
    workdir: str | Path,
    scenes: list[world.Scene] | None = None,
    reconstruct: Callable[[np.ndarray], np.ndarray] | None = None,
    redraw: Callable[[np.ndarray], np.ndarray] | None = None,
    init_params: Any = None,
) -> tuple[CLIPScorer, Any]:
    """Trains on uint8 images (N, S, S, 3) and their captions; returns a scorer and params.

    With the images' `scenes` (world data), each image also gets `config.hard_negatives`
    wrong captions, and `config.miscount_fraction` of each batch's images a wrong drawing
    (`miscounted`); real image–caption data trains without them. With `reconstruct` (indices ->
    the VQGAN's decoding of those images' codes), `config.degrade_fraction` of the images are
    shown as the VQGAN draws them, which is what the scorer ranks at generation time; with
    `redraw` (uint8 images -> the VQGAN's encoding and decoding of them), as many of the wrong
    drawings are. `init_params` (of a CLIP of `config.model`) fine-tunes that CLIP instead of
    training a new one.
    """
    size = config.model.vision.image_size
    if images.ndim != 4 or images.shape[1:] != (size, size, 3):
        raise ValueError(
            f"images must be (N, {size}, {size}, 3) uint8 for this CLIP; got {images.shape}"
        )
    if len(images) != len(captions):
        raise ValueError(f"{len(images)} images but {len(captions)} captions")
    if not 0 <= config.miscount_fraction <= 1:
        raise ValueError(f"miscount fraction {config.miscount_fraction:g}: must be in [0, 1]")
    pixels = pixels_for_clip(soften(images, config.degrade_fraction, config.seed, reconstruct))
    tokenizer = CLIPTokenizer(context_length=config.model.text.context_length)
    tokens = tokenizer(captions).astype(np.int32)
    negatives = None
    if scenes is not None and config.hard_negatives:
        if len(scenes) != len(captions):
            raise ValueError(f"{len(scenes)} scenes but {len(captions)} captions")
        wrong = hard_negative_captions(scenes, config.hard_negatives, config.seed)
        negatives = tokenizer([text for texts in wrong for text in texts]).astype(np.int32)
        negatives = negatives.reshape(len(captions), config.hard_negatives, -1)  # (N, K, T)
    wrong_pixels, wrong_count = None, round(config.miscount_fraction * config.batch_size)
    if scenes is not None and wrong_count:
        drawn = miscounted_images(scenes, config.seed, size)
        views = (lambda chosen: redraw(drawn[chosen])) if redraw is not None else None
        wrong_pixels = pixels_for_clip(
            soften(drawn, config.degrade_fraction, config.seed + 1, views)
        )
    optimizer = common.make_optimizer(config.optimizer, config.num_steps)
    params = init_params if init_params is not None else new_params(config)
    state = common.create_state(params, optimizer)

    def batches(start):
        for indices in common.batch_order(len(images), config.batch_size, config.seed, start):
            batch = {"pixels": pixels[indices], "tokens": tokens[indices]}
            if negatives is not None:
                batch["negative_tokens"] = negatives[indices]
            if wrong_pixels is not None:
                batch["wrong_pixels"] = wrong_pixels[indices[:wrong_count]]
            yield common.device_batch(batch)

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
