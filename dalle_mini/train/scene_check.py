"""The scene checker: judges an image against what its caption asked for, attribute by attribute.

The evaluation scores generated images with it, so it reads an image the way a person would and
tolerates blur, noise and colour banding (measured on `degrade`d renders):
1. background: the palette colour most pixels of the border are nearest to;
2. objects: connected regions of the 3×3-smoothed image far from the background, specks
   dropped, regions joined by a blurred rim split at their cores;
3. colour: the palette colour the object's core pixels are blends of with the background;
4. kind: the world shape that, drawn at the object's measured area and centroid and blurred by
   the best of a few radii, fits its soft coverage with the least squared error; the fitted
   radius gives the size, the coverage centroid the grid cell.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFilter
from scipy import ndimage

from dalle_mini.train.world import (
    COLORS,
    KINDS,
    SIZE_RADIUS,
    SUPERSAMPLE,
    UNIT_AREAS,
    Scene,
    SceneObject,
    draw_shape,
    position_at,
    relation_holds,
    validate_scene,
)

ATTRIBUTES = ("background", "count", "color", "kind", "size", "position", "relation")
# RGB distance from the background beyond which a pixel belongs to an object; the closest two
# palette colours (orange and yellow) are 81 apart.
FOREGROUND_DISTANCE = 40.0
# How much a colour is penalised per unit of saturation the object's pixels fall short of it;
# small enough that a blurred red reads red, large enough that gray does not read black.
BLEND_SHORTFALL_WEIGHT = 0.25
MIN_OBJECT_AREA = 0.002  # fraction of the image; smaller regions are specks
MAX_READ_OBJECTS = 8  # only the largest regions are read and matched against the request
# Radius (fraction of the image side) between small / medium and medium / big.
SIZE_BOUNDS = (
    (SIZE_RADIUS["small"] + SIZE_RADIUS["medium"]) / 2,
    (SIZE_RADIUS["medium"] + SIZE_RADIUS["big"]) / 2,
)
_COLOR_NAMES = tuple(COLORS)
_PALETTE = np.array([COLORS[name] for name in _COLOR_NAMES], dtype=np.float32)  # (C, 3)


@dataclass(frozen=True)
class FoundObject:
    """An object as read from pixels; center and radius are fractions of the image side."""

    color: str
    kind: str
    size: str
    center: tuple[float, float]
    radius: float
    area: float  # fraction of the image, soft edges counted partially


@dataclass(frozen=True)
class Reading:
    """What an image shows: its background colour and its objects, largest first.

    `object_count` counts every region bigger than a speck; only the MAX_READ_OBJECTS largest
    are read into `objects`.
    """

    background: str
    objects: tuple[FoundObject, ...]
    object_count: int


def to_pixels(image) -> np.ndarray:
    """(H, W, 3) float32 in 0..255 from a PIL image, a uint8 array or a float array in [0, 1]."""
    if isinstance(image, Image.Image):
        image = np.asarray(image.convert("RGB"))
    pixels = np.asarray(image)
    if pixels.ndim != 3 or pixels.shape[-1] != 3 or min(pixels.shape[:2]) < 8:
        raise ValueError(
            f"expected an RGB image (H, W, 3) with H, W >= 8, got shape {pixels.shape}"
        )
    if np.issubdtype(pixels.dtype, np.floating):
        return np.clip(pixels, 0.0, 1.0).astype(np.float32) * 255.0
    return pixels.astype(np.float32)


def _smooth(values: np.ndarray) -> np.ndarray:
    """3×3 mean over the two image axes of an (H, W) or (H, W, C) array."""
    return ndimage.uniform_filter(values, size=(3, 3) + (1,) * (values.ndim - 2), mode="nearest")


def _nearest_colors(pixels: np.ndarray, exclude: str | None = None) -> np.ndarray:
    """Palette index of the nearest colour for each (N, 3) pixel, optionally excluding one."""
    distances = np.linalg.norm(pixels[:, None, :] - _PALETTE[None], axis=-1)  # (N, C)
    if exclude is not None:
        distances[:, _COLOR_NAMES.index(exclude)] = np.inf
    return distances.argmin(axis=1)


def _read_background(pixels: np.ndarray) -> tuple[str, np.ndarray]:
    """Background name (the palette colour most border pixels are nearest) and its measured RGB."""
    width = max(1, round(pixels.shape[0] / 32))
    border = np.concatenate([
        pixels[:width].reshape(-1, 3), pixels[-width:].reshape(-1, 3),
        pixels[:, :width].reshape(-1, 3), pixels[:, -width:].reshape(-1, 3),
    ])  # fmt: skip
    nearest = _nearest_colors(border)
    winner = np.bincount(nearest, minlength=len(_COLOR_NAMES)).argmax()
    return _COLOR_NAMES[winner], np.median(border[nearest == winner], axis=0)


def _blended_color(core: np.ndarray, background_rgb: np.ndarray, background: str) -> str:
    """The palette colour that (N, 3) object pixels are blends of, with the background.

    Blur and small size mix an object's colour with the background's (a small red star on
    white reads pink), so each candidate is scored by how far the pixels lie off the segment
    from the background to it, plus how far short of it the most saturated pixels stop.
    """
    offsets = core - background_rgb  # (N, 3)
    best_score, best_name = np.inf, _COLOR_NAMES[0]
    for name, rgb in zip(_COLOR_NAMES, _PALETTE, strict=True):
        if name == background:
            continue
        direction = rgb - background_rgb
        length = float(np.linalg.norm(direction))
        share = np.clip(offsets @ direction / length**2, 0.0, 1.2)  # (N,) blend proportion
        off_segment = np.linalg.norm(offsets - share[:, None] * direction, axis=1)
        shortfall = max(0.0, 1.0 - float(np.percentile(share, 90))) * length
        score = float(np.median(off_segment)) + BLEND_SHORTFALL_WEIGHT * shortfall
        if score < best_score:
            best_score, best_name = score, name
    return best_name


# Blur radii (pixels) tried when fitting shape templates, so blurry images match blurred shapes.
TEMPLATE_BLURS = (0.0, 0.7, 1.2, 1.8)


def _template(
    kind: str, center: tuple[float, float], radius: float, shape: tuple[int, int]
) -> np.ndarray:
    """Coverage (H, W) in [0, 1] of `kind` drawn at `center`/`radius` (pixels)."""
    canvas = Image.new("L", (shape[1] * SUPERSAMPLE, shape[0] * SUPERSAMPLE), 0)
    scaled_center = (center[0] * SUPERSAMPLE, center[1] * SUPERSAMPLE)
    draw_shape(ImageDraw.Draw(canvas), kind, scaled_center, radius * SUPERSAMPLE, 255)
    return np.asarray(canvas.reduce(SUPERSAMPLE), dtype=np.float32) / 255.0


def _classify_shape(
    coverage: np.ndarray, center: tuple[float, float], area: float
) -> tuple[str, float]:
    """The kind whose template, at the object's area and centroid and at the best of
    TEMPLATE_BLURS, fits `coverage` with the least squared error; and its radius (pixels)."""
    best = (np.inf, KINDS[0], 0.0)
    for kind in KINDS:
        radius = float(np.sqrt(area / UNIT_AREAS[kind]))
        template = _template(kind, center, radius, coverage.shape)
        for blur in TEMPLATE_BLURS:
            blurred = ndimage.gaussian_filter(template, blur, mode="constant") if blur else template
            best = min(best, (float(((coverage - blurred) ** 2).sum()), kind, radius))
    return best[1], best[2]


@dataclass(frozen=True)
class _Frame:
    """An image prepared for reading its objects."""

    raw: np.ndarray  # (H, W, 3) pixels as given
    distance: np.ndarray  # (H, W) distance of the smoothed image to the background colour
    raw_distance: np.ndarray  # (H, W) the same for the raw pixels
    noise_floor: float  # median raw distance of background pixels
    labels: np.ndarray  # (H, W) object regions 1.., background 0
    background: str
    background_rgb: np.ndarray  # (3,)


def _separate_touching(
    labels: np.ndarray, count: int, distance: np.ndarray
) -> tuple[np.ndarray, int]:
    """Splits regions holding several objects joined by blurred rims: the pixels above half a
    region's peak distance form one core per object, and each pixel goes to the nearest core."""
    min_area = MIN_OBJECT_AREA * labels.size
    areas = np.bincount(labels.ravel(), minlength=count + 1)
    separated, next_label = np.zeros_like(labels), 1
    for label in range(1, count + 1):
        region = labels == label
        cores = np.zeros_like(labels)
        if areas[label] >= 2 * min_area:
            cores, _ = ndimage.label(
                region & (distance > 0.5 * distance[region].max()), structure=np.ones((3, 3))
            )
        core_labels = np.flatnonzero(np.bincount(cores.ravel())[1:] >= min_area) + 1
        if len(core_labels) < 2:
            separated[region], next_label = next_label, next_label + 1
            continue
        seeds = np.isin(cores, core_labels)
        _, (rows, columns) = ndimage.distance_transform_edt(~seeds, return_indices=True)
        nearest_core = cores[rows, columns]  # (H, W)
        for core in core_labels:
            separated[region & (nearest_core == core)], next_label = next_label, next_label + 1
    return separated, next_label - 1


