"""The synthetic scene world and its checker: captions and pixels agree, parsing inverts the
caption writer, the held-out pairs stay held out, and the checker judges images correctly."""

import dataclasses
import json
import random

import numpy as np
import pytest
from PIL import Image

from dalle_mini.text import TextNormalizer
from dalle_mini.train import scene_check, world
from dalle_mini.train.world import COLORS, Scene, SceneObject


def sampled(split: str, count: int, seed: str = "t") -> list[tuple[Scene, str]]:
    """`count` (scene, caption) pairs of a split, each from its own seeded rng."""
    pairs = []
    for index in range(count):
        rng = random.Random(f"{seed}:{split}:{index}")
        scene = world.sample_scene(rng, split)
        pairs.append((scene, world.caption(scene, rng)))
    return pairs


def pixel(image: Image.Image, x: float, y: float) -> tuple[int, int, int]:
    """The RGB of the pixel at (x, y) given as fractions of the image side."""
    return image.getpixel((int(x * image.width), int(y * image.height)))


@pytest.fixture(scope="module")
def normalizer(tmp_path_factory):
    # The world's captions hold no hashtags, so a one-word frequency file is enough.
    words = tmp_path_factory.mktemp("words") / "enwiki-words-frequency.txt"
    words.write_text("the 100\n")
    return TextNormalizer(words, rng=0)


# --- captions and pixels --------------------------------------------------------------------


def test_a_drawn_red_circle_is_red_at_the_stated_place_on_the_named_background():
    scene = world.parse_caption("a big red circle in the top left corner on a yellow background")
    image = world.render(scene, size=64)
    assert image.size == (64, 64) and image.mode == "RGB"
    assert pixel(image, 1 / 6, 1 / 6) == COLORS["red"]
    for x, y in [(0.5, 0.5), (5 / 6, 5 / 6), (5 / 6, 1 / 6), (0.0, 0.0), (0.99, 0.99)]:
        assert pixel(image, x, y) == COLORS["yellow"]
    pixels = np.asarray(image)
    red = np.all(pixels == COLORS["red"], axis=-1)
    rows, columns = np.nonzero(red)
    assert columns.max() < 64 / 3 and rows.max() < 64 / 3  # all of it inside the top-left cell


def test_unnamed_background_is_white_and_every_sampled_scene_draws_what_it_says():
    image = world.render(world.parse_caption("a drawing of a blue square at the bottom"), size=48)
    assert pixel(image, 0.02, 0.02) == COLORS["white"]
    assert pixel(image, 0.5, 5 / 6) == COLORS["blue"]
    for scene, _ in sampled("train", 40):
        image = world.render(scene, size=64)
        assert pixel(image, 0.0, 0.0) == COLORS[scene.background]
        for obj, (x, y) in zip(scene.objects, scene.layout, strict=True):
            assert pixel(image, x, y) == COLORS[obj.color]  # every kind covers its own centroid
            if obj.position is not None:
                assert world.position_at(x, y) == obj.position


def test_objects_never_match_the_background_nor_overlap_and_relations_hold():
    relations = 0
    for scene, _ in sampled("train", 400) + sampled("heldout", 100):
        assert all(obj.color != scene.background for obj in scene.objects)
        for obj, (x, y) in zip(scene.objects, scene.layout, strict=True):
            center_x, center_y = world.cell_center(world.position_at(x, y))
            reach = max(abs(x - center_x), abs(y - center_y)) + world.SIZE_RADIUS[obj.size]
            assert reach <= world.MAX_EXTENT + 1e-3 < 1 / 6  # the whole object inside its cell
        if len(scene.objects) == 2:
            assert world.position_at(*scene.layout[0]) != world.position_at(*scene.layout[1])
        if scene.relation is not None:
            relations += 1
            assert world.relation_holds(scene.relation, *scene.layout)
            assert not world.relation_holds(scene.relation, *reversed(scene.layout))
    assert relations > 40


