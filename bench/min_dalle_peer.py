"""min-dalle (PyTorch, `min-dalle==0.4.11`), the peer of the speed benchmark, run offline.

min-dalle downloads its weights (and pings the hub) whenever it starts. This adapter
  - writes the benchmark's random weights in min-dalle's own files (`<root>/dalle_bart_mini/
    encoder.pt, decoder.pt, vocab.json, merges.txt` and `<root>/vqgan/detoker.pt`: torch state
    dicts of its `DalleBartEncoder`, `DalleBartDecoder` and `VQGanDetokenizer`), converted from
    our flax trees, so both implementations compute with the very same weights;
  - replaces `requests` inside min-dalle's module while it loads, so nothing reaches the
    network (its files exist, so nothing is downloaded; the unconditional ping is answered
    locally);
  - runs one grid the way min-dalle's `generate_images` does, timing its sampling and its VQGAN
    detokenizer separately.

min-dalle is an optional extra of the benchmark (`pip install torch==2.13.0 min-dalle==0.4.11
--no-deps` plus `requests emoji`), never a dependency of the package.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import time
import types
from pathlib import Path

import numpy as np

IMAGE_TOKENS = 256


def _torch():
    import torch

    return torch


# -- weights: our flax trees -> min-dalle's state dicts -------------------------------------------


def _linear(kernel) -> np.ndarray:
    return np.ascontiguousarray(
        np.asarray(kernel, np.float32).T
    )  # flax (in, out) -> torch (out, in)


def _norm(prefix: str, bias, scale=None) -> dict[str, np.ndarray]:
    bias = np.asarray(bias, np.float32)
    scale = np.ones_like(bias) if scale is None else np.asarray(scale, np.float32)
    return {f"{prefix}.weight": scale, f"{prefix}.bias": bias}


def _attention(prefix: str, tree, i: int) -> dict[str, np.ndarray]:
    return {
        f"{prefix}.{name}.weight": _linear(tree[name]["kernel"][i])
        for name in ("q_proj", "k_proj", "v_proj", "out_proj")
    }


def _glu(prefix: str, glu, i: int) -> dict[str, np.ndarray]:
    return {
        **_norm(f"{prefix}.ln0", glu["LayerNorm_0"]["bias"][i]),
        **_norm(f"{prefix}.ln1", glu["LayerNorm_1"]["bias"][i]),
        **{f"{prefix}.fc{j}.weight": _linear(glu[f"Dense_{j}"]["kernel"][i]) for j in range(3)},
    }


def _stack_ends(stack) -> dict[str, np.ndarray]:
    return {
        "embed_tokens.weight": np.asarray(stack["embed_tokens"]["embedding"], np.float32),
        "embed_positions.weight": np.asarray(stack["embed_positions"]["embedding"], np.float32),
        **_norm(
            "layernorm_embedding",
            stack["layernorm_embedding"]["bias"],
            stack["layernorm_embedding"]["scale"],
        ),  # fmt: skip
        **_norm("final_ln", stack["final_ln"]["bias"]),
    }


def encoder_state_dict(params) -> dict[str, np.ndarray]:
    """min-dalle `DalleBartEncoder` weights from our DalleBart params (scanned layout)."""
    encoder = params["model"]["encoder"]
    layers = encoder["layers"]["FlaxBartEncoderLayers"]
    state = _stack_ends(encoder)
    for i in range(layers["LayerNorm_0"]["bias"].shape[0]):
        p = f"layers.{i}"
        state.update(_norm(f"{p}.pre_self_attn_layer_norm", layers["LayerNorm_0"]["bias"][i]))
        state.update(_attention(f"{p}.self_attn", layers["FlaxBartAttention_0"], i))
        state.update(_norm(f"{p}.self_attn_layer_norm", layers["LayerNorm_1"]["bias"][i],
                           layers["LayerNorm_1"]["scale"][i]))  # fmt: skip
        state.update(_glu(f"{p}.glu", layers["GLU_0"], i))
    return state


def decoder_state_dict(params) -> dict[str, np.ndarray]:
    """min-dalle `DalleBartDecoder` weights (with its lm_head) from our DalleBart params."""
    decoder = params["model"]["decoder"]
    layers = decoder["layers"]["FlaxBartDecoderLayers"]
    state = _stack_ends(decoder)
    state["lm_head.weight"] = _linear(params["lm_head"]["kernel"])
    norms = {
        "LayerNorm_0": "pre_self_attn_layer_norm",
        "LayerNorm_1": "self_attn_layer_norm",
        "LayerNorm_2": "pre_encoder_attn_layer_norm",
        "LayerNorm_3": "encoder_attn_layer_norm",
    }
    for i in range(layers["LayerNorm_0"]["bias"].shape[0]):
        p = f"layers.{i}"
        for ours, theirs in norms.items():
            scale = layers[ours]["scale"][i] if "scale" in layers[ours] else None
            state.update(_norm(f"{p}.{theirs}", layers[ours]["bias"][i], scale))
        state.update(_attention(f"{p}.self_attn", layers["FlaxBartAttention_0"], i))
        state.update(_attention(f"{p}.encoder_attn", layers["FlaxBartAttention_1"], i))
        state.update(_glu(f"{p}.glu", layers["GLU_0"], i))
    return state


def _conv(tree, prefix: str) -> dict[str, np.ndarray]:
    kernel = np.asarray(tree["kernel"], np.float32).transpose(3, 2, 0, 1)  # HWIO -> OIHW
    return {f"{prefix}.weight": np.ascontiguousarray(kernel),
            f"{prefix}.bias": np.asarray(tree["bias"], np.float32)}  # fmt: skip


def _group_norm(tree, prefix: str) -> dict[str, np.ndarray]:
    return {f"{prefix}.weight": np.asarray(tree["scale"], np.float32),
            f"{prefix}.bias": np.asarray(tree["bias"], np.float32)}  # fmt: skip


def _vq_block(tree, prefix: str) -> dict[str, np.ndarray]:
    state = {}
    for name, sub in tree.items():
        if name.startswith("norm"):
            state.update(_group_norm(sub, f"{prefix}.{name}"))
        else:  # conv1, conv2, nin_shortcut, q, k, v, proj_out
            state.update(_conv(sub, f"{prefix}.{name}"))
    return state


def detokenizer_state_dict(vqgan_params) -> dict[str, np.ndarray]:
    """min-dalle `VQGanDetokenizer` weights (the decoder half) from our VQGAN params."""
    decoder = vqgan_params["decoder"]
    state = {"embedding.weight": np.asarray(vqgan_params["quantize"]["embedding"]["embedding"]),
             **_conv(vqgan_params["post_quant_conv"], "post_quant_conv"),
             **_conv(decoder["conv_in"], "decoder.conv_in"),
             **_conv(decoder["conv_out"], "decoder.conv_out"),
             **_group_norm(decoder["norm_out"], "decoder.norm_out")}  # fmt: skip
    for name in ("block_1", "attn_1", "block_2"):
        state.update(_vq_block(decoder["mid"][name], f"decoder.mid.{name}"))
    for level in range(5):
        up = decoder[f"up_{level}"]
        for name, sub in up.items():
            kind, index = name.rsplit("_", 1) if name != "upsample" else ("upsample", "")
            if kind == "upsample":
                state.update(_conv(sub["conv"], f"decoder.up.{level}.upsample.conv"))
            else:  # block_j -> block.j, attn_j -> attn.j
                state.update(_vq_block(sub, f"decoder.up.{level}.{kind}.{index}"))
    return state


def _save(state: dict[str, np.ndarray], module, path: Path) -> None:
    """Saves a state dict after checking it names exactly the module's tensors and shapes."""
    torch = _torch()
    expected = {name: tuple(t.shape) for name, t in module.state_dict().items()}
    got = {name: tuple(array.shape) for name, array in state.items()}
    if expected != got:
        missing = sorted(set(expected) - set(got))[:5]
        extra = sorted(set(got) - set(expected))[:5]
        shapes = sorted(n for n in set(got) & set(expected) if got[n] != expected[n])[:5]
        raise ValueError(f"{path.name}: missing {missing}, unexpected {extra}, mis-shaped {shapes}")
    torch.save({name: torch.from_numpy(np.asarray(a)) for name, a in state.items()}, path)