def _read_object(frame: _Frame, label: int) -> FoundObject:
    height, width = frame.labels.shape
    region_mask = frame.labels == label
    inside = frame.distance[region_mask]
    core = frame.raw[region_mask][inside >= np.median(inside)]  # drop the outer rim
    color = _blended_color(core, frame.background_rgb, frame.background)
    # Soft coverage: a pixel blending object and background in proportion a lies about
    # a·|colour − bg| from the background, so blurred and anti-aliased rims count in proportion.
    # Raw pixels keep the shape sharper than the smoothed ones that found the region.
    full = float(np.linalg.norm(_PALETTE[_COLOR_NAMES.index(color)] - frame.background_rgb))
    full = max(full, 2 * FOREGROUND_DISTANCE)
    near = ndimage.binary_dilation(region_mask, iterations=2) & ((frame.labels == 0) | region_mask)
    coverage = np.clip(
        (frame.raw_distance - frame.noise_floor) / (full - frame.noise_floor), 0.0, 1.0
    )
    coverage = coverage * near  # (H, W)
    area = float(coverage.sum())
    rows, columns = np.nonzero(near)
    top, left = rows.min(), columns.min()
    crop = coverage[top : rows.max() + 1, left : columns.max() + 1]
    ys, xs = np.mgrid[: crop.shape[0], : crop.shape[1]] + 0.5  # pixel centres
    center = (float((crop * xs).sum() / area), float((crop * ys).sum() / area))
    kind, radius = _classify_shape(crop, center, area)
    relative_radius = radius / width
    size = (
        "small"
        if relative_radius < SIZE_BOUNDS[0]
        else "medium"
        if relative_radius < SIZE_BOUNDS[1]
        else "big"
    )
    return FoundObject(
        color=color,
        kind=kind,
        size=size,
        center=(float(center[0] + left) / width, float(center[1] + top) / height),
        radius=relative_radius,
        area=area / (height * width),
    )


