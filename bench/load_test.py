"""Load test: N simulated people using the app at once, through its real HTTP API.

Starts `python app.py` on loopback (embedded model by default) once with cross-request batching
and once without (`--no-batching`, one request at a time), and for each number of users N runs
them for a fixed window: every user sends a request (a mix of prompts and knobs), waits for the
images, and sends the next, until the window closes; requests still running then are awaited.
Reports per server and N: images per minute, median and p95 latency, failures, requests turned
away because the queue was full (the user waits a second and tries again), and the server's
peak RSS.

    python bench/load_test.py                              # N = 1, 8, 32, 64; both servers
    python bench/load_test.py --users 1 8 --window 20 --out bench/load.json

Bounded: each level lasts `--window` seconds plus the time to finish what is running (at most
`--drain` seconds), and everything stays on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
IMAGES_PER_REQUEST = 9
PROMPTS = [
    "a red circle on a blue background",
    "a big yellow star in the top left corner",
    "two green squares on a white background",
    "a small blue triangle to the left of a pink heart",
    "a purple star",
    "an orange heart below a green circle",
    "three red triangles",
    "a black square on a yellow background",
]


def random_knobs(rng: random.Random) -> list:
    """(prompt, temperature, top_k, top_p, condition_scale, num_candidates, seed), as the API."""
    return [
        rng.choice(PROMPTS),
        rng.choice([0.7, 1.0, 1.0, 1.3]),
        rng.choice([0, 20, 50]),
        rng.choice([0.9, 1.0]),
        rng.choice([3.0, 10.0, 10.0]),
        rng.choice([16, 32, 32, 32]),
        rng.randrange(2**32),
    ]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """`python app.py` in a subprocess on loopback, with its RSS sampled in the background."""

    def __init__(self, model: str, extra: list[str], log: Path, start_timeout: float = 600):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/"
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False"}
        env.pop("SPACE_ID", None)
        env.pop("GRADIO_SERVER_NAME", None)
        command = [sys.executable, "app.py", "--model", model, "--port", str(self.port), *extra]
        self.log = open(log, "w")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(
            command, cwd=ROOT, env=env, stdout=self.log, stderr=self.log
        )
        self.ps = psutil.Process(self.process.pid)
        self._wait(start_timeout, log)
        self.peak_rss = 0
        self._sampling = threading.Event()
        self._sampler = threading.Thread(target=self._sample_rss, daemon=True)
        self._sampler.start()

    def _wait(self, timeout: float, log: Path) -> None:
        deadline = time.monotonic() + timeout
        while self.process.poll() is None and time.monotonic() < deadline:
            try:
                urllib.request.urlopen(self.url, timeout=2).close()
                return
            except OSError:
                time.sleep(1)
        self.stop()
        raise SystemExit(f"the app did not start; its log:\n{log.read_text()[-3000:]}")

    def _sample_rss(self) -> None:
        while not self._sampling.wait(0.5):
            try:
                self.peak_rss = max(self.peak_rss, self.ps.memory_info().rss)
            except psutil.Error:
                return

    def reset_peak(self) -> None:
        self.peak_rss = self.ps.memory_info().rss

    def stop(self) -> None:
        if hasattr(self, "_sampling"):
            self._sampling.set()
        self.process.terminate()
        try:
            self.process.wait(timeout=150)  # it finishes the requests in progress first
        except subprocess.TimeoutExpired:
            self.process.kill()
        self.log.close()


def run_level(url: str, users: int, window: float, drain: float, seed: int) -> dict:
    """`users` people for `window` seconds; returns the level's figures."""
    from gradio_client import Client

    latencies, failures, rejected = [], [], [0]
    lock = threading.Lock()
    start = time.monotonic()
    stop_at, give_up_at = start + window, start + window + drain
    finished_at = [start]

    def person(index: int) -> None:
        rng = random.Random(seed * 1000 + index)
        client = Client(url, verbose=False, download_files=False)  # the server does the work
        while time.monotonic() < stop_at:
            began = time.monotonic()
            job = client.submit(*random_knobs(rng), api_name="/generate")
            try:
                gallery, *_ = job.result(timeout=max(1.0, give_up_at - began))
                assert len(gallery) == IMAGES_PER_REQUEST, f"{len(gallery)} images"
            except Exception as error:  # noqa: BLE001 - counted and reported
                with lock:
                    if "queue is full" in str(error).lower():
                        rejected[0] += 1
                    else:
                        failures.append(f"{type(error).__name__}: {error}"[:300])
                time.sleep(1.0)
                continue
            now = time.monotonic()
            with lock:
                latencies.append(now - began)
                finished_at[0] = max(finished_at[0], now)

    threads = [threading.Thread(target=person, args=(i,), daemon=True) for i in range(users)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(max(0.0, give_up_at - time.monotonic()) + 30)
    elapsed = max(finished_at[0] - start, 1e-9)
    ordered = sorted(latencies)
    return {
        "users": users,
        "requests": len(latencies),
        "images_per_minute": len(latencies) * IMAGES_PER_REQUEST * 60 / elapsed,
        "median_latency_s": statistics.median(ordered) if ordered else None,
        "p95_latency_s": ordered[max(0, round(0.95 * len(ordered)) - 1)] if ordered else None,
        "failures": len(failures),
        "failure_examples": failures[:3],
        "rejected_when_full": rejected[0],
        "elapsed_s": elapsed,
    }


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="embedded")
    parser.add_argument("--users", type=int, nargs="+", default=[1, 8, 32, 64])
    parser.add_argument("--window", type=float, default=40.0, help="seconds per level (40)")
    parser.add_argument("--drain", type=float, default=90.0, help="most seconds to finish (90)")
    parser.add_argument("--max-queue", type=int, default=16, help="the app's --max-queue (16)")
    parser.add_argument("--batch-rows", type=int, help="the batched app's --batch-rows")
    parser.add_argument(
        "--modes", nargs="+", default=["batched", "unbatched"], choices=["batched", "unbatched"]
    )
    parser.add_argument("--out", type=Path, help="write the figures as JSON here")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    rows = ["--batch-rows", str(args.batch_rows)] if args.batch_rows else []
    flags = {"batched": rows, "unbatched": ["--no-batching"]}
    report = {
        "model": args.model,
        "window_s": args.window,
        "max_queue": args.max_queue,
        "cpus": os.cpu_count(),
        "load_average_at_start": os.getloadavg(),
        "modes": {},
    }
    for mode in args.modes:
        log = Path(f"/tmp/load-test-{mode}.log")
        extra = ["--max-queue", str(args.max_queue), *flags[mode]]
        print(f"starting the {mode} server (warm-up compiles the sampler)...", flush=True)
        server = Server(args.model, extra, log)
        levels = []
        try:
            for users in args.users:
                server.reset_peak()
                level = run_level(server.url, users, args.window, args.drain, args.seed)
                level["peak_rss_mb"] = server.peak_rss / 2**20
                level["load_average"] = os.getloadavg()[0]
                levels.append(level)
                print(f"  {mode:9s} N={users:3d}: {format_level(level)}", flush=True)
        finally:
            server.stop()
        report["modes"][mode] = levels
    print(table(report))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.out}")


