"""Training data in the original DALL·E Mini format: parquet rows of `caption` + `encoding`.

The original trainer read parquet files whose rows hold a caption (string) and its image's
VQGAN codes (`encoding`, a list of ints). The `encode` step writes the world in that format, so a
real dataset already encoded that way trains the same way: `read_encoded(paths)`.

`TextBatcher` prepares the text side once (normalize + tokenize every caption with the model's
processor) and then serves batches where about 10% of the captions are replaced by the empty
prompt, which is what makes super-conditioning (`condition_scale`) work at sampling time.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from dalle_mini.processor import DalleBartProcessor
from dalle_mini.train.common import batch_order

CAPTION_COLUMN, ENCODING_COLUMN = "caption", "encoding"


def write_encoded(path: str | os.PathLike, captions: Sequence[str], encodings: np.ndarray) -> Path:
    """Writes `caption` (string) and `encoding` (list<int64>) rows to a parquet file."""
    encodings = np.asarray(encodings)
    if encodings.ndim != 2 or len(encodings) != len(captions):
        raise ValueError(
            f"need one code row per caption: {len(captions)} captions, codes {encodings.shape}"
        )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    table = pa.table(
        {
            CAPTION_COLUMN: pa.array(list(captions), pa.string()),
            ENCODING_COLUMN: pa.array(list(encodings.astype(np.int64)), pa.list_(pa.int64())),
        }
    )
    pq.write_table(table, path)
    return path


def read_encoded(
    paths: str | os.PathLike | Sequence[str | os.PathLike],
) -> tuple[list[str], np.ndarray]:
    """Captions and codes (N, image_length) int32 of a parquet file, a folder of them or a list."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    files: list[Path] = []
    for path in map(Path, paths):
        files.extend(sorted(path.glob("*.parquet")) if path.is_dir() else [path])
    if not files:
        raise FileNotFoundError(f"no parquet files in {[str(p) for p in paths]}")
    captions, encodings = [], []
    for file in files:
        if not file.is_file():
            raise FileNotFoundError(f"{file} does not exist; write it with the `encode` step")
        table = pq.read_table(file)
        missing = {CAPTION_COLUMN, ENCODING_COLUMN} - set(table.column_names)
        if missing:
            raise ValueError(
                f"{file} lacks column(s) {sorted(missing)}; expected `caption` and `encoding`"
            )
        captions.extend(str(text) for text in table.column(CAPTION_COLUMN).to_pylist())
        encodings.extend(table.column(ENCODING_COLUMN).to_pylist())
    lengths = {len(row) for row in encodings}
    if len(lengths) != 1:
        raise ValueError(
            f"encodings of {files} have different lengths {sorted(lengths)}; use one VQGAN"
        )
    return captions, np.asarray(encodings, dtype=np.int32)


class TextBatcher:
    """Tokenized captions and codes, served in shuffled batches with caption blanking.

    Args:
      processor: the model's processor (normalizer + tokenizer + max_text_length).
      captions, encodings: the dataset; encodings (N, image_length).
      blank_rate: fraction of captions replaced by the empty (unconditional) prompt.
      alternates, alternate_rate: other captions of the same images (one per image), each
        served in place of its image's caption at `alternate_rate`.
    """

    def __init__(
        self,
        processor: DalleBartProcessor,
        captions: Sequence[str],
        encodings: np.ndarray,
        blank_rate: float = 0.1,
        alternates: Sequence[str] | None = None,
        alternate_rate: float = 0.0,
    ):
        if not 0.0 <= blank_rate < 1.0:
            raise ValueError(f"blank_rate must be in [0, 1), got {blank_rate}")
        if not 0.0 <= alternate_rate <= 1.0 or (alternate_rate and alternates is None):
            raise ValueError(
                f"alternate_rate must be in [0, 1] and needs alternate captions, got "
                f"{alternate_rate} with {'no' if alternates is None else len(alternates)} "
                "alternates"
            )
        if alternates is not None and len(alternates) != len(captions):
            raise ValueError(
                f"need one alternate caption per caption: {len(alternates)} for {len(captions)}"
            )
        tokens = processor(list(captions))
        self.input_ids, self.attention_mask = tokens["input_ids"], tokens["attention_mask"]
        self.uncond_ids = tokens["input_ids_uncond"][:1]  # (1, T)
        self.uncond_mask = tokens["attention_mask_uncond"][:1]
        self.alternate_rate = alternate_rate
        if alternate_rate:
            tokens = processor(list(alternates))
            self.alternate_ids, self.alternate_mask = tokens["input_ids"], tokens["attention_mask"]
        self.encodings = np.asarray(encodings, np.int32)
        self.blank_rate = blank_rate

    def __len__(self) -> int:
        return len(self.encodings)

    def batches(
        self, batch_size: int, seed: int, start_step: int = 0
    ) -> Iterator[dict[str, np.ndarray]]:
        """Batches from `start_step` on: `input_ids`, `attention_mask` (B, T), `codes` (B, L)."""
        for step, indices in enumerate(
            batch_order(len(self), batch_size, seed, start_step), start_step
        ):
            blank = np.random.default_rng([seed, step, 1]).random(batch_size) < self.blank_rate
            input_ids, attention_mask = self.input_ids[indices], self.attention_mask[indices]
            if self.alternate_rate:
                draw = np.random.default_rng([seed, step, 2]).random(batch_size)
                alternate = (draw < self.alternate_rate)[:, None]
                input_ids = np.where(alternate, self.alternate_ids[indices], input_ids)
                attention_mask = np.where(alternate, self.alternate_mask[indices], attention_mask)
            yield {
                "input_ids": np.where(blank[:, None], self.uncond_ids, input_ids),
                "attention_mask": np.where(blank[:, None], self.uncond_mask, attention_mask),
                "codes": self.encodings[indices],
            }
