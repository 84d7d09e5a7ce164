"""CLIPScorer against open_clip's own outputs on the random-weight fixture in
tests/fixtures/clip-vit (copied from shared/reference/clip-vit; see its README.md)."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dalle_mini import hub
from dalle_mini import scoring as scoring_module
from dalle_mini.clip_tokenizer import CLIPTokenizer, clean_text
from dalle_mini.hub import CheckpointError
from dalle_mini.scoring import CLIPScorer, RankedImage

FIXTURE = Path(__file__).parent / "fixtures" / "clip-vit"


@pytest.fixture(scope="module")
def ref():
    return dict(np.load(FIXTURE / "reference.npz"))


@pytest.fixture(scope="module")
def texts():
    return json.loads((FIXTURE / "texts.json").read_text())


@pytest.fixture(scope="module")
def scorer():
    return CLIPScorer.from_pretrained(FIXTURE)


def nhwc(nchw):
    return nchw.transpose(0, 2, 3, 1)


# ---- tokenizer -------------------------------------------------------------------------


def test_tokens_of_fixture_prompts_are_open_clips(scorer, ref, texts):
    tokens = scorer.tokenize(texts["texts"])
    assert tokens.shape == (4, 77)
    np.testing.assert_array_equal(tokens, ref["text_tokens"])


def test_every_tokenizer_case_matches_open_clip():
    tokenizer = CLIPTokenizer()
    cases = json.loads((FIXTURE / "tokenizer_cases.json").read_text())["cases"]
    cases += json.loads((FIXTURE / "texts.json").read_text())["details"]
    for case in cases:
        assert clean_text(case["text"]) == case["cleaned"], case["text"]
        assert tokenizer.pieces(case["text"]) == case["bpe_pieces"], case["text"]
        assert tokenizer(case["text"])[0].tolist() == case["tokens"], case["text"]


def test_truncation_keeps_75_content_tokens_and_ends_with_eot():
    tokens = CLIPTokenizer()(["cat " * 100, ""])
    assert tokens[0, 0] == 49406 and tokens[0, 76] == 49407
    assert (tokens[0, 1:76] == 2368).all()  # "cat</w>"
    assert tokens[1, :3].tolist() == [49406, 49407, 0] and not tokens[1, 2:].any()


# ---- preprocessing ---------------------------------------------------------------------


def test_pixels_match_open_clip(scorer, ref):
    pixels = scorer.preprocess(list(ref["images_uint8"]))
    assert pixels.shape == (4, 32, 32, 3) and pixels.dtype == np.float32
    np.testing.assert_allclose(pixels, nhwc(ref["pixel_values"]), rtol=0, atol=1e-5)
    # an (N, H, W, 3) batch array and PIL images give the same pixels
    np.testing.assert_array_equal(scorer.preprocess(ref["images_uint8"]), pixels)
    pil = [Image.fromarray(image, "RGB") for image in ref["images_uint8"]]
    np.testing.assert_array_equal(scorer.preprocess(pil), pixels)


def test_rgba_gray_and_palette_images_are_converted_like_open_clip(scorer, ref):
    rgba = Image.fromarray(ref["rgba_uint8"], "RGBA")
    gray = Image.fromarray(ref["gray_uint8"], "L")
    palette = Image.fromarray(ref["palette_indices_uint8"], "P")
    palette.putpalette(ref["palette_rgb_uint8"].ravel().tolist())
    for image, name in ((rgba, "rgba"), (gray, "gray"), (palette, "palette")):
        expected = nhwc(ref[f"{name}_pixel_values"])
        np.testing.assert_allclose(scorer.preprocess(image), expected, rtol=0, atol=1e-5)
    # raw arrays: (H, W) and (H, W, 1) are grayscale, (H, W, 4) is RGBA
    expected_gray = nhwc(ref["gray_pixel_values"])
    np.testing.assert_allclose(scorer.preprocess(ref["gray_uint8"]), expected_gray, atol=1e-5)
    np.testing.assert_allclose(
        scorer.preprocess([ref["gray_uint8"][..., None]]), expected_gray, atol=1e-5
    )
    np.testing.assert_allclose(
        scorer.preprocess(ref["rgba_uint8"]), nhwc(ref["rgba_pixel_values"]), atol=1e-5
    )


def test_float_images_in_unit_range_equal_their_uint8_version(scorer, ref):
    floats = ref["images_uint8"].astype(np.float32) / 255
    np.testing.assert_array_equal(scorer.preprocess(floats), scorer.preprocess(ref["images_uint8"]))
    with pytest.raises(ValueError, match=r"must lie in \[0, 1\]"):
        scorer.preprocess(floats * 255)


def test_images_of_other_sizes_and_modes_are_accepted(scorer):
    rng = np.random.default_rng(0)
    images = [
        Image.fromarray(rng.integers(0, 256, (17, 5, 3), dtype=np.uint8)),  # tiny, portrait
        Image.fromarray(rng.integers(0, 256, (300, 300), dtype=np.uint8)).convert("1"),
        Image.fromarray(rng.integers(0, 256, (64, 96, 4), dtype=np.uint8), "RGBA").convert("CMYK"),
        Image.fromarray(rng.integers(0, 256, (40, 40, 2), dtype=np.uint8), "LA"),
    ]
    pixels = scorer.preprocess(images)
    assert pixels.shape == (4, 32, 32, 3) and np.isfinite(pixels).all()
    with pytest.raises(ValueError, match="channels last"):
        scorer.preprocess(np.zeros((3, 40, 40, 5), np.uint8))


# ---- features, scores, rerank ------------------------------------------------------------


def test_features_match_open_clip(scorer, ref, texts):
    image_features = scorer.encode_pixels(nhwc(ref["pixel_values"]))
    np.testing.assert_allclose(image_features, ref["image_features"], rtol=0, atol=1e-4)
    np.testing.assert_allclose(
        scorer.encode_images(ref["images_uint8"]), ref["image_features"], atol=1e-4
    )
    text_features = scorer.encode_text(texts["texts"])
    np.testing.assert_allclose(text_features, ref["text_features"], rtol=0, atol=1e-4)
    assert scorer.backend.logit_scale == pytest.approx(float(ref["logit_scale"]))


def test_scores_are_open_clips_logits(scorer, ref, texts):
    for row, prompt in enumerate(texts["texts"]):
        scores = scorer.score(prompt, ref["images_uint8"])
        assert scores.shape == (4,) and scores.dtype == np.float32
        np.testing.assert_allclose(scores, ref["logits_per_text"][row], rtol=0, atol=1e-4)
        np.testing.assert_allclose(scores, ref["logits_per_image"][:, row], rtol=0, atol=1e-4)


def test_rerank_keeps_the_best_in_order(scorer, ref, texts):
    images = list(ref["images_uint8"])
    for row, prompt in enumerate(texts["texts"]):
        best = scorer.rerank(prompt, images, keep=2)
        expected = np.argsort(-ref["logits_per_text"][row])[:2]
        assert [r.index for r in best] == expected.tolist()
        assert all(isinstance(r, RankedImage) for r in best)
        assert best[0].score >= best[1].score
        assert best[0].image is images[best[0].index]
        np.testing.assert_allclose(
            [r.score for r in best], ref["logits_per_text"][row][expected], atol=1e-4
        )
    assert len(scorer.rerank(texts["texts"][0], images, keep=9)) == 4  # keep > N keeps all
    with pytest.raises(ValueError, match="keep must be at least 1"):
        scorer.rerank(texts["texts"][0], images, keep=0)


def test_rerank_ties_keep_input_order(scorer, ref):
    same = [ref["images_uint8"][2]] * 3
    assert [r.index for r in scorer.rerank("a flat colour", same, keep=3)] == [0, 1, 2]


# ---- loading: names, folders, errors, saving ------------------------------------------------


def test_unknown_name_lists_the_known_ones():
    with pytest.raises(CheckpointError) as error:
        CLIPScorer.from_pretrained("ViT-B-99")
    for name in ("ViT-B-32", "ViT-L-14", "ViT-B-32-laion2b", "embedded"):
        assert repr(name) in str(error.value)


def test_folder_missing_weights_names_the_file(tmp_path):
    shutil.copy(FIXTURE / "open_clip_config.json", tmp_path)
    with pytest.raises(CheckpointError, match="lacks open_clip_model.safetensors"):
        CLIPScorer.from_pretrained(tmp_path)


def test_corrupt_weights_are_reported(tmp_path):
    shutil.copy(FIXTURE / "open_clip_config.json", tmp_path)
    (tmp_path / "open_clip_model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="could not be read"):
        CLIPScorer.from_pretrained(tmp_path)


def test_short_names_map_to_open_clip_hub_folders(monkeypatch):
    requested = []

    def fake_resolve(name, **kwargs):
        requested.append((name, kwargs["revision"]))
        return FIXTURE

    monkeypatch.setattr(scoring_module, "resolve_folder", fake_resolve)
    CLIPScorer.from_pretrained("ViT-B-32", revision="abc")
    CLIPScorer.from_pretrained("laion/some-clip")
    assert requested == [
        ("timm/vit_base_patch32_clip_224.openai", "abc"),
        ("laion/some-clip", None),
    ]


def test_embedded_clip_loads_from_the_package_assets(monkeypatch, tmp_path, ref):
    monkeypatch.setattr(hub, "EMBEDDED_ROOT", tmp_path)
    with pytest.raises(CheckpointError, match="embedded clip model is missing"):
        CLIPScorer.from_pretrained("embedded")
    shutil.copytree(FIXTURE, tmp_path / "clip")
    scores = CLIPScorer.from_pretrained("embedded").score("x", ref["images_uint8"][:1])
    assert scores.shape == (1,)


def test_save_pretrained_round_trips_in_open_clip_format(scorer, tmp_path, ref, texts):
    from safetensors.numpy import load_file

    scorer.save_pretrained(tmp_path)
    saved, original = (
        load_file(tmp_path / "open_clip_model.safetensors"),
        load_file(FIXTURE / "open_clip_model.safetensors"),
    )
    assert saved.keys() == original.keys()
    for key in original:
        np.testing.assert_array_equal(saved[key], original[key], err_msg=key)
    config = json.loads((tmp_path / "open_clip_config.json").read_text())
    assert (
        config["model_cfg"]["quick_gelu"] is True
        and config["preprocess_cfg"]["resize_mode"] == "shortest"
    )
    reloaded = CLIPScorer.from_pretrained(tmp_path)
    np.testing.assert_allclose(
        reloaded.score(texts["texts"][1], ref["images_uint8"]), ref["logits_per_text"][1], atol=1e-4
    )


def test_a_folders_own_vocabulary_is_used(tmp_path, ref):
    shutil.copytree(FIXTURE, tmp_path / "clip")
    shutil.copy(scoring_module.PACKAGED_VOCAB, tmp_path / "clip" / "bpe_simple_vocab_16e6.txt.gz")
    scorer = CLIPScorer.from_pretrained(tmp_path / "clip")
    assert scorer.backend.tokenizer.vocab_path == tmp_path / "clip" / "bpe_simple_vocab_16e6.txt.gz"
    np.testing.assert_array_equal(
        scorer.tokenize("an armchair in the shape of an avocado")[0], ref["text_tokens"][0]
    )


def test_open_clip_backend_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "open_clip", None)  # import fails
    with pytest.raises(ImportError, match=r"pip install \.\[open_clip\]"):
        CLIPScorer.from_pretrained(FIXTURE, backend="open_clip")
    with pytest.raises(ValueError, match="unknown CLIP backend"):
        CLIPScorer.from_pretrained(FIXTURE, backend="onnx")
