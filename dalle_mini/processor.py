"""Prompts to token ids: `DalleBartProcessor`, and `train_tokenizer` for new checkpoints.

The processor mirrors the original `DalleBartProcessor` (facts: `dalle-mini-facts.md` §3;
reference ids: `reference/dallebart-scan/reference.npz`): normalize each prompt when the
checkpoint's config says `normalize_text: true`, tokenize with the checkpoint's own byte-level
BPE (`BartTokenizerFast` format: `<s>`=0, `<pad>`=1, `</s>`=2), pad and truncate to
`max_text_length`, and add the unconditional batch (`""`, never normalized) used by
super-conditioning. It runs on the `tokenizers` library alone, without transformers.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
from tokenizers import AddedToken, Tokenizer, decoders, pre_tokenizers, processors, trainers
from tokenizers.models import BPE

from dalle_mini.checkpoint import read_json
from dalle_mini.hub import CheckpointError, resolve_folder
from dalle_mini.text import WORDS_FREQUENCY_NAME, TextNormalizer

TOKENIZER_NAME = "tokenizer.json"
TOKENIZER_EXTRA_FILES = (
    "vocab.json",
    "merges.txt",
    "tokenizer_config.json",
    "special_tokens_map.json",
)
# Special tokens in id order; `<mask>` is appended after training so it takes the last id.
SPECIAL_TOKENS = ("<s>", "<pad>", "</s>", "<unk>")
MASK_TOKEN = "<mask>"
DEFAULT_MAX_TEXT_LENGTH = 64  # DalleBartConfig's default when config.json omits it


class DalleBartProcessor:
    """Normalizes and tokenizes prompts into fixed-length id batches for DalleBart.

    Args:
      tokenizer: the checkpoint's byte-level BPE (`tokenizers.Tokenizer`, as in tokenizer.json).
      max_text_length: every batch is padded or truncated to this many ids.
      normalizer: applied to each prompt first; None leaves prompts as they are.
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        max_text_length: int = DEFAULT_MAX_TEXT_LENGTH,
        normalizer: TextNormalizer | None = None,
    ):
        pad_id = tokenizer.token_to_id("<pad>")
        if pad_id is None:
            raise ValueError("the tokenizer has no '<pad>' token; DalleBart tokenizers need one")
        if max_text_length < 2:
            raise ValueError(
                f"max_text_length must leave room for <s> and </s>, got {max_text_length}"
            )
        self.tokenizer = _copy(tokenizer)  # plain: no padding or truncation
        self.tokenizer.no_padding()
        self.tokenizer.no_truncation()
        self.max_text_length = max_text_length
        self.normalizer = normalizer
        self._fixed_length = _copy(self.tokenizer)
        self._fixed_length.enable_truncation(max_text_length)
        self._fixed_length.enable_padding(length=max_text_length, pad_id=pad_id, pad_token="<pad>")

    @classmethod
    def from_pretrained(
        cls, name_or_folder: str | os.PathLike, revision: str | None = None
    ) -> DalleBartProcessor:
        """Loads the tokenizer, `max_text_length` and `normalize_text` of a DalleBart checkpoint.

        Args:
          name_or_folder: a checkpoint folder, a hub repo id ("dalle-mini/dalle-mini") or
            "embedded".
          revision: hub branch, tag or commit.
        """
        folder = resolve_folder(
            name_or_folder,
            component="dallebart",
            required_files=["config.json", TOKENIZER_NAME],
            optional_files=[*TOKENIZER_EXTRA_FILES, WORDS_FREQUENCY_NAME],
            revision=revision,
        )
        config = read_json(folder / "config.json")
        normalizer = None
        if config.get("normalize_text", False):
            words_path = folder / WORDS_FREQUENCY_NAME
            if not words_path.is_file():
                raise CheckpointError(
                    f"{folder} lacks {WORDS_FREQUENCY_NAME}: its config.json sets normalize_text "
                    "to true and the text normalizer needs that word list to split hashtags. "
                    "Copy it from the hub repo dalle-mini/dalle-mini into the folder."
                )
            normalizer = TextNormalizer(words_path)
        max_text_length = int(config.get("max_text_length", DEFAULT_MAX_TEXT_LENGTH))
        return cls(_load_tokenizer(folder / TOKENIZER_NAME), max_text_length, normalizer)

    def normalize(self, text: str) -> str:
        """The prompt as the model sees it (unchanged when the checkpoint does not normalize)."""
        return text if self.normalizer is None else self.normalizer(text)

    def __call__(self, text: str | Sequence[str]) -> dict[str, np.ndarray]:
        """Tokenizes a prompt or a list of prompts.

        Returns:
          int32 arrays of shape (B, max_text_length): `input_ids`, `attention_mask`, and
          `input_ids_uncond`, `attention_mask_uncond` (the empty prompt, repeated B times).
        """
        prompts = [self.normalize(prompt) for prompt in _check_prompts(text)]
        self._warn_if_truncated(prompts)
        encodings = self._fixed_length.encode_batch(prompts)
        uncond = self._fixed_length.encode("")  # "" itself, not normalize("") == " "
        batch_size = len(prompts)
        return {
            "input_ids": np.array([e.ids for e in encodings], dtype=np.int32),  # (B, T)
            "attention_mask": np.array([e.attention_mask for e in encodings], dtype=np.int32),
            "input_ids_uncond": np.tile(np.array(uncond.ids, dtype=np.int32), (batch_size, 1)),
            "attention_mask_uncond": np.tile(
                np.array(uncond.attention_mask, dtype=np.int32), (batch_size, 1)
            ),
        }

    def _warn_if_truncated(self, prompts: list[str]) -> None:
        lengths = [len(e.ids) for e in self.tokenizer.encode_batch(prompts)]
        excess = [n - self.max_text_length for n in lengths if n > self.max_text_length]
        if excess:
            warnings.warn(
                f"{len(excess)} of {len(prompts)} prompts are longer than max_text_length="
                f"{self.max_text_length} tokens and were truncated ({sum(excess)} tokens cut; "
                f"longest prompt had {max(lengths)} tokens including <s> and </s>)",
                stacklevel=3,
            )

    def save_pretrained(self, folder: str | os.PathLike) -> None:
        """Writes the tokenizer files (as `BartTokenizerFast.save_pretrained` would) and, when
        prompts are normalized, the word-frequency file. config.json is the model's to write."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save(str(folder / TOKENIZER_NAME))
        self.tokenizer.model.save(str(folder))  # vocab.json, merges.txt
        _write_json(folder / "tokenizer_config.json", self._tokenizer_config())
        _write_json(folder / "special_tokens_map.json", self._special_tokens_map())
        if self.normalizer is not None:
            source = self.normalizer.words_frequency_path
            target = folder / WORDS_FREQUENCY_NAME
            if not (target.exists() and target.samefile(source)):
                shutil.copyfile(source, target)

    def _tokenizer_config(self) -> dict:
        return {
            "add_prefix_space": False,
            "bos_token": "<s>",
            "cls_token": "<s>",
            "eos_token": "</s>",
            "errors": "replace",
            "mask_token": MASK_TOKEN,
            "model_max_length": self.max_text_length,
            "pad_token": "<pad>",
            "sep_token": "</s>",
            "tokenizer_class": "BartTokenizer",
            "trim_offsets": True,
            "unk_token": "<unk>",
        }

    def _special_tokens_map(self) -> dict:
        mask = next(
            (
                t
                for t in self.tokenizer.get_added_tokens_decoder().values()
                if t.content == MASK_TOKEN
            ),
            AddedToken(MASK_TOKEN, lstrip=True, normalized=True, special=True),
        )
        return {
            "bos_token": "<s>",
            "cls_token": "<s>",
            "eos_token": "</s>",
            "mask_token": {
                "content": MASK_TOKEN,
                "lstrip": mask.lstrip,
                "normalized": mask.normalized,
                "rstrip": mask.rstrip,
                "single_word": mask.single_word,
            },
            "pad_token": "<pad>",
            "sep_token": "</s>",
            "unk_token": "<unk>",
        }


def train_tokenizer(captions: Iterable[str], vocab_size: int) -> Tokenizer:
    """Trains a byte-level BPE in the format of the published DalleBart tokenizers.

    Pass captions as the model will see them (normalized, with their leading space). The result
    has `<s>`=0, `<pad>`=1, `</s>`=2, `<unk>`=3, `<mask>` as the last id, the ByteLevel
    pre-tokenizer without prefix space and `<s> … </s>` added around each text.

    Args:
      captions: training texts.
      vocab_size: total ids including the specials; at least 261 (256 bytes + 5 specials).
        A small corpus may run out of merges and yield fewer.
    """
    minimum = 256 + len(SPECIAL_TOKENS) + 1
    if vocab_size < minimum:
        raise ValueError(
            f"vocab_size must be at least {minimum} (all bytes + specials), got {vocab_size}"
        )
    captions = list(captions)
    if not captions:
        raise ValueError("train_tokenizer needs at least one caption")
    for index, caption in enumerate(captions):
        if not isinstance(caption, str):
            raise TypeError(f"caption {index} is a {type(caption).__name__}, expected str")
    tokenizer = Tokenizer(BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - 1,  # leaves the last id for <mask>
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(captions, trainer)
    tokenizer.add_special_tokens(
        [AddedToken(MASK_TOKEN, lstrip=True, normalized=True, special=True)]
    )
    tokenizer.post_processor = processors.RobertaProcessing(
        ("</s>", SPECIAL_TOKENS.index("</s>")),
        ("<s>", SPECIAL_TOKENS.index("<s>")),
        trim_offsets=True,
        add_prefix_space=False,
    )
    # Published tokenizers also list <mask> in the BPE vocabulary (so in vocab.json).
    serialized = json.loads(tokenizer.to_str())
    serialized["model"]["vocab"][MASK_TOKEN] = tokenizer.token_to_id(MASK_TOKEN)
    return Tokenizer.from_str(json.dumps(serialized))


def _check_prompts(text: object) -> list[str]:
    """A list of prompts from a str or a list/tuple of str; clear errors otherwise."""
    if isinstance(text, str):
        return [text]
    if not isinstance(text, (list, tuple)):
        raise TypeError(f"prompts must be a str or a list of str, got {type(text).__name__}")
    if not text:
        raise ValueError(
            'no prompts given: pass a non-empty list of strings ("" is a valid prompt)'
        )
    for index, prompt in enumerate(text):
        if not isinstance(prompt, str):
            raise TypeError(
                f"prompt {index} is a {type(prompt).__name__}, expected str "
                "(pass a flat list of strings; decode bytes first)"
            )
    return list(text)


def _load_tokenizer(path: Path) -> Tokenizer:
    try:
        return Tokenizer.from_file(str(path))
    except Exception as error:  # the Rust side raises a bare Exception on bad files
        raise CheckpointError(
            f"{path} is not a valid tokenizers file ({error}); save it again with "
            "DalleBartProcessor.save_pretrained or BartTokenizerFast.save_pretrained"
        ) from error


def _copy(tokenizer: Tokenizer) -> Tokenizer:
    return Tokenizer.from_str(tokenizer.to_str())


def _write_json(path: Path, content: dict) -> None:
    path.write_text(json.dumps(content, indent=2, sort_keys=True, ensure_ascii=False) + "\n")
