"""`dalle-mini-train`: the training pipeline of the embedded models, one sub-command per stage.

    dalle-mini-train all --workdir runs/embedded --out dalle_mini/assets/embedded
    dalle-mini-train world|vqgan|encode|dallebart|clip|evaluate --workdir runs/embedded

Stages read and write fixed places under `--workdir`: `world/` (the dataset), `vqgan/`,
`encoded/{train,valid,heldout}.parquet` (caption + encoding rows, the original training format),
`dallebart/`, `clip/` (each holding its resumable `train_state.msgpack`, `metrics.jsonl` and the
finished model in `model/`) and `eval/` (report.json, report.md, sample grids). A re-run stage
resumes from its checkpoint (a finished one only reloads it and saves the model again).
`all` runs the six stages, then (with `--out`) assembles the three models in a temporary folder
and moves it into place, so an interrupted run never leaves half-written assets.

With `--images FOLDER` (your own images and captions, `image_folder`) the first stage imports
that folder into `images/{train,valid}` instead of drawing the world, and every later stage of
that workdir trains and measures on it: the world's own aids (hard negative captions, captions
naming every cell, the scene checker) are left out, and `evaluate` reports CLIP scores.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import multiprocessing
import os
import random
import shutil
import signal
import sys
import time
from pathlib import Path

import numpy as np

from dalle_mini import hub
from dalle_mini.checkpoint import CONFIG_NAME
from dalle_mini.train import common, image_folder, train_clip, train_dallebart, train_vqgan, world
from dalle_mini.train import evaluate as evaluation
from dalle_mini.train.data import read_encoded, write_encoded

STAGES = ("world", "vqgan", "encode", "dallebart", "clip", "evaluate")
CODE_RATE = 10.0
TIMINGS_NAME = "timings.json"


def _model_dir(args, stage: str) -> Path:
    return Path(args.workdir) / stage / "model"


def _optimizer(args, learning_rate: float, warmup: int, **overrides) -> common.OptimizerConfig:
    return common.OptimizerConfig(learning_rate=learning_rate, warmup_steps=warmup, **overrides)


def tiny_overrides(args) -> None:
    """The `--tiny` preset: a few-minute smoke run of the whole pipeline at toy sizes."""
    args.image_size, args.num_train, args.num_valid, args.num_heldout = 32, 256, 32, 32
    args.vqgan_steps, args.dallebart_steps, args.clip_steps = 20, 20, 20
    args.vqgan_crop = 16
    args.eval_prompts, args.eval_candidates, args.eval_keep = 4, 4, 2


def _own_data(args) -> bool:
    """Whether this run trains on your own images (`--images`, or a workdir that imported them)
    rather than the world."""
    return bool(args.images) or (_images_dir(args) / image_folder.INFO_NAME).is_file()


def _images_dir(args) -> Path:
    return Path(args.workdir) / "images"


def _split(args, split: str) -> tuple[np.ndarray, list[str], list | None]:
    """Images, captions and scenes of one split of the run's data; scenes are None for your own
    images, which have none."""
    if _own_data(args):
        images, captions, _ = image_folder.load_split(_images_dir(args), split)
        return images, captions, None
    return world.load_split(Path(args.workdir) / "world", split)


def _splits(args) -> tuple[str, ...]:
    return image_folder.SPLITS if _own_data(args) else world.SPLITS


def stage_world(args) -> dict:
    """Draws the world, or with `--images` imports that folder; a workdir holds one or the other."""
    own, drawn = _images_dir(args), Path(args.workdir) / "world"
    if args.images:
        if drawn.is_dir():
            raise ValueError(
                f"{args.workdir} holds the world already ({drawn}): give your own images "
                f"another --workdir"
            )
        info = image_folder.import_folder(args.images, own, args.image_size, args.seed)
        print(
            f"[world] imported {info['counts']['train']} training and {info['counts']['valid']} "
            f"validation images of {args.image_size} px from {args.images} (no world is drawn)"
        )
        return {}
    if (own / image_folder.INFO_NAME).is_file():
        raise ValueError(
            f"{args.workdir} holds your own images ({own}): pass --images again, or draw the "
            f"world in another --workdir"
        )
    world.write_dataset(
        Path(args.workdir) / "world",
        args.num_train,
        args.num_valid,
        args.num_heldout,
        args.image_size,
        args.seed,
    )
    return {}


def _batch(stage: str, option: str, size: int, available: int) -> int:
    """`size`, or all `available` training examples when there are fewer (a small folder of
    your own images), saying so."""
    if size <= available:
        return size
    print(
        f"[{stage}] {option} {size} is more than the {available} training examples, so {available}"
    )
    return available


def _vqgan_config(args) -> train_vqgan.VQGANTrainConfig:
    model = train_vqgan.embedded_config(args.image_size)
    if args.tiny:
        model = dataclasses.replace(
            model, ch_mult=(1, 1, 1), z_channels=16, n_embed=64, embed_dim=8
        )
    return train_vqgan.VQGANTrainConfig(
        model=model,
        optimizer=_optimizer(args, args.vqgan_lr, min(50, args.vqgan_steps // 5)),
        num_steps=args.vqgan_steps,
        batch_size=args.vqgan_batch,
        crop_size=args.vqgan_crop or None,
        seed=args.seed,
        log_every=args.log_every,
        checkpoint_every=args.checkpoint_every,
    )


def stage_vqgan(args) -> dict:
    """Trains the VQGAN; with `--vqgan` (a finished one, e.g. "embedded") copies that one in
    instead, so that the run's models, its evaluation and `--out` hold the VQGAN its codes
    were made with."""
    if args.vqgan:
        source, target = _vqgan_folder(args), _model_dir(args, "vqgan")
        if not (source / CONFIG_NAME).is_file():
            raise FileNotFoundError(
                f"--vqgan {args.vqgan}: no VQGAN folder ({source / CONFIG_NAME} missing)"
            )
        if source.resolve() != target.resolve():
            shutil.rmtree(target, ignore_errors=True)
            shutil.copytree(source, target)
        print(f"[vqgan] --vqgan {args.vqgan}: nothing to train, the run uses {target}")
        return {}
    images, _, _ = _split(args, "train")
    config = _vqgan_config(args)
    config = dataclasses.replace(
        config, batch_size=_batch("vqgan", "--vqgan-batch", config.batch_size, len(images))
    )
    model, params = train_vqgan.train(images, config, Path(args.workdir) / "vqgan")
    model.save_pretrained(_model_dir(args, "vqgan"), params)
    valid, _, scenes = _split(args, "valid")
    report = train_vqgan.reconstruction_report(
        model, params, valid[:256], None if scenes is None else scenes[:256]
    )
    (Path(args.workdir) / "vqgan" / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"[vqgan] validation: {report}")
    return {"vqgan": report}


def _vqgan_folder(args) -> Path:
    """The VQGAN the encode stage encodes with (and its codes decode with): `--vqgan` (a folder,
    or "embedded") or the one the vqgan stage trained."""
    if args.vqgan == hub.EMBEDDED_NAME:
        return hub.embedded_folder("vqgan")
    return Path(args.vqgan) if args.vqgan else _model_dir(args, "vqgan")


def stage_encode(args) -> dict:
    from dalle_mini.models.vqgan import VQModel

    if args.code_rate < 0:
        raise ValueError(f"--code-rate {args.code_rate:g}: must be 0 (nearest codes) or more")
    model, params = VQModel.from_pretrained(_vqgan_folder(args))
    train = _split(args, "train")
    costs, report = None, {"code_rate": 0.0}
    if args.code_rate > 0:
        found = train_vqgan.code_costs(model, params, train[0], args.code_rate)
        print(f"[encode] {found.summary()}")
        costs = found.costs
        report = {key: value for key, value in dataclasses.asdict(found).items() if key != "costs"}
    for split in _splits(args):
        images, captions, _ = train if split == "train" else _split(args, split)
        codes = train_vqgan.encode_images(model, params, images, code_costs=costs)
        path = write_encoded(Path(args.workdir) / "encoded" / f"{split}.parquet", captions, codes)
        print(f"[encode] {split}: {len(captions)} rows -> {path}")
    report_path = Path(args.workdir) / "encoded" / "report.json"
    report_path.write_text(json.dumps(report, indent=2) + "\n")
    return {}


def _world_training_captions(
    args, captions: list[str], partial_rate: float
) -> tuple[list[str], list[str] | None]:
    """The encoded world's training captions as the DalleBart trains on them, and their
    partial captions (None when `partial_rate`, `--partial-captions`, is 0).

    With `--cell-captions`, each caption that leaves an object's cell unnamed is recaptioned to
    name every cell (`world.with_cells_named`); same images and codes. The place of an object
    is decided by a few codes only, and the DalleBart learns it from the captions that name it
    (500-step fine-tunes of the shipped model, 64 prompts x 16: position 16.6% -> 22.9% of all
    candidates, 26.7% -> 35.1% of the kept nine). The partial captions
    (`world.partial_caption`) name the cells likewise."""
    _, world_captions, scenes = world.load_split(Path(args.workdir) / "world", "train")
    _check_same_order(
        Path(args.workdir) / "encoded" / "train.parquet",
        captions,
        world_captions,
        "encode again, or pass --no-cell-captions and --partial-captions 0",
    )
    if args.cell_captions:
        rng, captions, changed = random.Random(args.seed), list(captions), 0
        named = [world.with_cells_named(scene) for scene in scenes]
        for index, (scene, renamed) in enumerate(zip(scenes, named, strict=True)):
            if renamed != scene:
                captions[index] = world.caption(renamed, rng)
                changed += 1
        print(f"[dallebart] {changed} of {len(captions)} training captions now name every cell")
        scenes = named
    partial = None
    if partial_rate:
        rng = random.Random(f"partial captions {args.seed}")
        partial = [world.partial_caption(scene, rng) for scene in scenes]
        print(
            f"[dallebart] {partial_rate:.0%} of the captions served are partial, "
            f"e.g. {partial[0]!r} for {captions[0]!r}"
        )
    return captions, partial


def _partial_rate(args) -> float:
    """`--partial-captions`, checked. Off by default: at 0.3 the whole pipeline's DalleBart
    (`runs/lat7`, 8 Dec 2026) put objects in their named cells more often (reranked, seen /
    held-out: position 81.2 -> 88.7 / 78.9 -> 82.4%) but drew the named kind and colour less
    often (kind 55.1 -> 47.6 / 20.1 -> 13.3%, colour 91.1 -> 89.2 / 86.0 -> 82.4%)."""
    if not 0.0 <= args.partial_captions <= 1.0:
        raise ValueError(f"--partial-captions {args.partial_captions:g}: must be in [0, 1]")
    if (args.data or _own_data(args)) and args.partial_captions:
        source = "--data" if args.data else "your own images"
        raise ValueError(
            "--partial-captions needs the world's scenes to leave a colour or a kind unsaid, and "
            f"{source} has captions only: leave it out (or 0)"
        )
    return args.partial_captions


def _check_same_order(path: Path, encoded_captions, captions, fix: str) -> None:
    """Refuses parquet rows that are not the run's training split (`captions`), in order."""
    if list(encoded_captions) != list(captions):
        raise ValueError(f"{path} does not hold this run's training split in order: {fix}")


