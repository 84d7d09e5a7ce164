"""Does decoding (VQGAN) or image scoring (CLIP) in fixed-size chunks keep every candidate's
result bit-identical, whatever its neighbours and place in the chunk, and is it faster?

The pipeline decodes each candidate alone (a batch of one) and scores CLIP per request, so a
request gets the same pixels and scores alone or in a crowd. A fixed chunk shape (padded) would
also be independent of the crowd, if XLA computes each row of a batch the same way whatever
sits beside it. This script checks that on this machine and times both ways.

For `--candidates` random code grids (the model's own grid size, so it follows the model):
  - identity: every candidate decoded in a chunk of C at several positions, beside different
    random neighbours, against the same chunk-of-C program with it at position 0; and against
    the batch-of-one decode the pipeline uses now. Same for CLIP image features.
  - speed: median seconds per image over `--runs` runs, batch of one vs chunks of C (compile
    excluded), and process CPU seconds, since wall time is unreliable on a shared machine.

    python bench/bench_chunks.py                      # the embedded model, C = 4, 8, 16, 32
    python bench/bench_chunks.py --chunks 8 --candidates 32 --runs 3 --out bench/chunks.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import jax
import numpy as np

from dalle_mini.models.vqgan import VQGANConfig, VQModel
from dalle_mini.pipeline import Pipeline
from dalle_mini.results import to_image


def timed_pair(first, second, runs: int) -> list[tuple[float, float]]:
    """(median wall seconds, median process CPU seconds) of each function over `runs` calls,
    interleaved so that both meet the same load on a shared machine."""
    times = {first: ([], []), second: ([], [])}
    for _ in range(runs):
        for fn, (walls, cpus) in times.items():
            wall, cpu = time.perf_counter(), time.process_time()
            jax.block_until_ready(fn())
            walls.append(time.perf_counter() - wall)
            cpus.append(time.process_time() - cpu)
    return [(statistics.median(w), statistics.median(c)) for w, c in times.values()]


def decode(pipe, codes: np.ndarray) -> np.ndarray:
    return np.asarray(pipe.vqgan.decode_code(codes, params=pipe.vqgan_params))


def decode_alone(pipe, codes: np.ndarray) -> np.ndarray:
    return np.concatenate([decode(pipe, row[None]) for row in codes])


def decode_chunked(pipe, codes: np.ndarray, chunk: int) -> np.ndarray:
    """Codes padded (repeating the last row) to whole chunks of `chunk`, decoded chunk by chunk."""
    padded = np.concatenate([codes, np.repeat(codes[-1:], -len(codes) % chunk, axis=0)])
    parts = [decode(pipe, padded[i : i + chunk]) for i in range(0, len(padded), chunk)]
    return np.concatenate([np.asarray(p) for p in parts])[: len(codes)]


def encode_chunked(pipe, pixels: np.ndarray, chunk: int) -> np.ndarray:
    padded = np.concatenate([pixels, np.repeat(pixels[-1:], -len(pixels) % chunk, axis=0)])
    parts = [pipe.scorer.encode_pixels(padded[i : i + chunk]) for i in range(0, len(padded), chunk)]
    return np.concatenate(parts)[: len(pixels)]


def placement_mismatches(compute, items: np.ndarray, chunk: int, rng) -> dict:
    """Each item computed at positions 0, middle and last of a chunk of random neighbours,
    against position 0 beside other neighbours: how many differ at all, and by how much."""
    differing, worst = 0, 0.0
    for index in range(len(items)):
        results = []
        for position in sorted({0, chunk // 2, chunk - 1}):
            neighbours = items[rng.choice(len(items), chunk, replace=True)]
            neighbours[position] = items[index]
            results.append(np.asarray(compute(neighbours))[position])
        gaps = [float(np.abs(r - results[0]).max()) for r in results[1:]]
        differing += any(g > 0 for g in gaps)
        worst = max([worst, *gaps])
    return {"items_differing": differing, "items": len(items), "max_abs_diff": worst}


def as_uint8(pixels: np.ndarray) -> np.ndarray:
    return np.stack([np.asarray(to_image(p)) for p in pixels])


def check_decode(pipe, codes: np.ndarray, chunk: int, runs: int, rng) -> dict:
    alone = decode_alone(pipe, codes)
    chunked = decode_chunked(pipe, codes, chunk)
    placement = placement_mismatches(lambda c: decode(pipe, c), codes, chunk, rng)
    (alone_s, alone_cpu), (chunk_s, chunk_cpu) = timed_pair(
        lambda: decode_alone(pipe, codes), lambda: decode_chunked(pipe, codes, chunk), runs
    )
    return {
        "chunk": chunk,
        "placement": placement,
        "vs_alone_max_abs_diff": float(np.abs(chunked - alone).max()),
        "vs_alone_uint8_pixels_differing": int((as_uint8(chunked) != as_uint8(alone)).sum()),
        "alone_ms_per_image": 1e3 * alone_s / len(codes),
        "chunked_ms_per_image": 1e3 * chunk_s / len(codes),
        "alone_cpu_ms_per_image": 1e3 * alone_cpu / len(codes),
        "chunked_cpu_ms_per_image": 1e3 * chunk_cpu / len(codes),
    }


def check_clip(pipe, images: list, chunk: int, runs: int, rng) -> dict:
    """CLIP image features: per request (one call of all its candidates, as now) vs chunks."""
    pixels = pipe.scorer.preprocess(images)  # (N, S, S, 3)
    per_request = pipe.scorer.encode_pixels(pixels)
    chunked = encode_chunked(pipe, pixels, chunk)
    placement = placement_mismatches(pipe.scorer.encode_pixels, pixels, chunk, rng)
    (request_s, request_cpu), (chunk_s, chunk_cpu) = timed_pair(
        lambda: pipe.scorer.encode_pixels(pixels), lambda: encode_chunked(pipe, pixels, chunk), runs
    )
    return {
        "chunk": chunk,
        "placement": placement,
        "vs_per_request_max_abs_diff": float(np.abs(chunked - per_request).max()),
        "per_request_ms_per_image": 1e3 * request_s / len(images),
        "chunked_ms_per_image": 1e3 * chunk_s / len(images),
        "per_request_cpu_ms_per_image": 1e3 * request_cpu / len(images),
        "chunked_cpu_ms_per_image": 1e3 * chunk_cpu / len(images),
    }


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="embedded")
    parser.add_argument("--candidates", type=int, default=32)
    parser.add_argument("--chunks", type=int, nargs="+", default=[4, 8, 16, 32])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--no-clip", action="store_true", help="time the decoding only")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--vqgan-config",
        type=Path,
        help="time a VQGAN of this config.json instead, with random weights (e.g. a model still "
        "in training)",
    )
    parser.add_argument("--out", help="write the figures as JSON here")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    pipe = Pipeline.from_pretrained(args.model)
    if args.vqgan_config:
        pipe.vqgan = VQModel(VQGANConfig.from_json(args.vqgan_config))
        pipe.vqgan_params = pipe.vqgan.init_params(jax.random.PRNGKey(args.seed))
    rng = np.random.default_rng(args.seed)
    grid = pipe.vqgan.config.grid_size
    codes = rng.integers(0, pipe.vqgan.config.n_embed, (args.candidates, grid * grid))
    images = [to_image(p) for p in decode_alone(pipe, codes)]
    report = {
        "model": pipe.describe(),
        "vqgan": str(args.vqgan_config or args.model),
        "cpus": os.cpu_count(),
        "candidates": args.candidates,
    }
    report["load_average_at_start"] = os.getloadavg()
    report["decode"], report["clip"] = [], []
    for chunk in args.chunks:
        report["decode"].append(check_decode(pipe, codes, chunk, args.runs, rng))
        print("decode", json.dumps(report["decode"][-1]), flush=True)
        if pipe.scorer is not None and not args.no_clip:
            report["clip"].append(check_clip(pipe, images, chunk, args.runs, rng))
            print("clip", json.dumps(report["clip"][-1]), flush=True)
    report["load_average_at_end"] = os.getloadavg()
    if args.out:
        with open(args.out, "w") as handle:
            json.dump(report, handle, indent=2)
            handle.write("\n")


if __name__ == "__main__":
    main()
