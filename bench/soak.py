"""Soak test: moderate load on the app for a long while, watching its memory, files and threads.

Starts `python app.py` on loopback (batching on, embedded model by default) and keeps `--users`
simulated people sending requests through gradio_client, each pausing a little between
requests, for `--minutes`. Every `--every` seconds it samples the server's RSS, open file
descriptors and thread count. Writes the samples (CSV), a summary (JSON) and a plot (PNG with
matplotlib if installed, else an SVG drawn here).

    python bench/soak.py --minutes 30 --out bench/soak        # bench/soak.{csv,json,svg|png}

Verdict: RSS growth after warm-up (the mean of the last tenth of the run against the mean of the
tenth just after `--warmup` minutes) under 5%, and no growth of descriptors or threads (their
maxima in the last tenth not above the maxima of the warm-up tenth).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import statistics
import sys
import threading
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from load_test import IMAGES_PER_REQUEST, Server, random_knobs  # noqa: E402

COLUMNS = ("minutes", "rss_mb", "open_fds", "threads", "requests_done", "failures")


def people(url: str, users: int, stop: threading.Event, pause: float, counts: dict) -> list:
    from gradio_client import Client

    lock = threading.Lock()

    def person(index: int) -> None:
        rng = random.Random(index)
        client = Client(url, verbose=False, download_files=False)  # the server does the work
        while not stop.is_set():
            try:
                gallery, *_ = client.predict(*random_knobs(rng), api_name="/generate")
                key = "done" if len(gallery) == IMAGES_PER_REQUEST else "failures"
            except Exception as error:  # noqa: BLE001 - counted
                key = "rejected" if "queue is full" in str(error).lower() else "failures"
                if key == "failures":
                    print(f"request failed: {error}", flush=True)
            with lock:
                counts[key] += 1
            stop.wait(rng.uniform(0, 2 * pause))

    threads = [threading.Thread(target=person, args=(i,), daemon=True) for i in range(users)]
    for thread in threads:
        thread.start()
    return threads


def sample(ps: psutil.Process, start: float, counts: dict) -> dict:
    return {
        "minutes": (time.monotonic() - start) / 60,
        "rss_mb": ps.memory_info().rss / 2**20,
        "open_fds": ps.num_fds(),
        "threads": ps.num_threads(),
        "requests_done": counts["done"],
        "failures": counts["failures"],
    }


def verdict(samples: list[dict], warmup_minutes: float) -> dict:
    after = [s for s in samples if s["minutes"] >= warmup_minutes]
    tenth = max(1, len(after) // 10)
    first, last = after[:tenth], after[-tenth:]
    base_rss = statistics.mean(s["rss_mb"] for s in first)
    end_rss = statistics.mean(s["rss_mb"] for s in last)
    growth = {
        key: max(s[key] for s in last) - max(s[key] for s in first)
        for key in ("open_fds", "threads")
    }
    return {
        "rss_after_warmup_mb": base_rss,
        "rss_at_end_mb": end_rss,
        "rss_growth_percent": 100 * (end_rss - base_rss) / base_rss,
        "fd_growth": growth["open_fds"],
        "thread_growth": growth["threads"],
        "passes": end_rss < 1.05 * base_rss and growth["open_fds"] <= 0 and growth["threads"] <= 0,
    }


def plot(samples: list[dict], stem: Path) -> Path:
    series = [("rss_mb", "RSS (MB)"), ("open_fds", "open fds"), ("threads", "threads")]
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return write_svg(samples, series, stem.with_suffix(".svg"))
    figure, axes = plt.subplots(len(series), 1, figsize=(6, 5), sharex=True)
    for axis, (key, label) in zip(axes, series, strict=True):
        axis.plot([s["minutes"] for s in samples], [s[key] for s in samples])
        axis.set_ylabel(label)
    axes[-1].set_xlabel("minutes")
    figure.tight_layout()
    path = stem.with_suffix(".png")
    figure.savefig(path, dpi=100)
    return path


def write_svg(samples: list[dict], series: list, path: Path) -> Path:
    """Small multiples, one line chart per series, sharing the time axis."""
    width, panel, left, pad = 640, 150, 70, 24
    height = pad + len(series) * (panel + pad) + 20
    minutes = [s["minutes"] for s in samples]
    span = max(minutes[-1], 1e-9)
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        'font-family="sans-serif" font-size="11">',
        f'<rect width="{width}" height="{height}" fill="white"/>',
    ]
    for row, (key, label) in enumerate(series):
        top = pad + row * (panel + pad)
        values = [s[key] for s in samples]
        low, high = min(values), max(values)
        low, high = (low - 1, high + 1) if high == low else (low, high)
        low, high = low - 0.05 * (high - low), high + 0.05 * (high - low)

        def xy(t, v, top=top, low=low, high=high):
            x = left + (width - left - 10) * t / span
            return f"{x:.1f},{top + panel - panel * (v - low) / (high - low):.1f}"

        points = " ".join(xy(t, v) for t, v in zip(minutes, values, strict=True))
        parts += [
            f'<rect x="{left}" y="{top}" width="{width - left - 10}" height="{panel}" '
            'fill="none" stroke="#999"/>',
            f'<text x="{left - 6}" y="{top + 10}" text-anchor="end">{high:.0f}</text>',
            f'<text x="{left - 6}" y="{top + panel}" text-anchor="end">{low:.0f}</text>',
            f'<text x="{left}" y="{top - 6}" font-weight="bold">{label}</text>',
            f'<polyline points="{points}" fill="none" stroke="#1f77b4" stroke-width="1.5"/>',
        ]
    bottom = pad + len(series) * (panel + pad)
    parts += [
        f'<text x="{left}" y="{bottom}">0</text>',
        f'<text x="{width - 10}" y="{bottom}" text-anchor="end">{span:.0f} min</text>',
        "</svg>",
    ]
    path.write_text("\n".join(parts) + "\n")
    return path


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="embedded")
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--warmup", type=float, default=3.0, help="minutes before comparing (3)")
    parser.add_argument("--users", type=int, default=4, help="simulated people (4)")
    parser.add_argument(
        "--pause", type=float, default=3.0, help="mean seconds between requests (3)"
    )
    parser.add_argument("--every", type=float, default=5.0, help="seconds between samples (5)")
    parser.add_argument("--out", type=Path, default=Path("bench/soak"), help="file stem")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    server = Server(args.model, [], Path("/tmp/soak-app.log"))
    counts = {"done": 0, "failures": 0, "rejected": 0}
    stop, samples = threading.Event(), []
    start = time.monotonic()
    threads = people(server.url, args.users, stop, args.pause, counts)
    try:
        while time.monotonic() - start < args.minutes * 60:
            samples.append(sample(server.ps, start, counts))
            time.sleep(args.every)
            print(f"{samples[-1]['minutes']:.1f} min: {samples[-1]}", flush=True)
    finally:
        stop.set()
        for thread in threads:
            thread.join(120)
        server.stop()
    with open(args.out.with_suffix(".csv"), "w", newline="") as handle:
        writer = csv.DictWriter(handle, COLUMNS)
        writer.writeheader()
        writer.writerows(samples)
    summary = {
        "minutes": args.minutes,
        "users": args.users,
        "pause_s": args.pause,
        "requests_done": counts["done"],
        "failures": counts["failures"],
        "rejected_when_full": counts["rejected"],
        "cpus": os.cpu_count(),
        "load_average_at_end": os.getloadavg(),
        **verdict(samples, args.warmup),
    }
    summary["plot"] = str(plot(samples, args.out))
    args.out.with_suffix(".json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
