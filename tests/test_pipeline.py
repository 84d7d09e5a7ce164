"""The generation pipeline as a Python user meets it: ranked images, scores, settings that
regenerate an image, batches of prompts, streaming previews, clear errors.

Runs on a tiny random pipeline (tests/tiny_pipeline.py: noise images, but every stage real).
Sampler batches are rounded up to powers of two of at least 8, so the tests stick to 8 rows
(regeneration included) to compile once.
"""

import dataclasses
import json
import math

import numpy as np
import pytest
from tiny_pipeline import build_tiny_pipeline

from dalle_mini.hub import CheckpointError, embedded_folder
from dalle_mini.models.dallebart import DalleBart
from dalle_mini.pipeline import Pipeline
from dalle_mini.results import Preview, Result
from dalle_mini.settings import MAX_SEED, ImageSettings

PROMPT = "a red circle on a blue background"


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    return Pipeline.from_pretrained(build_tiny_pipeline(tmp_path_factory.mktemp("tiny")))


@pytest.fixture(scope="module")
def seed_order(pipe):
    """Candidates 0..7 of seed 3, unranked, with their scores."""
    return pipe(PROMPT, num_images=8, seed=3, rerank=False)


def pixels(image):
    return np.asarray(image)


def test_result_holds_ranked_images_scores_and_settings(pipe):
    result = pipe(PROMPT, num_images=4, num_candidates=8, seed=3, temperature=0.9, top_p=0.95)
    assert isinstance(result, Result) and result.prompt == PROMPT
    assert [image.size for image in result.images] == [(32, 32)] * 4
    assert {image.mode for image in result.images} == {"RGB"}
    assert result.scores == sorted(result.scores, reverse=True)
    np.testing.assert_allclose(result.scores, pipe.score(PROMPT, result.images), atol=1e-4)
    indices = [s.image_index for s in result.settings]
    assert len(set(indices)) == 4 and all(0 <= i < 8 for i in indices)
    first = result.settings[0]
    assert (first.prompt, first.seed, first.temperature, first.top_p) == (PROMPT, 3, 0.9, 0.95)
    assert first.top_k == 50  # None means the model's default, as in the original
    assert first.condition_scale == 10.0 and first.model == pipe.name
    assert result.codes.shape == (4, 64) and 0 <= result.codes.min() <= result.codes.max() < 128
    assert result.normalized_prompt == " a red circle on a blue background"


def test_reranking_keeps_the_best_candidates_unchanged(pipe, seed_order):
    assert [s.image_index for s in seed_order.settings] == list(range(8))
    ranked = pipe(PROMPT, num_images=4, num_candidates=8, seed=3)
    best = np.argsort(-np.asarray(seed_order.scores), kind="stable")[:4]
    assert [s.image_index for s in ranked.settings] == best.tolist()
    for image, index in zip(ranked.images, best, strict=True):
        assert np.array_equal(pixels(image), pixels(seed_order.images[index]))
    np.testing.assert_allclose(ranked.scores, np.asarray(seed_order.scores)[best], atol=1e-4)


def test_settings_regenerate_the_same_pixels_alone(pipe, seed_order):
    ranked = pipe(PROMPT, num_images=4, num_candidates=8, seed=3)
    again = pipe.regenerate(ranked.settings[2])
    assert len(again.images) == 1 and again.settings == [ranked.settings[2]]
    assert np.array_equal(pixels(again.images[0]), pixels(ranked.images[2]))
    # Through JSON, as the CLI and the app hand them out.
    as_json = json.loads(json.dumps(ranked.settings[3].to_dict()))
    assert np.array_equal(pixels(pipe.regenerate(as_json).images[0]), pixels(ranked.images[3]))


def test_regenerating_a_list_of_settings_is_one_batch_of_the_same_images(pipe, seed_order):
    again = pipe.regenerate(seed_order.settings[::-1])  # 8 images in reverse order
    for result, original in zip(again, seed_order.images[::-1], strict=True):
        assert np.array_equal(pixels(result.images[0]), pixels(original))


def test_seed_decides_the_images(pipe, seed_order):
    same = pipe(PROMPT, num_images=8, seed=3, rerank=False)
    assert np.array_equal(same.codes, seed_order.codes)
    other = pipe(PROMPT, num_images=8, seed=MAX_SEED, rerank=False)
    assert not np.array_equal(other.codes, seed_order.codes)


