"""VQGAN encode and decode speed with JAX's default XLA options and with those of
`sampling.compiler_options` (on a CPU at float32: YNNPACK's fusions off), which `VQModel`
compiles with.

Cases: the embedded VQGAN (its shipped weights) decoding 256 images' codes, as the evaluation
and the app's candidates do, and encoding 256 images of 64 px, as the encode stage does; and,
with `--published`, the published f16_16384 VQGAN's architecture (random weights, from the
reference config) decoding a grid of 9 images of 256 px. Both variants are compiled first and
checked to give the same pixels, then timed in alternating rounds, so a slow moment of a shared
machine falls on both; medians of the rounds, seconds per call.

    python bench/bench_vqgan.py --rounds 5
    python bench/bench_vqgan.py --rounds 5 \
        --published ../shared/reference/config_vqgan_f16_16384.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dalle_mini import sampling  # noqa: E402
from dalle_mini.hub import embedded_folder  # noqa: E402
from dalle_mini.models.vqgan import VQGANConfig, VQGANModule, VQModel  # noqa: E402


def compiled(config: VQGANConfig, method: str, params, inputs, options):
    module = VQGANModule(config)
    fn = getattr(VQGANModule, method)
    call = jax.jit(lambda p, x: module.apply({"params": p}, x, method=fn))
    return call.lower(params, inputs).compile(compiler_options=options)


def cases(published: str | None):
    rng = np.random.default_rng(0)
    model, params = VQModel.from_pretrained(embedded_folder("vqgan"))
    config, grid = model.config, model.config.grid_size
    codes = jnp.asarray(rng.integers(0, config.n_embed, (256, grid, grid)), jnp.int32)
    size = config.resolution
    images = jnp.asarray(rng.random((256, size, size, 3)), jnp.float32)
    yield "embedded decode, 256 images", config, "decode_code", params, codes
    yield "embedded encode, 256 images", config, "encode", params, images
    if published:
        big = VQGANConfig.from_dict(json.loads(Path(published).read_text()))
        big_model = VQModel(big)
        big_params = big_model.init_params(jax.random.PRNGKey(0))
        grid = big.grid_size
        big_codes = jnp.asarray(rng.integers(0, big.n_embed, (9, grid, grid)), jnp.int32)
        yield "f16_16384 decode, 9 images", big, "decode_code", big_params, big_codes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--published", help="the published VQGAN's config.json (random weights)")
    args = parser.parse_args()
    tuned = sampling.compiler_options(jnp.float32)
    print(f"backend {jax.default_backend()}, tuned options {tuned or 'none on this backend'}")
    print("| case | default s | tuned s | default / tuned | largest difference (first output) |")
    print("|---|---|---|---|---|")
    for name, config, method, params, inputs in cases(args.published):
        variants = {
            label: compiled(config, method, params, inputs, options)
            for label, options in (("default", {}), ("tuned", tuned))
        }
        outputs = {label: np.asarray(call(params, inputs)[0]) for label, call in variants.items()}
        difference = float(np.abs(outputs["default"] - outputs["tuned"]).max())
        times = {label: [] for label in variants}
        for _ in range(args.rounds):
            for label, call in variants.items():
                start = time.perf_counter()
                jax.block_until_ready(call(params, inputs))
                times[label].append(time.perf_counter() - start)
        default, faster = (statistics.median(times[label]) for label in ("default", "tuned"))
        print(
            f"| {name} | {default:.2f} | {faster:.2f} | {default / faster:.2f}x | "
            f"{difference:.1e} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
