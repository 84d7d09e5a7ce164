"""The OpenAI CLIP text tokenizer, as open_clip's `SimpleTokenizer` applies it.

Byte-level BPE over `bpe_simple_vocab_16e6.txt.gz` (48,894 merges, 49,408 ids), with CLIP's
text cleaning (ftfy, HTML unescape twice, whitespace collapse, lower case), the `regex`
pre-tokenizer, and the fixed framing `[<start_of_text>] + ids + [<end_of_text>]` truncated or
zero-padded to `context_length` (77) tokens. Written from the description in
`shared/reference/clip-vit/README.md` §5; `tests/test_clip.py` checks it token for token
against the ids open_clip produced.
"""

from __future__ import annotations

import functools
import gzip
import html
import os
from collections.abc import Sequence
from pathlib import Path

import ftfy
import numpy as np
import regex

VOCAB_NAME = "bpe_simple_vocab_16e6.txt.gz"
PACKAGED_VOCAB = Path(__file__).resolve().parent / "assets" / VOCAB_NAME
START_OF_TEXT = "<start_of_text>"
END_OF_TEXT = "<end_of_text>"
_MERGE_COUNT = 49152 - 256 - 2  # lines 1..48894 of the file; later lines are unused
_WORD_END = "</w>"
_PIECES = regex.compile(
    r"<start_of_text>|<end_of_text>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+",
    regex.IGNORECASE,
)


def byte_symbols() -> dict[int, str]:
    """Byte value -> printable stand-in, in vocabulary order (ids 0..255 follow this order).

    Bytes 33..126, 161..172 and 174..255 stand for themselves; the other 68 bytes, in
    increasing order, become chr(256), chr(257), ...
    """
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    others = [byte for byte in range(256) if byte not in printable]
    symbols = {byte: chr(byte) for byte in printable}
    symbols.update({byte: chr(256 + rank) for rank, byte in enumerate(others)})
    return symbols


def clean_text(text: str) -> str:
    """ftfy fix, HTML unescape twice, collapse whitespace, lower case (open_clip's 'lower')."""
    text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text))
    return " ".join(text.split()).lower()


class CLIPTokenizer:
    """Turns prompts into the (N, context_length) token ids a CLIP text tower expects."""

    def __init__(self, vocab_path: str | os.PathLike | None = None, context_length: int = 77):
        path = Path(vocab_path) if vocab_path is not None else PACKAGED_VOCAB
        if not path.is_file():
            raise FileNotFoundError(
                f"CLIP BPE vocabulary {path} is missing; it ships with dalle_mini as "
                f"dalle_mini/assets/{VOCAB_NAME} (reinstall the package)"
            )
        with gzip.open(path, "rt", encoding="utf-8") as lines:
            merges = [
                tuple(line.split()) for line in lines.read().split("\n")[1 : _MERGE_COUNT + 1]
            ]
        if len(merges) != _MERGE_COUNT or any(len(pair) != 2 for pair in merges):
            raise ValueError(f"{path} is not the CLIP BPE merges file ({len(merges)} merges read)")
        self.vocab_path = path
        self.context_length = context_length
        self.byte_encoder = byte_symbols()
        singles = list(self.byte_encoder.values())
        vocab = [*singles, *(symbol + _WORD_END for symbol in singles)]
        vocab += ["".join(pair) for pair in merges] + [START_OF_TEXT, END_OF_TEXT]
        self.encoder = {symbol: index for index, symbol in enumerate(vocab)}
        self.merge_ranks = {pair: rank for rank, pair in enumerate(merges)}
        self.start_id = self.encoder[START_OF_TEXT]  # 49406
        self.end_id = self.encoder[END_OF_TEXT]  # 49407
        self.vocab_size = len(vocab)  # 49408

    @functools.lru_cache(maxsize=65536)  # noqa: B019 (one tokenizer per scorer; prompts repeat)
    def bpe(self, piece: str) -> tuple[str, ...]:
        """Merges the byte symbols of one pre-tokenized piece, lowest merge rank first."""
        if piece in (START_OF_TEXT, END_OF_TEXT):
            return (piece,)
        symbols = [*piece[:-1], piece[-1] + _WORD_END]
        while len(symbols) > 1:
            pairs = set(zip(symbols, symbols[1:], strict=False))
            best = min(pairs, key=lambda pair: self.merge_ranks.get(pair, float("inf")))
            if best not in self.merge_ranks:
                break
            merged, i = [], 0
            while i < len(symbols):
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                    merged.append(symbols[i] + symbols[i + 1])
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            symbols = merged
        return tuple(symbols)

    def pieces(self, text: str) -> list[str]:
        """The BPE pieces of `text` after cleaning, in the byte-symbol alphabet."""
        out = []
        for piece in _PIECES.findall(clean_text(text)):
            encoded = "".join(self.byte_encoder[byte] for byte in piece.encode("utf-8"))
            out.extend(self.bpe(encoded))
        return out

    def encode(self, text: str) -> list[int]:
        """Content ids of one prompt, without start/end tokens or truncation."""
        return [self.encoder[piece] for piece in self.pieces(text)]

    def __call__(self, texts: str | Sequence[str]) -> np.ndarray:
        """Returns (N, context_length) int64 ids: SOT, content, EOT, zero padding.

        Longer prompts keep their first `context_length` ids with the last one overwritten
        by EOT, as open_clip does (at most context_length - 2 content tokens survive).
        """
        if isinstance(texts, str):
            texts = [texts]
        tokens = np.zeros((len(texts), self.context_length), dtype=np.int64)
        for row, text in enumerate(texts):
            ids = [self.start_id, *self.encode(text), self.end_id][: self.context_length]
            ids[-1] = self.end_id
            tokens[row, : len(ids)] = ids
        return tokens