def test_a_list_of_prompts_runs_as_one_batch_with_the_same_images(pipe, seed_order):
    results = pipe([PROMPT, "two green squares"], num_images=2, num_candidates=4, seed=3)
    assert [r.prompt for r in results] == [PROMPT, "two green squares"]
    first = results[0]  # the best 2 of candidates 0..3 of the prompt sampled alone
    best = np.argsort(-np.asarray(seed_order.scores[:4]), kind="stable")[:2]
    assert [s.image_index for s in first.settings] == best.tolist()
    for image, index in zip(first.images, best, strict=True):
        assert np.array_equal(pixels(image), pixels(seed_order.images[index]))


def test_each_request_keeps_its_own_knobs_in_a_shared_batch(pipe, seed_order):
    sampled = pipe.request(PROMPT, num_images=4, seed=3, rerank=False)
    greedy = pipe.request("a purple star", num_images=4, seed=3, top_k=1, rerank=False)
    *_, (first, second) = pipe.stream_requests([sampled, greedy])
    for image, alone in zip(first.images, seed_order.images[:4], strict=True):
        assert np.array_equal(pixels(image), pixels(alone))
    assert all(np.array_equal(c, second.codes[0]) for c in second.codes)  # top-k 1: no randomness
    assert len({tuple(c) for c in first.codes}) == 4


def test_stream_yields_growing_previews_then_the_result(pipe, seed_order):
    updates = list(pipe.stream(PROMPT, num_images=8, seed=3, rerank=False))
    previews, final = updates[:-1], updates[-1]
    assert [p.step for p in previews] == [16, 32, 48]  # every 2 rows of 8 codes, of 64
    assert all(isinstance(p, Preview) and p.is_preview for p in previews)
    assert isinstance(final, Result) and not final.is_preview
    assert np.array_equal(final.codes, seed_order.codes)
    first = previews[0].images
    assert len(first) == 8 and first[0].size == (32, 32)
    # Rows not sampled yet are dimmed; the rows done are not.
    bottom = np.stack([pixels(image)[8:] for image in first])
    assert bottom.max() <= math.ceil(255 * 0.35) and pixels(first[0])[:8].max() > 100
    assert previews[0].grid().size == (96, 96)


def test_grid_and_saved_files(pipe, seed_order, tmp_path):
    assert seed_order.grid().size == (96, 96)  # 8 images: 3 columns, 3 rows
    paths = seed_order.save(tmp_path)
    assert [p.name for p in paths] == ["grid.png"] + [f"image_{i:02d}.png" for i in range(1, 9)] + [
        "result.json"
    ]
    saved = json.loads(paths[-1].read_text())
    assert saved["images"][0]["score"] == pytest.approx(seed_order.scores[0])
    again = pipe.regenerate(saved["images"][5]["settings"])
    assert np.array_equal(pixels(again.images[0]), pixels(seed_order.images[5]))


@pytest.mark.parametrize(
    "prompt, knobs, error, words",
    [
        ("", {}, ValueError, "prompt is empty"),
        ("   ", {}, ValueError, "prompt is empty"),
        (None, {}, TypeError, "prompt must be a string"),
        (["ok", 3], {}, TypeError, "prompt must be a string"),
        ([], {}, ValueError, "list of prompts is empty"),
        ("x" * 1001, {}, ValueError, "limit is 1000"),
        (PROMPT, {"num_images": 0}, ValueError, "num_images=0 is out of range"),
        (PROMPT, {"num_images": 17}, ValueError, "from 1 to 16"),
        (PROMPT, {"num_images": 2.5}, ValueError, "num_images=2.5 is not a whole number"),
        (PROMPT, {"num_images": 9, "num_candidates": 4}, ValueError, "fewer than num_images"),
        (PROMPT, {"num_candidates": 10_000}, ValueError, "num_candidates=10000"),
        (PROMPT, {"seed": -1}, ValueError, "seed=-1 is out of range"),
        (PROMPT, {"seed": 2**32}, ValueError, "seed=4294967296"),
        (PROMPT, {"seed": True}, TypeError, "seed must be an integer"),
        (PROMPT, {"seed": "3"}, TypeError, "seed must be an integer"),
        (PROMPT, {"temperature": 0}, ValueError, "temperature=0.0 is out of range"),
        (PROMPT, {"temperature": float("nan")}, ValueError, "temperature=nan"),
        (PROMPT, {"temperature": float("inf")}, ValueError, "temperature=inf"),
        (PROMPT, {"top_k": -1}, ValueError, "top_k=-1"),
        (PROMPT, {"top_p": 0.0}, ValueError, "top_p=0.0"),
        (PROMPT, {"top_p": 1.5}, ValueError, "top_p=1.5"),
        (PROMPT, {"condition_scale": -2}, ValueError, "condition_scale=-2.0"),
        (PROMPT, {"rerank": "yes"}, TypeError, "rerank must be True or False"),
        (PROMPT, {"guidance": 3}, TypeError, "guidance"),
    ],
)
def test_bad_input_gets_a_clear_error(pipe, prompt, knobs, error, words):
    with pytest.raises(error, match=words.replace("(", r"\(")):
        pipe(prompt, **knobs)


