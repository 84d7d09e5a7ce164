"""Speed of DALL·E Mini generation here and in min-dalle, side by side, against the hardware floor.

Workloads (issue 6):
  a  the real mini architecture (437,833,712 parameters, random weights): a 3×3 grid with
     super-conditioning (9 images × 256 codes, condition scale 10, top-k 50), then VQGAN
     decoding of the 9 images with the real f16_16384 VQGAN architecture;
  b  one image of the same;
  c  the embedded model's full pipeline: 32 candidates, CLIP-reranked to 9 (ours only).
Both implementations compute with the same random weights (converted to min-dalle's files by
`min_dalle_peer.py`), offline. Every timed run is its own process, so its peak memory is its
own; runs alternate (ours, min-dalle, ours, ...) so that load from other processes on a shared
machine falls on both alike. The persistent compilation cache starts empty, so the first run
shows the cold compile time and the later ones the time to load compiled code from disk.

    python bench/bench_speed.py --out bench/results.json              # a, b at float32, 3 runs
    python bench/bench_speed.py --workloads a --dtypes bfloat16 --runs 3
    python bench/bench_speed.py --no-peer --workloads c

The floor: FLOPs and bytes a grid must move, from the architecture, over this machine's measured
matrix-product throughput and memory bandwidth (`floor_seconds`). Peak memory is the resident
set's high-water mark: while loading the weights, and while generating (`peak_rss_run_gb`).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

PROMPT = "a red apple on a wooden table"
PROMPT_IDS = [0, 1750, 1029, 15318, 15, 10, 7602, 2103, 2]  # fixed ids: timing ignores content
WORKLOAD_IMAGES = {"a": 9, "b": 1, "c": 9}
CONDITION_SCALE, TOP_K = 10.0, 50


# -- the measured run, in a child process ----------------------------------------------------------


class CompileClock:
    """Seconds JAX spends tracing, lowering, compiling or loading compiled code from disk."""

    EVENTS = (
        "/jax/core/compile/jaxpr_trace_duration",
        "/jax/core/compile/jaxpr_to_mlir_module_duration",
        "/jax/core/compile/backend_compile_duration",
    )  # includes disk cache reads/writes

    def __init__(self):
        import jax

        self.seconds = 0.0
        jax.monitoring.register_event_duration_secs_listener(self._record)

    def _record(self, event, duration, **kwargs):
        if event in self.EVENTS:
            self.seconds += duration


def _memory_gb() -> dict[str, float]:
    """This process's resident set now and its high-water mark, in GB (Linux)."""
    with open("/proc/self/status") as handle:
        status = dict(line.split(":", 1) for line in handle)
    return {key: int(status[key].split()[0]) * 1024 / 1e9 for key in ("VmRSS", "VmHWM")}


def _end_of_loading() -> dict[str, float]:
    """The loading's memory figures; then restarts the high-water mark (so that the run's own
    peak can be read at the end) by writing 5 to /proc/self/clear_refs."""
    memory = _memory_gb()
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")
    return {"peak_rss_loading_gb": memory["VmHWM"], "rss_after_load_gb": memory["VmRSS"]}


