"""The optional open-clip-torch backend of `CLIPScorer` (`pip install .[open_clip]`).

Same interface as the flax backend in `scoring.py`, computed by open_clip itself: its model,
eval transform and tokenizer. It serves any model of open_clip's zoo (ResNet, ConvNeXt,
SigLIP, ...), not only the ViT family the flax towers implement. torch and open_clip are
imported only when this backend is asked for, so the default install never needs them.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

_INSTALL_HINT = (
    "the open_clip CLIP backend needs open-clip-torch and a working torch + torchvision: "
    "`pip install .[open_clip]` (or use the default backend='flax', which needs neither)"
)


def _import_open_clip():
    try:
        import open_clip
        import torch
    except (
        Exception
    ) as error:  # a broken torchvision fails with RuntimeError/OSError, not only ImportError
        raise ImportError(f"{_INSTALL_HINT} ({type(error).__name__}: {error})") from error
    return open_clip, torch


class OpenCLIPTorchBackend:
    """Wraps an open_clip model, its eval transform and tokenizer behind numpy in/out."""

    name = "open_clip"

    def __init__(self, model, transform, tokenizer, torch):
        self.model, self.transform, self.tokenizer, self.torch = model, transform, tokenizer, torch
        self.model.eval()
        self.device = next(iter(model.parameters())).device

    @property
    def logit_scale(self) -> float:
        return float(self.model.logit_scale.item())

    def tokenize(self, texts: Sequence[str]) -> np.ndarray:
        return self.tokenizer(list(texts)).cpu().numpy()

    def preprocess(self, images) -> np.ndarray:
        pixels = self.torch.stack([self.transform(image) for image in images])  # (N, 3, S, S)
        return pixels.permute(0, 2, 3, 1).cpu().numpy()  # (N, S, S, 3), as the flax backend

    def encode_pixels(self, pixels: np.ndarray) -> np.ndarray:
        nchw = np.ascontiguousarray(np.asarray(pixels, np.float32).transpose(0, 3, 1, 2))
        with self.torch.no_grad():
            features = self.model.encode_image(self.torch.from_numpy(nchw).to(self.device))
        return features.float().cpu().numpy()

    def encode_tokens(self, tokens: np.ndarray) -> np.ndarray:
        ids = self.torch.from_numpy(np.asarray(tokens, np.int64)).to(self.device)
        with self.torch.no_grad():
            features = self.model.encode_text(ids)
        return features.float().cpu().numpy()

    def score_pixels(self, pixels: np.ndarray, tokens: np.ndarray) -> np.ndarray:
        image = self.encode_pixels(pixels)
        text = self.encode_tokens(tokens)[0]
        cosine = (image @ text) / np.maximum(
            np.linalg.norm(image, axis=-1) * np.linalg.norm(text), 1e-12
        )
        scores = np.exp(self.logit_scale) * cosine
        bias = getattr(self.model, "logit_bias", None)  # SigLIP models add one
        if bias is not None:
            scores = scores + float(bias.item())
        return scores.astype(np.float32)


def load_open_clip_backend(
    name_or_folder: str | os.PathLike, revision: str | None = None, pretrained: str | None = None
) -> OpenCLIPTorchBackend:
    """Builds the backend from a scorer name (resolved like the flax backend's and handed to
    open_clip as `local-dir:`), or from an open_clip zoo name plus `pretrained` tag."""
    from dalle_mini.scoring import resolve_clip_folder

    open_clip, torch = _import_open_clip()
    if pretrained is None:
        model_name = f"local-dir:{resolve_clip_folder(name_or_folder, revision)}"
    else:
        model_name = os.fspath(name_or_folder)
    model, _, transform = open_clip.create_model_and_transforms(model_name, pretrained=pretrained)
    tokenizer = open_clip.get_tokenizer(model_name)
    return OpenCLIPTorchBackend(model, transform, tokenizer, torch)
