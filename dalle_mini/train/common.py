"""What every trainer shares: optimizers and schedules, checkpoints, the step loop and its logs.

Optimizers are optax (AdamW or Adafactor) behind a linear warmup and a cosine or linear decay,
with optional gradient clipping and gradient accumulation (`optax.MultiSteps`), as the original
DalleBart trainer offered. Training state (step, parameters, optimizer state, the data order's
rng) is saved with flax's msgpack serialization only, never pickle, and written atomically so a
run killed mid-write resumes from the previous checkpoint. `run_steps` drives a jitted
`step(state, batch, rng) -> (state, metrics)` with a progress bar, periodic metrics printed to
stdout and appended to `metrics.jsonl`, checkpoints every N steps, and resume.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import serialization, struct
from tqdm.auto import tqdm

CHECKPOINT_NAME = "train_state.msgpack"
CHECKPOINT_INFO_NAME = "train_state.json"
METRICS_NAME = "metrics.jsonl"


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """Optimizer and schedule of one training run."""

    name: str = "adamw"  # or "adafactor"
    learning_rate: float = 1e-3
    warmup_steps: int = 100
    decay: str = "cosine"  # or "linear" or "constant"
    end_learning_rate_ratio: float = 0.05  # learning rate at the last step, as a fraction
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.99
    grad_clip: float | None = 1.0
    accumulation_steps: int = 1  # micro-batches averaged into one update


def learning_rate_schedule(config: OptimizerConfig, total_steps: int) -> optax.Schedule:
    """Linear warmup from 0 then `decay` to `end_learning_rate_ratio` at `total_steps` updates."""
    peak, warmup = config.learning_rate, min(config.warmup_steps, max(total_steps - 1, 0))
    end = peak * config.end_learning_rate_ratio
    decay_steps = max(total_steps - warmup, 1)
    if config.decay == "cosine":
        decay = optax.cosine_decay_schedule(peak, decay_steps, alpha=config.end_learning_rate_ratio)
    elif config.decay == "linear":
        decay = optax.linear_schedule(peak, end, decay_steps)
    elif config.decay == "constant":
        decay = optax.constant_schedule(peak)
    else:
        raise ValueError(f"unknown decay {config.decay!r}; use 'cosine', 'linear' or 'constant'")
    warmup_schedule = optax.linear_schedule(0.0, peak, max(warmup, 1))
    return optax.join_schedules([warmup_schedule, decay], [warmup])


def make_optimizer(config: OptimizerConfig, total_steps: int) -> optax.GradientTransformation:
    """The optimizer for `total_steps` parameter updates (micro-batches: × accumulation_steps)."""
    schedule = learning_rate_schedule(config, total_steps)
    if config.name == "adamw":
        core = optax.adamw(
            schedule, b1=config.beta1, b2=config.beta2, weight_decay=config.weight_decay
        )
    elif config.name == "adafactor":
        core = optax.adafactor(
            schedule,
            weight_decay_rate=config.weight_decay or None,
            multiply_by_parameter_scale=False,
        )
    else:
        raise ValueError(f"unknown optimizer {config.name!r}; use 'adamw' or 'adafactor'")
    parts = [optax.clip_by_global_norm(config.grad_clip)] if config.grad_clip else []
    optimizer = optax.chain(*parts, core)
    if config.accumulation_steps < 1:
        raise ValueError(f"accumulation_steps must be >= 1, got {config.accumulation_steps}")
    if config.accumulation_steps > 1:
        optimizer = optax.MultiSteps(optimizer, every_k_schedule=config.accumulation_steps)
    return optimizer


@struct.dataclass
class TrainState:
    """Everything a run needs to continue exactly: counted in micro-batch steps."""

    step: jax.Array
    params: Any
    opt_state: Any
    extra: Any = None  # trainer-specific arrays (e.g. the VQGAN's code usage counts)


def create_state(params, optimizer: optax.GradientTransformation, extra=None) -> TrainState:
    return TrainState(jnp.zeros((), jnp.int32), params, optimizer.init(params), extra)


def apply_gradients(
    state: TrainState, grads, optimizer: optax.GradientTransformation
) -> TrainState:
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state)


# --- checkpoints ------------------------------------------------------------------------------


def _atomic_write(path: Path, data: bytes) -> None:
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_bytes(data)
    os.replace(temporary, path)


def save_checkpoint(folder: str | os.PathLike, state: TrainState, info: dict[str, Any]) -> Path:
    """Writes the state (flax msgpack) and a JSON of `info` (config, step) into `folder`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = jax.device_get(state)
    _atomic_write(folder / CHECKPOINT_NAME, serialization.to_bytes(state))
    info = {**info, "step": int(state.step)}
    _atomic_write(folder / CHECKPOINT_INFO_NAME, (json.dumps(info, indent=2) + "\n").encode())
    return folder / CHECKPOINT_NAME


def load_checkpoint(folder: str | os.PathLike, target: TrainState) -> TrainState | None:
    """The state saved in `folder`, shaped like `target`; None when there is none."""
    path = Path(folder) / CHECKPOINT_NAME
    if not path.is_file():
        return None
    try:
        state = serialization.from_bytes(target, path.read_bytes())
    except Exception as error:  # msgpack and flax raise several unrelated types
        raise ValueError(
            f"{path} does not match this run's model or optimizer ({type(error).__name__}: "
            f"{error}); delete the folder or pass a different --workdir to start afresh"
        ) from error
    return jax.tree.map(jnp.asarray, state)