def test_objects_stand_on_the_code_grid_so_a_kind_at_a_size_always_covers_its_codes_alike():
    # every sampled centre is a lattice point at its size's phase
    for scene, _ in sampled("train", 300):
        for obj, centre in zip(scene.objects, scene.layout, strict=True):
            for value in centre:
                steps = value * world.LATTICE - world.LATTICE_PHASE[obj.size]
                assert abs(steps - round(steps)) < 1e-3, (obj, centre)
    # so one kind at one size is drawn pixel for pixel alike wherever it stands, up to whole codes
    code = 64 // world.LATTICE
    for size in world.SIZES:
        star = SceneObject("red", "star", size)
        crops = []
        for position in ("top left", "center", "bottom right", "right"):
            for seed in range(3):
                scene = Scene((dataclasses.replace(star, position=position),))
                scene = dataclasses.replace(scene, layout=world.place(scene, random.Random(seed)))
                x, y = (round(v * 64) for v in scene.layout[0])  # whole pixels at 64 px
                phase = world.LATTICE_PHASE[size] * code
                assert (x - phase) % code == 0 and (y - phase) % code == 0
                half = int(np.ceil(world.SIZE_RADIUS[size] * 64)) + 1
                crops.append(
                    np.asarray(world.render(scene, 64))[y - half : y + half, x - half : x + half]
                )
        assert all(np.array_equal(crop, crops[0]) for crop in crops[1:]), size
        assert len({world.place(Scene((star,)), random.Random(seed)) for seed in range(20)}) > 1


def test_default_layout_satisfies_a_parsed_relation():
    scene = world.parse_caption("a small green star below a red heart")
    first, second = world.place(scene)
    assert first[1] > second[1] + world.RELATION_MARGIN
    with pytest.raises(ValueError, match="no layout"):
        world.place(
            world.parse_caption("a red circle at the top left to the right of a blue square")
        )


# --- caption writer and parser --------------------------------------------------------------


@pytest.mark.parametrize("split", world.SPLITS)
def test_parse_caption_recovers_the_scene_raw_and_normalized(split, normalizer):
    for scene, text in sampled(split, 250):
        assert world.parse_caption(text) == scene.request(), text
        assert world.parse_caption(normalizer(text)) == scene.request(), normalizer(text)


def test_captions_naming_cells_name_where_each_object_is_drawn():
    renamed, kept = 0, 0
    for scene, _ in sampled("train", 300):
        named = world.with_cells_named(scene)
        request = world.parse_caption(world.caption(named, random.Random(0)))
        if scene.relation is not None or scene.is_repeated:
            assert named == scene  # one phrase for two objects, or a relation: left as it is
            kept += 1
            continue
        drawn = [world.position_at(*center) for center in scene.layout]
        assert [obj.position for obj in request.objects] == drawn
        # nothing else changes: colours, kinds, sizes, background, and every named cell
        assert request == named.request()
        assert all(
            old.position in (None, new.position)
            for old, new in zip(scene.objects, named.objects, strict=True)
        )
        renamed += any(obj.position is None for obj in scene.objects)
    assert renamed > 50 and kept > 20


def test_captions_vary_in_phrasing():
    scene = world.Scene((SceneObject("gray", "star", "small", "top left"),), "orange")
    texts = {world.caption(scene, random.Random(seed)) for seed in range(200)}
    assert len(texts) > 30
    assert any(text.startswith(("a drawing of", "an image of", "a picture of")) for text in texts)
    assert any("grey" in text for text in texts) and any("gray" in text for text in texts)
    assert all("orange background" in text for text in texts)
    two = world.Scene((SceneObject("red", "heart"),) * 2)
    assert all(
        world.caption(two, random.Random(seed)).count("two red hearts") == 1 for seed in range(20)
    )


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            " two small grey stars, on an orange background",
            Scene((SceneObject("gray", "star", "small"),) * 2, "orange"),
        ),
        (
            "A Yellow background with a LARGE red circle in the upper-left corner!",
            Scene((SceneObject("red", "circle", "big", "top left"),), "yellow"),
        ),
        (
            " an image of a red circle to the left of a blue square",
            Scene(
                (SceneObject("red", "circle"), SceneObject("blue", "square")), relation="left of"
            ),
        ),
        (
            "a pink heart in the middle and a tiny black diamond at the bottom right",
            Scene(
                (
                    SceneObject("pink", "heart", position="center"),
                    SceneObject("black", "diamond", "small", "bottom right"),
                )
            ),
        ),
    ],
)
def test_parse_caption_reads_varied_phrasings(text, expected):
    assert world.parse_caption(text) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "names no shape"),
        ("a circle on a blue background", "without a colour"),
        ("a red circle, a blue square and a green star", "one or two"),
        ("a red circle on a red background", "invisible"),
    ],
)
def test_parse_caption_rejects_what_the_world_cannot_draw(text, message):
    with pytest.raises(ValueError, match=message):
        world.parse_caption(text)


# --- splits ---------------------------------------------------------------------------------