def run_ours(work: Path, workload: str, dtype_name: str, seed: int,
             pack_weights: bool | None = None) -> dict:  # fmt: skip
    """One grid. `pack_weights` as `DalleBart.load_params` takes it: None packs the decoder's
    step matrices for the CPU kernel where it pays (the mini on a CPU), False keeps XLA's
    products (the "xla" implementation of `--compare-xla`)."""
    import jax
    import jax.numpy as jnp

    from dalle_mini import sampling
    from dalle_mini.models import bart_stacks
    from dalle_mini.models.dallebart import DalleBart
    from dalle_mini.models.vqgan import VQModel

    clock, dtype, count = CompileClock(), getattr(jnp, dtype_name), WORKLOAD_IMAGES[workload]
    model = DalleBart.from_config(work / "dallebart", dtype=dtype)
    # the sampler compiled from the weights' shapes, before they are read: the compiler's
    # working memory comes and goes while the process is small
    model.compile_sampler(count, param_dtype=dtype, text_length=64, pack_weights=pack_weights)
    compiled_ahead = clock.seconds
    start = time.perf_counter()
    params = model.load_params(work / "dallebart", param_dtype=dtype, pack_weights=pack_weights)
    vqgan, vqgan_params = VQModel.from_pretrained(work / "vqgan", decoder_only=True)
    loaded = time.perf_counter()
    memory = _end_of_loading()
    ids = np.ones((count, 64), np.int32)
    ids[:, : len(PROMPT_IDS)] = PROMPT_IDS
    uncond_ids, uncond_mask = model.unconditional_batch(1)  # one row, shared by every image
    knobs = sampling.Knobs.broadcast(count, condition_scale=CONDITION_SCALE, temperature=1.0,
                                     top_k=TOP_K, top_p=1.0)  # fmt: skip
    row_keys = sampling.row_keys_for(jax.random.PRNGKey(seed), jnp.arange(count))
    compile_before = clock.seconds
    t0 = time.perf_counter()
    state = model.start_sampling(ids, (ids != 1).astype(np.int32), row_keys, knobs, uncond_ids,
                                 uncond_mask, params=params)  # fmt: skip
    state = model.continue_sampling(state, params=sampling.split_decoder_layers(params))
    codes = np.asarray(state.sequences[:, 1:])
    del state  # the key/value cache (0.5 GB for a mini grid) is not needed to decode the codes
    t1 = time.perf_counter()
    sample_compile = clock.seconds - compile_before  # none, unless the shapes differed
    pixels = np.concatenate([  # one image at a time: as fast on a CPU, a ninth of the memory
        (np.clip(np.asarray(vqgan.decode_code(row[None], params=vqgan_params)), 0, 1) * 255)
        .astype(np.uint8)
        for row in codes
    ])  # fmt: skip
    t2 = time.perf_counter()
    decode_compile = clock.seconds - compile_before - sample_compile
    assert pixels.shape == (count, 256, 256, 3) and codes.max() < 16384
    return {
        "load_seconds": loaded - start,
        **memory,
        "sample_seconds": t1 - t0 - sample_compile,
        "decode_seconds": t2 - t1 - decode_compile,
        "compile_seconds": compiled_ahead + sample_compile + decode_compile,
        "sampler_compile_seconds": compiled_ahead + sample_compile,
        "codes_checksum": int(codes.sum()),
        "packed_weights": bart_stacks.is_packed(params),
    }


def run_pipeline(work: Path, workload: str, dtype_name: str, seed: int) -> dict:
    """Workload c: the embedded pipeline, 32 candidates reranked to 9."""
    from dalle_mini.pipeline import Pipeline

    start = time.perf_counter()
    pipe = Pipeline.from_pretrained("embedded", dtype=dtype_name)
    loaded = time.perf_counter()
    memory = _end_of_loading()
    seconds = []
    for _ in range(2):  # the first call compiles, the second is timed (compile events of the
        start_call = time.perf_counter()  # pipeline's threads overlap, so they cannot be summed)
        result = pipe(PROMPT, num_images=9, num_candidates=32, seed=seed)
        seconds.append(time.perf_counter() - start_call)
        assert len(result.images) == 9
    return {"load_seconds": loaded - start, **memory, "sample_seconds": seconds[1],
            "decode_seconds": 0.0, "compile_seconds": seconds[0] - seconds[1],
            "sampler_compile_seconds": None}  # fmt: skip


def run_peer(work: Path, workload: str, dtype_name: str, seed: int, steps: int = 256) -> dict:
    import min_dalle_peer

    start = time.perf_counter()
    model = min_dalle_peer.load(work / "min-dalle", dtype_name)
    loaded = time.perf_counter()
    memory = _end_of_loading()
    timings = min_dalle_peer.generate_grid(
        model, PROMPT, grid_size={"a": 3, "b": 1}[workload], seed=seed, top_k=TOP_K,
        condition_scale=CONDITION_SCALE, num_steps=steps,
    )  # fmt: skip
    return {"load_seconds": loaded - start, **memory,
            "sample_seconds": timings["sample_seconds"],
            "decode_seconds": timings["detokenize_seconds"], "compile_seconds": 0.0,
            "step_seconds": timings["step_seconds"],
            "steps_timed": timings["steps_timed"]}  # fmt: skip


