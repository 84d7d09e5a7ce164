"""The evaluation of the embedded models: generate for world prompts, check, rerank, report.

For each split (validation = seen colour–shape pairs, held-out = pairs never drawn in training)
the first `num_prompts` captions are each sampled `num_candidates` times (DalleBart with
super-conditioning → VQGAN decode). The scene checker (`scene_check.check_image`) judges every
candidate against the scene its caption asked for; CLIP scores them and keeps the best `keep`.
Reported per attribute: accuracy over all candidates (no reranking) and over the kept ones
(reranking), the mean CLIP score of the kept vs. all candidates, and codebook usage. The
quality bars of the embedded model are checked on the reranked figures; both are reported.
Output: `report.json`, `report.md` and a sample grid per split in the output folder.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jax
import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from dalle_mini.models.dallebart import DalleBart
from dalle_mini.models.vqgan import VQModel
from dalle_mini.processor import DalleBartProcessor
from dalle_mini.scoring import CLIPScorer
from dalle_mini.train import image_folder, scene_check, world
from dalle_mini.train.train_vqgan import decode_codes

# (split, attribute) -> least accuracy with reranking (the quality bars).
QUALITY_BARS = {
    ("valid", "background"): 0.97,
    ("valid", "color"): 0.95,
    ("valid", "kind"): 0.90,
    ("valid", "position"): 0.90,
    ("heldout", "color"): 0.80,
    ("heldout", "kind"): 0.80,
}
SPLIT_TITLES = {"valid": "seen pairs (validation)", "heldout": "held-out colour–shape pairs"}


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    num_prompts: int = 256
    num_candidates: int = 32
    keep: int = 9
    condition_scale: float | None = None  # None: the DalleBart's own (config.json)
    top_k: int | None = None  # None: the DalleBart's own (config.json), as the app samples
    top_p: float = 1.0
    temperature: float = 1.0
    prompts_per_call: int = 8  # prompts sampled together (× num_candidates rows)
    seed: int = 0


@dataclasses.dataclass
class Models:
    dallebart: DalleBart
    dallebart_params: Any
    processor: DalleBartProcessor
    vqgan: VQModel
    vqgan_params: Any
    scorer: CLIPScorer

    @classmethod
    def load(cls, folder: str | Path) -> Models:
        """Loads `folder/dallebart`, `folder/vqgan` and `folder/clip` (or "embedded")."""
        name = str(folder)
        part = (lambda c: name) if name == "embedded" else (lambda c: Path(folder) / c)  # noqa: E731
        dallebart, params = DalleBart.from_pretrained(part("dallebart"))
        vqgan, vqgan_params = VQModel.from_pretrained(part("vqgan"))
        return cls(
            dallebart,
            params,
            DalleBartProcessor.from_pretrained(part("dallebart")),
            vqgan,
            vqgan_params,
            CLIPScorer.from_pretrained(part("clip")),
        )


def generate(
    models: Models, prompts: list[str], config: EvalConfig, first_index: int
) -> np.ndarray:
    """Codes (len(prompts) * num_candidates, image_length); candidate c of prompt p is row
    p * num_candidates + c, its key derived from (seed, first_index * num_candidates + row)."""
    repeated = [prompt for prompt in prompts for _ in range(config.num_candidates)]
    batch = models.processor(repeated)
    indices = first_index * config.num_candidates + np.arange(len(repeated))
    out = models.dallebart.generate(
        **batch,
        prng_key=jax.random.PRNGKey(config.seed),
        params=models.dallebart_params,
        condition_scale=config.condition_scale,
        top_k=config.top_k,
        top_p=config.top_p,
        temperature=config.temperature,
        image_indices=indices,
    )
    return np.asarray(out.sequences[:, 1:])


def ranked_candidates(
    models: Models, captions: list[str], config: EvalConfig, desc: str, codes_seen: list
) -> Iterator[tuple[int, str, np.ndarray, np.ndarray, np.ndarray]]:
    """For each of the first num_prompts captions, `(index, prompt, candidates, scores, kept)`:
    its candidates (num_candidates, S, S, 3) uint8 as the VQGAN draws them, their CLIP scores
    and the indices of the `keep` best, best first. Appends each call's codes to `codes_seen`."""
    count = min(config.num_prompts, len(captions))
    progress = tqdm(total=count, desc=desc, unit="prompt")
    for start in range(0, count, config.prompts_per_call):
        prompts = captions[start : min(start + config.prompts_per_call, count)]
        codes = generate(models, prompts, config, start)
        codes_seen.append(codes)
        images = decode_codes(models.vqgan, models.vqgan_params, codes)
        for offset, prompt in enumerate(prompts):
            candidates = images[
                offset * config.num_candidates : (offset + 1) * config.num_candidates
            ]
            scores = models.scorer.score(prompt, list(candidates))
            kept = np.argsort(-scores, kind="stable")[: config.keep]
            yield start + offset, prompt, candidates, scores, kept
        progress.update(len(prompts))
    progress.close()


