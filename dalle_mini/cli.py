"""`dalle-mini`: generate images from the command line, or regenerate one from its settings.

    dalle-mini generate "a red circle on a blue background" --num-images 9 --seed 3 --out out/
    dalle-mini regenerate out/result.json --image 4 --out again/

A thin layer over `dalle_mini.pipeline.Pipeline`: parse the knobs, run the pipeline with a
progress bar, write the grid, each image and a JSON of settings and scores.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from dalle_mini import settings as limits
from dalle_mini.compile_cache import enable_compile_cache

_EPILOG = """
knobs:
  Each image is sampled code by code; at every step the model's scores for the next code are
  combined as uncond + condition_scale * (cond - uncond), divided by the temperature, cut to the
  top-k codes and to the top-p probability mass, then one code is drawn. Candidate i of a seed is
  always the same image, so any image can be regenerated alone from the settings in result.json.

examples:
  dalle-mini generate "a red circle on a blue background" --num-images 9 --seed 3 --out out/
  dalle-mini generate "two green squares" "a yellow star" --num-candidates 16 --out out/
  dalle-mini generate "a blue heart" --model mini --dtype bfloat16   # published DALL·E Mini
  dalle-mini regenerate out/result.json --image 4 --out again/
"""


def _add_model_arguments(parser: argparse.ArgumentParser, default: str | None) -> None:
    group = parser.add_argument_group("model")
    group.add_argument(
        "--model",
        default=default,
        help="'embedded' (offline, default), 'mini' or 'mega' (published DALL·E Mini / Mega: "
        "network once, then cached), or a folder with dallebart/, vqgan/ and clip/",
    )
    group.add_argument("--dallebart", help="override the DalleBart (folder or hub id)")
    group.add_argument("--vqgan", help="override the VQGAN (folder or hub id)")
    group.add_argument("--clip", help="override the CLIP (folder, hub id or name like ViT-B-32)")
    group.add_argument("--no-clip", action="store_true", help="load no CLIP: no reranking/scores")
    group.add_argument(
        "--dtype",
        choices=["float32", "bfloat16"],
        default=None,
        help="DalleBart compute dtype (default float32)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dalle-mini",
        description="DALL·E Mini in JAX: text to images, offline by default.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=_EPILOG,
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    gen = commands.add_parser(
        "generate",
        help="generate images for one or more prompts",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=_EPILOG,
    )
    gen.add_argument(
        "prompts",
        nargs="+",
        metavar="PROMPT",
        help="what to draw; several prompts "
        "run as one batch, each written to its own numbered folder",
    )
    knobs = gen.add_argument_group("knobs")
    knobs.add_argument(
        "--num-images",
        type=int,
        metavar="N",
        default=9,
        help=f"images kept per prompt, 1-{limits.MAX_IMAGES} (default 9)",
    )
    knobs.add_argument(
        "--num-candidates",
        type=int,
        metavar="N",
        default=32,
        help="images sampled per prompt, of which CLIP keeps the best "
        f"--num-images (default 32, at most {limits.MAX_CANDIDATES})",
    )
    knobs.add_argument(
        "--seed",
        type=int,
        metavar="S",
        default=0,
        help=f"0-{limits.MAX_SEED}; same seed and knobs, same images (default 0)",
    )
    knobs.add_argument(
        "--temperature",
        type=float,
        metavar="T",
        default=1.0,
        help="> 0; lower is safer and plainer, higher is more varied (default 1.0)",
    )
    knobs.add_argument(
        "--top-k",
        type=int,
        metavar="K",
        default=None,
        help="sample only among the k likeliest codes; 0 turns it off "
        "(default: the model's, 50, as the original)",
    )
    knobs.add_argument(
        "--top-p",
        type=float,
        metavar="P",
        default=None,
        help="in (0, 1]: sample only among the likeliest codes holding this much "
        "probability (default: off)",
    )
    knobs.add_argument(
        "--condition-scale",
        type=float,
        metavar="C",
        default=None,
        help=f"0-{limits.MAX_CONDITION_SCALE:g}; how strongly to follow the prompt "
        "(super-conditioning; 1 = plain sampling; default: the model's, 1.25 for the embedded "
        "model, 10 for the published ones)",
    )
    knobs.add_argument(
        "--no-rerank",
        action="store_true",
        help="keep the first --num-images samples instead of CLIP's best",
    )
    _add_model_arguments(gen, "embedded")
    gen.add_argument("--out", type=Path, default=Path("out"), help="output folder (default out/)")
    gen.add_argument("--quiet", action="store_true", help="no progress bar or summary")

    regen = commands.add_parser("regenerate", help="sample again one image from its settings")
    regen.add_argument(
        "settings",
        type=Path,
        help="a result.json written by `generate` (or by "
        "the app), or a JSON file of one image's settings",
    )
    regen.add_argument(
        "--image",
        type=int,
        default=None,
        help="which image of a result.json, by rank (default: all of them)",
    )
    _add_model_arguments(regen, None)
    regen.add_argument(
        "--out",
        type=Path,
        default=Path("out/regenerated"),
        help="output folder (default out/regenerated/)",
    )
    regen.add_argument("--quiet", action="store_true", help="no summary")
    return parser


def load_pipeline(
    args: argparse.Namespace, default_model: str = "embedded", default_dtype: str = "float32"
):
    from dalle_mini.pipeline import Pipeline

    return Pipeline.from_pretrained(
        args.model or default_model,
        dallebart=args.dallebart,
        vqgan=args.vqgan,
        clip=False if args.no_clip else args.clip,
        dtype=args.dtype or default_dtype,
    )


def generate(args: argparse.Namespace) -> list[Path]:
    from tqdm.auto import tqdm

    pipe = load_pipeline(args)
    knobs = dict(
        num_images=args.num_images,
        num_candidates=args.num_candidates,
        seed=args.seed,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        condition_scale=args.condition_scale,
        rerank=not args.no_rerank and pipe.scorer is not None,
    )
    requests = [pipe.request(prompt, **knobs) for prompt in args.prompts]
    start = time.perf_counter()
    total = pipe.model.config.image_length
    with tqdm(total=total, unit="code", desc="sampling", disable=args.quiet) as bar:
        for update in pipe.stream_requests(requests):
            bar.update((update[0].step if update[0].is_preview else total) - bar.n)
    seconds = time.perf_counter() - start
    folders = [args.out]
    if len(update) > 1:  # numbered, never named after the prompt
        folders = [args.out / f"{i:02d}" for i in range(1, len(update) + 1)]
    for result, folder in zip(update, folders, strict=True):
        paths = result.save(folder)
        if not args.quiet:
            _print_summary(result, paths, seconds)
    return folders


def regenerate(args: argparse.Namespace) -> list[Path]:
    try:
        content = json.loads(args.settings.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"cannot read settings from {args.settings}: {error}") from error
    items = _settings_from(content, args.image)
    first = items[0]
    pipe = load_pipeline(
        args,
        default_model=first.get("model", "embedded"),
        default_dtype=first.get("dtype", "float32"),
    )
    results = pipe.regenerate(items)
    paths = []
    for item, result in zip(items, results, strict=True):
        index = item["image_index"]
        path = args.out / f"seed{item['seed']}_image{index}.png"
        args.out.mkdir(parents=True, exist_ok=True)
        result.images[0].save(path)
        paths.append(path)
        if not args.quiet:
            print(f"{path}  (seed {item['seed']}, candidate {index}, prompt {item['prompt']!r})")
    return paths


def _settings_from(content, rank: int | None) -> list[dict]:
    """One image's settings dict, or those of a result.json (all, or the image of `rank`)."""
    if isinstance(content, dict) and "images" in content:
        images = content["images"]
        if not isinstance(images, list) or not all(
            isinstance(image, dict) and "settings" in image for image in images
        ):
            raise ValueError("the result file's 'images' must be a list of {'settings': ...}")
        if rank is None:
            return [image["settings"] for image in images]
        if not 1 <= rank <= len(images):
            raise ValueError(f"--image {rank} is out of range: the result has {len(images)} images")
        return [images[rank - 1]["settings"]]
    if rank is not None:
        raise ValueError("--image picks an image of a result.json; this file holds one image")
    if not isinstance(content, dict):
        raise ValueError("the settings file must hold a JSON object")
    return [content]


def _print_summary(result, paths: list[Path], seconds: float) -> None:
    print(
        f"\n{result.prompt!r}: {len(result.images)} of {result.num_candidates} candidates "
        f"in {seconds:.1f} s → {paths[0].parent}/"
    )
    for rank, (path, settings) in enumerate(
        zip(paths[1:-1], result.settings, strict=True), start=1
    ):
        score = "" if result.scores is None else f"  CLIP {result.scores[rank - 1]:.3f}"
        print(f"  {rank:2d}. {path.name}  candidate {settings.image_index}{score}")
    print(f"  grid: {paths[0]}   settings and scores: {paths[-1]}")


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `dalle-mini` console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        enable_compile_cache()  # a second run reuses the compiled sampler
        if args.command == "generate":
            generate(args)
        else:
            regenerate(args)
    except (ValueError, TypeError, OSError) as error:  # a bad knob, checkpoint, file or folder
        print(f"dalle-mini {args.command}: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