def child_main(args) -> None:
    if args.threads:  # before JAX or torch start their thread pools
        os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[: args.threads])
    if args.impl != "peer":
        from dalle_mini.compile_cache import enable_compile_cache

        enable_compile_cache(args.compile_cache, min_compile_time_secs=0.0)
    runners = {"ours": run_ours, "xla": run_ours, "pipeline": run_pipeline, "peer": run_peer}
    run = runners[args.impl]
    extra = {"steps": args.peer_steps} if args.impl == "peer" else {}
    if args.impl == "xla":
        extra = {"pack_weights": False}
    result = run(Path(args.work_dir), args.workload, args.dtype, args.seed, **extra)
    result["peak_rss_run_gb"] = _memory_gb()["VmHWM"]
    result["peak_rss_gb"] = max(result["peak_rss_run_gb"], result["peak_rss_loading_gb"])
    print("RESULT " + json.dumps(result), flush=True)


# -- machine and floor -----------------------------------------------------------------------------


def measure_machine() -> dict:
    """Best observed large matrix-product throughput (f32, bf16 in, f32 accumulate) and memory
    read bandwidth, in JAX on all threads (a child process runs this)."""
    import jax
    import jax.numpy as jnp

    def best_seconds(fn, *args, repeats=5):
        jax.block_until_ready(fn(*args))
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            jax.block_until_ready(fn(*args))
            times.append(time.perf_counter() - start)
        return min(times)

    n = 2048
    out = {}
    for name, dtype in (("float32", jnp.float32), ("bfloat16", jnp.bfloat16)):
        a = jnp.ones((n, n), dtype)
        matmul = jax.jit(lambda x, y: jnp.dot(x, y, preferred_element_type=jnp.float32))
        out[f"matmul_gflops_{name}"] = 2 * n**3 / best_seconds(matmul, a, a) / 1e9
    big = jnp.ones((256 * 2**20,), jnp.float32)  # 1 GiB
    total = jax.jit(jnp.sum)
    out["read_bandwidth_gbs"] = big.nbytes / best_seconds(total, big) / 1e9
    vqgan_flops = _vqgan_flops_per_image()
    if vqgan_flops:
        out["vqgan_decode_gflop_per_image"] = vqgan_flops / 1e9
    return out


def _vqgan_flops_per_image() -> float | None:
    import jax
    import jax.numpy as jnp

    from dalle_mini.models.vqgan import VQGANConfig, VQModel

    vqgan = VQModel(VQGANConfig.f16_16384())
    params = vqgan.abstract_params()
    codes = jax.ShapeDtypeStruct((1, 16, 16), jnp.int32)
    cost = vqgan._decode_code.lower(params, codes).cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return float(cost.get("flops", 0.0)) or None


def floor_seconds(workload: str, dtype_name: str, machine: dict) -> dict:
    """The least time the hardware allows for a workload: every phase bound by compute or by
    memory, whichever is slower (mini architecture; rows = 2 × images with super-conditioning,
    the unconditional prompt encoded once)."""
    from dalle_mini.models.bart import DalleBartConfig

    c, images = DalleBartConfig.mini(), WORKLOAD_IMAGES[workload]
    d, f, vocab, text, length = c.d_model, c.decoder_ffn_dim, c.image_vocab_size + 1, 64, 256
    weight_bytes = 4 if dtype_name == "float32" else 2
    flops_rate = machine[f"matmul_gflops_{dtype_name}"] * 1e9
    bandwidth = machine["read_bandwidth_gbs"] * 1e9
    rows, prompts = 2 * images, images + 1
    encoder_flops = 2 * prompts * text * c.encoder_layers * (4 * d * d + 3 * d * f + 2 * text * d)
    encoder_flops += 2 * prompts * text * c.decoder_layers * 2 * d * d  # cross keys/values
    layer_weights = 6 * d * d + 3 * d * f  # per step: self q,k,v,o + cross q,o + GLU
    step_weights = c.decoder_layers * layer_weights + d * vocab
    total_flops, step_seconds, total_bytes = encoder_flops, 0.0, 0.0
    for t in range(length):
        attention = c.decoder_layers * 2 * 2 * d * ((t + 1) + text)  # scores + context
        flops = 2 * rows * step_weights + rows * attention
        cache_bytes = 4 * c.decoder_layers * 2 * d * (rows * (t + 1) + prompts * text)
        step_bytes = step_weights * weight_bytes + cache_bytes
        total_flops, total_bytes = total_flops + flops, total_bytes + step_bytes
        step_seconds += max(flops / flops_rate, step_bytes / bandwidth)
    vqgan_flops = images * machine.get("vqgan_decode_gflop_per_image", 0.0) * 1e9
    vqgan_seconds = vqgan_flops / (machine["matmul_gflops_float32"] * 1e9)
    return {
        "gflop_per_grid": (total_flops + vqgan_flops) / 1e9,
        "sampling_gbytes_per_grid": total_bytes / 1e9,
        "floor_seconds": encoder_flops / flops_rate + step_seconds + vqgan_seconds,
        "floor_sample_seconds": encoder_flops / flops_rate + step_seconds,
        "floor_decode_seconds": vqgan_seconds,
    }


