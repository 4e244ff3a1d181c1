"""Token counting: the bundled encodings by model name, and the byte bound for unknown models."""

from __future__ import annotations

import pytest

from butler_memory.llm.tokens import ENCODINGS, UTF8_BYTES, TokenCounter, encoding_for_model

TEXTS = [
    "Меня зовут Анна, у меня аллергия на арахис.",
    "My son Misha was born on March 12.",
    "我对花生过敏。每周二提醒我十点半看医生。",
    "😀🎉👍🏽 ok 🙏 ❤️‍🔥",
    '["2026-01-01 00:07","user","line\\nbreak \\"quoted\\""]',
]


@pytest.mark.parametrize(
    ("model", "encoding"),
    [
        ("gpt-4o-mini", "o200k_base"),
        ("gpt-4.1", "o200k_base"),
        ("gpt-5-nano", "o200k_base"),
        ("o3-mini", "o200k_base"),
        ("gpt-4-turbo", "cl100k_base"),
        ("gpt-3.5-turbo", "cl100k_base"),
        ("llama3.1:8b", "llama3"),
        ("meta-llama/Llama-3.3-70B-Instruct", "llama3"),
        ("qwen2.5:7b-instruct", "qwen3"),
        ("Qwen/Qwen3-8B", "qwen3"),
        ("mistral:7b", UTF8_BYTES),
        ("gemma2", UTF8_BYTES),
        ("test-model", UTF8_BYTES),
    ],
)
def test_models_map_to_their_encoding(model: str, encoding: str) -> None:
    assert encoding_for_model(model) == encoding


@pytest.mark.parametrize("text", TEXTS)
def test_the_byte_bound_is_never_below_a_real_count(text: str) -> None:
    bound = TokenCounter(UTF8_BYTES).count(text)
    for encoding in ENCODINGS:
        assert TokenCounter(encoding).count(text) <= bound, encoding


def test_counts_are_real_tokens_not_characters() -> None:
    counter = TokenCounter("o200k_base")
    assert counter.count("hello world") == 2
    assert counter.count("<|endoftext|>") > 1, "special-token text in user content is ordinary text"


def test_an_unknown_tokenizer_is_refused() -> None:
    with pytest.raises(ValueError, match="tokenizer 'bpe' is not one of"):
        TokenCounter.for_model("gpt-4o", "bpe")