def write_weights(root: Path, params, vqgan_params, tokenizer_folder: Path) -> Path:
    """Writes min-dalle's mini files under `root` (see the module docstring); returns root."""
    from min_dalle.models import DalleBartDecoder, DalleBartEncoder, VQGanDetokenizer

    bart_dir, vqgan_dir = root / "dalle_bart_mini", root / "vqgan"
    bart_dir.mkdir(parents=True, exist_ok=True)
    vqgan_dir.mkdir(parents=True, exist_ok=True)
    for name in ("vocab.json", "merges.txt"):
        shutil.copyfile(tokenizer_folder / name, bart_dir / name)
    sizes = dict(attention_head_count=16, embed_count=1024, glu_embed_count=2730, layer_count=12)
    with _torch().device("meta"):  # shapes only, nothing allocated
        encoder = DalleBartEncoder(text_vocab_count=50264, text_token_count=64, device="cpu",
                                   **sizes)  # fmt: skip
        decoder = DalleBartDecoder(image_vocab_count=16384, device="cpu", **sizes)
        detokenizer = VQGanDetokenizer()
    _save(encoder_state_dict(params), encoder, bart_dir / "encoder.pt")
    _save(decoder_state_dict(params), decoder, bart_dir / "decoder.pt")
    _save(detokenizer_state_dict(vqgan_params), detokenizer, vqgan_dir / "detoker.pt")
    return root