def test_regenerate_refuses_settings_of_another_model_or_incomplete_ones(pipe, seed_order):
    settings = dataclasses.replace(seed_order.settings[0], model="dalle-mini/dalle-mega")
    with pytest.raises(ValueError, match="come from model 'dalle-mini/dalle-mega'"):
        pipe.regenerate(settings)
    partial = seed_order.settings[0].to_dict()
    del partial["seed"]
    with pytest.raises(ValueError, match=r"missing keys \['seed'\]"):
        pipe.regenerate(partial)
    with pytest.raises(ValueError, match="image_index=-4"):
        ImageSettings.from_dict({**seed_order.settings[0].to_dict(), "image_index": -4})


def test_a_vqgan_that_cannot_decode_the_codes_is_refused(pipe):
    config = pipe.model.config
    for change, words in [
        ({"image_length": 16}, "image_length=16 codes per image but the VQGAN decodes a 8×8"),
        ({"decoder_start_token_id": 512, "image_vocab_size": 512}, "codebook has only 128"),
    ]:
        model = DalleBart(dataclasses.replace(config, **change))
        with pytest.raises(CheckpointError, match=words):
            Pipeline(model, None, pipe.vqgan, pipe.vqgan_params, pipe.processor)


def test_without_clip_there_is_no_reranking_but_images_come(pipe, seed_order):
    bare = Pipeline(
        pipe.model, pipe.params, pipe.vqgan, pipe.vqgan_params, pipe.processor, name=pipe.name
    )
    with pytest.raises(ValueError, match="rerank=True needs a CLIP model"):
        bare(PROMPT, rerank=True)
    result = bare(PROMPT, num_images=8, seed=3)  # rerank=None: only when a CLIP is loaded
    assert result.scores is None
    assert np.array_equal(result.codes, seed_order.codes)


def test_stream_checks_knobs_before_sampling(pipe):
    with pytest.raises(TypeError, match=r"unknown setting\(s\) \['guidance'\]"):
        pipe.stream(PROMPT, guidance=3)  # raises at the call, not at the first next()
    with pytest.raises(ValueError, match="top_p=0.0"):
        pipe.stream([PROMPT, "a purple star"], top_p=0.0)


def test_describe_names_the_model(pipe):
    text = pipe.describe()
    assert pipe.name in text and "64 codes per image" in text and "32×32 pixels" in text


def test_unknown_model_name_says_what_is_accepted():
    with pytest.raises(CheckpointError, match="not a folder"):
        Pipeline.from_pretrained("no such model here")
    with pytest.raises(ValueError, match="dtype='float16' is not supported"):
        Pipeline.from_pretrained("embedded", dtype="float16")


@pytest.mark.skipif(
    not (embedded_folder("dallebart") / "flax_model.msgpack").is_file(),
    reason="the embedded model is not trained into dalle_mini/assets/embedded yet",
)
def test_embedded_model_end_to_end():
    pipe = Pipeline.from_pretrained("embedded")
    result = pipe("a red circle on a blue background", num_images=9, num_candidates=16, seed=1)
    side = pipe.vqgan.config.resolution
    assert [image.size for image in result.images] == [(side, side)] * 9
    assert result.scores == sorted(result.scores, reverse=True)
    again = pipe.regenerate(result.settings[8])
    assert np.array_equal(pixels(again.images[0]), pixels(result.images[8]))