def test_held_out_pairs_appear_only_in_the_held_out_split():
    assert len(world.HELD_OUT_PAIRS) >= 8
    assert {kind for _, kind in world.HELD_OUT_PAIRS} == set(world.KINDS)
    for split in ("train", "valid"):
        for scene, _ in sampled(split, 1500):
            assert not any(
                (obj.color, obj.kind) in world.HELD_OUT_PAIRS for obj in scene.objects
            ), scene
    seen = set()
    for scene, _ in sampled("heldout", 600):
        held = [
            (obj.color, obj.kind)
            for obj in scene.objects
            if (obj.color, obj.kind) in world.HELD_OUT_PAIRS
        ]
        assert held, scene
        seen.update(held)
    assert seen == world.HELD_OUT_PAIRS


def test_sampling_is_deterministic_under_a_seed():
    first = [world.example(3, "valid", index) for index in range(5)]
    again = [world.example(3, "valid", index) for index in range(5)]
    other = [world.example(4, "valid", index) for index in range(5)]
    for (image, text, scene), (image_again, *rest) in zip(first, again, strict=True):
        assert np.array_equal(image, image_again) and [text, scene] == rest
    assert [entry[1] for entry in first] != [entry[1] for entry in other]


# --- the checker ----------------------------------------------------------------------------


@pytest.mark.parametrize("split", world.SPLITS)
def test_checker_accepts_every_freshly_rendered_scene(split):
    for scene, text in sampled(split, 40, seed="check"):
        verdict = scene_check.check_image(world.render(scene), world.parse_caption(text))
        assert set(verdict) == set(scene_check.ATTRIBUTES)
        assert all(value is True or value is None for value in verdict.values()), (text, verdict)
        assert (verdict["relation"] is None) == (scene.relation is None)
        assert (verdict["position"] is None) == all(obj.position is None for obj in scene.objects)


def test_checker_rejects_a_wrong_expectation():
    image = world.render(world.parse_caption("a red circle at the top left"))
    asked = lambda text: scene_check.check_image(image, world.parse_caption(text))  # noqa: E731
    verdict = asked("a blue square at the top left")
    assert verdict["color"] is False and verdict["kind"] is False
    assert (
        verdict["background"] is True and verdict["position"] is True and verdict["count"] is True
    )
    assert asked("a red circle at the top left on a green background")["background"] is False
    assert asked("a red circle at the bottom right")["position"] is False
    assert asked("a big red circle")["size"] is False
    assert asked("two red circles")["count"] is False

    pair = world.render(world.parse_caption("a red circle to the left of a blue square"))
    assert scene_check.check_image(pair, world.parse_caption("a red circle left of a blue square"))[
        "relation"
    ]
    swapped = scene_check.check_image(
        pair, world.parse_caption("a red circle right of a blue square")
    )
    assert swapped["relation"] is False and swapped["color"] and swapped["kind"]


def test_checker_reads_objects_and_accepts_arrays():
    scene = world.parse_caption(
        "a small purple star on the right and a big orange heart at the top on a gray background"
    )
    image = world.render(scene)
    reading = scene_check.read_image(
        np.asarray(image, dtype=np.float32) / 255.0
    )  # floats in [0, 1]
    assert reading.background == "gray" and reading.object_count == 2
    found = {
        (obj.color, obj.kind, obj.size, world.position_at(*obj.center)) for obj in reading.objects
    }
    assert found == {("purple", "star", "small", "right"), ("orange", "heart", "big", "top")}
    with pytest.raises(ValueError, match="RGB image"):
        scene_check.read_image(np.zeros((64, 64)))


def test_checker_tolerates_blur_noise_and_few_colour_levels():
    verdicts = []
    for index, (scene, text) in enumerate(sampled("valid", 60, seed="degrade")):
        image = scene_check.degrade(
            world.render(scene), np.random.default_rng(index), blur=1.0, noise=8.0, levels=8
        )
        verdicts.append(scene_check.check_image(image, world.parse_caption(text)))
    summary = scene_check.summarize(verdicts)
    assert summary["background"] == 1.0 and summary["count"] >= 0.97 and summary["color"] >= 0.95
    assert summary["kind"] >= 0.9 and summary["position"] >= 0.95


def test_summarize_averages_only_scored_verdicts():
    summary = scene_check.summarize(
        [{"color": True, "position": None}, {"color": False, "position": True}]
    )
    assert summary["color"] == 0.5 and summary["position"] == 1.0 and summary["relation"] is None


# --- dataset files --------------------------------------------------------------------------


