"""Time to the first preview and to the final ranked grid, as a visitor of the app waits.

    python bench/bench_pipeline.py                         # embedded model, this machine
    python bench/bench_pipeline.py --num-candidates 16 --repeats 5 --out bench/pipeline.json

The first run includes compilation (what the first visitor after a start waits without the
app's warm-up); the next runs use other seeds and show the steady state. A preview counts as
shown once its images are decoded, as the app does before sending it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path


def time_one(pipe, prompt: str, seed: int, args) -> dict[str, float]:
    """Seconds from the call to the first decoded preview and to the final result."""
    start = time.perf_counter()
    first_preview = None
    for update in pipe.stream(
        prompt, num_images=args.num_images, num_candidates=args.num_candidates, seed=seed
    ):
        update.images  # noqa: B018 - decode it, as a front end would to show it
        if update.is_preview and first_preview is None:
            first_preview = time.perf_counter() - start
    return {"first_preview_s": first_preview, "final_s": time.perf_counter() - start}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="embedded")
    parser.add_argument("--prompt", default="a red circle on a blue background")
    parser.add_argument("--num-images", type=int, default=9)
    parser.add_argument("--num-candidates", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3, help="warm runs after the first")
    parser.add_argument("--out", type=Path, help="write the figures as JSON here")
    args = parser.parse_args(argv)

    import jax

    from dalle_mini.pipeline import Pipeline

    start = time.perf_counter()
    pipe = Pipeline.from_pretrained(args.model)
    load_s = time.perf_counter() - start
    cold = time_one(pipe, args.prompt, 0, args)
    warm = [time_one(pipe, args.prompt, seed, args) for seed in range(1, args.repeats + 1)]
    report = {
        "model": pipe.describe(),
        "num_images": args.num_images,
        "num_candidates": args.num_candidates,
        "previews_every_codes": pipe.preview_rows * pipe.grid_size,
        "load_s": load_s,
        "cold": cold,
        "warm_median": {key: statistics.median(run[key] for run in warm) for key in cold},
        "warm_runs": warm,
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor(),
            "cpu_count": os.cpu_count(),
            "jax": jax.__version__,
            "device": str(jax.devices()[0]),
        },
    }
    print(report["model"])
    print(f"{args.num_candidates} candidates → {args.num_images} images; load {load_s:.1f} s")
    for name, run in (("first run (compiles)", cold), ("warm, median", report["warm_median"])):
        print(
            f"  {name:22s} first preview {run['first_preview_s']:6.2f} s   "
            f"final grid {run['final_s']:6.2f} s"
        )
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.out}")
    return report


if __name__ == "__main__":
    main()