# -- running min-dalle offline ---------------------------------------------------------------------


class _NoNetwork:
    """Stands in for `requests` in min-dalle's module: answers its start-up ping, refuses
    anything else (a download would mean a weights file is missing)."""

    @staticmethod
    def get(url, *args, **kwargs):
        if url.endswith("config.json"):
            return types.SimpleNamespace(status_code=200, content=b"{}")
        raise RuntimeError(f"min-dalle tried to download {url}: its weights files are missing")


@contextlib.contextmanager
def offline():
    import min_dalle.min_dalle as module

    original = module.requests
    module.requests = _NoNetwork
    try:
        yield
    finally:
        module.requests = original


def load(root: Path, dtype: str):
    """A `MinDalle` for the mini architecture from the files under `root`.

    min-dalle sets torch's thread count to `os.cpu_count()`, which ignores the CPUs this
    process may use: with fewer available (CPU affinity, or cores held by other processes),
    its OpenMP threads wait on each other (on a shared 2-core machine, 16× slower per step).
    The thread count is set to the CPUs in this process's affinity mask instead.
    """
    torch = _torch()
    from min_dalle import MinDalle

    with offline():
        model = MinDalle(models_root=str(root), dtype=getattr(torch, dtype), device="cpu",
                         is_mega=False, is_reusable=True, is_verbose=False)  # fmt: skip
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    return model


def text_tokens(model, prompt: str) -> np.ndarray:
    """The (2, 64) token rows min-dalle encodes: the empty prompt, then the prompt."""
    tokens = model.tokenizer.tokenize(prompt)[: model.text_token_count]
    rows = np.ones((2, model.text_token_count), np.int32)
    rows[0, :2] = [tokens[0], tokens[-1]]
    rows[1, : len(tokens)] = tokens
    return rows


class _StopSampling(Exception):
    pass


def generate_grid(model, prompt: str, *, grid_size: int, seed: int, top_k: int,
                  condition_scale: float, num_steps: int = IMAGE_TOKENS) -> dict:  # fmt: skip
    """One grid through min-dalle's own `generate_images`, timed.

    min-dalle's cost per code is the same at every position (it attends over all 256 cached
    positions and recomputes the cross-attention keys and values at every step), so with
    `num_steps` < 256 the sampling stops after that many steps and its time is extrapolated to
    256 from the mean step time; the detokenizer then decodes a full grid of codes.
    Returns seconds: `encode_seconds` (before the first step), `step_seconds` (mean),
    `sample_seconds` (for 256 codes), `detokenize_seconds`; and `steps_timed`.
    """
    torch = _torch()
    step_times, clock = [], {"start": time.perf_counter(), "last": None}
    sample_tokens = model.decoder.sample_tokens

    def timed_step(*args, **kwargs):
        if clock["last"] is None:
            clock["encoded"] = time.perf_counter()
        result = sample_tokens(*args, **kwargs)
        now = time.perf_counter()
        step_times.append(now - (clock["last"] or clock["encoded"]))
        clock["last"] = now
        if len(step_times) == num_steps < IMAGE_TOKENS:
            raise _StopSampling
        return result

    detokenize_seconds = []
    detokenize = model.image_grid_from_tokens

    def timed_detokenize(*args, **kwargs):
        start = time.perf_counter()
        with torch.autocast("cpu", enabled=False):  # min-dalle detokenizes in float32
            images = detokenize(*args, **kwargs)
        detokenize_seconds.append(time.perf_counter() - start)
        return images

    model.decoder.sample_tokens, model.image_grid_from_tokens = timed_step, timed_detokenize
    try:
        with _cpu_autocast(model.dtype):
            try:
                model.generate_images(
                    text=prompt, seed=seed, grid_size=grid_size, temperature=1.0, top_k=top_k,
                    supercondition_factor=condition_scale, is_seamless=False, is_verbose=False,
                )  # fmt: skip
            except _StopSampling:  # decode a full grid of codes, as the 256th step would
                codes = torch.randint(0, 2**14, (grid_size**2, IMAGE_TOKENS))
                timed_detokenize(image_tokens=codes, is_seamless=False)
    finally:
        del model.decoder.sample_tokens, model.image_grid_from_tokens
    encode_seconds = clock["encoded"] - clock["start"]
    step_seconds = sum(step_times) / len(step_times)
    return {"encode_seconds": encode_seconds, "step_seconds": step_seconds,
            "sample_seconds": encode_seconds + step_seconds * IMAGE_TOKENS,
            "detokenize_seconds": detokenize_seconds[0],
            "steps_timed": len(step_times)}  # fmt: skip


def _cpu_autocast(dtype):
    """min-dalle relies on CUDA autocast to mix its bfloat16 weights with its float32 attention
    state; on a CPU the same mixing needs CPU autocast (float32 needs nothing)."""
    torch = _torch()
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast("cpu", dtype=dtype)
