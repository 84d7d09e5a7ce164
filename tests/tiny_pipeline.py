"""A tiny random pipeline folder (`dallebart/`, `vqgan/`, `clip/`) for the front-end tests.

The DalleBart is freshly initialised (seeded) with the tokenizer of fixtures/dallebart-scan and
sized to the VQGAN of fixtures/vqgan (128 codes, 8×8 codes per 32×32 image); the VQGAN and the
CLIP are the conformance fixtures. Its images are noise, but every stage runs for real and fast.
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import jax

FIXTURES = Path(__file__).parent / "fixtures"
TOKENIZER_FILES = (
    "tokenizer.json",
    "vocab.json",
    "merges.txt",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "enwiki-words-frequency.txt",
)


def build_tiny_pipeline(folder: Path, seed: int = 0) -> Path:
    """Writes the three component folders under `folder` and returns it."""
    from dalle_mini.checkpoint import read_json
    from dalle_mini.models.bart import DalleBartConfig
    from dalle_mini.models.dallebart import DalleBart

    scan = FIXTURES / "dallebart-scan"
    config = DalleBartConfig.from_dict(read_json(scan / "config.json"))
    config = dataclasses.replace(
        config,
        image_vocab_size=128,
        decoder_start_token_id=128,
        bos_token_id=129,
        eos_token_id=129,
        pad_token_id=129,
        image_length=64,
    )
    model = DalleBart(config)
    (folder / "dallebart").mkdir(parents=True, exist_ok=True)
    params = model.init_params(jax.random.PRNGKey(seed))
    # A flatter lm_head, so that even at condition scale 10 the candidates differ from each other.
    params["lm_head"]["kernel"] = params["lm_head"]["kernel"] * 0.1
    model.save_pretrained(folder / "dallebart", params=params)
    for name in TOKENIZER_FILES:
        shutil.copyfile(scan / name, folder / "dallebart" / name)
    shutil.copytree(
        FIXTURES / "vqgan",
        folder / "vqgan",
        dirs_exist_ok=True,
        ignore=shutil.ignore_patterns("reference.npz"),
    )
    (folder / "clip").mkdir(exist_ok=True)
    for name in ("open_clip_config.json", "open_clip_model.safetensors"):
        shutil.copyfile(FIXTURES / "clip-vit" / name, folder / "clip" / name)
    return folder
