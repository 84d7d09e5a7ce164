"""open_clip state dicts <-> the flax parameters of `models/clip.py`.

Flax paths mirror open_clip's keys (`visual/transformer/resblocks_0/attn/in_proj/kernel` <-
`visual.transformer.resblocks.0.attn.in_proj_weight`), so a conversion is a fixed renaming plus
the layout changes of torch's Linear (out, in) and Conv (OIHW) weights. Both the `CLIP` layout
and `CustomTextCLIP`'s (text tower under `text.`) load; saving writes the `CLIP` layout.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np

from dalle_mini.checkpoint import check_tree, flatten, unflatten
from dalle_mini.models.clip import CLIPConfig, param_shapes

_TEXT_PREFIX = "text."  # open_clip's CustomTextCLIP keeps the text tower under `text.`

_LINEAR = ("out_proj", "c_fc", "c_proj")


def _flax_path(key: str) -> tuple[str, str]:
    """Maps one open_clip key to (flax path, transform)."""
    parts = re.sub(r"resblocks\.(\d+)\.", r"resblocks_\1.", key).split(".")
    *parents, leaf = parts
    parent = parents[-1] if parents else ""
    if parent.startswith("ln_"):
        return "/".join([*parents, {"weight": "scale"}.get(leaf, leaf)]), "none"
    if leaf in ("in_proj_weight", "in_proj_bias"):
        kind = "kernel" if leaf.endswith("weight") else "bias"
        return "/".join([*parents, "in_proj", kind]), "linear" if kind == "kernel" else "none"
    if parent in _LINEAR:
        return "/".join([*parents, {"weight": "kernel"}.get(leaf, leaf)]), "linear"
    if parent == "conv1" and leaf == "weight":
        return "/".join([*parents, "kernel"]), "conv"
    if parent == "token_embedding" and leaf == "weight":
        return "token_embedding/embedding", "none"
    return "/".join(parts), "none"


def _torch_key(path: str) -> str:
    parts = path.split("/")
    *parents, leaf = parts
    parent = parents[-1] if parents else ""
    if parent == "in_proj":
        parents, leaf = parents[:-1], f"in_proj_{'weight' if leaf == 'kernel' else 'bias'}"
    elif leaf in ("kernel", "scale", "embedding"):
        leaf = "weight"
    return re.sub(r"resblocks_(\d+)", r"resblocks.\1", ".".join([*parents, leaf]))


def params_from_state_dict(
    state_dict: Mapping[str, np.ndarray], config: CLIPConfig, source: str = "state dict"
) -> dict[str, Any]:
    """Converts an open_clip state dict (CLIP or CustomTextCLIP layout) to flax parameters."""
    is_custom_text = any(key.startswith(_TEXT_PREFIX) for key in state_dict)
    flat = {}
    for key, value in state_dict.items():
        if is_custom_text and key.startswith(_TEXT_PREFIX):
            key = key[len(_TEXT_PREFIX) :]
        path, transform = _flax_path(key)
        value = np.asarray(value)
        if jnp.issubdtype(value.dtype, jnp.floating):  # float16/bfloat16 files load as float32
            value = value.astype(np.float32)
        if transform == "linear" and value.ndim == 2:
            value = value.T  # torch Linear (out, in) -> Dense (in, out)
        elif transform == "conv" and value.ndim == 4:
            value = value.transpose(2, 3, 1, 0)  # OIHW -> HWIO
        elif path == "logit_scale" and value.size == 1:
            value = value.reshape(())  # some checkpoints store shape (1,)
        flat[path] = value
    params = unflatten(flat)
    check_tree(params, param_shapes(config), source)
    return params


def state_dict_from_params(params: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Flax parameters -> open_clip `CLIP` state dict (float32, contiguous, torch layouts)."""
    state = {}
    for path, value in flatten(params).items():
        value = np.asarray(value, dtype=np.float32)
        key = _torch_key(path)
        if path.endswith("conv1/kernel"):
            value = value.transpose(3, 2, 0, 1)  # HWIO -> OIHW
        elif path.endswith("/kernel"):
            value = value.T
        state[key] = np.ascontiguousarray(value)
    return state