def _codebook_size(args) -> int:
    """The number of codes of the VQGAN the codes were made with: `--vqgan`'s or the vqgan
    stage's when it has a config.json, else the embedded recipe's."""
    from dalle_mini.models.vqgan import VQGANConfig

    config = _vqgan_folder(args) / CONFIG_NAME
    if config.is_file():
        return VQGANConfig.from_json(config).n_embed
    return _vqgan_config(args).model.n_embed


def stage_dallebart(args) -> dict:
    from dalle_mini.models.dallebart import DalleBart
    from dalle_mini.processor import DalleBartProcessor

    data = args.data or [Path(args.workdir) / "encoded" / "train.parquet"]
    partial_rate = _partial_rate(args)  # a bad value fails before the data is read
    captions, codes = read_encoded(data)
    partial = None
    if not args.data and not _own_data(args) and (args.cell_captions or partial_rate):
        captions, partial = _world_training_captions(args, captions, partial_rate)
    num_codes = args.num_codes or _codebook_size(args)
    processor = model_config = init_params = None
    if args.init_from:  # fine-tuning keeps the model's size, tokenizer and weights
        model, init_params = DalleBart.from_pretrained(args.init_from)
        processor, model_config = DalleBartProcessor.from_pretrained(args.init_from), model.config
    config = train_dallebart.DalleBartTrainConfig(
        optimizer=_optimizer(
            args,
            args.dallebart_lr,
            min(100, args.dallebart_steps // 10),
            weight_decay=0.01,
            name=args.optimizer,
            accumulation_steps=args.accumulation_steps,
        ),
        num_steps=args.dallebart_steps,
        batch_size=_batch("dallebart", "--dallebart-batch", args.dallebart_batch, len(captions)),
        use_bfloat16=args.bf16,
        alternate_rate=partial_rate,
        grid_positions=args.position_init == "grid",
        seed=args.seed,
        log_every=args.log_every,
        checkpoint_every=args.checkpoint_every,
    )
    workdir = Path(args.workdir) / "dallebart"
    model, params, processor = train_dallebart.train(
        captions, codes, num_codes, config, workdir, processor, model_config, init_params, partial
    )
    train_dallebart.save(_model_dir(args, "dallebart"), model, params, processor)
    return {}


def _clip_model(args):
    """The CLIP a new clip stage trains: the embedded size (toy with `--tiny`)."""
    model = train_clip.embedded_config(args.image_size)
    if args.tiny:
        model = dataclasses.replace(
            model,
            embed_dim=16,
            vision=dataclasses.replace(model.vision, width=32, layers=1),
            text=dataclasses.replace(model.text, width=32, heads=1, layers=1),
        )
    return model


def stage_clip(args) -> dict:
    images, captions, scenes = _split(args, "train")
    if scenes is None and args.clip_miscount:
        raise ValueError(
            "--clip-miscount draws the world's scenes with an object too many or too few, and "
            "your own images have no scenes: leave it out (or 0)"
        )
    init_params = None
    if args.clip_init:  # fine-tuning keeps the CLIP's size and weights
        from dalle_mini.scoring import CLIPScorer

        scorer = CLIPScorer.from_pretrained(args.clip_init)
        model, init_params = scorer.config, scorer.params
        if model.vision.image_size != images.shape[1]:
            raise ValueError(
                f"--clip-init {args.clip_init} sees {model.vision.image_size}-px images and this "
                f"run's are {images.shape[1]} px: import them with --image-size "
                f"{model.vision.image_size}"
            )
    else:
        model = _clip_model(args)
    config = train_clip.CLIPTrainConfig(
        model=model,
        optimizer=_optimizer(
            args, args.clip_lr, min(50, args.clip_steps // 5), weight_decay=0.05, beta2=0.98
        ),
        num_steps=args.clip_steps,
        batch_size=_batch("clip", "--clip-batch", args.clip_batch, len(images)),
        miscount_fraction=args.clip_miscount,
        grid_positions=args.position_init == "grid",
        seed=args.seed,
        log_every=args.log_every,
        checkpoint_every=args.checkpoint_every,
    )
    reconstruct = redraw = None
    if args.clip_views == "vqgan":
        reconstruct, redraw = _reconstructor(args, captions)
    scorer, _ = train_clip.train(
        images,
        captions,
        config,
        Path(args.workdir) / "clip",
        scenes,
        reconstruct,
        redraw,
        init_params,
    )
    scorer.save_pretrained(_model_dir(args, "clip"))
    return {}


def _reconstructor(args, captions: list[str]):
    """Two ways to show images as the generator will draw them, with the workdir's VQGAN:
    indices -> its decoding of those training images' codes (encode stage), and uint8 images
    -> its decoding of their nearest codes (for drawings that have none)."""
    path, vqgan = Path(args.workdir) / "encoded" / "train.parquet", _vqgan_folder(args)
    if not path.is_file() or not vqgan.is_dir():
        raise FileNotFoundError(
            "--clip-views vqgan needs the encode stage's codes and the VQGAN that made them "
            f"({path}, {vqgan}): run those stages first, or pass --clip-views synthetic"
        )
    from dalle_mini.models.vqgan import VQModel

    encoded_captions, codes = read_encoded(path)
    _check_same_order(path, encoded_captions, captions, "encode again")
    model, params = VQModel.from_pretrained(vqgan)

    def reconstruct(indices: np.ndarray) -> np.ndarray:
        print(f"[clip] decoding {len(indices)} of the training images with the VQGAN")
        return train_vqgan.decode_codes(model, params, codes[indices])

    def redraw(images: np.ndarray) -> np.ndarray:
        print(f"[clip] encoding and decoding {len(images)} wrong drawings with the VQGAN")
        return train_vqgan.decode_codes(
            model, params, train_vqgan.encode_images(model, params, images)
        )

    return reconstruct, redraw


def stage_evaluate(args) -> dict:
    folder = args.models or Path(args.workdir)
    models = evaluation.Models.load(
        folder if args.models == "embedded" else _models_root(args, folder)
    )
    config = evaluation.EvalConfig(
        num_prompts=args.eval_prompts,
        num_candidates=args.eval_candidates,
        keep=args.eval_keep,
        condition_scale=args.condition_scale,
        top_k=args.top_k,
        top_p=args.top_p,
        temperature=args.temperature,
        seed=args.seed,
    )
    extra = {}
    vqgan_report = Path(args.workdir) / "vqgan" / "report.json"
    if vqgan_report.is_file():
        extra["vqgan"] = json.loads(vqgan_report.read_text())
    timings_path = Path(args.workdir) / TIMINGS_NAME
    if timings_path.is_file():
        # the stages before this one; this evaluation's own time is the report's evaluate_seconds,
        # and an earlier evaluation's would only mislead
        timings = json.loads(timings_path.read_text())
        extra["timings_s"] = with_total({n: timings[n] for n in STAGES[:-1] if n in timings})
    out = Path(args.workdir) / "eval"
    if _own_data(args):
        evaluation.run_own_images(models, _images_dir(args), out, config, extra)
        summary = {}
    else:
        results = evaluation.run(models, Path(args.workdir) / "world", out, config, extra)
        summary = {"bars_met": sum(b["met"] for b in results["bars"]), "bars": len(results["bars"])}
    print((out / "report.md").read_text())
    return summary


def _models_root(args, folder: Path) -> Path:
    """A folder holding dallebart/, vqgan/, clip/ model folders: the workdir's, or an assets one."""
    folder = Path(folder)
    if (folder / "dallebart" / "model").is_dir():
        root = folder / "eval" / "models"
        for stage in ("dallebart", "vqgan", "clip"):
            link = root / stage
            link.parent.mkdir(parents=True, exist_ok=True)
            if link.is_symlink() or link.exists():
                link.unlink()
            link.symlink_to((folder / stage / "model").resolve(), target_is_directory=True)
        return root
    return folder


def install(args) -> Path:
    """Copies the three models (and the evaluation) to `--out` via a temporary folder."""
    out = Path(args.out)
    temporary = out.with_name(out.name + ".tmp")
    shutil.rmtree(temporary, ignore_errors=True)
    for stage in ("dallebart", "vqgan", "clip"):
        shutil.copytree(_model_dir(args, stage), temporary / stage)
    for name in ("report.json", "report.md", "samples_valid.png", "samples_heldout.png"):
        source = Path(args.workdir) / "eval" / name
        if source.is_file():
            shutil.copyfile(
                source,
                temporary / f"evaluation_{name}" if name.startswith("report") else temporary / name,
            )
    if (out / "README.md").is_file():  # the hand-written model card stays
        shutil.copyfile(out / "README.md", temporary / "README.md")
    if out.exists():
        shutil.rmtree(out)
    temporary.rename(out)
    return out


RUNNERS = {
    "world": stage_world,
    "vqgan": stage_vqgan,
    "encode": stage_encode,
    "dallebart": stage_dallebart,
    "clip": stage_clip,
    "evaluate": stage_evaluate,
}


def with_total(timings: dict[str, float]) -> dict[str, float]:
    """`timings` (seconds per stage) with "total": the sum of the stages among them."""
    return {**timings, "total": round(sum(timings.get(name, 0.0) for name in STAGES), 1)}


def run_stage(args, stage: str) -> None:
    """Runs one stage and records its wall time in `workdir/timings.json`."""
    started = time.time()
    RUNNERS[stage](args)
    _record_time(args, stage, time.time() - started)


def _record_time(args, stage: str, seconds: float) -> None:
    timings_path = Path(args.workdir) / TIMINGS_NAME
    timings = json.loads(timings_path.read_text()) if timings_path.is_file() else {}
    timings = with_total({**timings, stage: round(seconds, 1)})  # this run's time
    timings_path.parent.mkdir(parents=True, exist_ok=True)
    timings_path.write_text(json.dumps(timings, indent=2) + "\n")
    print(f"[{stage}] took {timings[stage]:.0f} s (all stages: {timings['total']:.0f} s)")


class StageFailed(Exception):
    """A stage run in a process of its own failed; the process printed why."""


# Stages that need only the encode stage's output and not each other's.
CONCURRENT_STAGES = ("dallebart", "clip")


def pin_threads(pid: int, cpus: set[int]) -> None:
    """Lets every thread of process `pid` run only on `cpus` (Linux: a thread's affinity is its
    own, so the process's is set thread by thread). Threads started later take their starter's."""
    for _ in range(2):  # again, for any thread started while the first pass ran
        for tid in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(ProcessLookupError):  # the thread has ended
                os.sched_setaffinity(int(tid), cpus)


def _stage_process(args, stage: str, cpus: set[int] | None) -> None:
    if cpus:
        import jax

        # The CPU backend makes one compute thread per core it may use when it starts: start it
        # on every core, then keep it on its share, so that it can have them all back later.
        jax.devices()
        pin_threads(os.getpid(), cpus)
    RUNNERS[stage](args)


def run_concurrently(args, stages: tuple[str, ...]) -> None:
    """Runs `stages` at once, each in its own process on its own share of the CPU cores, and
    records each one's wall time; when one finishes, those still running get every core. Why:
    on a 2-core CPU a second core makes the DalleBart's training step only about 1.4× faster,
    so training the CLIP beside it on that core saves most of the CLIP stage's time, and the
    DalleBart has both cores again once the CLIP is done (measured 7 Dec 2026 on a 2-core AMD
    EPYC: a DalleBart step takes 1.2-1.3 s alone on two cores; beside the CLIP on one, 1.74 s
    with one compute thread and 1.83 s with the two it keeps so as to use both again later)."""
    cpus = sorted(os.sched_getaffinity(0))
    share = max(1, len(cpus) // len(stages))
    context = multiprocessing.get_context("spawn")  # a fresh JAX in each, not a forked one
    running = {}
    for index, stage in enumerate(stages):
        mine = set(cpus[index * share : (index + 1) * share]) if len(cpus) >= len(stages) else None
        process = context.Process(target=_stage_process, args=(args, stage, mine), name=stage)
        process.start()
        running[stage] = (process, time.time())
    failed, stopped = [], []
    while running:
        for stage, (process, started) in list(running.items()):
            process.join(timeout=1.0)
            if process.exitcode is None:
                continue
            del running[stage]
            if process.exitcode == 0:
                _record_time(args, stage, time.time() - started)
                _widen(running, set(cpus), stage)
            elif failed and process.exitcode == -signal.SIGTERM:  # terminated below
                stopped.append(stage)
            else:
                failed.append(stage)
                for other, _ in running.values():  # one failed: the run is over
                    other.terminate()
    if failed:
        also = f"; stopped {', '.join(stopped)} beside it" if stopped else ""
        raise StageFailed(f"stage {', '.join(failed)} failed (its error is printed above){also}")


def _widen(running: dict, cpus: set[int], done: str) -> None:
    """Gives the stages still running every core, now that stage `done` needs none."""
    for stage, (process, _) in running.items():
        try:
            pin_threads(process.pid, cpus)
        except FileNotFoundError:  # it has just ended; the loop above will see how
            continue
        print(f"[{stage}] goes on on {len(cpus)} cores now that {done} is done", flush=True)


def run_all(args) -> None:
    import jax

    # On an accelerator the stages take turns: each would claim most of its memory.
    concurrent = (
        jax.default_backend() == "cpu"
        and hasattr(os, "sched_setaffinity")  # Linux; elsewhere the stages take turns
        and len(os.sched_getaffinity(0)) >= 2
    )
    for stage in STAGES:
        if stage in CONCURRENT_STAGES and concurrent:
            if stage == CONCURRENT_STAGES[0]:
                run_concurrently(args, CONCURRENT_STAGES)
            continue
        run_stage(args, stage)
    if args.out:
        print(f"[all] installed the models in {install(args)}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dalle-mini-train", description=__doc__.split("\n")[0])
    parser.add_argument(
        "stage",
        choices=(*STAGES, "all", "install"),
        help="a stage, `all` of them, or `install` (copy finished models to --out)",
    )
    parser.add_argument(
        "--workdir", default="runs/embedded", help="where every stage reads and writes"
    )
    parser.add_argument("--out", help="`all` only: install the trained models in this folder")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tiny", action="store_true", help="toy sizes: a smoke run of minutes")
    parser.add_argument(
        "--images",
        help="train on your own images instead of the world: a folder of images with captions "
        "(a .txt beside each image, or metadata.jsonl / metadata.csv with file_name and text); "
        "the world stage imports it into the workdir, which later stages then read",
    )
    parser.add_argument("--log-every", type=int, default=50)
    parser.add_argument("--checkpoint-every", type=int, default=250)
    group = parser.add_argument_group("world")
    group.add_argument(
        "--image-size", type=int, default=64, help="side of the world's (or your) images, px"
    )
    group.add_argument("--num-train", type=int, default=20000)
    group.add_argument("--num-valid", type=int, default=1000)
    group.add_argument("--num-heldout", type=int, default=1000)
    group = parser.add_argument_group("vqgan")
    group.add_argument("--vqgan-steps", type=int, default=2400)
    group.add_argument("--vqgan-batch", type=int, default=32, help="images (crops) per step")
    group.add_argument(
        "--vqgan-crop",
        type=int,
        default=32,
        help="train on windows of this many pixels around objects, aligned to the code grid "
        "(a multiple of the downsampling, 4); 0 trains on whole images",
    )
    group.add_argument("--vqgan-lr", type=float, default=2e-3)
    group.add_argument(
        "--vqgan",
        help="encode, and clip's VQGAN views: the VQGAN folder the codes are made with, or "
        "'embedded' (default: the trained one)",
    )
    group = parser.add_argument_group("encode")
    group.add_argument(
        "--code-rate",
        type=float,
        default=CODE_RATE,
        help="prefer common codes where a rarer one fits barely better (entropy-constrained "
        "encoding, `train_vqgan.code_costs`): the cost of a nat of code information, in "
        "median squared distances to the nearest code; 0 takes the nearest code, as the "
        "original",
    )
    group = parser.add_argument_group("dallebart")
    group.add_argument(
        "--data",
        nargs="+",
        help="parquet files/folders of caption+encoding rows (default: the encoded world)",
    )
    group.add_argument(
        "--num-codes", type=int, help="codebook size of --data (default: the embedded VQGAN's)"
    )
    group.add_argument(
        "--init-from", help="fine-tune this DalleBart folder (or 'embedded') instead of a new one"
    )
    group.add_argument(
        "--no-cell-captions",
        dest="cell_captions",
        action="store_false",
        help="train on the encoded world's captions as written; by default a caption that "
        "leaves an object's grid cell unnamed is recaptioned to name it (world data only)",
    )
    group.add_argument(
        "--partial-captions",
        type=float,
        default=0.0,
        help="share of the captions served in a form that leaves each object's colour or kind "
        "unsaid (`world.partial_caption`), so that colour and kind words are learnt apart; "
        "measured at 0.3: named places likelier, named kinds and colours less likely "
        "(world data only; 0, the default, turns it off)",
    )
    group.add_argument("--dallebart-steps", type=int, default=3000)
    group.add_argument("--dallebart-batch", type=int, default=32)
    group.add_argument("--dallebart-lr", type=float, default=2e-3)
    group.add_argument("--optimizer", choices=("adamw", "adafactor"), default="adamw")
    group.add_argument("--accumulation-steps", type=int, default=1)
    group.add_argument("--bf16", action="store_true", help="bfloat16 compute (slower on most CPUs)")
    group.add_argument(
        "--position-init",
        choices=("grid", "random"),
        default="grid",
        help="a new DalleBart's decoder and a new CLIP's image tower position embeddings: "
        "row/column waves, or random as the original trainers",
    )
    group = parser.add_argument_group("clip")
    group.add_argument("--clip-steps", type=int, default=1000)
    group.add_argument("--clip-batch", type=int, default=128)
    group.add_argument(
        "--clip-views",
        choices=("vqgan", "synthetic"),
        default="vqgan",
        help="half the training images as the workdir's VQGAN decodes their codes, or "
        "softened by blur, noise and banding (needs no VQGAN)",
    )
    group.add_argument(
        "--clip-miscount",
        type=float,
        default=0.0,
        help="share of each batch's images also drawn with an object too many or too few, "
        "which their caption must score lower (world data only; 0, the default, turns it off)",
    )
    group.add_argument("--clip-lr", type=float, default=1e-3)
    group.add_argument(
        "--clip-init", help="fine-tune this CLIP folder (or 'embedded') instead of a new one"
    )
    group = parser.add_argument_group("evaluate")
    group.add_argument(
        "--models",
        help="evaluate these models: a folder with dallebart/ vqgan/ clip/, "
        "or 'embedded' (default: the workdir's)",
    )
    group.add_argument("--eval-prompts", type=int, default=256)
    group.add_argument("--eval-candidates", type=int, default=32)
    group.add_argument("--eval-keep", type=int, default=9)
    group.add_argument(
        "--condition-scale", type=float, help="default: the DalleBart's own (its config.json)"
    )
    group.add_argument("--top-k", type=int, help="default: the DalleBart's own (its config.json)")
    group.add_argument("--top-p", type=float, default=1.0, help="nucleus filtering; 1 disables it")
    group.add_argument("--temperature", type=float, default=1.0)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.tiny:
        tiny_overrides(args)
    try:
        if args.stage == "all":
            run_all(args)
        elif args.stage == "install":
            if not args.out:
                raise ValueError("install needs --out FOLDER (e.g. dalle_mini/assets/embedded)")
            print(f"installed the models in {install(args)}")
        else:
            run_stage(args, args.stage)
    except (ValueError, FileNotFoundError, StageFailed) as error:
        print(f"dalle-mini-train {args.stage}: error: {error}", file=sys.stderr)
        return 2
    return 0
