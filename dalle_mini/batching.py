"""How generation requests become one sampler batch, and how its rows go back to them.

Every request contributes one row per candidate. A row carries its own prompt tokens, PRNG key
(candidate i of seed s uses fold_in(PRNGKey(s), i), as `sampling.row_keys_for`) and knobs, so
requests with different prompts, seeds and knobs share one decoder batch and each gets the
images it would get alone. The batch is padded to a power of two (at least `MIN_BATCH`) by
repeating its last row, so a handful of compiled sizes serve every mix of requests.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dalle_mini import sampling
from dalle_mini.settings import GenerationRequest

MIN_BATCH = 8


@dataclasses.dataclass(frozen=True)
class SamplerBatch:
    tokens: dict[str, np.ndarray]  # input_ids, attention_mask and the *_uncond pair, (N, T)
    row_keys: jax.Array  # (N, 2) one PRNG key per row
    knobs: sampling.Knobs  # (N,) per knob


def batch_size_for(row_count: int) -> int:
    """A power of two, at least MIN_BATCH: regenerating one image reuses the batch of 8."""
    return max(MIN_BATCH, 1 << max(row_count - 1, 0).bit_length())


def make_batch(
    requests: Sequence[GenerationRequest], tokens: Sequence[dict[str, np.ndarray]]
) -> SamplerBatch:
    """The rows of `requests`; `tokens[i]` is the processor's output for request i's prompt."""
    owner = np.repeat(np.arange(len(requests)), [r.num_candidates for r in requests])
    owner = np.pad(owner, (0, batch_size_for(len(owner)) - len(owner)), mode="edge")  # (N,)
    keys = jnp.concatenate([
        sampling.row_keys_for(jax.random.PRNGKey(np.uint32(r.seed)),
                              jnp.asarray(r.image_indices, jnp.int32))
        for r in requests
    ])  # fmt: skip
    keys = jnp.concatenate([keys, jnp.repeat(keys[-1:], len(owner) - len(keys), axis=0)])

    def column(name: str, dtype) -> jax.Array:
        return jnp.asarray([getattr(requests[i], name) for i in owner], dtype)  # (N,)

    knobs = sampling.Knobs(
        condition_scale=column("condition_scale", jnp.float32),
        temperature=column("temperature", jnp.float32),
        top_k=column("top_k", jnp.int32),
        top_p=column("top_p", jnp.float32),
    )
    rows = {key: np.concatenate([t[key] for t in tokens])[owner] for key in tokens[0]}
    return SamplerBatch(tokens=rows, row_keys=keys, knobs=knobs)


def split_rows(codes: np.ndarray, requests: Sequence[GenerationRequest]):
    """(request, its rows of `codes`) pairs, in request order; padding rows are dropped."""
    ends = np.cumsum([r.num_candidates for r in requests])
    return [(r, codes[end - r.num_candidates : end]) for r, end in zip(requests, ends, strict=True)]
