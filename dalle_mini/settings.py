"""What a generation asks for: validated requests, and the settings that regenerate one image.

Every front end (Python, CLI, Gradio app, notebook) builds a `GenerationRequest` through
`make_request`, so a bad value gets the same message everywhere: the knob, the value, and the
range it must lie in. `ImageSettings` is the other direction: everything that went into one
image of a result (prompt, seed, image index, knobs, model), small enough to show in a UI or
save as JSON, and enough to sample exactly that image again on its own.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Mapping, Sequence
from typing import Any

MAX_IMAGES = 16
MAX_CANDIDATES = 128
MAX_PROMPT_CHARS = 1000
MAX_SEED = 2**32 - 1
MAX_IMAGE_INDEX = 2**31 - 1
MAX_CONDITION_SCALE = 100.0
MAX_TOP_K = 2**31 - 1
KNOB_NAMES = frozenset({
    "num_images", "num_candidates", "seed", "temperature", "top_k", "top_p", "condition_scale",
    "rerank", "image_indices",
})  # fmt: skip


@dataclasses.dataclass(frozen=True)
class GenerationRequest:
    """One prompt's generation, every knob resolved (no None left).

    `image_indices` lists which candidates of the seed to sample: candidate i uses the PRNG key
    fold_in(PRNGKey(seed), i), so any subset can be sampled alone and gives the same images.
    """

    prompt: str
    num_images: int
    seed: int
    temperature: float
    top_k: int  # 0 disables top-k
    top_p: float  # 1.0 disables top-p
    condition_scale: float
    rerank: bool
    image_indices: tuple[int, ...]

    @property
    def num_candidates(self) -> int:
        return len(self.image_indices)

    def settings_of(self, candidate: int, model: str, dtype: str) -> ImageSettings:
        """The settings of this request's `candidate`-th sample (position in image_indices)."""
        return ImageSettings(
            prompt=self.prompt,
            seed=self.seed,
            image_index=self.image_indices[candidate],
            temperature=self.temperature,
            top_k=self.top_k,
            top_p=self.top_p,
            condition_scale=self.condition_scale,
            model=model,
            dtype=dtype,
        )


@dataclasses.dataclass(frozen=True)
class ImageSettings:
    """What regenerates exactly one image: `Pipeline.regenerate(settings)`."""

    prompt: str
    seed: int
    image_index: int
    temperature: float
    top_k: int
    top_p: float
    condition_scale: float
    model: str  # the pipeline's model name; regenerating with another model is refused
    dtype: str = "float32"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> ImageSettings:
        """Reads settings back (from the JSON the CLI or the app wrote), checking every value."""
        if not isinstance(values, Mapping):
            raise TypeError(f"settings must be a dict, got {type(values).__name__}")
        names = [field.name for field in dataclasses.fields(cls)]
        unknown = sorted(set(values) - set(names))
        missing = [name for name in names[:-1] if name not in values]  # dtype may be left out
        if unknown or missing:
            problems = [f"unknown keys {unknown}"] if unknown else []
            problems += [f"missing keys {missing}"] if missing else []
            raise ValueError(
                f"settings do not describe one image ({'; '.join(problems)}); expected the keys "
                f"{names}, as in result.settings[i].to_dict()"
            )
        for name in ("model", "dtype"):
            if name in values and not isinstance(values[name], str):
                raise TypeError(f"settings {name} must be a string, got {values[name]!r}")
        return cls(
            prompt=check_prompt(values["prompt"]),
            seed=check_int("seed", values["seed"], 0, MAX_SEED),
            image_index=check_int("image_index", values["image_index"], 0, MAX_IMAGE_INDEX),
            temperature=check_float("temperature", values["temperature"], 0.0, math.inf, True),
            top_k=check_int("top_k", values["top_k"], 0, MAX_TOP_K),
            top_p=check_float("top_p", values["top_p"], 0.0, 1.0, low_open=True),
            condition_scale=check_float(
                "condition_scale", values["condition_scale"], 0.0, MAX_CONDITION_SCALE
            ),
            model=values["model"],
            dtype=values.get("dtype", "float32"),
        )