def read_image(image) -> Reading:
    """Reads the background and the objects of an image (PIL, uint8 array or floats in [0, 1])."""
    raw = to_pixels(image)  # (H, W, 3)
    # A 3×3 mean averages noise and colour banding away (dithered levels average back to the
    # true colour) before regions are cut; shapes are then read from the raw pixels.
    pixels = _smooth(raw)  # (H, W, 3)
    background, background_rgb = _read_background(pixels)
    distance = np.linalg.norm(pixels - background_rgb, axis=-1)  # (H, W)
    labels, count = ndimage.label(distance > FOREGROUND_DISTANCE, structure=np.ones((3, 3)))
    labels, count = _separate_touching(labels, count, distance)
    raw_distance = np.linalg.norm(raw - background_rgb, axis=-1)  # (H, W)
    noise_floor = float(np.median(raw_distance[labels == 0])) if (labels == 0).any() else 0.0
    frame = _Frame(raw, distance, raw_distance, noise_floor, labels, background, background_rgb)
    areas = np.bincount(labels.ravel(), minlength=count + 1)[1:]
    keep = [
        label + 1
        for label in np.argsort(-areas, kind="stable")
        if areas[label] >= MIN_OBJECT_AREA * labels.size
    ]
    objects = tuple(_read_object(frame, label) for label in keep[:MAX_READ_OBJECTS])
    return Reading(background, objects, len(keep))


