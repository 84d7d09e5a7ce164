"""Caption normalization: the text clean-up DALL·E Mini / Mega were trained with.

`TextNormalizer` turns raw captions into the lower-case ASCII form the published checkpoints
saw during training (facts: `dalle-mini-facts.md` §3; reference outputs:
`reference/normalizer.json`, produced by the original `dalle_mini.model.text` with ftfy 6.3.1,
emoji 2.16.0 and unidecode 1.4.0). Every regular expression below reproduces one step of the
original pipeline, quirks included (e.g. "u.s.a" becomes "u.s, a": protected dots do not
overlap), because the models were trained on exactly that output.

`HashtagSegmenter` splits hashtag bodies such as "sunsetbeach" into words by dynamic
programming over a word-frequency list (`enwiki-words-frequency.txt`, one `word count` pair per
line, most frequent first): a word on line i (0-based) costs log(i + 1), an unknown piece costs
infinity, and the split with the lowest total cost wins (the wordninja approach).
"""

from __future__ import annotations

import html
import math
import os
import random
import re
from pathlib import Path

import emoji
import ftfy
from unidecode import unidecode

from dalle_mini.hub import resolve_folder

WORDS_FREQUENCY_NAME = "enwiki-words-frequency.txt"
WORDS_FREQUENCY_REPO = "dalle-mini/dalle-mini"

# How CC12M's "<person>" placeholder is replaced: phrase and weight (its frequency in captions).
PERSON_PHRASES = ("a person", "someone", "somebody")
PERSON_WEIGHTS = (282265, 121194, 12219)

# Placeholders that shield characters from the punctuation-to-comma step. They are made of
# word characters so that the steps in between (dashes, hashtags) treat them as part of a word,
# exactly as the original's "xtokx" markers were.
_MARK = "xtokx"
_DOT_MARK = f"{_MARK}dot{_MARK}"
_QUOTE_MARK = f"{_MARK}quote{_MARK}"
_SLASH_MARK = f"{_MARK}slash{_MARK}"

_PERSON_RUN = re.compile(r"<person>([,\s]*(and)*[,\s]*<person>)+")
_WIKI_REF_START = re.compile(r"\A\s*\[\d+\]")
_WIKI_REF_END = re.compile(r"\[\d+\]\s*\Z")
_HTML_TAG = re.compile(r"<[^<]+?>")
_URL = re.compile(r"http\S+")
_NUMBER_COMMA = re.compile(r"(\d),(\d{3})")
_WORD_DOT = re.compile(r"(\w)\.(\w)")
_CONTRACTION_QUOTE = re.compile(r"'(?=([stdm]|(ll)|(re)|(ve))\b)")
_DATE_SLASH = re.compile(r"(\d)/(\d)")
_WORD_DASH = re.compile(r"(\w)-(\w)")
_SPACED_SYMBOL = re.compile(r"([%&/$*])")
_HASHTAG = re.compile(r"#(\w+)")
_IGNORED = re.compile(r"[_#\\]")
_ANY_QUOTE = re.compile(r"['\"`]")
_PUNCTUATION = re.compile(r"[()\[\].,|:;?!=+~\-/{}]")
_REPEATED = re.compile(r"(\D)(\1{3,})")
_QUOTE_RUN = re.compile(r'(\s*"+\s*)+')
_COMMA_RUN = re.compile(r"(\s*,+\s*)+")
_WHITESPACE = re.compile(r"\s+")
_NOT_WORD_PIECE = re.compile(r"[^a-zA-Z0-9']+")


def default_words_frequency_path() -> Path:
    """The words file of the published `dalle-mini/dalle-mini` repo (hub cache or download)."""
    folder = resolve_folder(
        WORDS_FREQUENCY_REPO, component="dallebart", required_files=[WORDS_FREQUENCY_NAME]
    )
    return folder / WORDS_FREQUENCY_NAME


