"""Wiring of the optional open-clip-torch backend (dalle_mini/scoring_torch.py).

torch/open_clip cannot be imported on the CI machines, so small stand-ins for both are
injected: a "model" whose features are simple, hand-checkable functions of its inputs and which
asserts what open_clip would require (NCHW pixels, int64 tokens, no autograd, eval mode).
Any layout, scaling or call mistake in the adapter changes the scores checked below."""

import sys
import types
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dalle_mini.scoring import CLIPScorer

FIXTURE = Path(__file__).parent / "fixtures" / "clip-vit"
WORD_VECTORS = {"red": (1, 0, 0), "green": (0, 1, 0), "grey": (1, 1, 1)}


class FakeTensor:
    def __init__(self, array):
        self.array = np.asarray(array)

    def permute(self, *dims):
        return FakeTensor(self.array.transpose(dims))

    def to(self, device):
        assert device == "cpu"
        return self

    def cpu(self):
        return self

    def float(self):
        return FakeTensor(self.array.astype(np.float32))

    def numpy(self):
        return self.array

    def item(self):
        return self.array.item()


class FakeNoGrad:
    active = False

    def __enter__(self):
        FakeNoGrad.active = True

    def __exit__(self, *exc):
        FakeNoGrad.active = False


class FakeModel:
    """Image features: mean RGB of the (NCHW) pixels; text features: WORD_VECTORS[word]."""

    def __init__(self, logit_bias=None):
        self.logit_scale = FakeTensor(np.float32(np.log(10.0)))
        self.logit_bias = None if logit_bias is None else FakeTensor(np.float32(logit_bias))
        self.is_eval = False

    def eval(self):
        self.is_eval = True
        return self

    def parameters(self):
        return iter([types.SimpleNamespace(device="cpu")])

    def encode_image(self, pixels):
        assert self.is_eval and FakeNoGrad.active
        assert pixels.array.ndim == 4 and pixels.array.shape[1] == 3, "open_clip wants NCHW"
        return FakeTensor(pixels.array.mean(axis=(2, 3)))  # (N, 3)

    def encode_text(self, tokens):
        assert self.is_eval and FakeNoGrad.active and tokens.array.dtype == np.int64
        return FakeTensor(np.asarray(tokens.array[:, 1:4], np.float32))  # (N, 3)


def fake_transform(image):
    """Like open_clip's transform: PIL -> CHW float tensor (here 4x4, /255, no normalisation)."""
    rgb = np.asarray(image.convert("RGB").resize((4, 4)), np.float32) / 255
    return FakeTensor(rgb.transpose(2, 0, 1))


def fake_tokenizer(texts):
    return FakeTensor(np.asarray([[49406, *WORD_VECTORS[text], 49407] for text in texts], np.int64))


@pytest.fixture
def fake_open_clip(monkeypatch):
    calls = []
    module = types.ModuleType("open_clip")
    module.model = FakeModel()

    def create_model_and_transforms(name, pretrained=None):
        calls.append((name, pretrained))
        return module.model, None, fake_transform

    module.create_model_and_transforms = create_model_and_transforms
    module.get_tokenizer = lambda name: calls.append(("tokenizer", name)) or fake_tokenizer
    torch = types.ModuleType("torch")
    torch.from_numpy = FakeTensor
    torch.stack = lambda tensors: FakeTensor(np.stack([t.array for t in tensors]))
    torch.no_grad = FakeNoGrad
    monkeypatch.setitem(sys.modules, "open_clip", module)
    monkeypatch.setitem(sys.modules, "torch", torch)
    module.calls = calls
    return module


def solid(rgb):
    return Image.new("RGB", (6, 5), rgb)


IMAGES = [solid((0, 0, 255)), solid((255, 0, 0)), solid((128, 128, 128)), solid((0, 255, 0))]


def test_open_clip_backend_scores_and_reranks(fake_open_clip):
    scorer = CLIPScorer.from_pretrained(FIXTURE, backend="open_clip")
    assert fake_open_clip.calls == [
        (f"local-dir:{FIXTURE}", None),
        ("tokenizer", f"local-dir:{FIXTURE}"),
    ]
    assert fake_open_clip.model.is_eval

    pixels = scorer.preprocess(IMAGES)
    assert pixels.shape == (4, 4, 4, 3)  # channels last, like the flax backend
    np.testing.assert_allclose(pixels[1, 0, 0], [1, 0, 0])
    np.testing.assert_array_equal(scorer.tokenize("red"), [[49406, 1, 0, 0, 49407]])
    np.testing.assert_allclose(scorer.encode_images(IMAGES)[2], [128 / 255] * 3, rtol=1e-6)
    np.testing.assert_allclose(scorer.encode_text(["grey", "green"]), [[1, 1, 1], [0, 1, 0]])

    # score = exp(logit_scale) * cosine = 10 * cosine
    scores = scorer.score("red", IMAGES)
    assert scores.dtype == np.float32
    np.testing.assert_allclose(scores, [0, 10, 10 / np.sqrt(3), 0], rtol=1e-5, atol=1e-6)
    best = scorer.rerank("green", IMAGES, keep=3)
    assert [r.index for r in best] == [3, 2, 0]  # green, grey, then the first of the zero ties
    assert best[0].image is IMAGES[3] and best[0].score == pytest.approx(10)


def test_open_clip_zoo_models_and_logit_bias(fake_open_clip):
    fake_open_clip.model = FakeModel(logit_bias=-2.0)
    scorer = CLIPScorer.from_pretrained("ViT-B-16-SigLIP", backend="open_clip", pretrained="webli")
    assert fake_open_clip.calls[0] == ("ViT-B-16-SigLIP", "webli")
    np.testing.assert_allclose(scorer.score("red", IMAGES[:2]), [-2, 8], rtol=1e-5, atol=1e-6)
    with pytest.raises(AttributeError, match="flax backend"):
        _ = scorer.params
    with pytest.raises(TypeError, match="flax backend"):
        scorer.save_pretrained("unused")