def _grid_image(rows: list[np.ndarray]) -> np.ndarray:
    """One image of the kept candidates, a row per prompt."""
    return np.concatenate([np.concatenate(list(row), axis=1) for row in rows], axis=0)


def evaluate_split(
    models: Models, captions: list[str], scenes: list[world.Scene], config: EvalConfig, split: str
) -> dict[str, Any]:
    """Generates, checks and reranks for the first num_prompts captions of one split."""
    verdicts_all, verdicts_kept, scores_all, scores_kept, codes_seen, grid = [], [], [], [], [], []
    ranked = ranked_candidates(models, captions, config, f"evaluate {split}", codes_seen)
    for index, _, candidates, scores, kept in ranked:
        request = scenes[index].request()
        verdicts = [scene_check.check_image(image, request) for image in candidates]
        verdicts_all += verdicts
        verdicts_kept += [verdicts[i] for i in kept]
        scores_all.append(float(scores.mean()))
        scores_kept.append(float(scores[kept].mean()))
        if len(grid) < 6:
            grid.append(candidates[kept])
    count = min(config.num_prompts, len(captions))
    used = np.unique(np.concatenate(codes_seen))
    return {
        "num_prompts": count,
        "accuracy_all": scene_check.summarize(verdicts_all),
        "accuracy_reranked": scene_check.summarize(verdicts_kept),
        "clip_score_all": float(np.mean(scores_all)),
        "clip_score_kept": float(np.mean(scores_kept)),
        "generated_codes_used": int(used.size),
        "generated_codebook_usage": float(used.size / models.dallebart.config.num_codes),
        "prompts_shown": captions[: len(grid)],
        "_grid": _grid_image(grid),
    }


