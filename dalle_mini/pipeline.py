"""The generation pipeline: prompts in, CLIP-ranked images out, in one call or as a stream.

The steps of the original inference notebook (generate, decode, CLIP-rerank), as numbered in
the code:
  1. normalize + tokenize the prompt (`DalleBartProcessor`),
  2. encode it, and the empty prompt for super-conditioning (`DalleBart.start_sampling`),
  3. sample image codes for every candidate, a few rows of codes at a time (previews between),
  4. decode codes to pixels (`VQModel.decode_code`),
  5. score the candidates against the prompt (`CLIPScorer`),
  6. rank them and keep the best.

    pipe = Pipeline.from_pretrained("embedded")
    result = pipe("a red circle on a blue background", num_images=9, seed=3)
    result.images[0], result.scores[0], result.settings[0]
    pipe.regenerate(result.settings[4])            # the same pixels as result.images[4]

Reproducible by construction: candidate i of seed s samples with the key fold_in(PRNGKey(s), i)
and is decoded on its own, so an image does not depend on the batch it was made in. Many
requests (different prompts, seeds and knobs) share one sampler batch: `stream_requests`.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from dalle_mini import sampling
from dalle_mini.checkpoint import count_params
from dalle_mini.hub import EMBEDDED_NAME, CheckpointError
from dalle_mini.models.dallebart import DalleBart
from dalle_mini.models.vqgan import PUBLISHED_VQGAN, VQModel
from dalle_mini.processor import DalleBartProcessor
from dalle_mini.results import Preview, Result
from dalle_mini.settings import (
    MAX_CANDIDATES,
    GenerationRequest,
    ImageSettings,
    make_request,
)

# name -> (DalleBart, VQGAN, CLIP). The published ones need the network once (then cached).
PRESETS = {
    EMBEDDED_NAME: (EMBEDDED_NAME, EMBEDDED_NAME, EMBEDDED_NAME),
    "mini": ("dalle-mini/dalle-mini", PUBLISHED_VQGAN, "ViT-B-32"),
    "mega": ("dalle-mini/dalle-mega", PUBLISHED_VQGAN, "ViT-B-32"),
}
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
MIN_BATCH = 8
_PREVIEW_DIM = 0.35  # previews show rows not sampled yet at this fraction of their brightness


class Pipeline:
    """DalleBart + VQGAN (+ CLIP): text to ranked images. Build with `from_pretrained`.

    Args:
      preview_rows: rows of codes sampled between two previews (default: a quarter of the grid).
      max_candidates: the most candidates one request may ask for.
    """

    def __init__(self, model: DalleBart, params, vqgan: VQModel, vqgan_params,
                 processor: DalleBartProcessor, scorer=None, *, name: str = "custom",
                 preview_rows: int | None = None, max_candidates: int = MAX_CANDIDATES):  # fmt: skip
        check_compatible(model, vqgan)
        self.model, self.params = model, params
        self.vqgan, self.vqgan_params = vqgan, vqgan_params
        self.processor, self.scorer = processor, scorer
        self.name = name
        self.dtype = jnp.dtype(model.dtype).name
        self.grid_size = vqgan.config.grid_size  # codes per row of the image
        self.preview_rows = preview_rows or max(1, self.grid_size // 4)
        self.max_candidates = max_candidates
        self._normalizer_lock = threading.Lock()

    @classmethod
    def from_pretrained(cls, name: str | os.PathLike | None = EMBEDDED_NAME, *,
                        dallebart=None, vqgan=None, clip=None, revision: str | None = None,
                        dtype: str = "float32", **options) -> Pipeline:  # fmt: skip
        """Loads the three components.

        Args:
          name: "embedded" (offline, the default), "mini" or "mega" (the published DALL·E Mini /
            Mega with the published VQGAN and OpenAI's CLIP ViT-B/32; network once, then
            cached), a folder holding `dallebart/`, `vqgan/` and optionally `clip/`, or a
            DalleBart folder / hub id (paired with the published VQGAN and CLIP).
          dallebart, vqgan, clip: override one component (folder, hub id or "embedded");
            `clip=False` loads no CLIP (no reranking, no scores).
          revision: hub revision of the DalleBart (e.g. a branch of dalle-mini/dalle-mega).
          dtype: "float32" or "bfloat16" (DalleBart compute; halves memory traffic on GPU).
          options: `preview_rows`, `max_candidates` (see the class).
        """
        defaults = _component_names(name)
        dallebart = dallebart or defaults[0]
        vqgan = vqgan or defaults[1]
        clip = defaults[2] if clip is None else clip
        if dtype not in DTYPES:
            raise ValueError(f"dtype={dtype!r} is not supported: use one of {sorted(DTYPES)}")
        model, params = DalleBart.from_pretrained(dallebart, revision=revision, dtype=DTYPES[dtype])
        processor = DalleBartProcessor.from_pretrained(dallebart, revision=revision)
        vq_model, vq_params = VQModel.from_pretrained(vqgan)
        scorer = None
        if clip:
            from dalle_mini.scoring import CLIPScorer

            scorer = CLIPScorer.from_pretrained(clip)
        overridden = name is None or (dallebart, vqgan) != defaults[:2]
        label = f"dallebart={dallebart}, vqgan={vqgan}" if overridden else os.fspath(name)
        return cls(model, params, vq_model, vq_params, processor, scorer, name=label, **options)

    # -- the public calls ------------------------------------------------------------------------

    def __call__(self, prompt: str | Sequence[str], **knobs) -> Result | list[Result]:
        """Generates images for a prompt (→ Result) or a list of prompts (→ list of Results).

        Knobs (all optional): num_images (1–16, default 9), num_candidates (default 32),
        seed (default 0), temperature (1.0), top_k (None = the model's 50; 0 = off),
        top_p (None = off), condition_scale (10.0), rerank (True). See `settings.make_request`.
        """
        *_, final = self.stream(prompt, **knobs)
        return final

    def stream(self, prompt: str | Sequence[str], **knobs) -> Iterator[Any]:
        """Like calling the pipeline, but first yields a `Preview` every `preview_rows` rows of
        codes (a list of them for a list of prompts), then the final Result(s)."""
        is_batch = not isinstance(prompt, str)
        prompts = _prompt_list(prompt)
        requests = [self.request(text, **knobs) for text in prompts]
        for update in self.stream_requests(requests):
            yield update if is_batch else update[0]

    def regenerate(self, settings) -> Result | list[Result]:
        """Samples exactly the image(s) that `settings` describe, alone.

        Args:
          settings: an `ImageSettings`, its dict (e.g. read from the CLI's JSON), or a list of them
            (→ a list of single-image Results, sampled as one batch).
        """
        is_batch = isinstance(settings, (list, tuple))
        items = [self._own_settings(s) for s in (settings if is_batch else [settings])]
        if not items:
            raise ValueError("no settings given to regenerate")
        requests = [
            self.request(s.prompt, num_images=1, seed=s.seed, temperature=s.temperature,
                         top_k=s.top_k, top_p=s.top_p, condition_scale=s.condition_scale,
                         rerank=False, image_indices=[s.image_index])  # fmt: skip
            for s in items
        ]
        *_, results = self.stream_requests(requests, previews=False)
        return results if is_batch else results[0]

    def request(self, prompt: str, **knobs) -> GenerationRequest:
        """A checked request for this pipeline (clear TypeError/ValueError on a bad knob)."""
        unknown = sorted(set(knobs) - _KNOB_NAMES)
        if unknown:
            raise TypeError(f"unknown setting(s) {unknown}; the knobs are {sorted(_KNOB_NAMES)}")
        request = make_request(
            prompt, default_top_k=self.model.config.top_k, max_candidates=self.max_candidates,
            **knobs,
        )  # fmt: skip
        if request.rerank and self.scorer is None:
            raise ValueError("rerank=True needs a CLIP model: load one, or pass rerank=False")
        return request

    def stream_requests(self, requests: Sequence[GenerationRequest],
                        previews: bool = True) -> Iterator[list[Any]]:  # fmt: skip
        """Samples many requests in one batch. Yields, every `preview_rows` rows of codes, a
        list of `Preview`s (one per request; `previews=False` skips them), then a list of
        `Result`s. Each request keeps its own prompt, seed and knobs."""
        if not requests:
            raise ValueError("no requests given")
        for request in requests:
            if not isinstance(request, GenerationRequest):
                raise TypeError(f"expected GenerationRequest (pipe.request(...)), got {request!r}")
        # 1. normalize + tokenize; one sampler row per candidate.
        tokens, owner = self._tokenize(requests)
        row_keys, knobs = _row_keys(requests, owner), _row_knobs(requests, owner)
        # 2. encode the prompts (and the empty prompt).
        state = self.model.start_sampling(
            tokens["input_ids"], tokens["attention_mask"], row_keys, knobs,
            tokens["input_ids_uncond"], tokens["attention_mask_uncond"], params=self.params,
        )  # fmt: skip
        # 3. sample the codes, `preview_rows` rows at a time.
        image_length = self.model.config.image_length
        step, chunk = 0, self.preview_rows * self.grid_size
        while step < image_length:
            state = self.model.continue_sampling(state, chunk, params=self.params)
            codes, step = np.asarray(state.sequences[:, 1:]), int(state.step)  # (N, image_length)
            if previews and step < image_length:
                yield [self._preview(r, c, step) for r, c in zip(requests, _split(codes, requests))]
        # 4.–6. decode, score and rank, per request.
        yield [self._finish(r, c) for r, c in zip(requests, _split(codes, requests))]

    # -- the steps -------------------------------------------------------------------------------

    def _tokenize(self, requests: Sequence[GenerationRequest]):
        """Token ids per sampler row, and which request each row belongs to (padded rows repeat
        the last one: see `_bucket`)."""
        tokens = [self._tokenize_one(r.prompt) for r in requests]
        owner = np.repeat(np.arange(len(requests)), [r.num_candidates for r in requests])
        owner = np.pad(owner, (0, _bucket(len(owner)) - len(owner)), mode="edge")  # (N,)
        return {key: np.concatenate([t[key] for t in tokens])[owner] for key in tokens[0]}, owner

    def _tokenize_one(self, prompt: str) -> dict[str, np.ndarray]:
        # The normalizer replaces "<person>" at random: restart its generator for every prompt so
        # the same prompt always reads the same (and regenerates the same image).
        with self._normalizer_lock:
            if self.processor.normalizer is not None:
                self.processor.normalizer.rng.seed(0)
            return self.processor([prompt])

    def normalize(self, prompt: str) -> str:
        """The prompt as the model reads it."""
        with self._normalizer_lock:
            if self.processor.normalizer is not None:
                self.processor.normalizer.rng.seed(0)
            return self.processor.normalize(prompt)

    def decode(self, codes: Any) -> list[Image.Image]:
        """Image codes (N, image_length) → N RGB images. Each image is decoded on its own (a
        batch of one), so its pixels do not depend on what it was decoded with."""
        codes = np.asarray(codes)
        images = []
        for row in codes.reshape(len(codes), -1):
            pixels = self.vqgan.decode_code(row[None], params=self.vqgan_params)  # (1, H, W, 3)
            images.append(to_image(np.asarray(pixels[0])))
        return images

    def score(self, prompt: str, images: Sequence[Image.Image]) -> np.ndarray:
        if self.scorer is None:
            raise ValueError("this pipeline has no CLIP model to score with")
        return np.asarray(self.scorer.score(prompt, list(images)), np.float32)

    def _preview(self, request: GenerationRequest, codes: np.ndarray, step: int) -> Preview:
        """Partly sampled images: the rows not sampled yet repeat the last sampled row, dimmed."""
        shown = codes[: request.num_images]  # (n, image_length), the first candidates
        rows_done = step // self.grid_size
        render = functools.partial(self._render_partial, shown.copy(), rows_done)
        return Preview(request.prompt, step, self.model.config.image_length, render)

    def _render_partial(self, codes: np.ndarray, rows_done: int) -> list[Image.Image]:
        grid = codes.reshape(len(codes), self.grid_size, self.grid_size).copy()
        grid[:, rows_done:] = grid[:, rows_done - 1 : rows_done]
        images = []
        for image in self.decode(grid.reshape(len(codes), -1)):
            pixels = np.asarray(image, np.float32)
            cut = rows_done * pixels.shape[0] // self.grid_size
            pixels[cut:] *= _PREVIEW_DIM
            images.append(Image.fromarray(pixels.round().astype(np.uint8)))
        return images

    def _finish(self, request: GenerationRequest, codes: np.ndarray) -> Result:
        # 4. decode every candidate.
        candidates = self.decode(codes)
        # 5. score them against the prompt.
        scores = self.score(request.prompt, candidates) if self.scorer is not None else None
        # 6. rank: keep the best num_images (or the first ones, without reranking).
        order = np.arange(request.num_images)
        if request.rerank:
            order = np.argsort(-scores, kind="stable")[: request.num_images]
        return Result(
            prompt=request.prompt,
            normalized_prompt=self.normalize(request.prompt),
            images=[candidates[i] for i in order],
            scores=None if scores is None else [float(scores[i]) for i in order],
            settings=[self._settings(request, request.image_indices[i]) for i in order],
            codes=codes[order],
            num_candidates=request.num_candidates,
        )

    def _settings(self, request: GenerationRequest, image_index: int) -> ImageSettings:
        return ImageSettings(
            prompt=request.prompt, seed=request.seed, image_index=int(image_index),
            temperature=request.temperature, top_k=request.top_k, top_p=request.top_p,
            condition_scale=request.condition_scale, model=self.name, dtype=self.dtype,
        )  # fmt: skip

    def _own_settings(self, settings) -> ImageSettings:
        if not isinstance(settings, ImageSettings):
            settings = ImageSettings.from_dict(settings)
        if (settings.model, settings.dtype) != (self.name, self.dtype):
            raise ValueError(
                f"these settings come from model {settings.model!r} ({settings.dtype}) but this "
                f"pipeline runs {self.name!r} ({self.dtype}): load "
                f"Pipeline.from_pretrained({settings.model!r}, dtype={settings.dtype!r}) to "
                "regenerate the image"
            )
        return settings

    def describe(self) -> str:
        """One line naming the models, for pages and logs."""
        config, vq = self.model.config, self.vqgan.config
        side = vq.resolution
        clip = "CLIP reranking" if self.scorer is not None else "no CLIP reranking"
        return (
            f"{self.name}: DalleBart {count_params(self.params) / 1e6:.1f}M parameters "
            f"({self.dtype}), {config.image_length} codes per image from {config.num_codes}, "
            f"VQGAN decoding to {side}×{side} pixels, {clip}"
        )


_KNOB_NAMES = {
    "num_images", "num_candidates", "seed", "temperature", "top_k", "top_p",
    "condition_scale", "rerank", "image_indices",
}  # fmt: skip


def check_compatible(model: DalleBart, vqgan: VQModel) -> None:
    """Refuses a DalleBart whose codes the VQGAN cannot decode."""
    config, vq = model.config, vqgan.config
    if config.image_length != vq.grid_size**2:
        raise CheckpointError(
            f"the DalleBart samples image_length={config.image_length} codes per image but the "
            f"VQGAN decodes a {vq.grid_size}×{vq.grid_size} grid ({vq.grid_size**2} codes): "
            "pair the DalleBart with the VQGAN it was trained with"
        )
    if config.num_codes > vq.n_embed:
        raise CheckpointError(
            f"the DalleBart samples codes 0..{config.num_codes - 1} but the VQGAN codebook has "
            f"only {vq.n_embed} entries: pair the DalleBart with the VQGAN it was trained with"
        )


def to_image(pixels: np.ndarray) -> Image.Image:
    """(H, W, 3) floats, nominally in [0, 1] (VQGAN output) → an RGB image."""
    return Image.fromarray((np.clip(pixels, 0.0, 1.0) * 255).round().astype(np.uint8), "RGB")


def _component_names(name) -> tuple[str, str, Any]:
    if name is None:
        return (None, None, None)
    name = os.fspath(name)
    if name in PRESETS:
        return PRESETS[name]
    folder = Path(name).expanduser()
    if (folder / "dallebart").is_dir():
        clip = folder / "clip"
        return (str(folder / "dallebart"), str(folder / "vqgan"), str(clip) if clip.is_dir() else False)
    return (name, PUBLISHED_VQGAN, PRESETS["mini"][2])


def _prompt_list(prompt) -> list[str]:
    if isinstance(prompt, str):
        return [prompt]
    if not isinstance(prompt, (list, tuple)):
        raise TypeError(f"prompt must be a string or a list of strings, got {type(prompt).__name__}")
    if not prompt:
        raise ValueError("the list of prompts is empty")
    return list(prompt)


def _bucket(count: int) -> int:
    """Sampler batch size for `count` rows: a power of two, at least MIN_BATCH, so that a few
    compiled sizes serve every request (regenerating one image reuses the batch of 8)."""
    return max(MIN_BATCH, 1 << max(count - 1, 0).bit_length())


def _split(codes: np.ndarray, requests: Sequence[GenerationRequest]) -> list[np.ndarray]:
    ends = np.cumsum([r.num_candidates for r in requests])
    return [codes[end - r.num_candidates : end] for r, end in zip(requests, ends)]


def _row_keys(requests: Sequence[GenerationRequest], owner: np.ndarray) -> jax.Array:
    """(N, 2) keys: candidate i of seed s gets fold_in(PRNGKey(s), i), as `sampling.row_keys_for`."""
    keys = jnp.concatenate([
        sampling.row_keys_for(jax.random.PRNGKey(np.uint32(r.seed)),
                              jnp.asarray(r.image_indices, jnp.int32))
        for r in requests
    ])  # fmt: skip
    return jnp.concatenate([keys, jnp.repeat(keys[-1:], len(owner) - len(keys), axis=0)])


def _row_knobs(requests: Sequence[GenerationRequest], owner: np.ndarray) -> sampling.Knobs:
    def column(name: str, dtype) -> jax.Array:
        return jnp.asarray([getattr(requests[i], name) for i in owner], dtype)  # (N,)

    return sampling.Knobs(
        condition_scale=column("condition_scale", jnp.float32),
        temperature=column("temperature", jnp.float32),
        top_k=column("top_k", jnp.int32),
        top_p=column("top_p", jnp.float32),
    )

