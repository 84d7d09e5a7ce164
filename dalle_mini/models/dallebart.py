"""`DalleBart`: load, run and sample the published DALL·E Mini / Mega checkpoints.

The interface mirrors the original inference notebook (`from_pretrained(..., _do_init=False)`
returning `(model, params)`, `model(...).logits`, `model.generate(**batch, prng_key=...)`), so
its users can switch. The computation lives in `models/bart.py`, `models/bart_stacks.py` and
`sampling.py`; this class holds a config, a compute dtype and the compiled functions.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dalle_mini import checkpoint, compile_cache, sampling
from dalle_mini.hub import CheckpointError, resolve_folder
from dalle_mini.models import bart, bart_stacks

Array = jax.Array
_UNSCANNED = re.compile(r"^(.*/layers)/FlaxBart(Encoder|Decoder)Layer_(\d+)/(.*)$")


@dataclasses.dataclass
class EncoderOutput:
    last_hidden_state: Array


@dataclasses.dataclass
class Seq2SeqOutput:
    logits: Array  # (B, T, image_vocab_size + 1)
    encoder_last_hidden_state: Array  # (B, max_text_length, d_model)


@dataclasses.dataclass
class GenerateOutput:
    sequences: Array  # (B, image_length + 1), start token first; codes are sequences[:, 1:]


def to_scanned(params: dict[str, Any]) -> dict[str, Any]:
    """Stacks an unscanned tree (`layers/FlaxBartEncoderLayer_{i}/...`) into the scanned layout."""
    flat = checkpoint.flatten(params)
    per_layer: dict[str, dict[int, Any]] = {}
    scanned = {}
    for path, leaf in flat.items():
        match = _UNSCANNED.match(path)
        if match is None:
            scanned[path] = leaf
            continue
        stack, side, index, rest = match.groups()
        per_layer.setdefault(f"{stack}/FlaxBart{side}Layers/{rest}", {})[int(index)] = leaf
    for path, leaves in per_layer.items():
        if sorted(leaves) != list(range(len(leaves))):
            raise CheckpointError(
                f"unscanned layers of {path} are not numbered 0..{len(leaves) - 1}"
            )
        scanned[path] = np.stack([leaves[i] for i in range(len(leaves))])
    return checkpoint.unflatten(scanned)


class DalleBart:
    """A DalleBart of a given config, computing in `dtype` (float32 or bfloat16)."""

    WEIGHTS_FILES = (checkpoint.CONFIG_NAME, checkpoint.WEIGHTS_NAME)

    def __init__(self, config: bart.DalleBartConfig, dtype: Any = jnp.float32):
        self.config = config
        self.dtype = dtype
        self.params = None  # set by from_pretrained(..., _do_init=True)
        self._encode = jax.jit(lambda p, ids, mask: bart_stacks.encode(p, config, ids, mask, dtype))
        self._forward = jax.jit(self._forward_fn)
        self._init_state = jax.jit(
            self._init_state_fn, static_argnames=("use_uncond", "block_length")
        )
        self._run_steps = jax.jit(
            self._run_steps_fn,
            static_argnames=("num_steps", "only_image_codes"),
            donate_argnames="state",
            compiler_options=sampling.compiler_options(dtype),
        )

    # -- loading and saving ---------------------------------------------------------------

    @classmethod
    def from_pretrained(
        cls,
        name_or_folder: str | os.PathLike,
        revision: str | None = None,
        dtype: Any = jnp.float32,
        param_dtype: Any = jnp.float32,
        _do_init: bool = False,
        pack_weights: bool | None = None,
        **ignored,
    ):
        """Loads a checkpoint folder, hub repo id or "embedded".

        Returns `(model, params)` with `_do_init=False` (as the original), else the model with
        `model.params` set. float16 checkpoints load as `param_dtype` (float32 by default).
        `pack_weights`: see `load_params`.
        """
        folder = cls._folder(name_or_folder, revision)  # a hub repo is fetched once, here
        model = cls.from_config(folder, dtype=dtype)
        params = model.load_params(folder, param_dtype=param_dtype, pack_weights=pack_weights)
        if _do_init:
            model.params = params
            return model
        return model, params

    @classmethod
    def from_config(
        cls, name_or_folder: str | os.PathLike, revision: str | None = None, dtype=jnp.float32
    ) -> DalleBart:
        """The model of a checkpoint's config.json, without its weights (`load_params` reads
        them): for compiling the sampler before the weights take their memory."""
        folder = cls._folder(name_or_folder, revision)
        try:
            config = bart.DalleBartConfig.from_dict(checkpoint.read_json(folder / "config.json"))
        except ValueError as error:
            raise CheckpointError(f"{folder / 'config.json'}: {error}") from error
        return cls(config, dtype)

    def load_params(
        self,
        name_or_folder: str | os.PathLike,
        revision: str | None = None,
        param_dtype: Any = jnp.float32,
        pack_weights: bool | None = None,
    ):
        """The checkpoint's weights, checked against this model's shapes, on the device.

        `pack_weights`: lay the matrices a sampling step multiplies by out for the CPU kernel
        (`bart_stacks.pack_decoder`; same numbers, other shapes; `save_pretrained` writes them
        plain). None (default) packs where it pays (`bart_stacks.should_pack`: a CPU with the
        kernel, weights in the compute dtype, the mini's width or more); True insists
        (ValueError where it cannot).
        """
        pack = self._packs(pack_weights, param_dtype)
        weights = self._folder(name_or_folder, revision) / checkpoint.WEIGHTS_NAME
        # read leaf by leaf into aligned buffers that the CPU device adopts: the weights are
        # held once while loading, not two or three times
        params = to_scanned(checkpoint.load_msgpack(weights, dtype=param_dtype))
        checkpoint.check_tree(params, self.param_shapes(), weights)
        params = checkpoint.to_device(params)
        return bart_stacks.pack_decoder(params) if pack else params

    def _packs(self, pack_weights: bool | None, param_dtype: Any) -> bool:
        if pack_weights is None:
            return bart_stacks.should_pack(self.config, self.dtype, param_dtype)
        if pack_weights:
            problem = bart_stacks.pack_problem(self.dtype, param_dtype)
            if problem:
                raise ValueError(f"pack_weights=True, but {problem}; pass pack_weights=None")
        return bool(pack_weights)

    @classmethod
    def _folder(cls, name_or_folder, revision) -> Path:
        return resolve_folder(
            name_or_folder,
            component="dallebart",
            required_files=cls.WEIGHTS_FILES,
            revision=revision,
        )

    def save_pretrained(self, folder: str | os.PathLike, params=None) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / checkpoint.CONFIG_NAME).write_text(json.dumps(self.config.to_dict(), indent=2))
        plain = bart_stacks.unpack(self._params(params))  # packed matrices in the published form
        checkpoint.save_msgpack(folder / checkpoint.WEIGHTS_NAME, plain)

    def init_params(self, rng: Array):
        return bart_stacks.init_params(self.config, rng)

    def param_shapes(self):
        return jax.eval_shape(lambda: bart_stacks.init_params(self.config, jax.random.PRNGKey(0)))

    def _params(self, params):
        if params is None:
            if self.params is None:
                raise ValueError(
                    "pass params=..., or load with from_pretrained(..., _do_init=True)"
                )
            return self.params
        return params

    # -- forward passes ---------------------------------------------------------------------

    def encode(self, input_ids, attention_mask, params=None) -> EncoderOutput:
        return EncoderOutput(self._encode(self._params(params), input_ids, attention_mask))

    def _forward_fn(self, params, input_ids, attention_mask, decoder_input_ids):
        hidden = bart_stacks.encode(params, self.config, input_ids, attention_mask, self.dtype)
        logits = bart_stacks.decode(
            params, self.config, decoder_input_ids, hidden, attention_mask, self.dtype
        )
        return logits, hidden

    def __call__(
        self, input_ids, attention_mask, decoder_input_ids, params=None, **ignored
    ) -> Seq2SeqOutput:
        """Teacher-forced logits; `logits[:, t]` predicts the token after input t."""
        logits, hidden = self._forward(
            self._params(params), input_ids, attention_mask, decoder_input_ids
        )
        return Seq2SeqOutput(logits=logits, encoder_last_hidden_state=hidden)

    # -- sampling -----------------------------------------------------------------------------

    def _init_state_fn(
        self, params, ids, mask, uncond_ids, uncond_mask, row_keys, knobs, use_uncond,
        block_length=None,
    ):  # fmt: skip
        if not use_uncond:
            uncond_ids = uncond_mask = None
        return sampling.init_state(
            params, self.config, ids, mask, row_keys, knobs, uncond_ids, uncond_mask, self.dtype,
            block_length,
        )  # fmt: skip

    def _run_steps_fn(self, params, state, num_steps, only_image_codes):
        return sampling.run_steps(
            params, self.config, state, num_steps, only_image_codes, self.dtype
        )

    def start_sampling(
        self,
        input_ids,
        attention_mask,
        row_keys,
        knobs: sampling.Knobs,
        input_ids_uncond=None,
        attention_mask_uncond=None,
        params=None,
        block_length=None,
    ) -> sampling.SamplerState:
        """The sampler's first state. Unconditional rows run only where some scale is not 1.
        `block_length`: positions per block of the self-attention cache (default
        `sampling.cache_block_length`); it changes the speed, and the codes only through
        float rounding (the tests find them identical)."""
        use_uncond = bool(np.any(np.asarray(knobs.condition_scale) != 1.0))
        if use_uncond and input_ids_uncond is None:
            input_ids_uncond, attention_mask_uncond = self.unconditional_batch(len(input_ids))
        if not use_uncond:
            input_ids_uncond, attention_mask_uncond = input_ids, attention_mask  # unused
        elif _all_rows_equal(input_ids_uncond) and _all_rows_equal(attention_mask_uncond):
            # the usual case, every row the empty prompt: encode it once, share its keys/values
            input_ids_uncond, attention_mask_uncond = (
                input_ids_uncond[:1],
                attention_mask_uncond[:1],
            )
        # per-layer views of the decoder weights (CPU): the prompt's cross-attention keys and
        # values are then computed without copying each layer's projections out of the stack
        return self._init_state(
            sampling.split_decoder_layers(self._params(params), only_as_views=True),
            jnp.asarray(input_ids),
            jnp.asarray(attention_mask),
            jnp.asarray(input_ids_uncond),
            jnp.asarray(attention_mask_uncond),
            row_keys,
            knobs,
            use_uncond=use_uncond,
            block_length=block_length,
        )

    def continue_sampling(self, state, num_steps=None, only_image_codes=True, params=None):
        """Advances the sampler by `num_steps` codes (all remaining by default)."""
        num_steps = self.config.image_length if num_steps is None else int(num_steps)
        # per-layer decoder weights: sliced from the stacked arrays inside the loop, each layer
        # would be copied at every step
        params = sampling.split_decoder_layers(self._params(params))
        return self._run_steps(params, state, num_steps, only_image_codes)

    def compile_sampler(
        self,
        batch_size: int,
        *,
        use_uncond: bool = True,
        num_steps: int | None = None,
        only_image_codes: bool = True,
        param_dtype: Any = jnp.float32,
        text_length: int | None = None,
        block_length: int | None = None,
        pack_weights: bool | None = None,
    ) -> None:
        """Compiles the sampler for `batch_size` images from the parameters' shapes alone.

        Call it before loading the weights: the compiler's working memory is then spent and
        given back to the system while the process is small, instead of on top of the weights
        and the key/value cache (on a CPU, the largest moment of a cold first run: for the
        mini's 3×3 grid, peak 3.10 GB compiling after loading, 2.93 GB compiling ahead). The
        executables are kept (and written to the persistent compilation cache when one is on),
        so `start_sampling` and `continue_sampling` with the same shapes and statics reuse
        them.
        `use_uncond` as `start_sampling` decides it (some condition scale other than 1), with
        the usual empty prompt shared by every row; `num_steps` as given to
        `continue_sampling` (all remaining by default); `param_dtype` and `pack_weights` as
        given to `load_params`.
        """
        length = self.config.max_text_length if text_length is None else int(text_length)
        num_steps = self.config.image_length if num_steps is None else int(num_steps)
        if int(batch_size) < 1 or length < 1 or not 1 <= num_steps <= self.config.image_length:
            raise ValueError(
                f"compile_sampler needs batch_size >= 1, text_length >= 1 and num_steps in "
                f"1..{self.config.image_length}; got {batch_size}, {length}, {num_steps}"
            )
        ids = jax.ShapeDtypeStruct((batch_size, length), jnp.int32)
        uncond = jax.ShapeDtypeStruct((1 if use_uncond else batch_size, length), jnp.int32)
        knobs = jax.eval_shape(
            lambda: sampling.Knobs.broadcast(
                batch_size, condition_scale=1.0, temperature=1.0, top_k=0, top_p=1.0
            )
        )
        row_keys = jax.eval_shape(  # as `generate` derives them from a jax.random.PRNGKey
            sampling.row_keys_for, jax.random.PRNGKey(0), jnp.arange(batch_size)
        )
        shapes = jax.tree.map(
            lambda leaf: jax.ShapeDtypeStruct(leaf.shape, param_dtype), self.param_shapes()
        )
        if self._packs(pack_weights, param_dtype):
            shapes = bart_stacks.pack_decoder(shapes)
        params = jax.eval_shape(sampling.split_decoder_layers, shapes)  # as the calls pass them
        args = (params, ids, ids, uncond, uncond, row_keys, knobs)
        statics = {"use_uncond": use_uncond, "block_length": block_length}
        self._init_state.lower(*args, **statics).compile()
        state = jax.eval_shape(functools.partial(self._init_state, **statics), *args)
        # passed as continue_sampling passes them: the cache key tells positions from names
        self._run_steps.lower(params, state, num_steps, only_image_codes).compile()
        compile_cache.release_freed_memory()  # the compiler's memory, before the weights come

    def unconditional_batch(self, batch_size: int):
        """Token ids of the empty prompt, `<s></s>` then padding, as the processor makes them."""
        ids = np.full((batch_size, self.config.max_text_length), 1, np.int32)
        ids[:, 0], ids[:, 1] = 0, 2
        return ids, (ids != 1).astype(np.int32)

    def generate(
        self,
        input_ids,
        attention_mask,
        input_ids_uncond=None,
        attention_mask_uncond=None,
        prng_key=None,
        params=None,
        top_k=None,
        top_p=None,
        temperature=None,
        condition_scale=1.0,
        only_image_codes=True,
        image_indices=None,
        **ignored,
    ) -> GenerateOutput:
        """Samples `image_length` codes for each prompt row.

        Args:
          prng_key: row r uses `fold_in(prng_key, image_indices[r])`, so an image does not depend
            on the batch it was sampled in. Default PRNGKey(0).
          top_k: None is config.top_k (the original's 50; the embedded model's 8); 0 disables it.
          top_p: None or 1.0 disables nucleus filtering. temperature: None is 1.0.
          condition_scale: super-conditioning weight; 1.0 skips the unconditional rows.
          only_image_codes: never sample ids that are not VQGAN codes (start token, eos/pad,
            padded rows). False samples exactly as the original did.
          image_indices: (B,) ints, default 0..B-1.
        """
        batch = len(input_ids)
        knobs = sampling.Knobs.broadcast(
            batch,
            condition_scale=condition_scale,
            temperature=1.0 if temperature is None else temperature,
            top_k=self.config.top_k if top_k is None else top_k,
            top_p=1.0 if top_p is None else top_p,
        )
        validate_knobs(knobs)
        prng_key = jax.random.PRNGKey(0) if prng_key is None else prng_key
        indices = jnp.arange(batch) if image_indices is None else jnp.asarray(image_indices)
        row_keys = sampling.row_keys_for(prng_key, indices)
        state = self.start_sampling(
            input_ids,
            attention_mask,
            row_keys,
            knobs,
            input_ids_uncond,
            attention_mask_uncond,
            params,
        )
        state = self.continue_sampling(state, only_image_codes=only_image_codes, params=params)
        return GenerateOutput(sequences=state.sequences)


def _all_rows_equal(rows) -> bool:
    rows = np.asarray(rows)
    return bool(np.all(rows == rows[:1]))


def validate_knobs(knobs: sampling.Knobs) -> None:
    """Raises ValueError, naming the knob and its valid range, for values sampling cannot use."""
    checks = (
        ("temperature", knobs.temperature, lambda t: np.isfinite(t) & (t > 0), "a number > 0"),
        ("condition_scale", knobs.condition_scale, np.isfinite, "a finite number"),
        ("top_p", knobs.top_p, lambda p: np.isfinite(p) & (p > 0), "a number in (0, 1]"),
        ("top_k", knobs.top_k, lambda k: k >= 0, "an integer >= 0 (0 disables it)"),
    )
    for name, values, is_valid, expected in checks:
        values = np.asarray(values)
        if not np.all(is_valid(values)):
            bad = values[~is_valid(values)][0]
            raise ValueError(f"{name}={bad} is not valid: expected {expected}")