# -- setting up the weights ------------------------------------------------------------------------


def prepare_weights(work: Path, with_peer: bool) -> None:
    """Random mini DalleBart and f16_16384 VQGAN checkpoints in our format (and min-dalle's),
    written once per work folder."""
    import jax

    from dalle_mini import checkpoint
    from dalle_mini.models.bart import DalleBartConfig
    from dalle_mini.models.dallebart import DalleBart
    from dalle_mini.models.vqgan import VQGANConfig, VQModel

    bart_dir, vqgan_dir = work / "dallebart", work / "vqgan"
    if not (bart_dir / checkpoint.WEIGHTS_NAME).exists():
        print("writing random mini DalleBart weights ...", flush=True)
        model = DalleBart(DalleBartConfig.mini())
        rng = np.random.default_rng(0)
        flat = {}
        for path, leaf in checkpoint.flatten(model.param_shapes()).items():
            if path.endswith("scale"):
                flat[path] = np.ones(leaf.shape, np.float32)
            elif path.endswith("bias"):
                flat[path] = np.zeros(leaf.shape, np.float32)
            else:
                flat[path] = rng.standard_normal(leaf.shape, np.float32) * model.config.init_std
        model.save_pretrained(bart_dir, checkpoint.unflatten(flat))
        del flat
    if not (vqgan_dir / checkpoint.WEIGHTS_NAME).exists():
        print("writing random f16_16384 VQGAN weights ...", flush=True)
        vqgan = VQModel(VQGANConfig.f16_16384())
        vqgan.save_pretrained(vqgan_dir, jax.device_get(vqgan.init_params(jax.random.PRNGKey(0))))
    peer_dir = work / "min-dalle"
    if with_peer and not (peer_dir / "vqgan" / "detoker.pt").exists():
        import min_dalle_peer

        print("converting the weights to min-dalle's files ...", flush=True)
        params = checkpoint.load_msgpack(bart_dir / checkpoint.WEIGHTS_NAME)
        vqgan_params = checkpoint.load_msgpack(vqgan_dir / checkpoint.WEIGHTS_NAME)
        tokenizer = ROOT / "tests" / "fixtures" / "dallebart-scan"
        min_dalle_peer.write_weights(peer_dir, params, vqgan_params, tokenizer)


def peer_available() -> str | None:
    """None if min-dalle can run, else why not."""
    try:
        import min_dalle  # noqa: F401
        import torch  # noqa: F401
    except ImportError as error:
        return f"min-dalle is not installed ({error}): pip install torch==2.13.0; " \
               "pip install --no-deps min-dalle==0.4.11 requests emoji"  # fmt: skip
    return None


def pipeline_available() -> str | None:
    """None if workload c can run, else why not."""
    try:
        from dalle_mini.hub import embedded_folder
        from dalle_mini.pipeline import Pipeline  # noqa: F401
    except ImportError as error:
        return f"dalle_mini.pipeline is not available ({error})"
    for component in ("dallebart", "vqgan", "clip"):
        folder = embedded_folder(component)
        if not folder.is_dir() or not any(folder.iterdir()):
            return f"the embedded {component} is not in {folder} yet"
    return None


# -- the parent: runs, aggregates, prints ----------------------------------------------------------


def spawn(args, *extra) -> dict:
    command = [sys.executable, __file__, "--work-dir", str(args.work_dir), *extra]
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    for line in result.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    raise RuntimeError(f"{' '.join(extra)} failed:\n{result.stdout[-2000:]}{result.stderr[-4000:]}")