# --- the loop ---------------------------------------------------------------------------------


class MetricsLog:
    """Prints metrics every `every` steps and appends them to `folder/metrics.jsonl`."""

    def __init__(self, folder: str | os.PathLike, every: int, name: str):
        self.path = Path(folder) / METRICS_NAME
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.every, self.name = max(int(every), 1), name
        self.started = time.time()

    def write(self, step: int, metrics: dict[str, float], echo: bool = True) -> None:
        record = {
            "stage": self.name,
            "step": step,
            "elapsed_s": round(time.time() - self.started, 1),
        }
        record.update({key: round(float(value), 6) for key, value in metrics.items()})
        with open(self.path, "a") as lines:
            lines.write(json.dumps(record) + "\n")
        if echo:
            shown = " ".join(f"{k}={v:.4g}" for k, v in record.items() if isinstance(v, float))
            tqdm.write(f"[{self.name}] step {step}: {shown}")


def run_steps(
    state: TrainState,
    step_fn: Callable[[TrainState, dict, jax.Array], tuple[TrainState, dict]],
    batches: Callable[[int], Iterator[dict]],
    num_steps: int,
    workdir: str | os.PathLike,
    info: dict[str, Any],
    *,
    name: str,
    seed: int = 0,
    log_every: int = 50,
    checkpoint_every: int = 500,
    hook: Callable[[TrainState, dict, dict], TrainState] | None = None,
) -> TrainState:
    """Runs `step_fn` until `state.step == num_steps`, resuming from `workdir` if it holds one.

    Args:
      batches: `batches(start_step)` yields the batches from that step on (so a resumed run
        sees the same data as an uninterrupted one).
      hook: optional host-side `hook(state, batch, metrics) -> state` after each step (e.g.
        codebook restarts).
    """
    restored = load_checkpoint(workdir, state)
    if restored is not None:
        state = restored
        tqdm.write(
            f"[{name}] resumed from {Path(workdir) / CHECKPOINT_NAME} at step {int(state.step)}"
        )
    start = int(state.step)
    log = MetricsLog(workdir, log_every, name)
    window: list[dict] = []
    base_key = jax.random.PRNGKey(seed)
    progress = tqdm(total=num_steps, initial=start, desc=name, unit="step", mininterval=5)
    for step, batch in zip(range(start, num_steps), batches(start), strict=False):
        state, metrics = step_fn(state, batch, jax.random.fold_in(base_key, step))
        if hook is not None:
            state = hook(state, batch, metrics)
        window.append(metrics)
        progress.update(1)
        done = step + 1
        if done % log.every == 0 or done == num_steps:
            means = {k: float(np.mean([jax.device_get(m[k]) for m in window])) for k in window[0]}
            log.write(done, means)
            progress.set_postfix(loss=f"{means.get('loss', float('nan')):.4f}")
            window = []
        if done % checkpoint_every == 0 or done == num_steps:
            save_checkpoint(workdir, state, info)
    progress.close()
    return state


def batch_order(
    num_examples: int, batch_size: int, seed: int, start_step: int
) -> Iterator[np.ndarray]:
    """Example indices of each batch from `start_step` on: a fresh permutation every epoch,
    determined by (seed, epoch) alone so a resumed run continues the same order."""
    if num_examples < batch_size:
        raise ValueError(f"batch size {batch_size} exceeds the {num_examples} examples available")
    per_epoch = num_examples // batch_size
    step = start_step
    while True:
        epoch, offset = divmod(step, per_epoch)
        order = np.random.default_rng([seed, epoch]).permutation(num_examples)
        for index in range(offset, per_epoch):
            yield order[index * batch_size : (index + 1) * batch_size]
        step = (epoch + 1) * per_epoch


def device_batch(arrays: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    return {key: jnp.asarray(value) for key, value in arrays.items()}


def grid_positions(image_length: int, d_model: int, scale: float) -> np.ndarray:
    """Position embeddings (image_length, d_model) that say each place's row and column.

    For the codes of an image (DalleBart's decoder) or the patches of one (a ViT), a raster of
    side × side. Half of the features are waves over the row, half over the column (sine and
    cosine at frequencies from π, period 2 places, down to π / side, half a period over the
    whole side), with standard deviation `scale` (the DalleBart's random init's; for a ViT, about
    the patch embeddings', see `train_clip.new_params`). Same table shape and format as
    a random init, so nothing changes for loading or inference; the model still learns it, but
    starts knowing where in the image each place lies, which a small model trained briefly
    otherwise does not learn. Falls back to waves over the position (down to π / image_length)
    when image_length is not a square.
    """
    side = math.isqrt(image_length)
    position = np.arange(image_length)
    if side * side == image_length:
        axes, extent = [position // side, position % side], side
    else:
        axes, extent = [position], image_length
    per_axis = d_model // (2 * len(axes))  # sine/cosine pairs per axis
    frequencies = np.pi / max(extent, 2) ** (np.arange(per_axis) / max(per_axis - 1, 1))
    waves = [f(axis[:, None] * frequencies[None]) for axis in axes for f in (np.sin, np.cos)]
    table = np.concatenate(waves, axis=1)
    table = np.pad(table, ((0, 0), (0, d_model - table.shape[1])))
    return (table * scale / table.std()).astype(np.float32)