def check_bars(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Each quality bar with the measured (reranked) accuracy and whether it holds."""
    rows = []
    for (split, attribute), bar in QUALITY_BARS.items():
        value = results["splits"][split]["accuracy_reranked"].get(attribute)
        rows.append(
            {
                "split": split,
                "attribute": attribute,
                "bar": bar,
                "value": value,
                "met": value is not None and value >= bar,
            }
        )
    for split, numbers in results["splits"].items():
        worse = [
            a
            for a, v in numbers["accuracy_reranked"].items()
            if v is not None and v < numbers["accuracy_all"][a]
        ]
        rows.append(
            {
                "split": split,
                "attribute": "reranking helps",
                "bar": None,
                "value": {
                    "attributes_worse": worse,
                    "clip_kept_minus_all": numbers["clip_score_kept"] - numbers["clip_score_all"],
                },
                "met": not worse and numbers["clip_score_kept"] > numbers["clip_score_all"],
            }
        )
    return rows


def _own_settings(models: Models, config: EvalConfig) -> EvalConfig:
    """`config` with the DalleBart's own condition scale and top-k where it leaves them None."""
    own = models.dallebart.config
    return dataclasses.replace(
        config,
        condition_scale=own.condition_scale
        if config.condition_scale is None
        else config.condition_scale,
        top_k=own.top_k if config.top_k is None else config.top_k,
    )


def run(
    models: Models,
    world_dir: str | Path,
    out_dir: str | Path,
    config: EvalConfig,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Evaluates the validation and held-out splits and writes report.json / report.md."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.time()
    config = _own_settings(models, config)
    results: dict[str, Any] = {"config": dataclasses.asdict(config), "splits": {}, **(extra or {})}
    for split in ("valid", "heldout"):
        _, captions, scenes = world.load_split(world_dir, split)
        numbers = evaluate_split(models, captions, scenes, config, split)
        Image.fromarray(numbers.pop("_grid")).save(out_dir / f"samples_{split}.png")
        results["splits"][split] = numbers
    results["bars"] = check_bars(results)
    results["evaluate_seconds"] = round(time.time() - started, 1)
    (out_dir / "report.json").write_text(json.dumps(results, indent=2) + "\n")
    (out_dir / "report.md").write_text(markdown_report(results))
    return results


def _percent(value) -> str:
    return "–" if value is None else f"{100 * value:.1f}%"


def markdown_report(results: dict[str, Any]) -> str:
    config, splits = results["config"], results["splits"]
    lines = [
        "# Evaluation of the embedded models",
        "",
        f"{config['num_prompts']} prompts per split, {config['num_candidates']} candidates each, "
        f"{config['keep']} kept by CLIP; condition_scale {config['condition_scale']}, "
        f"top_k {config['top_k']}, top_p {config['top_p']}, "
        f"temperature {config['temperature']}.",
        "",
        "| attribute | " + " | ".join(f"{SPLIT_TITLES[s]}: all | reranked" for s in splits) + " |",
        "|---|" + "---|---|" * len(splits),
    ]
    for attribute in scene_check.ATTRIBUTES:
        cells = [
            " | ".join(_percent(n[key][attribute]) for key in ("accuracy_all", "accuracy_reranked"))
            for n in splits.values()
        ]
        lines.append(f"| {attribute} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "| split | CLIP score, all | CLIP score, kept | generated codes used |",
        "|---|---|---|---|",
    ]
    for split, n in splits.items():
        lines.append(
            f"| {split} | {n['clip_score_all']:.2f} | {n['clip_score_kept']:.2f} | "
            f"{n['generated_codes_used']} ({_percent(n['generated_codebook_usage'])}) |"
        )
    lines += [
        "",
        "## Quality bars (reranked)",
        "",
        "| split | attribute | bar | measured | met |",
        "|---|---|---|---|---|",
    ]
    for bar in results["bars"]:
        value = bar["value"] if isinstance(bar["value"], dict) else _percent(bar["value"])
        lines.append(
            f"| {bar['split']} | {bar['attribute']} | {_percent(bar['bar'])} | {value} | "
            f"{'yes' if bar['met'] else 'NO'} |"
        )
    return "\n".join(lines + _appendix(results)) + "\n"


def _appendix(results: dict[str, Any]) -> list[str]:
    """The report's closing sections: the VQGAN's report and the stage times, when given."""
    lines = []
    for key in ("vqgan", "timings_s"):
        if key in results:
            lines += ["", f"## {key}", "", "```", json.dumps(results[key], indent=2), "```"]
    return lines


def run_own_images(
    models: Models,
    images_dir: str | Path,
    out_dir: str | Path,
    config: EvalConfig,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Evaluates on the validation captions of your own images (`image_folder.import_folder`):
    no scene checker knows them, so it reports what CLIP sees: the mean score of all candidates,
    of the kept ones, and of the real validation images for their own captions (what a
    generator that drew them would score), plus codebook usage and a sample grid. Writes
    report.json, report.md and samples_valid.png."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.time()
    config = _own_settings(models, config)
    real, captions, _ = image_folder.load_split(images_dir, "valid")
    count = min(config.num_prompts, len(captions))
    scores_all, scores_kept, scores_real, codes_seen, grid = [], [], [], [], []
    ranked = ranked_candidates(models, captions, config, "evaluate own images", codes_seen)
    for index, prompt, candidates, scores, kept in ranked:
        scores_all.append(float(scores.mean()))
        scores_kept.append(float(scores[kept].mean()))
        scores_real.append(float(models.scorer.score(prompt, [real[index]])[0]))
        if len(grid) < 6:
            grid.append(candidates[kept])
    used = np.unique(np.concatenate(codes_seen))
    Image.fromarray(_grid_image(grid)).save(out_dir / "samples_valid.png")
    results = {
        "config": dataclasses.asdict(config),
        "data": "own images",
        "valid": {
            "num_prompts": count,
            "clip_score_all": float(np.mean(scores_all)),
            "clip_score_kept": float(np.mean(scores_kept)),
            "clip_score_real": float(np.mean(scores_real)),
            "generated_codes_used": int(used.size),
            "generated_codebook_usage": float(used.size / models.dallebart.config.num_codes),
            "prompts_shown": captions[: len(grid)],
        },
        **(extra or {}),
        "evaluate_seconds": round(time.time() - started, 1),
    }
    (out_dir / "report.json").write_text(json.dumps(results, indent=2) + "\n")
    numbers = results["valid"]
    lines = [
        "# Evaluation on your own images",
        "",
        f"{count} validation captions, {config.num_candidates} candidates each, {config.keep} "
        f"kept by CLIP; condition_scale {config.condition_scale}, top_k {config.top_k}, "
        f"top_p {config.top_p}, temperature {config.temperature}. No scene checker knows these "
        "images, so the figures are CLIP scores (higher: image and caption agree more).",
        "",
        "| CLIP score, all candidates | kept | the real validation images | generated codes used |",
        "|---|---|---|---|",
        f"| {numbers['clip_score_all']:.2f} | {numbers['clip_score_kept']:.2f} | "
        f"{numbers['clip_score_real']:.2f} | {numbers['generated_codes_used']} "
        f"({_percent(numbers['generated_codebook_usage'])}) |",
    ]
    (out_dir / "report.md").write_text("\n".join(lines + _appendix(results)) + "\n")
    return results
