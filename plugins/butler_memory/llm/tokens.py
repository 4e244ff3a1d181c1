"""Count prompt tokens as the model's server will, offline; bound them when the model is unknown.

The counts come from ``quicktok`` (package ``quicktok-v1``), an exact BPE tokenizer whose ids match
tiktoken's and the models' own, and which ships its vocabularies inside the wheel: nothing is
downloaded at run time (tiktoken itself fetches its BPE files on first use, which a worker without
internet access cannot do). Bundled: ``o200k_base`` (GPT-4o, GPT-4.1, GPT-5, o-series),
``cl100k_base`` (GPT-4, GPT-3.5), ``llama3`` (Llama 3.x), ``qwen3`` (Qwen 2/2.5/3).

For any other model the count is the text's UTF-8 byte length: every byte-level BPE and every
SentencePiece tokenizer with byte fallback spends at most one token per byte, so this is an upper
bound (a conservative budget: Russian text costs about three times its real tokens). The check of
what the server read then compares with the ``o200k_base`` count and a wider tolerance, because
the real tokenizer may pack the text tighter than o200k does (Qwen: about 0.8 of it on Chinese).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

UTF8_BYTES = "utf8_bytes"
AUTO = "auto"
ENCODINGS = ("o200k_base", "cl100k_base", "llama3", "qwen3")
TOKENIZERS = (AUTO, *ENCODINGS, UTF8_BYTES)

EXACT_TOLERANCE = 0.1
"""Default share of our count a server may read less of before the prompt counts as truncated,
when the tokenizer is the model's own (chat templates only add tokens, so 10 % is slack)."""
ESTIMATE_TOLERANCE = 0.4
"""The same for a model whose tokenizer is unknown (compared with the o200k_base count)."""

_MODEL_ENCODINGS = (
    (re.compile(r"^(gpt-4o|gpt-4\.1|gpt-4\.5|gpt-5|chatgpt-4o|o[1345])(\b|[-.:_])"), "o200k_base"),
    (re.compile(r"^(gpt-4|gpt-3\.5)(\b|[-.:_])"), "cl100k_base"),
    (re.compile(r"^(meta-)?llama-?3(\b|[-.:_])"), "llama3"),
    (re.compile(r"^qwen(2|2\.5|3)(\b|[-.:_])"), "qwen3"),
)


def encoding_for_model(model: str) -> str:
    """Return the bundled encoding of a model name (``org/`` prefixes and ``:tags`` allowed), else utf8_bytes."""
    name = model.strip().lower().rsplit("/", 1)[-1]
    for pattern, encoding in _MODEL_ENCODINGS:
        if pattern.match(name):
            return encoding
    return UTF8_BYTES


_LOADED: dict[str, Any] = {}


def _encoding(name: str) -> Any:
    """Load a bundled encoding once per process (about 0.1 s each)."""
    if name not in _LOADED:
        import quicktok

        _LOADED[name] = quicktok.get_encoding(name)
    return _LOADED[name]


@dataclass(frozen=True)
class TokenCounter:
    """Counts the tokens of prompt texts for one model."""

    encoding: str
    """One of ENCODINGS, or UTF8_BYTES when the model's tokenizer is unknown."""

    @classmethod
    def for_model(cls, model: str, tokenizer: str = AUTO) -> TokenCounter:
        """Return the counter a connection asks for (``tokenizer`` extra), or the model's own."""
        if tokenizer not in TOKENIZERS:
            raise ValueError(f"tokenizer {tokenizer!r} is not one of {', '.join(TOKENIZERS)}")
        return cls(encoding_for_model(model) if tokenizer == AUTO else tokenizer)

    @property
    def exact(self) -> bool:
        """Whether the counts are the model's own (else an upper bound)."""
        return self.encoding != UTF8_BYTES

    @property
    def default_tolerance(self) -> float:
        """The truncation check's default tolerance for this counter."""
        return EXACT_TOLERANCE if self.exact else ESTIMATE_TOLERANCE

    def count(self, text: str) -> int:
        """Return the tokens of ``text`` (exact, or an upper bound for an unknown tokenizer)."""
        if not text:
            return 0
        if not self.exact:
            return len(text.encode("utf-8"))
        return int(_encoding(self.encoding).count(text))

    def reference(self, text: str) -> int:
        """Return the count a server's reported prompt tokens is checked against."""
        if not text:
            return 0
        return int(_encoding(self.encoding if self.exact else "o200k_base").count(text))

    def warm_up(self) -> None:
        """Load the encodings this counter uses (no I/O beyond the package's own files)."""
        _encoding(self.encoding if self.exact else "o200k_base")