def format_level(level: dict) -> str:
    def seconds(value):
        return "-" if value is None else f"{value:.1f} s"

    return (
        f"{level['images_per_minute']:.0f} images/min, median {seconds(level['median_latency_s'])}"
        f", p95 {seconds(level['p95_latency_s'])}, failures {level['failures']}, rejected "
        f"{level['rejected_when_full']}, peak RSS {level['peak_rss_mb']:.0f} MB"
    )


def table(report: dict) -> str:
    """A Markdown table, batched and unbatched side by side per N."""
    modes = list(report["modes"])
    rows = [
        "| N | "
        + " | ".join(
            f"{m} img/min | {m} median / p95 s | {m} fail / rejected | {m} peak RSS MB"
            for m in modes
        )
        + " | speed-up |"
    ]
    rows.append("|" + "---|" * (2 + 4 * len(modes)))
    by_users = {m: {lv["users"]: lv for lv in report["modes"][m]} for m in modes}
    for users in sorted(by_users[modes[0]]):
        cells = []
        for m in modes:
            lv = by_users[m].get(users)
            if lv is None:
                cells += ["-"] * 4
                continue
            med, p95 = lv["median_latency_s"], lv["p95_latency_s"]
            cells += [
                f"{lv['images_per_minute']:.0f}",
                "-" if med is None else f"{med:.1f} / {p95:.1f}",
                f"{lv['failures']} / {lv['rejected_when_full']}",
                f"{lv['peak_rss_mb']:.0f}",
            ]
        speedup = "-"
        if len(modes) == 2 and users in by_users[modes[1]]:
            base = by_users[modes[1]][users]["images_per_minute"]
            speedup = (
                f"{by_users[modes[0]][users]['images_per_minute'] / base:.2f}×" if base else "-"
            )
        rows.append(f"| {users} | " + " | ".join(cells) + f" | {speedup} |")
    return "\n".join(rows)


if __name__ == "__main__":
    main()