class HashtagSegmenter:
    """Splits a string without spaces into the likeliest sequence of words.

    Args:
      words_frequency_path: `enwiki-words-frequency.txt`; only the first field of each line and
        the line's position are used. A word listed twice keeps its later (costlier) position.
    """

    def __init__(self, words_frequency_path: str | os.PathLike):
        path = Path(words_frequency_path)
        if not path.is_file():
            raise FileNotFoundError(
                f"word-frequency file {WORDS_FREQUENCY_NAME} not found at {path}: the text "
                "normalizer needs it to split hashtags. It ships with every DalleBart checkpoint "
                f"folder (e.g. hub repo {WORDS_FREQUENCY_REPO}); pass its path, or put it in the "
                "model folder."
            )
        self.word_cost: dict[str, float] = {}
        for rank, line in enumerate(path.read_text(encoding="utf8").splitlines()):
            fields = line.split()
            if fields:
                self.word_cost[fields[0]] = math.log(rank + 1)
        if not self.word_cost:
            raise ValueError(f"word-frequency file {path} lists no words")
        self.max_word_length = max(len(word) for word in self.word_cost)

    def __call__(self, text: str) -> str:
        """Splits each run of letters, digits and apostrophes; joins all words with spaces."""
        words = []
        for piece in _NOT_WORD_PIECE.split(text):
            words.extend(self.segment(piece))
        return " ".join(words)

    def segment(self, text: str) -> list[str]:
        """The lowest-cost split of `text`; digit runs and "'s" stay glued to what precedes."""
        # best[i] = (cost of the best split of text[:i], length of its last word)
        best: list[tuple[float, int]] = [(0.0, 0)]
        for end in range(1, len(text) + 1):
            best.append(
                min(
                    (best[end - length][0] + self._cost(text[end - length : end]), length)
                    for length in range(1, min(end, self.max_word_length) + 1)
                )
            )
        # Walk back from the end; `words` collects right-to-left.
        words: list[str] = []
        end = len(text)
        while end > 0:
            length = best[end][1]
            word = text[end - length : end]
            if word != "'" and words and (words[-1] == "'s" or _glues_digits(word, words[-1])):
                words[-1] = word + words[-1]
            else:
                words.append(word)
            end -= length
        return words[::-1]

    def _cost(self, word: str) -> float:
        return self.word_cost.get(word.lower(), math.inf)


def _glues_digits(left: str, right: str) -> bool:
    return left[-1].isdigit() and right[0].isdigit()


class TextNormalizer:
    """Normalizes captions the way the published DALL·E Mini / Mega models were trained.

    Args:
      words_frequency_path: `enwiki-words-frequency.txt` for splitting hashtags. None fetches
        the one of the hub repo `dalle-mini/dalle-mini` (from the local cache when offline).
      rng: where the random "<person>" replacements come from: a `random.Random`, an int seed,
        or None for a fresh unseeded generator.

    Calling it on a string returns the normalized string, which always starts with one space.
    """

    def __init__(
        self,
        words_frequency_path: str | os.PathLike | None = None,
        *,
        rng: random.Random | int | None = None,
    ):
        if words_frequency_path is None:
            words_frequency_path = default_words_frequency_path()
        self.words_frequency_path = Path(words_frequency_path)
        self.hashtags = HashtagSegmenter(self.words_frequency_path)
        self.rng = rng if isinstance(rng, random.Random) else random.Random(rng)

    def __call__(self, text: str) -> str:
        if not isinstance(text, str):
            raise TypeError(f"TextNormalizer expects a str, got {type(text).__name__}")
        text = html.unescape(html.unescape(ftfy.fix_text(text)))
        text = unidecode(emoji.demojize(text)).lower()
        text = self.replace_person_tokens(text)
        text = _WIKI_REF_END.sub("", _WIKI_REF_START.sub("", text))
        text = _URL.sub("", _HTML_TAG.sub(" ", text))
        text = _NUMBER_COMMA.sub(r"\1\2", _NUMBER_COMMA.sub(r"\1\2", text))  # twice: overlaps
        text = _protect(text)
        text = _WORD_DASH.sub(r"\1 \2", text)
        text = _SPACED_SYMBOL.sub(r" \1 ", text)
        text = _HASHTAG.sub(lambda match: self.hashtags(match.group(1)), text)
        text = _IGNORED.sub(" ", text)
        text = _ANY_QUOTE.sub(' " ', text)
        text = _PUNCTUATION.sub(",", text)
        text = _restore(text)
        text = _REPEATED.sub(r"\1", text)  # 4+ repeats only: roman numerals like "viii" survive
        text = _COMMA_RUN.sub(", ", _QUOTE_RUN.sub(' " ', text))
        text = _WHITESPACE.sub(" ", text)
        return " " + _strip_commas(text)

    def replace_person_tokens(self, text: str) -> str:
        """Replaces "<person>" by a weighted random phrase, and runs of them by "people"."""
        text = _PERSON_RUN.sub(" people ", text)
        while "<person>" in text:
            phrase = self.rng.choices(PERSON_PHRASES, weights=PERSON_WEIGHTS)[0]
            text = text.replace("<person>", f" {phrase} ", 1)
        return text


def _protect(text: str) -> str:
    """Marks dots inside words/numbers, contraction apostrophes and date slashes."""
    text = _WORD_DOT.sub(rf"\1{_DOT_MARK}\2", text)
    text = _CONTRACTION_QUOTE.sub(_QUOTE_MARK, text)
    return _DATE_SLASH.sub(rf"\1{_SLASH_MARK}\2", text)


def _restore(text: str) -> str:
    return text.replace(_DOT_MARK, ".").replace(_QUOTE_MARK, "'").replace(_SLASH_MARK, "/")


def _strip_commas(text: str) -> str:
    """Strips spaces, then at most one trailing and one leading comma, then spaces again."""
    text = text.strip()
    if text.endswith(","):
        text = text[:-1]
    if text.startswith(","):
        text = text[1:]
    return text.strip()
