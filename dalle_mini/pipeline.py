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

import functools
import os
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np
from PIL import Image

from dalle_mini.batching import make_batch, split_rows
from dalle_mini.checkpoint import count_params
from dalle_mini.hub import EMBEDDED_NAME, CheckpointError
from dalle_mini.models.dallebart import DalleBart
from dalle_mini.models.vqgan import PUBLISHED_VQGAN, VQModel
from dalle_mini.processor import DalleBartProcessor
from dalle_mini.results import Preview, Result, to_image
from dalle_mini.settings import (
    KNOB_NAMES,
    MAX_CANDIDATES,
    GenerationRequest,
    ImageSettings,
    make_request,
    prompt_list,
)

# name -> (DalleBart, VQGAN, CLIP). The published ones need the network once (then cached).
PRESETS = {
    EMBEDDED_NAME: (EMBEDDED_NAME, EMBEDDED_NAME, EMBEDDED_NAME),
    "mini": ("dalle-mini/dalle-mini", PUBLISHED_VQGAN, "ViT-B-32"),
    "mega": ("dalle-mini/dalle-mega", PUBLISHED_VQGAN, "ViT-B-32"),
}
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
_PREVIEW_DIM = 0.35  # previews show rows not sampled yet at this fraction of their brightness


class Pipeline:
    """DalleBart + VQGAN (+ CLIP): text to ranked images. Build with `from_pretrained`.

    Args:
      preview_rows: rows of codes sampled between two previews (default: a quarter of the grid).
      max_candidates: the most candidates one request may ask for.
    """

    def __init__(
        self,
        model: DalleBart,
        params,
        vqgan: VQModel,
        vqgan_params,
        processor: DalleBartProcessor,
        scorer=None,
        *,
        name: str = "custom",
        preview_rows: int | None = None,
        max_candidates: int = MAX_CANDIDATES,
    ):
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
    def from_pretrained(
        cls,
        name: str | os.PathLike | None = EMBEDDED_NAME,
        *,
        dallebart=None,
        vqgan=None,
        clip=None,
        revision: str | None = None,
        dtype: str = "float32",
        **options,
    ) -> Pipeline:
        """Loads the three components.

        Args:
          name: "embedded" (offline, the default), "mini" or "mega" (the published DALL·E Mini /
            Mega with the published VQGAN and OpenAI's CLIP ViT-B/32; network once, then
            cached), a folder holding `dallebart/`, `vqgan/` and optionally `clip/`, or a
            DalleBart folder / hub id (paired with the published VQGAN and CLIP).
          dallebart, vqgan, clip: override one component (folder, hub id or "embedded");
            `clip=False` loads no CLIP (no reranking, no scores).
          revision: hub revision of the DalleBart (e.g. a branch of dalle-mini/dalle-mega).
          dtype: "float32" or "bfloat16": the DalleBart's compute and weights (bfloat16 halves
            their memory and traffic; on CPUs with AVX-512 BF16 the sampling kernels use it).
          options: `preview_rows`, `max_candidates` (see the class).
        """
        defaults = _component_names(name)
        dallebart = dallebart or defaults[0]
        vqgan = vqgan or defaults[1]
        clip = defaults[2] if clip is None else clip
        if not dallebart or not vqgan:
            raise ValueError("name a model (e.g. 'embedded'), or pass both dallebart= and vqgan=")
        if dtype not in DTYPES:
            raise ValueError(f"dtype={dtype!r} is not supported: use one of {sorted(DTYPES)}")
        # weights kept in the compute dtype: the products round them to it anyway
        model, params = DalleBart.from_pretrained(
            dallebart, revision=revision, dtype=DTYPES[dtype], param_dtype=DTYPES[dtype]
        )
        processor = DalleBartProcessor.from_pretrained(dallebart, revision=revision)
        vq_model, vq_params = VQModel.from_pretrained(vqgan, decoder_only=True)
        scorer = None
        if clip:
            from dalle_mini.scoring import CLIPScorer

            scorer = CLIPScorer.from_pretrained(clip)
        overridden = name is None or (dallebart, vqgan) != defaults[:2]
        label = f"dallebart={dallebart}, vqgan={vqgan}" if overridden else os.fspath(name)
        return cls(model, params, vq_model, vq_params, processor, scorer, name=label, **options)

    # -- the public calls ------------------------------------------------------------------------

    def __call__(
        self,
        prompt: str | Sequence[str],
        *,
        num_images: int = 9,
        num_candidates: int = 32,
        seed: int = 0,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        condition_scale: float | None = None,
        rerank: bool | None = None,
    ) -> Result | list[Result]:
        """Generates images for a prompt (→ Result) or a list of prompts (→ list of Results,
        sampled as one batch).

        Args:
          num_images: images kept, 1–16.
          num_candidates: images sampled, of which CLIP keeps the best `num_images`.
          seed: 0 to 2**32 - 1; candidate i of a seed is always the same image.
          temperature: > 0; below 1 plainer and safer, above 1 more varied.
          top_k: sample among the k likeliest codes; None is the model's default (config.json:
            50 as the original, 8 for the embedded model), 0 turns it off.
          top_p: sample among the likeliest codes holding this probability; None is off.
          condition_scale: super-conditioning weight, >= 0; 1 is plain sampling; None is the
            model's default (config.json `condition_scale`: 10 for the published models, 1.25 for
            the embedded one).
          rerank: keep CLIP's best (True) or the first `num_images` samples (False);
            None reranks when a CLIP is loaded.

        Raises:
          TypeError / ValueError naming the knob and the values it accepts.
        """
        knobs = dict(num_images=num_images, num_candidates=num_candidates, seed=seed,
                     temperature=temperature, top_k=top_k, top_p=top_p,
                     condition_scale=condition_scale, rerank=rerank)  # fmt: skip
        *_, final = self.stream(prompt, **knobs)
        return final

    def stream(self, prompt: str | Sequence[str], **knobs) -> Iterator[Any]:
        """Like calling the pipeline (same knobs), but first yields a `Preview` every
        `preview_rows` rows of codes (a list of them for a list of prompts), then the final
        Result(s). Bad knobs raise here, before anything is sampled."""
        is_batch = not isinstance(prompt, str)
        requests = [self.request(text, **knobs) for text in prompt_list(prompt)]
        updates = self.stream_requests(requests)
        return updates if is_batch else (update[0] for update in updates)

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
            self.request(
                s.prompt,
                num_images=1,
                seed=s.seed,
                temperature=s.temperature,
                top_k=s.top_k,
                top_p=s.top_p,
                condition_scale=s.condition_scale,
                rerank=False,
                image_indices=[s.image_index],
            )
            for s in items
        ]
        *_, results = self.stream_requests(requests, previews=False)
        return results if is_batch else results[0]

    def request(self, prompt: str, **knobs) -> GenerationRequest:
        """A checked request for this pipeline (clear TypeError/ValueError on a bad knob)."""
        unknown = sorted(set(knobs) - KNOB_NAMES)
        if unknown:
            raise TypeError(f"unknown setting(s) {unknown}; the knobs are {sorted(KNOB_NAMES)}")
        if knobs.get("rerank") is None:
            knobs["rerank"] = self.scorer is not None
        request = make_request(
            prompt,
            default_top_k=self.model.config.top_k,
            default_condition_scale=self.model.config.condition_scale,
            max_candidates=self.max_candidates,
            **knobs,
        )
        if request.rerank and self.scorer is None:
            raise ValueError("rerank=True needs a CLIP model: load one, or pass rerank=False")
        return request

    def stream_requests(
        self, requests: Sequence[GenerationRequest], previews: bool = True,
        defer_finish: bool = False,
    ) -> Iterator[list[Any]]:  # fmt: skip
        """Samples many requests in one batch. Yields, every `preview_rows` rows of codes, a
        list of `Preview`s (one per request; `previews=False` skips them), then a list of
        `Result`s. Each request keeps its own prompt, seed and knobs.

        With `defer_finish`, the last list holds, instead of each `Result`, a function of no
        arguments that makes it (decodes, scores and ranks that request's candidates): a server
        runs them in each request's own thread while the next batch is sampled."""
        if not requests:
            raise ValueError("no requests given")
        for request in requests:
            if not isinstance(request, GenerationRequest):
                raise TypeError(f"expected GenerationRequest (pipe.request(...)), got {request!r}")
        # 1. normalize + tokenize; one sampler row per candidate.
        batch = make_batch(requests, [self._tokenize(r.prompt) for r in requests])
        # 2. encode the prompts (and the empty prompt).
        tokens = batch.tokens
        state = self.model.start_sampling(
            tokens["input_ids"],
            tokens["attention_mask"],
            batch.row_keys,
            batch.knobs,
            tokens["input_ids_uncond"],
            tokens["attention_mask_uncond"],
            params=self.params,
        )
        # 3. sample the codes, `preview_rows` rows at a time.
        image_length = self.model.config.image_length
        step, chunk = 0, self.preview_rows * self.grid_size
        while step < image_length:
            state = self.model.continue_sampling(state, chunk, params=self.params)
            codes, step = np.asarray(state.sequences[:, 1:]), int(state.step)  # (N, image_length)
            if previews and step < image_length:
                yield [self._preview(r, c, step) for r, c in split_rows(codes, requests)]
        # 4.–6. decode, score and rank, per request.
        if defer_finish:
            yield [functools.partial(self._finish, r, c) for r, c in split_rows(codes, requests)]
        else:
            yield [self._finish(r, c) for r, c in split_rows(codes, requests)]

    # -- the steps -------------------------------------------------------------------------------

    def _tokenize(self, prompt: str) -> dict[str, np.ndarray]:
        return self._with_fixed_normalizer(lambda: self.processor([prompt]))

    def normalize(self, prompt: str) -> str:
        """The prompt as the model reads it."""
        return self._with_fixed_normalizer(lambda: self.processor.normalize(prompt))

    def _with_fixed_normalizer(self, run):
        # The normalizer replaces "<person>" at random: restart its generator for every prompt so
        # the same prompt always reads the same (and regenerates the same image).
        with self._normalizer_lock:
            if self.processor.normalizer is not None:
                self.processor.normalizer.rng.seed(0)
            return run()

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
            settings=[request.settings_of(i, self.name, self.dtype) for i in order],
            codes=codes[order],
            num_candidates=request.num_candidates,
        )

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
            f"({self.dtype} compute), {config.image_length} codes per image from "
            f"{config.num_codes}, VQGAN decoding to {side}×{side} pixels, {clip}"
        )


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


def _component_names(name) -> tuple[str, str, Any]:
    if name is None:
        return (None, None, None)
    name = os.fspath(name)
    if name in PRESETS:
        return PRESETS[name]
    folder = Path(name).expanduser()
    if (folder / "dallebart").is_dir():
        clip = folder / "clip"
        return (
            str(folder / "dallebart"),
            str(folder / "vqgan"),
            str(clip) if clip.is_dir() else False,
        )
    return (name, PUBLISHED_VQGAN, PRESETS["mini"][2])