def summarize(runs: list[dict], images: int) -> dict:
    med = lambda key: statistics.median(run[key] for run in runs)  # noqa: E731
    seconds = med("sample_seconds") + med("decode_seconds")
    return {
        "runs": len(runs),
        "seconds_per_grid": seconds,
        "sample_seconds": med("sample_seconds"),
        "decode_seconds": med("decode_seconds"),
        "codes_per_second": images * 256 / med("sample_seconds"),
        "compile_seconds_cold": runs[0]["compile_seconds"],
        "compile_seconds_cached": med("compile_seconds") if len(runs) > 1 else None,
        "sampler_compile_seconds_cold": runs[0].get("sampler_compile_seconds"),
        "peak_rss_gb": max(run["peak_rss_gb"] for run in runs),
        "peak_rss_run_gb": max(run["peak_rss_run_gb"] for run in runs),
        "peak_rss_loading_gb": max(run["peak_rss_loading_gb"] for run in runs),
        "load_seconds": med("load_seconds"),
        "rss_after_load_gb": med("rss_after_load_gb"),
        "first_run_extra_seconds": (
            runs[0]["sample_seconds"]
            + runs[0]["decode_seconds"]
            - statistics.median(r["sample_seconds"] + r["decode_seconds"] for r in runs[1:])
            if len(runs) > 1
            else None
        ),
        "all_seconds_per_grid": [run["sample_seconds"] + run["decode_seconds"] for run in runs],
        **({"packed_weights": runs[0]["packed_weights"]} if "packed_weights" in runs[0] else {}),
        "all_sample_seconds": [run["sample_seconds"] for run in runs],
        **({"steps_timed_of_256": runs[0]["steps_timed"]} if "steps_timed" in runs[0] else {}),
    }


def paired_speedup(entry: dict, other: str, key: str) -> float:
    """Median over neighbouring runs (A B, A B, ...) of `other`'s seconds over ours."""
    pairs = zip(entry[other][key], entry["ours"][key], strict=True)
    return statistics.median(theirs / ours for theirs, ours in pairs)


def print_table(results: dict) -> None:
    header = (f"{'workload':9} {'dtype':9} {'impl':9} {'s/grid':>8} {'sample':>8} {'decode':>8} "
              f"{'codes/s':>8} {'compile':>8} {'cached':>7} {'run GB':>7} {'load GB':>7} "
              f"{'floor s':>8} {'×floor':>7} {'speed-up':>8}")  # fmt: skip
    print(header)
    print("-" * len(header))
    for key, entry in results["workloads"].items():
        workload, dtype = key.split("/")
        if "skipped" in entry:
            print(f"{workload:9} {dtype:9} skipped: {entry['skipped']}")
            continue
        floor = entry.get("floor", {}).get("floor_seconds")
        for impl in ("ours", "xla", "peer"):
            row = entry.get(impl)
            if not row:
                continue
            cached = row["compile_seconds_cached"]
            ratio = row["seconds_per_grid"] / floor if floor else float("nan")
            speedup = entry.get("speedup") if impl == "ours" else None
            print(f"{workload:9} {dtype:9} {impl:9} {row['seconds_per_grid']:8.1f} "
                  f"{row['sample_seconds']:8.1f} {row['decode_seconds']:8.1f} "
                  f"{row['codes_per_second']:8.1f} {row['compile_seconds_cold']:8.1f} "
                  f"{'' if cached is None else f'{cached:7.1f}':>7} {row['peak_rss_run_gb']:7.2f} "
                  f"{row['peak_rss_loading_gb']:7.2f} "
                  f"{floor or float('nan'):8.1f} {ratio:7.2f} "
                  f"{'' if speedup is None else f'{speedup:7.1f}×':>8}")  # fmt: skip