def make_request(
    prompt: Any,
    *,
    num_images: Any = 9,
    num_candidates: Any = 32,
    seed: Any = 0,
    temperature: Any = 1.0,
    top_k: Any = None,
    top_p: Any = None,
    condition_scale: Any = None,
    rerank: Any = True,
    default_top_k: int = 50,
    default_condition_scale: float = 10.0,
    image_indices: Sequence[Any] | None = None,
    max_candidates: int = MAX_CANDIDATES,
) -> GenerationRequest:
    """Checks every knob and resolves the defaults.

    Args:
      top_k: None means `default_top_k` (the model's: 50 as the original, 8 embedded); 0 off.
      top_p: None or 1.0 disables nucleus filtering.
      rerank: True samples `num_candidates` and keeps the `num_images` CLIP ranks best; False
        samples `num_images` only (candidates 0..num_images-1), in seed order.
      image_indices: sample exactly these candidates instead (regeneration).

    Raises:
      TypeError for a value of the wrong type, ValueError for one out of range; both messages
      name the knob and what it accepts.
    """
    prompt = check_prompt(prompt)
    if not isinstance(rerank, bool):
        raise TypeError(f"rerank must be True or False, got {rerank!r}")
    num_images = check_int("num_images", num_images, 1, MAX_IMAGES)
    if image_indices is not None:
        if isinstance(image_indices, (str, bytes)) or not isinstance(image_indices, Sequence):
            raise TypeError(f"image_indices must be a list of integers, got {image_indices!r}")
        if not 1 <= len(image_indices) <= max_candidates:
            raise ValueError(f"image_indices must list 1 to {max_candidates} candidates")
        indices = tuple(check_int("image_index", i, 0, MAX_IMAGE_INDEX) for i in image_indices)
        num_images = min(num_images, len(indices))
    else:
        count = check_int("num_candidates", num_candidates, 1, max_candidates)
        if rerank and count < num_images:
            raise ValueError(
                f"num_candidates={count} is fewer than num_images={num_images}: reranking keeps "
                "the best num_images of num_candidates samples, so raise num_candidates or "
                "lower num_images"
            )
        indices = tuple(range(count if rerank else num_images))
    return GenerationRequest(
        prompt=prompt,
        num_images=num_images,
        seed=check_int("seed", seed, 0, MAX_SEED),
        temperature=check_float("temperature", temperature, 0.0, math.inf, low_open=True),
        top_k=default_top_k if top_k is None else check_int("top_k", top_k, 0, MAX_TOP_K),
        top_p=1.0 if top_p is None else check_float("top_p", top_p, 0.0, 1.0, low_open=True),
        condition_scale=default_condition_scale
        if condition_scale is None
        else check_float("condition_scale", condition_scale, 0.0, MAX_CONDITION_SCALE),
        rerank=rerank,
        image_indices=indices,
    )


def prompt_list(prompts: Any) -> list[str]:
    """A list of prompts from one prompt or a list of them (each checked by `check_prompt`)."""
    if isinstance(prompts, str):
        return [prompts]
    if not isinstance(prompts, (list, tuple)):
        raise TypeError(f"the prompt must be a string or a list of strings, got {prompts!r}")
    if not prompts:
        raise ValueError("the list of prompts is empty")
    return list(prompts)


def check_prompt(prompt: Any) -> str:
    if not isinstance(prompt, str):
        raise TypeError(f"the prompt must be a string, got {type(prompt).__name__}")
    if not prompt.strip():
        raise ValueError("the prompt is empty: describe the image you want, e.g. 'a red circle'")
    if len(prompt) > MAX_PROMPT_CHARS:
        raise ValueError(
            f"the prompt is {len(prompt)} characters long; the limit is {MAX_PROMPT_CHARS} "
            "(the model reads only its first few dozen words anyway)"
        )
    return prompt


def check_int(name: str, value: Any, low: int, high: int) -> int:
    """`value` as an int in [low, high]; whole floats (9.0, as sliders send) are accepted."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be an integer, got {type(value).__name__} {value!r}")
    is_whole = isinstance(value, numbers.Integral) or (
        math.isfinite(value) and float(value).is_integer()
    )
    if not is_whole:
        raise ValueError(f"{name}={value!r} is not a whole number")
    if not low <= value <= high:
        raise ValueError(
            f"{name}={value!r} is out of range: expected an integer from {low} to {high}"
        )
    return int(value)


def check_float(name: str, value: Any, low: float, high: float, low_open: bool = False) -> float:
    """`value` as a finite float in [low, high] (or (low, high] with `low_open`)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {type(value).__name__} {value!r}")
    value = float(value)
    too_low = value <= low if low_open else value < low
    if not math.isfinite(value) or too_low or value > high:
        if low_open:
            expected = f"greater than {low:g}" + ("" if math.isinf(high) else f", at most {high:g}")
        else:
            expected = f"from {low:g} to {high:g}"
        raise ValueError(f"{name}={value!r} is out of range: expected a finite number {expected}")
    return value
