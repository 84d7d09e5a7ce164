"""What the pipeline returns: ranked images with scores and settings (`Result`), the partly
sampled images shown while it works (`Preview`), and writing them to disk.

Both have `.images` and `.grid()`, so a front end can show every update the same way.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from PIL import Image

from dalle_mini.settings import ImageSettings

GRID_NAME = "grid.png"
RESULT_NAME = "result.json"


@dataclasses.dataclass
class Result:
    """The kept images of one prompt, best first (in seed order without reranking)."""

    prompt: str
    normalized_prompt: str  # what the model read
    images: list[Image.Image]
    scores: list[float] | None  # CLIP scores, same order; None without a CLIP model
    settings: list[ImageSettings]  # per image: what `Pipeline.regenerate` needs
    codes: np.ndarray  # (num_images, image_length) int32 VQGAN codes, row-major
    num_candidates: int  # how many were sampled to choose these from
    is_preview: ClassVar[bool] = False

    def grid(self, columns: int | None = None) -> Image.Image:
        return make_grid(self.images, columns)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: the prompt, and per image its rank, file name, score and settings."""
        return {
            "prompt": self.prompt,
            "normalized_prompt": self.normalized_prompt,
            "num_candidates": self.num_candidates,
            "grid": GRID_NAME,
            "images": [
                {
                    "rank": rank,
                    "file": image_name(rank),
                    "score": None if self.scores is None else self.scores[rank - 1],
                    "settings": settings.to_dict(),
                }
                for rank, settings in enumerate(self.settings, start=1)
            ],
        }

    def save(self, folder: str | os.PathLike) -> list[Path]:
        """Writes grid.png, image_01.png, ... and result.json into `folder`; returns the paths
        (grid first, JSON last). File names are fixed here, never taken from the prompt."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        paths = [folder / GRID_NAME]
        self.grid().save(paths[0])
        for rank, image in enumerate(self.images, start=1):
            paths.append(folder / image_name(rank))
            image.save(paths[-1])
        paths.append(folder / RESULT_NAME)
        paths[-1].write_text(json.dumps(self.to_dict(), indent=2, ensure_ascii=False) + "\n")
        return paths


class Preview:
    """Images of the first candidates while their codes are still being sampled: the rows done
    so far, the rest dimmed. Decoded only when `.images` is first read."""

    is_preview: ClassVar[bool] = True

    def __init__(
        self, prompt: str, step: int, num_steps: int, render: Callable[[], list[Image.Image]]
    ):
        self.prompt = prompt
        self.step = step  # codes sampled per image so far
        self.num_steps = num_steps  # codes per image in all
        self._render = render

    @property
    def progress(self) -> float:
        return self.step / self.num_steps

    @functools.cached_property
    def images(self) -> list[Image.Image]:
        return self._render()

    def grid(self, columns: int | None = None) -> Image.Image:
        return make_grid(self.images, columns)

    def __repr__(self) -> str:
        return f"Preview(prompt={self.prompt!r}, step={self.step}/{self.num_steps})"


def to_image(pixels: np.ndarray) -> Image.Image:
    """(H, W, 3) floats, nominally in [0, 1] (VQGAN output) → an RGB image."""
    return Image.fromarray((np.clip(pixels, 0.0, 1.0) * 255).round().astype(np.uint8), "RGB")


def image_name(rank: int) -> str:
    return f"image_{rank:02d}.png"


def make_grid(images: Sequence[Image.Image], columns: int | None = None) -> Image.Image:
    """Images side by side, row by row; `columns` defaults to a square-ish grid (3×3 for 9)."""
    if not images:
        raise ValueError("no images to put in a grid")
    columns = columns or math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / columns)
    width, height = images[0].size
    grid = Image.new("RGB", (columns * width, rows * height), "white")
    for index, image in enumerate(images):
        grid.paste(image, ((index % columns) * width, (index // columns) * height))
    return grid
