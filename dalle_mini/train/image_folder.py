"""A folder of your own images and captions, as the training pipeline's data in place of the world.

Captions come from, in this order:
- `metadata.jsonl` (one JSON object per line) or `metadata.csv` in the folder, each row naming an
  image by `file_name` (its path inside the folder) with its caption under `text` or `caption`:
  the layout of Hugging Face `imagefolder` datasets;
- otherwise a text file beside each image with the same name: `cat.png` and `cat.txt`.

`import_folder` reads the folder once, squares every image (shorter side resized to the model's
size, then the centre cut out, as the original DALL·E Mini's encoding did), splits off a
validation share and writes both splits into the workdir; `load_split` reads a split back
(the world's `images.npz` layout, with each image's file name), so every later stage reads
decoded pixels rather than the folder again.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif")
CAPTION_COLUMNS = ("text", "caption")
SPLITS = ("train", "valid")
VALID_FRACTION = 0.05  # of the images, at least one, held out to measure on
INFO_NAME = "images.json"


def _metadata_rows(folder: Path) -> list[tuple[str, str]] | None:
    """(file_name, caption) rows of the folder's metadata file, or None when it has none."""
    jsonl, table = folder / "metadata.jsonl", folder / "metadata.csv"
    if jsonl.is_file():
        source, rows = jsonl, []
        for number, line in enumerate(jsonl.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as error:
                raise ValueError(f"{jsonl}, line {number}: not a JSON object ({error})") from None
    elif table.is_file():
        source = table
        with open(table, newline="", encoding="utf-8") as handle:
            rows = list(csv.DictReader(handle))
    else:
        return None
    pairs = []
    for number, row in enumerate(rows, 1):
        column = next((c for c in CAPTION_COLUMNS if isinstance(row, dict) and c in row), None)
        if not isinstance(row, dict) or "file_name" not in row or column is None:
            raise ValueError(
                f"{source}, row {number}: needs a `file_name` and a `text` (or `caption`) field, "
                f"as Hugging Face imagefolder metadata has"
            )
        pairs.append((str(row["file_name"]), str(row[column])))
    return pairs


def list_pairs(folder: str | Path) -> list[tuple[Path, str]]:
    """(image path, caption) of every image of `folder`, sorted by path; fails naming the first
    image without a caption, a metadata row whose image is missing, or an empty caption."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"no image folder {folder}: give a folder of images and captions")
    rows = _metadata_rows(folder)
    if rows is not None:
        pairs = [(folder / name, text) for name, text in rows]
        for path, _ in pairs:
            if not path.is_file():
                raise FileNotFoundError(f"{path} is named in {folder}'s metadata but missing")
    else:
        images = sorted(
            p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
        )
        pairs = []
        for path in images:
            text_file = path.with_suffix(".txt")
            if not text_file.is_file():
                raise FileNotFoundError(
                    f"{path} has no caption: write it to {text_file.name} beside it, or list "
                    f"every image in {folder / 'metadata.jsonl'} (file_name and text)"
                )
            pairs.append((path, text_file.read_text(encoding="utf-8")))
    if not pairs:
        raise ValueError(
            f"{folder} holds no images ({', '.join(IMAGE_SUFFIXES)}) with captions: add images "
            f"and a caption for each (a .txt file beside it, or metadata.jsonl)"
        )
    pairs = sorted((path, " ".join(text.split())) for path, text in pairs)
    for path, text in pairs:
        if not text:
            raise ValueError(f"the caption of {path} is empty: describe the image in it")
    return pairs


def square_image(path: Path, size: int) -> np.ndarray:
    """The image at `path` as (size, size, 3) uint8: RGB (transparent parts white), shorter side
    resized to `size`, centre cut out; fails naming the file when it is not an image PIL can
    read."""
    try:
        with Image.open(path) as opened:
            image = opened.convert("RGBA")  # palette and grey images too, transparency kept
    except (UnidentifiedImageError, OSError) as error:
        raise ValueError(f"{path} could not be read as an image ({error})") from None
    # transparent parts show white, as an image viewer shows them, not the colour they hide
    white = Image.new("RGBA", image.size, (255, 255, 255, 255))
    image = Image.alpha_composite(white, image).convert("RGB")
    scale = size / min(image.size)
    width, height = (max(size, round(side * scale)) for side in image.size)
    image = image.resize((width, height), Image.Resampling.BICUBIC)
    left, top = (width - size) // 2, (height - size) // 2
    return np.asarray(image.crop((left, top, left + size, top + size)), np.uint8)


def validation_indices(count: int, seed: int, fraction: float = VALID_FRACTION) -> np.ndarray:
    """Which of `count` images (sorted by path) are held out: a seeded choice of `fraction` of
    them, at least one, sorted."""
    if count < 2:
        raise ValueError(
            f"{count} image with a caption: at least 2 are needed (one is held out to measure on)"
        )
    size = min(count - 1, max(1, round(fraction * count)))
    return np.sort(np.random.default_rng(seed).choice(count, size, replace=False))


def import_folder(folder: str | Path, out_dir: str | Path, size: int, seed: int = 0) -> dict:
    """Reads `folder` (see the module's docstring) and writes out_dir/{train,valid}/images.npz
    (`images` (N, size, size, 3) uint8, `captions`, `files`) and out_dir/images.json. Returns the
    latter's contents."""
    folder = Path(folder)
    pairs = list_pairs(folder)
    held = np.zeros(len(pairs), bool)
    held[validation_indices(len(pairs), seed)] = True
    out_dir = Path(out_dir)
    counts = {}
    for split, chosen in (("train", ~held), ("valid", held)):
        picked = [pair for pair, take in zip(pairs, chosen, strict=True) if take]
        images = np.stack([square_image(path, size) for path, _ in picked])
        (out_dir / split).mkdir(parents=True, exist_ok=True)
        np.savez_compressed(
            out_dir / split / "images.npz",
            images=images,
            captions=np.array([text for _, text in picked], dtype=str),
            files=np.array([str(path.relative_to(folder)) for path, _ in picked], dtype=str),
        )
        counts[split] = len(picked)
    info = {"source": str(folder.resolve()), "size": size, "seed": seed, "counts": counts}
    (out_dir / INFO_NAME).write_text(json.dumps(info, indent=2) + "\n")
    return info


def load_split(out_dir: str | Path, split: str) -> tuple[np.ndarray, list[str], list[str]]:
    """Images (N, S, S, 3) uint8, captions and file names of a split `import_folder` wrote."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}: your own images have {', '.join(SPLITS)}")
    path = Path(out_dir) / split / "images.npz"
    if not path.is_file():
        raise FileNotFoundError(
            f"no imported images in {path}: run `dalle-mini-train world --images FOLDER` first "
            f"(with the same --workdir)"
        )
    with np.load(path) as arrays:
        return (
            arrays["images"],
            [str(text) for text in arrays["captions"]],
            [str(name) for name in arrays["files"]],
        )
