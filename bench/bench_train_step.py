"""Training-step speed of the embedded models' three trainers, with and without the XLA options
of `sampling.compiler_options` (on a CPU at float32: YNNPACK's fusions off).

Each trainer's real `make_step` at the sizes `dalle-mini-train` uses (DalleBart: 32 pairs of
256 codes; VQGAN: 8 images of 64 px, quantizer on; CLIP: 128 images with 2 wrong captions
each), on random inputs (a step's cost does not depend on the values). Both variants are
compiled first, then timed in alternating rounds, so a slow moment of a shared machine falls
on both; the figures are medians of the rounds, in seconds per step (wall and process CPU).

    python bench/bench_train_step.py --rounds 3 --steps 5
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dalle_mini import sampling  # noqa: E402
from dalle_mini.models import clip  # noqa: E402
from dalle_mini.models.vqgan import VQModel  # noqa: E402
from dalle_mini.train import common, train_clip, train_dallebart, train_vqgan  # noqa: E402


def dallebart_case(options):
    config = train_dallebart.DalleBartTrainConfig()
    model_config = train_dallebart.embedded_config(465, 1024, 256, config.max_text_length)
    optimizer = common.make_optimizer(config.optimizer, 2000)
    state = common.create_state(train_dallebart.new_params(model_config, config), optimizer)
    rng = np.random.default_rng(0)
    batch = {
        "codes": rng.integers(0, 1024, (config.batch_size, 256)),
        "input_ids": rng.integers(0, 465, (config.batch_size, config.max_text_length)),
        "attention_mask": np.ones((config.batch_size, config.max_text_length)),
    }
    batch = {name: jnp.asarray(value, jnp.int32) for name, value in batch.items()}
    return train_dallebart.make_step(model_config, optimizer, False, options), state, batch


def vqgan_case(options):
    config = dataclasses.replace(train_vqgan.VQGANTrainConfig(), autoencoder_warmup=0.0)
    model = VQModel(config.model)
    optimizer = common.make_optimizer(config.optimizer, config.num_steps)
    params = model.init_params(jax.random.PRNGKey(0))
    state = common.create_state(params, optimizer, extra=jnp.ones((config.model.n_embed,)))
    size = config.model.resolution
    images = np.random.default_rng(0).integers(0, 256, (8, size, size, 3), dtype=np.uint8)
    step = train_vqgan.make_step(model.module, optimizer, config, options)
    return step, state, {"images": jnp.asarray(images)}


def clip_case(options):
    config = train_clip.CLIPTrainConfig()
    optimizer = common.make_optimizer(config.optimizer, config.num_steps)
    state = common.create_state(train_clip.new_params(config), optimizer)
    rng = np.random.default_rng(0)
    size, length = config.model.vision.image_size, config.model.text.context_length
    count, wrong = config.batch_size, config.hard_negatives
    images = rng.integers(0, 256, (count, size, size, 3), dtype=np.uint8)
    batch = {
        "pixels": jnp.asarray(train_clip.pixels_for_clip(images)),
        "tokens": jnp.asarray(rng.integers(1, 400, (count, length)), jnp.int32),
        "negative_tokens": jnp.asarray(rng.integers(1, 400, (count, wrong, length)), jnp.int32),
    }
    return train_clip.make_step(clip.CLIP(config.model), optimizer, options), state, batch


CASES = {"dallebart": dallebart_case, "vqgan": vqgan_case, "clip": clip_case}


def run(step, state, batch, count: int):
    """Runs `count` steps; returns (state, wall seconds, process CPU seconds) per step."""
    wall, cpu = time.perf_counter(), time.process_time()
    for index in range(count):
        state, metrics = step(state, batch, jax.random.PRNGKey(index))
    jax.block_until_ready(metrics)
    return state, (time.perf_counter() - wall) / count, (time.process_time() - cpu) / count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trainers", nargs="+", choices=sorted(CASES), default=list(CASES))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=5, help="steps per timed round")
    args = parser.parse_args()
    tuned = sampling.compiler_options(jnp.float32)
    print(f"backend {jax.default_backend()}, tuned options {tuned or 'none on this backend'}")
    print("| trainer | XLA options | s/step (wall) | CPU s/step | tuned vs default (wall) |")
    print("|---|---|---|---|---|")
    for name in args.trainers:
        variants = {"default": CASES[name]({}), "tuned": CASES[name](tuned)}
        states = {label: run(*case, 1)[0] for label, case in variants.items()}  # compile
        walls, cpus = {label: [] for label in variants}, {label: [] for label in variants}
        for _ in range(args.rounds):
            for label, (step, _, batch) in variants.items():
                states[label], wall, cpu = run(step, states[label], batch, args.steps)
                walls[label].append(wall)
                cpus[label].append(cpu)
        medians = {label: statistics.median(walls[label]) for label in variants}
        for label in variants:
            ratio = medians["default"] / medians["tuned"] if label == "tuned" else 1.0
            print(
                f"| {name} | {label} | {medians[label]:.3f} | "
                f"{statistics.median(cpus[label]):.3f} | {ratio:.2f}x |",
                flush=True,
            )


if __name__ == "__main__":
    main()
