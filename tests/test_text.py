"""Text side of DalleBart: the caption normalizer and the processor, against the original's outputs.

Fixtures (copied from ../shared/reference): `normalizer.json` (60 input/output pairs of the
original TextNormalizer) and `dallebart-scan/` (a checkpoint folder with its tokenizer, words
file, `prompts.json` and the original processor's ids in `reference.npz`).
"""

import json
import random
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest

from dalle_mini import text as text_module
from dalle_mini.hub import CheckpointError
from dalle_mini.processor import DalleBartProcessor, train_tokenizer
from dalle_mini.text import PERSON_PHRASES, HashtagSegmenter, TextNormalizer

FIXTURES = Path(__file__).parent / "fixtures"
CHECKPOINT = FIXTURES / "dallebart-scan"
WORDS = CHECKPOINT / "enwiki-words-frequency.txt"
NORMALIZER_CASES = json.loads((FIXTURES / "normalizer.json").read_text())
PROMPTS = json.loads((CHECKPOINT / "prompts.json").read_text())
TOKENIZER_FILES = [
    "tokenizer.json",
    "vocab.json",
    "merges.txt",
    "tokenizer_config.json",
    "special_tokens_map.json",
]


@pytest.fixture(scope="module")
def normalizer():
    return TextNormalizer(WORDS)


@pytest.fixture(scope="module")
def processor():
    return DalleBartProcessor.from_pretrained(CHECKPOINT)


