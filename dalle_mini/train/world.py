"""The world: a synthetic dataset of simple scenes and the captions that describe them.

A scene is a solid background with one or two coloured shapes placed on a 3×3 grid. This module
holds the scene vocabulary, a seeded sampler (objects stand on the 16×16 grid of image codes),
a caption writer with varied phrasing and its inverse `parse_caption`, a Pillow renderer (drawn
at 4× and box-downsampled, so edges are anti-aliased), the split rule and the dataset writer
with its command line. Scenes showing a colour–shape pair of `HELD_OUT_PAIRS` only ever appear
in the held-out split, which therefore measures whether a model composes a colour and a shape
it has only seen apart.

    python -m dalle_mini.train.world --out data/world --num-train 20000
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from tqdm.auto import tqdm

COLORS = {
    "red": (220, 40, 40),
    "orange": (245, 140, 30),
    "yellow": (240, 220, 40),
    "green": (50, 170, 60),
    "blue": (40, 90, 220),
    "purple": (140, 60, 190),
    "pink": (240, 130, 180),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
    "gray": (128, 128, 128),
    "brown": (130, 80, 40),
}
KINDS = ("circle", "square", "triangle", "star", "heart", "diamond")
SIZES = ("small", "medium", "big")
# Grid cells in row-major order: POSITIONS[3 * row + column].
POSITIONS = (
    "top left", "top", "top right",
    "left", "center", "right",
    "bottom left", "bottom", "bottom right",
)  # fmt: skip
RELATIONS = ("left of", "right of", "above", "below")
SPLITS = ("train", "valid", "heldout")
# Never drawn in train or valid images; every held-out scene shows at least one of them.
HELD_OUT_PAIRS = frozenset({
    ("purple", "star"), ("brown", "heart"), ("green", "triangle"), ("orange", "diamond"),
    ("pink", "square"), ("gray", "circle"), ("yellow", "star"), ("red", "heart"),
    ("blue", "diamond"), ("black", "triangle"),
})  # fmt: skip

# Object radius (centre to the farthest point along x or y) as a fraction of the image side.
# Wherever it stands in its cell, an object stays within MAX_EXTENT of the cell's centre (a cell
# spans ±1/6), so objects in different cells never touch.
SIZE_RADIUS = {"small": 0.07, "medium": 0.10, "big": 0.125}
MAX_EXTENT = 0.15
# Object centres lie on the 16×16 grid of image codes (the VQGAN's, at downsampling 4 of 64 px),
# offset by LATTICE_PHASE of a grid step: every drawing of a kind at a size then covers the same
# codes in the same way, wherever it stands. Small shapes sit on a code's centre (3 codes
# across), medium and big ones on a code corner (4 across; a big shape fills its 4 exactly).
LATTICE = 16
LATTICE_PHASE = {"small": 0.5, "medium": 0.0, "big": 0.0}
# "left of" etc. hold when the centres differ by more than this fraction of the image side.
RELATION_MARGIN = 0.1
SUPERSAMPLE = 4
MIN_IMAGE_SIZE, MAX_IMAGE_SIZE = 32, 256


@dataclass(frozen=True)
class SceneObject:
    """One shape as a caption asks for it; `position` is None when the caption names no cell."""

    color: str
    kind: str
    size: str = "medium"
    position: str | None = None


@dataclass(frozen=True)
class Scene:
    """What a caption asks for, plus (optionally) where each object is drawn.

    `relation` relates objects[0] to objects[1] ("left of": the first is left of the second).
    `layout` holds each object's centre as (x, y) fractions of the image side; with None,
    `render` draws the most central layout that satisfies the scene.
    """

    objects: tuple[SceneObject, ...]
    background: str = "white"
    relation: str | None = None
    layout: tuple[tuple[float, float], ...] | None = None

    @property
    def is_repeated(self) -> bool:
        """Two of one object: captioned as one phrase ("two red circles") or not at all apart."""
        return len(self.objects) == 2 and self.objects[0] == self.objects[1]

    def request(self) -> Scene:
        """The scene as its caption conveys it: everything but the drawn layout."""
        return dataclasses.replace(self, layout=None)


def _check_choice(value, choices, what: str) -> None:
    if value not in choices:
        raise ValueError(
            f"unknown {what} {value!r}; expected one of {', '.join(map(str, choices))}"
        )


def validate_scene(scene: Scene) -> None:
    """Raises ValueError naming the first thing in `scene` that the world cannot draw."""
    _check_choice(scene.background, COLORS, "background colour")
    if not 1 <= len(scene.objects) <= 2:
        raise ValueError(f"a scene holds one or two objects, got {len(scene.objects)}")
    for obj in scene.objects:
        _check_choice(obj.color, COLORS, "colour")
        _check_choice(obj.kind, KINDS, "kind")
        _check_choice(obj.size, SIZES, "size")
        if obj.position is not None:
            _check_choice(obj.position, POSITIONS, "position")
        if obj.color == scene.background:
            raise ValueError(
                f"a {obj.color} {obj.kind} would be invisible on a {obj.color} background"
            )
    if scene.relation is not None:
        _check_choice(scene.relation, RELATIONS, "relation")
        if len(scene.objects) != 2:
            raise ValueError(f"relation {scene.relation!r} needs two objects")
    if scene.layout is not None and len(scene.layout) != len(scene.objects):
        raise ValueError(f"layout has {len(scene.layout)} centres for {len(scene.objects)} objects")


# --- geometry -------------------------------------------------------------------------------


def cell_center(position: str) -> tuple[float, float]:
    """The (x, y) centre of a grid cell, as fractions of the image side."""
    row, column = divmod(POSITIONS.index(position), 3)
    return (column + 0.5) / 3, (row + 0.5) / 3


def position_at(x: float, y: float) -> str:
    """The grid cell holding the point (x, y), given as fractions of the image side."""
    column, row = (min(max(int(v * 3), 0), 2) for v in (x, y))
    return POSITIONS[3 * row + column]


def relation_holds(relation: str, first: tuple[float, float], second: tuple[float, float]) -> bool:
    """Whether the object centred at `first` is `relation` the one at `second` (y grows down)."""
    dx, dy = second[0] - first[0], second[1] - first[1]
    offsets = {"left of": dx, "right of": -dx, "above": dy, "below": -dy}
    return offsets[relation] > RELATION_MARGIN


def _cells_fit(scene: Scene, cells: tuple[int, ...]) -> bool:
    for obj, cell in zip(scene.objects, cells, strict=True):
        if obj.position is not None and POSITIONS[cell] != obj.position:
            return False
    if scene.relation is None:
        return True
    (row_a, col_a), (row_b, col_b) = divmod(cells[0], 3), divmod(cells[1], 3)
    # Relations are drawn along one row or one column, so they read unambiguously.
    return {
        "left of": row_a == row_b and col_a < col_b,
        "right of": row_a == row_b and col_a > col_b,
        "above": col_a == col_b and row_a < row_b,
        "below": col_a == col_b and row_a > row_b,
    }[scene.relation]


def _centrality(cells: tuple[int, ...]) -> tuple:
    rows, columns = zip(*(divmod(cell, 3) for cell in cells), strict=True)
    off_center = abs(sum(rows) / len(rows) - 1) + abs(sum(columns) / len(columns) - 1)
    return off_center, max(rows) - min(rows), min(columns) - max(columns), cells


def place(scene: Scene, rng: random.Random | None = None) -> tuple[tuple[float, float], ...]:
    """Object centres in cells that satisfy the scene's named positions and relation.

    With `rng`: a random valid choice of cells, each centre a random point of the LATTICE
    within its cell's slack (the sampler's variety). Without: the most central choice of cells,
    each centre the lattice point nearest its cell's centre (a deterministic drawing).
    """
    options = [
        cells
        for cells in itertools.permutations(range(9), len(scene.objects))
        if _cells_fit(scene, cells)
    ]
    if not options:
        raise ValueError(
            f"no layout satisfies {scene}: two objects share a cell or contradict the relation"
        )
    cells = rng.choice(options) if rng is not None else min(options, key=_centrality)
    return tuple(
        centre_in(POSITIONS[cell], obj.size, rng)
        for obj, cell in zip(scene.objects, cells, strict=True)
    )


def centre_in(position: str, size: str, rng: random.Random | None) -> tuple[float, float]:
    """Where an object of `size` stands in the cell named `position`: a random LATTICE point
    within the cell's slack with `rng`, else the one nearest the cell's centre."""
    x, y = (lattice_choice(c, size, rng) for c in cell_center(position))
    return round(x, 6), round(y, 6)  # lattice points are exact in binary


def lattice_points(center: float, size: str) -> list[float]:
    """The LATTICE points (fractions of the image side, at the size's phase) where an object of
    `size` may stand along one axis of the cell centred at `center`, nearest first."""
    slack = MAX_EXTENT - SIZE_RADIUS[size]
    nearest = round(center * LATTICE - LATTICE_PHASE[size])
    points = [
        (step + LATTICE_PHASE[size]) / LATTICE
        for step in range(nearest - 2, nearest + 3)
        if abs((step + LATTICE_PHASE[size]) / LATTICE - center) <= slack + 1e-9
    ]
    return sorted(points, key=lambda point: (abs(point - center), point))


def lattice_choice(center: float, size: str, rng: random.Random | None) -> float:
    points = lattice_points(center, size)
    return rng.choice(sorted(points)) if rng is not None else points[0]


# --- shapes and rendering -------------------------------------------------------------------


def _raw_polygon(kind: str) -> np.ndarray:
    if kind in ("circle", "heart"):
        t = np.linspace(0, 2 * np.pi, 96, endpoint=False)
        if kind == "circle":
            return np.stack([np.cos(t), np.sin(t)], axis=1)
        x = 16 * np.sin(t) ** 3
        y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
        return np.stack([x, y], axis=1)
    if kind == "star":
        angles = -np.pi / 2 + np.arange(10) * np.pi / 5
        radii = np.where(np.arange(10) % 2 == 0, 1.0, 0.45)
        return np.stack([radii * np.cos(angles), radii * np.sin(angles)], axis=1)
    corners = {
        "square": [(-1, -1), (1, -1), (1, 1), (-1, 1)],
        "triangle": [(0, -1), (1, 0.8), (-1, 0.8)],
        "diamond": [(0, -1), (0.75, 0), (0, 1), (-0.75, 0)],
    }
    return np.asarray(corners[kind], dtype=np.float64)


def _polygon_area_centroid(points: np.ndarray) -> tuple[float, np.ndarray]:
    x, y = points[:, 0], points[:, 1]
    cross = x * np.roll(y, -1) - np.roll(x, -1) * y
    area = cross.sum() / 2
    centroid = np.array(
        [((x + np.roll(x, -1)) * cross).sum(), ((y + np.roll(y, -1)) * cross).sum()]
    )
    return abs(area), centroid / (6 * area)


def _unit_polygon(kind: str) -> np.ndarray:
    """The outline of `kind` with its area centroid at 0 and max(|x|, |y|) = 1; y points down."""
    points = _raw_polygon(kind)
    points = points - _polygon_area_centroid(points)[1]
    return points / np.abs(points).max()


UNIT_SHAPES = {kind: _unit_polygon(kind) for kind in KINDS}
# Area of each kind at radius 1, to turn a measured area back into a radius.
UNIT_AREAS = {kind: _polygon_area_centroid(points)[0] for kind, points in UNIT_SHAPES.items()}


def draw_shape(draw: ImageDraw.ImageDraw, kind: str, center, radius: float, fill) -> None:
    """Fills `kind` centred at `center` (pixels) with the given radius (pixels)."""
    points = UNIT_SHAPES[kind] * radius + np.asarray(center, dtype=np.float64)
    draw.polygon([tuple(point) for point in points], fill=fill)


def check_image_size(size: int) -> None:
    if not isinstance(size, int) or not MIN_IMAGE_SIZE <= size <= MAX_IMAGE_SIZE:
        raise ValueError(
            f"image size must be an int in [{MIN_IMAGE_SIZE}, {MAX_IMAGE_SIZE}], got {size!r}"
        )


def render(scene: Scene, size: int = 64) -> Image.Image:
    """Draws the scene as a size×size RGB image (at 4× size, then box-downsampled)."""
    validate_scene(scene)
    layout = scene.layout if scene.layout is not None else place(scene)
    return draw_objects(scene.background, zip(scene.objects, layout, strict=True), size)


def draw_objects(background: str, placed, size: int = 64) -> Image.Image:
    """Draws (object, (x, y) centre) pairs on a `background` of size×size, as `render` does,
    with no check of how many there are or where (wrong drawings for training a scorer)."""
    check_image_size(size)
    canvas_size = size * SUPERSAMPLE
    image = Image.new("RGB", (canvas_size, canvas_size), COLORS[background])
    draw = ImageDraw.Draw(image)
    for obj, (x, y) in placed:
        radius = SIZE_RADIUS[obj.size] * canvas_size
        draw_shape(draw, obj.kind, (x * canvas_size, y * canvas_size), radius, COLORS[obj.color])
    return image.reduce(SUPERSAMPLE)


# --- sampling -------------------------------------------------------------------------------


def _check_split(split: str) -> None:
    _check_choice(split, SPLITS, "split")


def sample_object(rng: random.Random, background: str, held_out: bool | None) -> SceneObject:
    """held_out: True draws a HELD_OUT_PAIRS pair, False avoids them, None allows anything."""
    if held_out:
        color, kind = rng.choice(sorted(pair for pair in HELD_OUT_PAIRS if pair[0] != background))
    else:
        while True:
            color = rng.choice([name for name in COLORS if name != background])
            kind = rng.choice(KINDS)
            if held_out is None or (color, kind) not in HELD_OUT_PAIRS:
                break
    return SceneObject(color, kind, rng.choices(SIZES, weights=(3, 4, 3))[0])


def _sample_pair(rng: random.Random, background: str, split: str) -> Scene:
    mode = rng.choices(("two", "relation", "positions", "plain"), weights=(2, 4, 2, 2))[0]
    held_index = 0 if mode == "two" else rng.randrange(2)

    def draw(index: int) -> SceneObject:
        if split != "heldout":
            return sample_object(rng, background, held_out=False)
        # The other object of a held-out scene may be anything.
        return sample_object(rng, background, held_out=True if index == held_index else None)

    first, second = draw(0), draw(1)
    if mode == "two":
        return Scene((first, first), background)
    while second == first:  # identical objects are only ever captioned as "two ..."
        second = draw(1)
    if mode == "relation":
        return Scene((first, second), background, rng.choice(RELATIONS))
    if mode == "positions":
        cell_a, cell_b = rng.sample(POSITIONS, 2)
        first, second = (
            dataclasses.replace(o, position=p) for o, p in ((first, cell_a), (second, cell_b))
        )
    return Scene((first, second), background)


def sample_scene(rng: random.Random, split: str = "train") -> Scene:
    """A random scene with its layout; train and valid avoid HELD_OUT_PAIRS, heldout shows one."""
    _check_split(split)
    background = "white" if rng.random() < 0.3 else rng.choice(list(COLORS))
    if rng.random() < 0.6:
        obj = sample_object(rng, background, held_out=split == "heldout")
        if rng.random() < 0.7:
            obj = dataclasses.replace(obj, position=rng.choice(POSITIONS))
        scene = Scene((obj,), background)
    else:
        scene = _sample_pair(rng, background, split)
    return dataclasses.replace(scene, layout=place(scene, rng))


# --- captions -------------------------------------------------------------------------------

# The empty prefix thrice: most captions start with the object.
_PREFIXES = (
    "",
    "",
    "",
    "a drawing of ",
    "an image of ",
    "a picture of ",
    "an illustration of ",
    "a simple drawing of ",
)
_ARTICLES = ("a ", "one ", "")
_SIZE_WORDS = {"small": ("small", "little", "tiny"), "medium": ("",), "big": ("big", "large")}
_COLOR_WORDS = {"gray": ("gray", "grey")}
_CORNER_PHRASES = (
    "at the {v} {h}",
    "in the {v} {h}",
    "in the {v} {h} corner",
    "in the {w} {h} corner",
)
_EDGE_PHRASES = {
    "vertical": ("at the {v}", "at the {v} of the image", "near the {v}"),
    "horizontal": ("on the {h}", "at the {h}", "on the {h} side"),
}
_CENTER_PHRASES = ("in the center", "in the middle", "at the center", "in the center of the image")
_RELATION_PHRASES = {
    "left of": ("to the left of", "left of"),
    "right of": ("to the right of", "right of"),
    "above": ("above", "over"),
    "below": ("below", "under", "beneath"),
}
_BACKGROUND_PHRASES = (
    "on a {} background",
    "with a {} background",
    "against a {} background",
    "on a plain {} background",
)


def _color_word(color: str, rng: random.Random) -> str:
    return rng.choice(_COLOR_WORDS.get(color, (color,)))


def _noun_phrase(
    obj: SceneObject, rng: random.Random, plural: bool = False, unsaid: str | None = None
) -> str:
    """`unsaid`: "color" leaves the colour out, "kind" says "shape" for the kind."""
    words = [
        rng.choice(_SIZE_WORDS[obj.size]),
        "" if unsaid == "color" else _color_word(obj.color, rng),
        ("shape" if unsaid == "kind" else obj.kind) + "s" * plural,
    ]
    if unsaid != "kind" and rng.random() < 0.1:
        words.append("shapes" if plural else "shape")
    return " ".join(word for word in words if word)


def _position_phrase(position: str | None, rng: random.Random) -> str:
    if position is None:
        return ""
    if position == "center":
        return " " + rng.choice(_CENTER_PHRASES)
    vertical, horizontal = position.split() if " " in position else (position, position)
    if vertical in ("left", "right"):
        return " " + rng.choice(_EDGE_PHRASES["horizontal"]).format(h=horizontal)
    if horizontal in ("top", "bottom"):
        return " " + rng.choice(_EDGE_PHRASES["vertical"]).format(v=vertical)
    upper = {"top": "upper", "bottom": "lower"}[vertical]
    return " " + rng.choice(_CORNER_PHRASES).format(v=vertical, h=horizontal, w=upper)


def _objects_phrase(scene: Scene, rng: random.Random, unsaid: Sequence[str | None]) -> str:
    first = scene.objects[0]
    if scene.is_repeated and scene.relation is None and first.position is None:
        return "two " + _noun_phrase(first, rng, plural=True, unsaid=unsaid[0])
    phrases = [
        rng.choices(_ARTICLES, weights=(8, 1, 1))[0]
        + _noun_phrase(obj, rng, unsaid=trait)
        + _position_phrase(obj.position, rng)
        for obj, trait in zip(scene.objects, unsaid, strict=True)
    ]
    if scene.relation is not None:
        return f"{phrases[0]} {rng.choice(_RELATION_PHRASES[scene.relation])} {phrases[1]}"
    return " and ".join(phrases)


def caption(scene: Scene, rng: random.Random, unsaid: Sequence[str | None] | None = None) -> str:
    """A caption for the scene's request, its wording drawn from `rng`.

    Everything the request holds is stated: colours, kinds, small/big sizes (medium goes
    unnamed), named positions, the relation and a non-white background; except, with
    `unsaid` (one entry per object: None, "color" or "kind"), the traits it names, as in
    "a purple shape" or "a star" (`partial_caption`).
    """
    validate_scene(scene)
    unsaid = unsaid or (None,) * len(scene.objects)
    if len(unsaid) != len(scene.objects) or not set(unsaid) <= {None, "color", "kind"}:
        raise ValueError(
            f"unsaid {unsaid!r}: need one of None, 'color', 'kind' for each of the scene's "
            f"{len(scene.objects)} objects"
        )
    body = _objects_phrase(scene, rng, unsaid)
    if scene.background == "white" and rng.random() < 0.7:
        text = rng.choice(_PREFIXES) + body
    elif rng.random() < 0.25:
        text = f"a {_color_word(scene.background, rng)} background with {body}"
    else:
        separator = ", " if rng.random() < 0.2 else " "
        background = rng.choice(_BACKGROUND_PHRASES).format(_color_word(scene.background, rng))
        text = rng.choice(_PREFIXES) + body + separator + background
    return re.sub(r"\ba(?= [aeiou])", "an", text)


def partial_caption(scene: Scene, rng: random.Random) -> str:
    """A caption of `scene` that leaves one trait of each object unsaid, its colour or its kind
    with even odds ("a purple shape", "a star"; both objects of "two red circles" alike).

    Trained on beside the full captions, they teach what a colour word draws whatever the
    shape, and what a kind word draws whatever the colour: the two pieces a caption naming a
    colour–shape pair never seen together has to be drawn from.
    """
    traits = [rng.choice(("color", "kind")) for _ in scene.objects]
    if scene.is_repeated:
        traits[1] = traits[0]
    return caption(scene, rng, traits)


def with_cells_named(scene: Scene) -> Scene:
    """The scene with each object's drawn cell (from its layout) as its named position, for a
    caption that says where everything is; scenes with a relation or a repeated object ("two
    circles", one phrase for both) are returned as they are."""
    if scene.layout is None or scene.relation is not None or scene.is_repeated:
        return scene
    objects = tuple(
        dataclasses.replace(obj, position=position_at(*center))
        for obj, center in zip(scene.objects, scene.layout, strict=True)
    )
    return dataclasses.replace(scene, objects=objects)


# --- parsing --------------------------------------------------------------------------------

_SYNONYMS = {
    "grey": "gray", "upper": "top", "lower": "bottom", "middle": "center", "centre": "center",
    "little": "small", "tiny": "small", "large": "big", "over": "above", "under": "below",
    "beneath": "below",
}  # fmt: skip


def _singular(word: str) -> str:
    return word[:-1] if word.endswith("s") and word[:-1] in KINDS else word


def _position_in(words: list[str]) -> str | None:
    vertical = next((word for word in words if word in ("top", "bottom")), None)
    horizontal = next((word for word in words if word in ("left", "right")), None)
    if vertical and horizontal:
        return f"{vertical} {horizontal}"
    return vertical or horizontal or ("center" if "center" in words else None)


def _relation_in(words: list[str]) -> tuple[str | None, list[str]]:
    """The relation named in `words` and the words before it."""
    for index, word in enumerate(words):
        if word in ("above", "below"):
            return word, words[:index]
        if word in ("left", "right") and words[index + 1 : index + 2] == ["of"]:
            return f"{word} of", words[:index]
    return None, words


def _mentioned_object(words: list[str], index: int, text: str) -> tuple[SceneObject, int]:
    """The object whose kind is words[index], and how many of it the caption asks for."""
    color = words[index - 1] if index > 0 else None
    if color not in COLORS:
        kind = _singular(words[index])
        raise ValueError(
            f"caption {text!r} names a {kind} without a colour ({', '.join(COLORS)}) "
            "right before it"
        )
    size = words[index - 2] if index > 1 and words[index - 2] in SIZES else "medium"
    is_plural = _singular(words[index]) != words[index] or "two" in words[max(index - 3, 0) : index]
    return SceneObject(color, _singular(words[index]), size), 2 if is_plural else 1


def parse_caption(text: str) -> Scene:
    """The scene a caption asks for (no layout): the inverse of `caption`.

    Accepts the caption writer's phrasings, raw or after the text normalizer (lowercase,
    punctuation turned into commas, a leading space). Raises ValueError when the text names no
    coloured shape, more than two objects, or a scene the world cannot draw.
    """
    words = [_SYNONYMS.get(word, word) for word in re.sub(r"[^a-z]+", " ", text.lower()).split()]
    background = "white"
    for index in range(len(words) - 1):
        if words[index] in COLORS and words[index + 1] == "background":
            background = words[index]
            del words[index : index + 2]
            break
    mentions = [index for index, word in enumerate(words) if _singular(word) in KINDS]
    if not mentions:
        raise ValueError(
            f"caption {text!r} names no shape; expected a colour and one of {', '.join(KINDS)}"
        )
    objects, relation = [], None
    for number, index in enumerate(mentions):
        obj, count = _mentioned_object(words, index, text)
        end = mentions[number + 1] - 1 if number + 1 < len(mentions) else len(words)
        tail = words[index + 1 : end]
        if number == 0 and len(mentions) == 2:
            relation, tail = _relation_in(tail)
        # A position after "two ... circles" would put both in one cell: it is ignored.
        position = _position_in(tail) if count == 1 else None
        objects += [dataclasses.replace(obj, position=position)] * count
    if len(objects) > 2:
        raise ValueError(
            f"caption {text!r} asks for {len(objects)} objects; the world draws one or two"
        )
    scene = Scene(tuple(objects), background, relation)
    validate_scene(scene)
    return scene


# --- dataset files --------------------------------------------------------------------------


def scene_to_dict(scene: Scene) -> dict:
    return dataclasses.asdict(scene)


def scene_from_dict(data: dict) -> Scene:
    objects = tuple(SceneObject(**obj) for obj in data["objects"])
    layout = data.get("layout")
    layout = tuple(tuple(centre) for centre in layout) if layout is not None else None
    return Scene(objects, data.get("background", "white"), data.get("relation"), layout)


def example(seed: int, split: str, index: int, size: int = 64) -> tuple[np.ndarray, str, Scene]:
    """Image (size, size, 3) uint8, caption and scene of one dataset entry; own rng per entry."""
    rng = random.Random(f"{seed}:{split}:{index}")
    scene = sample_scene(rng, split)
    text = caption(scene, rng)
    return np.asarray(render(scene, size)), text, scene


def write_dataset(
    out_dir, num_train: int, num_valid: int, num_heldout: int, size: int = 64, seed: int = 0
) -> dict[str, Path]:
    """Writes each split to out_dir/<split>/: images.npz (`images` (N, size, size, 3) uint8 and
    `captions`) and scenes.jsonl (index, caption, scene per line); plus out_dir/world.json.

    Entry i of a split depends only on (seed, split, i), so a bigger dataset extends a smaller.
    Returns the folder of each split.
    """
    check_image_size(size)
    counts = {"train": num_train, "valid": num_valid, "heldout": num_heldout}
    for split, count in counts.items():
        if not isinstance(count, int) or count < 0:
            raise ValueError(f"number of {split} images must be a non-negative int, got {count!r}")
    out_dir, folders = Path(out_dir), {}
    for split, count in counts.items():
        folder = folders[split] = out_dir / split
        folder.mkdir(parents=True, exist_ok=True)
        images = np.zeros((count, size, size, 3), np.uint8)
        captions = []
        with open(folder / "scenes.jsonl", "w") as lines:
            for index in tqdm(range(count), desc=f"world {split}", unit="img"):
                images[index], text, scene = example(seed, split, index, size)
                captions.append(text)
                lines.write(
                    json.dumps({"index": index, "caption": text, "scene": scene_to_dict(scene)})
                    + "\n"
                )
        np.savez_compressed(
            folder / "images.npz", images=images, captions=np.array(captions, dtype=str)
        )
    info = {"size": size, "seed": seed, "counts": counts, "held_out_pairs": sorted(HELD_OUT_PAIRS)}
    (out_dir / "world.json").write_text(json.dumps(info, indent=2) + "\n")
    return folders


def load_split(out_dir, split: str) -> tuple[np.ndarray, list[str], list[Scene]]:
    """Images (N, S, S, 3) uint8, captions and scenes of one split written by `write_dataset`."""
    _check_split(split)
    folder = Path(out_dir) / split
    if not (folder / "images.npz").is_file() or not (folder / "scenes.jsonl").is_file():
        command = f"python -m dalle_mini.train.world --out {out_dir}"
        raise FileNotFoundError(f"no {split} split in {out_dir}: write one with `{command}`")
    with np.load(folder / "images.npz") as arrays:
        images, captions = arrays["images"], [str(text) for text in arrays["captions"]]
    with open(folder / "scenes.jsonl") as lines:
        scenes = [scene_from_dict(json.loads(line)["scene"]) for line in lines]
    return images, captions, scenes


def main(argv: list[str] | None = None) -> int:
    """Command line: write the world dataset."""
    parser = argparse.ArgumentParser(
        prog="python -m dalle_mini.train.world", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--out", required=True, help="folder to write the splits into")
    parser.add_argument("--num-train", type=int, default=20000)
    parser.add_argument("--num-valid", type=int, default=1000)
    parser.add_argument("--num-heldout", type=int, default=1000)
    parser.add_argument(
        "--size", type=int, default=64, help=f"image side, {MIN_IMAGE_SIZE}..{MAX_IMAGE_SIZE}"
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        folders = write_dataset(
            args.out, args.num_train, args.num_valid, args.num_heldout, args.size, args.seed
        )
    except ValueError as error:
        parser.error(str(error))
    for split, folder in folders.items():
        print(f"{split}: {folder}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