def test_write_dataset_writes_images_captions_and_scenes(tmp_path):
    folders = world.write_dataset(
        tmp_path / "w", num_train=6, num_valid=3, num_heldout=4, size=32, seed=5
    )
    assert set(folders) == set(world.SPLITS)
    with np.load(folders["train"] / "images.npz") as arrays:
        assert arrays["images"].shape == (6, 32, 32, 3) and arrays["images"].dtype == np.uint8
        assert len(arrays["captions"]) == 6
    lines = (folders["heldout"] / "scenes.jsonl").read_text().splitlines()
    assert [json.loads(line)["index"] for line in lines] == [0, 1, 2, 3]
    info = json.loads((tmp_path / "w" / "world.json").read_text())
    assert info["size"] == 32 and info["counts"] == {"train": 6, "valid": 3, "heldout": 4}

    images, captions, scenes = world.load_split(tmp_path / "w", "heldout")
    for image, text, scene in zip(images, captions, scenes, strict=True):
        assert np.array_equal(image, np.asarray(world.render(scene, size=32)))
        assert world.parse_caption(text) == scene.request()

    # Same seed, same data; a bigger dataset extends a smaller one.
    world.write_dataset(
        tmp_path / "again", num_train=8, num_valid=0, num_heldout=0, size=32, seed=5
    )
    more, more_captions, _ = world.load_split(tmp_path / "again", "train")
    train, train_captions, _ = world.load_split(tmp_path / "w", "train")
    assert np.array_equal(more[:6], train) and more_captions[:6] == train_captions
    assert world.load_split(tmp_path / "again", "valid")[0].shape == (0, 32, 32, 3)


def test_command_line_writes_a_dataset_and_rejects_bad_sizes(tmp_path, capsys):
    args = ["--out", str(tmp_path), "--num-train", "2", "--num-valid", "1", "--num-heldout", "1"]
    assert world.main(args) == 0
    assert world.load_split(tmp_path, "valid")[0].shape == (1, 64, 64, 3)
    with pytest.raises(SystemExit):
        world.main([*args, "--size", "16"])
    assert "image size must be" in capsys.readouterr().err
    with pytest.raises(FileNotFoundError, match="python -m dalle_mini.train.world"):
        world.load_split(tmp_path / "missing", "train")


def test_render_and_sampler_reject_bad_input():
    with pytest.raises(ValueError, match="image size"):
        world.render(world.parse_caption("a red circle"), size=512)
    with pytest.raises(ValueError, match="unknown colour 'teal'"):
        world.render(Scene((SceneObject("teal", "circle"),)))
    with pytest.raises(ValueError, match="unknown split"):
        world.sample_scene(random.Random(0), "test")
    with pytest.raises(ValueError, match="relation"):
        world.render(dataclasses.replace(world.parse_caption("a red circle"), relation="above"))


def test_partial_captions_leave_each_object_one_trait_unsaid():
    unsaid = {"color": 0, "kind": 0}
    for scene, _ in sampled("train", 400):
        # leaving nothing unsaid is the caption itself, drawn from the same randomness
        full = world.caption(scene, random.Random(1), unsaid=(None,) * len(scene.objects))
        assert full == world.caption(scene, random.Random(1))
        if len(scene.objects) != 1:
            continue
        text = world.partial_caption(scene, random.Random(len(unsaid) + sum(unsaid.values())))
        words = set(text.replace(",", "").split())
        (obj,) = scene.objects
        names_color = bool(words & {obj.color, "grey" if obj.color == "gray" else obj.color})
        names_kind = obj.kind in words
        assert names_color != names_kind, text  # one of the two, never both or neither
        if not names_kind:
            assert "shape" in words and not words & set(world.KINDS), text
        unsaid["kind" if names_color else "color"] += 1
        if scene.background != "white":
            assert f"{scene.background} background" in text.replace("grey", "gray"), text
    assert min(unsaid.values()) > 0.35 * sum(unsaid.values())
    repeated = Scene((SceneObject("red", "heart"),) * 2, "blue")
    texts = {world.partial_caption(repeated, random.Random(seed)) for seed in range(40)}
    # still one phrase for both, leaving the same trait unsaid
    assert all(("two hearts" in t) != ("two red shapes" in t) for t in texts), texts
    assert any("two hearts" in t for t in texts) and any("two red shapes" in t for t in texts)
    with pytest.raises(ValueError, match="for each of the scene's 2 objects"):
        world.caption(repeated, random.Random(0), unsaid=("color",))