def _strict_call(processor, prompts):
    """Calls the processor, failing on any warning (e.g. an unexpected truncation)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return processor(prompts)


# --- TextNormalizer ---------------------------------------------------------------------------


@pytest.mark.parametrize("case", NORMALIZER_CASES, ids=[c["input"][:30] for c in NORMALIZER_CASES])
def test_normalizer_matches_original(normalizer, case):
    assert normalizer(case["input"]) == case["output"]


def test_normalizer_on_reference_prompts(normalizer):
    assert [normalizer(p) for p in PROMPTS["prompts"]] == PROMPTS["normalized_prompts"]


def test_person_token_is_a_weighted_random_phrase():
    draws = [TextNormalizer(WORDS, rng=seed)("<person> on a bike") for seed in range(300)]
    phrases = {d.removesuffix(" on a bike").strip() for d in draws}
    assert phrases == set(PERSON_PHRASES)
    counts = {p: sum(d == f" {p} on a bike" for d in draws) for p in PERSON_PHRASES}
    assert counts["a person"] > counts["someone"] > counts["somebody"]  # weights 282k/121k/12k


def test_person_token_is_reproducible_with_a_seed():
    text = "<person> talks to <person> near a <person>"
    first = TextNormalizer(WORDS, rng=7)(text)
    assert TextNormalizer(WORDS, rng=random.Random(7))(text) == first
    assert "<person>" not in first and "person>" not in first
    assert {TextNormalizer(WORDS, rng=s)(text) for s in range(20)} != {first}


def test_person_token_runs_become_people(normalizer):
    assert normalizer("<person> and <person> at the beach") == " people at the beach"
    assert normalizer("<PERSON>, <person> , <person> dancing") == " people dancing"


def test_missing_words_file_is_named(tmp_path):
    missing = tmp_path / "nowhere" / "enwiki-words-frequency.txt"
    with pytest.raises(FileNotFoundError, match="enwiki-words-frequency.txt") as info:
        TextNormalizer(missing)
    assert str(missing) in str(info.value)


def test_default_words_file_comes_from_the_published_repo(monkeypatch):
    asked = []

    def fake_resolve_folder(name, *, component, required_files, **kwargs):
        asked.append((name, component, list(required_files)))
        return CHECKPOINT

    monkeypatch.setattr(text_module, "resolve_folder", fake_resolve_folder)
    assert TextNormalizer()("#SunsetBeach") == " sunset beach"
    assert asked == [("dalle-mini/dalle-mini", "dallebart", ["enwiki-words-frequency.txt"])]


def test_normalizer_rejects_non_strings(normalizer):
    with pytest.raises(TypeError, match="bytes"):
        normalizer(b"a red apple")


def test_hashtag_split_follows_word_ranks(tmp_path):
    frequent_parts = tmp_path / "parts.txt"
    frequent_parts.write_text("in 100\nside 90\ninside 80\n")
    assert HashtagSegmenter(frequent_parts)("inside") == "in side"  # log 1 + log 2 < log 3
    frequent_whole = tmp_path / "whole.txt"
    frequent_whole.write_text("inside 100\nin 90\nside 80\n")
    assert HashtagSegmenter(frequent_whole)("inside") == "inside"
    assert HashtagSegmenter(frequent_whole)("InSide_in") == "InSide in"  # lookup ignores case


def test_hashtag_split_keeps_digit_runs_together():
    segmenter = HashtagSegmenter(WORDS)
    assert segmenter.segment("2020vision") == ["2020", "v", "is", "i", "on"]
    assert segmenter.segment("1234567") == ["1234567"]


# --- DalleBartProcessor -----------------------------------------------------------------------


def test_processor_matches_original_ids(processor):
    expected = np.load(CHECKPOINT / "reference.npz")
    with pytest.warns(UserWarning, match=r"2 of 4 prompts .* max_text_length=32"):
        batch = processor(PROMPTS["prompts"])
    assert set(batch) == {
        "input_ids",
        "attention_mask",
        "input_ids_uncond",
        "attention_mask_uncond",
    }
    for name, array in batch.items():
        assert array.dtype == np.int32 and array.shape == (4, 32), name
        np.testing.assert_array_equal(array, expected[name], err_msg=name)


def test_processor_settings_come_from_the_checkpoint(processor):
    assert processor.max_text_length == 32
    assert processor.tokenizer.get_vocab_size() == 800
    assert [processor.normalize(p) for p in PROMPTS["prompts"]] == PROMPTS["normalized_prompts"]


def test_truncation_keeps_end_of_sequence_last(processor):
    long_prompt = PROMPTS["prompts"][3]
    with pytest.warns(UserWarning, match=r"1 of 1 prompts .* \(\d+ tokens cut"):
        batch = processor([long_prompt])
    assert batch["input_ids"][0, -1] == 2
    assert batch["attention_mask"][0].all()


def test_uncond_batch_is_the_unnormalized_empty_prompt(processor):
    batch = _strict_call(processor, ["", "a cat", "a dog"])
    np.testing.assert_array_equal(batch["input_ids"][0, :4], [0, 224, 2, 1])  # "<s> Ġ </s>"
    np.testing.assert_array_equal(batch["input_ids_uncond"], [[0, 2] + [1] * 30] * 3)
    np.testing.assert_array_equal(batch["attention_mask_uncond"], [[1, 1] + [0] * 30] * 3)


def test_bare_string_is_a_batch_of_one(processor):
    single = _strict_call(processor, "A red cube on top of a blue sphere")
    batch = _strict_call(processor, ["A red cube on top of a blue sphere", "x"])
    for name in single:
        assert single[name].shape == (1, 32)
        np.testing.assert_array_equal(single[name][0], batch[name][0])


@pytest.mark.parametrize(
    ("prompts", "type_name", "index"),
    [
        (["ok", None], "NoneType", 1),
        ([3], "int", 0),
        (["a", "b", b"bytes"], "bytes", 2),
        (["a", ["nested"]], "list", 1),
    ],
)
def test_non_string_prompt_is_named(processor, prompts, type_name, index):
    with pytest.raises(TypeError, match=rf"prompt {index} is a {type_name}"):
        processor(prompts)


@pytest.mark.parametrize("prompts", [None, 42, b"a red apple"])
def test_prompts_must_be_a_string_or_list(processor, prompts):
    with pytest.raises(TypeError, match="str or a list of str"):
        processor(prompts)


def test_empty_prompt_list_is_rejected(processor):
    with pytest.raises(ValueError, match="no prompts"):
        processor([])


def test_checkpoint_without_normalization_tokenizes_raw_text(tmp_path):
    for name in TOKENIZER_FILES:
        shutil.copy(CHECKPOINT / name, tmp_path / name)
    config = json.loads((CHECKPOINT / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "normalize_text": False}))
    raw = DalleBartProcessor.from_pretrained(tmp_path)  # no words file needed
    assert raw.normalize("Café #SunsetBeach") == "Café #SunsetBeach"
    batch = _strict_call(raw, [" a red cube"])
    expected = raw.tokenizer.encode(" a red cube").ids
    assert batch["input_ids"][0, : len(expected)].tolist() == expected
    assert expected[0] == 0 and expected[-1] == 2


def test_normalizing_checkpoint_without_words_file_is_named(tmp_path):
    for name in [*TOKENIZER_FILES, "config.json"]:
        shutil.copy(CHECKPOINT / name, tmp_path / name)
    with pytest.raises(CheckpointError, match="lacks enwiki-words-frequency.txt"):
        DalleBartProcessor.from_pretrained(tmp_path)


# --- train_tokenizer / save_pretrained --------------------------------------------------------


def test_trained_tokenizer_round_trips_through_a_folder(normalizer, tmp_path):
    captions = [normalizer(p) for p in PROMPTS["prompts"]] * 20 + [
        normalizer(c["input"]) for c in NORMALIZER_CASES
    ]
    tokenizer = train_tokenizer(captions, vocab_size=320)
    assert [tokenizer.token_to_id(t) for t in ["<s>", "<pad>", "</s>", "<unk>"]] == [0, 1, 2, 3]
    assert tokenizer.token_to_id("<mask>") == tokenizer.get_vocab_size() - 1

    DalleBartProcessor(tokenizer, 24, normalizer).save_pretrained(tmp_path)
    for name in [*TOKENIZER_FILES, "enwiki-words-frequency.txt"]:
        assert (tmp_path / name).is_file(), name
    assert (tmp_path / "merges.txt").read_text().startswith("#version: 0.2\n")
    vocab = json.loads((tmp_path / "vocab.json").read_text())
    assert vocab["<s>"] == 0 and vocab["</s>"] == 2 and len(vocab) == tokenizer.get_vocab_size()
    saved = json.loads((tmp_path / "tokenizer.json").read_text())
    assert saved["post_processor"]["type"] == "RobertaProcessing"
    assert saved["pre_tokenizer"] == {
        "type": "ByteLevel",
        "add_prefix_space": False,
        "trim_offsets": True,
        "use_regex": True,
    }

    (tmp_path / "config.json").write_text(
        json.dumps({"max_text_length": 24, "normalize_text": True})
    )
    loaded = DalleBartProcessor.from_pretrained(tmp_path)
    prompts = ["A red cube", "#SunsetBeach 😊"]
    batch = _strict_call(loaded, prompts)
    assert batch["input_ids"].shape == (2, 24)
    for row, prompt in zip(batch["input_ids"], prompts, strict=True):
        ids = tokenizer.encode(normalizer(prompt)).ids
        assert row.tolist() == ids + [1] * (24 - len(ids))
    assert loaded.tokenizer.decode(batch["input_ids"][0].tolist()) == " a red cube"


def test_train_tokenizer_rejects_a_vocabulary_smaller_than_the_bytes():
    with pytest.raises(ValueError, match="at least 261"):
        train_tokenizer(["a red cube"], vocab_size=100)
