"""Benchmark: CLIP-scoring candidate images against one prompt with the flax CLIPScorer.

Builds a ViT-B/32 with random weights (the real architecture and size, 151,277,313
parameters, so no download is needed), then times `scorer.score(prompt, images)` for
`--candidates` random RGB images of `--image-size` pixels: the first call (which compiles)
separately, then the median of `--runs` further calls, split into preprocessing (Pillow
resize/crop/normalise + tokenizer) and the jitted forward pass of both towers. Process CPU
time is recorded too, as wall time is unreliable on a machine shared with other jobs.

    python bench/bench_clip.py --out clip_bench.json
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from dalle_mini.checkpoint import count_params
from dalle_mini.models.clip import PRESETS, init_params
from dalle_mini.scoring import CLIPScorer

PROMPT = "an oil painting of a small green frog wearing a tiny golden crown"


def timed(fn, cpu_times=None):
    """Wall seconds of fn() (and its result); appends process CPU seconds to `cpu_times`."""
    start, cpu_start = time.perf_counter(), time.process_time()
    result = fn()
    jax.block_until_ready(result)
    if cpu_times is not None:
        cpu_times.append(time.process_time() - cpu_start)
    return time.perf_counter() - start, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="ViT-B-32", choices=sorted(PRESETS))
    parser.add_argument("--candidates", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--out", help="write the figures as JSON to this path")
    args = parser.parse_args()

    config = PRESETS[args.model]
    init_s, params = timed(lambda: init_params(config, jax.random.PRNGKey(0)))
    scorer = CLIPScorer.from_params(config, params, dtype=jnp.dtype(args.dtype))
    rng = np.random.default_rng(0)
    shape = (args.candidates, args.image_size, args.image_size, 3)
    images = list(rng.integers(0, 256, shape, dtype=np.uint8))

    first_call_s, _ = timed(lambda: scorer.score(PROMPT, images))
    score_runs, preprocess_runs, forward_runs, cpu_runs = [], [], [], []
    for _ in range(args.runs):
        score_runs.append(timed(lambda: scorer.score(PROMPT, images), cpu_runs)[0])
        preprocess_s, (pixels, tokens) = timed(
            lambda: (scorer.preprocess(images), scorer.tokenize([PROMPT]))
        )
        preprocess_runs.append(preprocess_s)
        forward = functools.partial(scorer.backend.score_pixels, pixels, tokens)
        forward_runs.append(timed(forward)[0])
    score_s = statistics.median(score_runs)

    figures = {
        "model": args.model,
        "parameters": count_params(params),
        "dtype": args.dtype,
        "candidates": args.candidates,
        "image_size": args.image_size,
        "init_s": round(init_s, 3),
        "first_call_s": round(first_call_s, 3),
        "compile_s": round(first_call_s - score_s, 3),
        "score_median_s": round(score_s, 3),
        "score_runs_s": [round(t, 3) for t in score_runs],
        # CPU seconds used by this process per call: on a machine shared with other jobs this
        # shows the work itself (wall time on an idle machine ~ cpu_s / cores used)
        "score_cpu_median_s": round(statistics.median(cpu_runs), 3),
        "preprocess_median_s": round(statistics.median(preprocess_runs), 4),
        "forward_median_s": round(statistics.median(forward_runs), 3),
        "ms_per_candidate": round(1000 * score_s / args.candidates, 1),
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "cpu_count": os.cpu_count(),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "machine": platform.machine(),
    }
    for key, value in figures.items():
        print(f"{key:>20}: {value}")
    if args.out:
        with open(args.out, "w") as file:
            json.dump(figures, file, indent=2)
            file.write("\n")


if __name__ == "__main__":
    main()