def _agreement(expected: SceneObject, found: FoundObject | None) -> int:
    if found is None:
        return 0
    position = expected.position is not None and position_at(*found.center) == expected.position
    return (
        (found.color == expected.color)
        + (found.kind == expected.kind)
        + (found.size == expected.size)
        + position
    )


def _match(
    expected: tuple[SceneObject, ...], found: tuple[FoundObject, ...]
) -> list[FoundObject | None]:
    """The found object (or None) for each expected one, agreeing best overall."""
    candidates = list(found) + [None] * len(expected)

    def total_agreement(chosen) -> int:
        return sum(_agreement(want, got) for want, got in zip(expected, chosen, strict=True))

    return list(max(itertools.permutations(candidates, len(expected)), key=total_agreement))


def check_image(image, expected: Scene) -> dict[str, bool | None]:
    """Per-attribute verdicts of `image` against the request `expected`, e.g. parse_caption(prompt).

    Returns {attribute: bool or None} for ATTRIBUTES; None marks an attribute the request leaves
    open (no position named, no relation). Colour, kind, size and position hold only when every
    requested object is found with that attribute right; count compares the number of objects.
    """
    validate_scene(expected)
    reading = read_image(image)
    matched = list(zip(expected.objects, _match(expected.objects, reading.objects), strict=True))

    def all_hold(test, pairs=matched) -> bool:
        return all(got is not None and test(want, got) for want, got in pairs)

    positioned = [(want, got) for want, got in matched if want.position is not None]
    verdict = {
        "background": reading.background == expected.background,
        "count": reading.object_count == len(expected.objects),
        "color": all_hold(lambda want, got: got.color == want.color),
        "kind": all_hold(lambda want, got: got.kind == want.kind),
        "size": all_hold(lambda want, got: got.size == want.size),
        "position": all_hold(
            lambda want, got: position_at(*got.center) == want.position, positioned
        )
        if positioned
        else None,
        "relation": None,
    }
    if expected.relation is not None:
        first, second = (got for _, got in matched)
        verdict["relation"] = bool(
            first is not None
            and second is not None
            and relation_holds(expected.relation, first.center, second.center)
        )
    return verdict


def summarize(verdicts: Iterable[dict[str, bool | None]]) -> dict[str, float | None]:
    """Accuracy per attribute over the verdicts that score it (None where none does)."""
    verdicts = list(verdicts)
    summary = {}
    for attribute in ATTRIBUTES:
        scored = [verdict[attribute] for verdict in verdicts if verdict.get(attribute) is not None]
        summary[attribute] = float(np.mean(scored)) if scored else None
    return summary


def degrade(
    image: Image.Image,
    rng: np.random.Generator,
    blur: float = 1.0,
    noise: float = 8.0,
    levels: int = 8,
) -> Image.Image:
    """Gaussian blur (radius in pixels), Gaussian noise (std in 0..255) and `levels` levels per
    channel: roughly what a small VQGAN's reconstruction does to a world image."""
    pixels = np.asarray(
        image.convert("RGB").filter(ImageFilter.GaussianBlur(blur)), dtype=np.float32
    )
    pixels = np.clip(pixels + rng.normal(0.0, noise, pixels.shape), 0, 255)
    step = 255 / (levels - 1)
    return Image.fromarray((np.round(pixels / step) * step).astype(np.uint8))