def parent_main(args) -> None:
    workloads, dtypes = args.workloads.split(","), args.dtypes.split(",")
    args.work_dir.mkdir(parents=True, exist_ok=True)
    no_peer = "--no-peer given" if args.no_peer else peer_available()
    if no_peer:
        print(f"min-dalle skipped: {no_peer}")
    prepare_weights(args.work_dir, with_peer=not no_peer)
    cache = args.work_dir / f"compile-cache-{os.getpid()}"  # starts empty: first compile is cold
    machine = spawn(args, "--child", "machine", "--threads", str(args.threads or 0))
    print("machine:", json.dumps({k: round(v, 1) for k, v in machine.items()}), flush=True)
    results = {"command": " ".join([Path(sys.executable).name, *sys.argv]),
               "date": time.strftime("%Y-%m-%d %H:%M"), "machine": {**machine,
               "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
               "load_average_at_start": os.getloadavg()}, "workloads": {}}  # fmt: skip
    for dtype in dtypes:
        for workload in workloads:
            key = f"{workload}/{dtype}"
            skip = pipeline_available() if workload == "c" else None
            if skip:
                print(f"workload c skipped: {skip}")
                results["workloads"][key] = {"skipped": skip}
                continue
            impls = ["ours"] + (["xla"] if args.compare_xla else []) + ([] if no_peer else ["peer"])
            if workload == "c":
                impls = ["pipeline"]
            runs = {impl: [] for impl in impls}
            for run in range(args.runs):
                for impl in impls:  # interleaved: A B A B ...
                    child = ["--child", impl, "--workload", workload, "--dtype", dtype,
                             "--seed", str(run + 1), "--compile-cache", str(cache),
                             "--peer-steps", str(args.peer_steps),
                             "--threads", str(args.threads or 0)]  # fmt: skip
                    outcome = spawn(args, *child)
                    runs[impl].append(outcome)
                    seconds = outcome["sample_seconds"] + outcome["decode_seconds"]
                    print(f"  {key} {impl} run {run + 1}: {seconds:.1f} s "
                          f"(compile {outcome['compile_seconds']:.1f} s, peak "
                          f"{outcome['peak_rss_run_gb']:.2f} GB running, "
                          f"{outcome['peak_rss_loading_gb']:.2f} GB loading)",
                          flush=True)  # fmt: skip
            images = WORKLOAD_IMAGES[workload]
            entry = {("ours" if impl == "pipeline" else impl): summarize(rows, images)
                     for impl, rows in runs.items()}  # fmt: skip
            if "xla" in entry:  # the CPU kernels against XLA's products
                entry["speedup_over_xla"] = paired_speedup(entry, "xla", "all_seconds_per_grid")
                entry["speedup_over_xla_sampling"] = paired_speedup(
                    entry, "xla", "all_sample_seconds"
                )
            if workload != "c":
                entry["floor"] = floor_seconds(workload, dtype, machine)
            if "peer" in entry:
                entry["speedup"] = paired_speedup(entry, "peer", "all_seconds_per_grid")
                entry["speedup_sampling"] = paired_speedup(entry, "peer", "all_sample_seconds")
            results["workloads"][key] = entry
    results["machine"]["load_average_at_end"] = os.getloadavg()
    again = spawn(args, "--child", "machine", "--threads", str(args.threads or 0))
    for key, value in again.items():  # the best of two measurements, at the start and the end
        results["machine"][key] = max(value, results["machine"][key])
    for key, entry in results["workloads"].items():
        if "floor" in entry:
            entry["floor"] = floor_seconds(key.split("/")[0], key.split("/")[1], results["machine"])
    print()
    print_table(results)
    for key, entry in results["workloads"].items():
        if "speedup" in entry:
            print(f"{key}: ours is {entry['speedup']:.1f}× faster end to end, "
                  f"{entry['speedup_sampling']:.1f}× at sampling "
                  "(medians of paired runs)")  # fmt: skip
        if "speedup_over_xla" in entry:
            print(f"{key}: the packed CPU kernel is {entry['speedup_over_xla']:.2f}× XLA's "
                  f"products end to end, {entry['speedup_over_xla_sampling']:.2f}× at sampling "
                  "(medians of paired runs)")  # fmt: skip
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))
        print(f"\nwrote {args.out}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workloads", default="a,b", help="comma list of a, b, c")
    parser.add_argument("--dtypes", default="float32", help="comma list of float32, bfloat16")
    parser.add_argument("--runs", type=int, default=3, help="timed runs per implementation")
    parser.add_argument("--no-peer", action="store_true", help="time only this implementation")
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/dalle-mini-bench"),
                        help="where the random weights are written (about 4 GB)")  # fmt: skip
    parser.add_argument("--peer-steps", type=int, default=256,
                        help="time min-dalle's first N of 256 steps and extrapolate (its steps "
                        "all cost the same); 256 runs it whole")  # fmt: skip
    parser.add_argument("--threads", type=int, default=0,
                        help="CPUs each run may use (both implementations); 0: all")  # fmt: skip
    parser.add_argument("--compare-xla", action="store_true",
                        help="also time ours with plain weights and XLA's products ('xla'), "
                        "interleaved with the others")  # fmt: skip
    parser.add_argument("--out", help="write the results as JSON here")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--workload", help=argparse.SUPPRESS)
    parser.add_argument("--dtype", help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--compile-cache", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child == "machine":
        if args.threads:
            os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[: args.threads])
        print("RESULT " + json.dumps(measure_machine()), flush=True)
    elif args.child:
        args.impl = args.child
        child_main(args)
    else:
        parent_main(args)


if __name__ == "__main__":
    main()
