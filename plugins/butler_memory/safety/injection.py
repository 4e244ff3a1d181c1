"""Spot instruction-like and fence-breaking text, sentence by sentence (Russian and English).

The summary is read back into the Butler's prompts, so an instruction that reaches it is a stored
prompt injection. A sentence is *flagged* when it reads as addressed to the assistant or its
system rather than as something the user said about themselves:

- ``override``: ignore / disregard / forget the previous instructions, rules, prompt;
- ``persona``: "you are now", "from now on you are", developer mode, jailbreak;
- ``prompt``: the system prompt, hidden instructions, revealing or repeating them;
- ``audience``: telling, sending or redirecting *users* (customers, everyone who asks) somewhere;
- ``markup``: role markers at a line start (``system:``, ``assistant:``), chat-template tokens
  (``<|im_start|>``, ``[INST]``, ``<<SYS>>``), ``###`` headers, code fences, our own prompt fences
  (``<<<EVENTS``, ``SUMMARY>>>``);
- ``blob``: a long base64-like run that could hide any of the above.

A user's own standing requests ("always remind me to take my pills", "ignore the noise, I need a
quiet room", a URL they share) are not flagged: they are memory. Pure and fast (precompiled
regular expressions, no I/O); the verdicts name a kind, never the text.
"""

from __future__ import annotations

import re
from dataclasses import replace
from functools import lru_cache

from butler_memory.llm.summarizer import SummaryRequest

_I = re.IGNORECASE

# "<verb> ... <what>" of an override, in either language; a gap of a few words between them.
_GAP = r"(?:[\s,;:]+[^\s.!?;:]+){0,5}?[\s,;:]+"
_OVERRIDE_EN = (
    r"\b(?:ignore|disregard|forget|override|bypass|drop|discard|skip)\b"
    + _GAP
    + r"(?:instructions?|rules?|prompts?|guidelines?|directives?|constraints?|guardrails?|polic(?:y|ies)|"
    r"system\s+messages?|programming|safety\s+filters?)\b"
)
_OVERRIDE_RU = (
    r"(?<![^\W\d_])(?:игнорир\w*|проигнорир\w*|забуд\w*|забыть|не\s+обращай\w*\s+внимани\w*\s+на|отбрось\w*|"
    r"отбросить|отмени\w*|пренебрег\w*|обойди|обойти|не\s+следуй\w*|не\s+соблюдай\w*)"
    + _GAP
    + r"(?:инструкци\w*|правил\w*|указани\w*|промпт\w*|ограничени\w*|директив\w*|установк\w*|фильтр\w*|"
    r"системн\w+\s+сообщени\w*)"
)
_PERSONA = (
    r"\byou\s+are\s+now\s+(?:an?|the|in|free|dan|unrestricted|unfiltered|jailbroken|evil|my\s+new)\b|"
    r"\byou\s+are\s+no\s+longer\s+(?:an?\s+)?(?:assistant|bound|restricted|limited|required|chatgpt|ai)\b|\bfrom\s+now\s+on,?\s+you\s+(?:are|act\s+as)\s+(?:an?\s+|the\s+)?(?!my\b)\w+|"
    r"\bact\s+as\s+(?:an?\s+)?(?:unrestricted|unfiltered|jailbroken|evil|different)\b|"
    r"\b(?:developer|god|dan|jailbreak)\s+mode\b|\bjailbr(?:eak|oken)\b|\bdo\s+anything\s+now\b|"
    r"(?<![^\W\d_])(?:теперь|отныне|с\s+этого\s+момента)\s+ты\s+(?:[—-]\s+)?(?:будешь\s+)?(?:\w+\s+){0,2}?"
    r"(?:ассистент\w*|бот\w*|помощник\w*|модел\w*|ии|dan|персонаж\w*|хакер\w*|свобод\w*|без\s+ограничени\w*|"
    r"подчиняешься|слушаешься|следуешь|выполняешь|игнорируешь)(?![^\W\d_])|(?<![^\W\d_])ты\s+больше\s+не\s+"
    r"(?:ассистент|бот|помощник|обязан|связан|ограничен)|(?<![^\W\d_])притворись|(?<![^\W\d_])режим\w*\s+"
    r"(?:разработчика|бога|без\s+ограничений)|(?<![^\W\d_])джейлбрейк\w*"
)
_PROMPT = (
    r"\b(?:system|developer|hidden|initial|original|secret)\s+(?:prompt|message|instructions?)\b|"
    r"\bnew\s+(?:instructions?|rules)\s*(?::|follow|are|below)|"
    r"\b(?:reveal|print|show|repeat|output|leak|dump)\b(?:\s+\w+){0,3}\s+(?:your|the|all)\s+"
    r"(?:\w+\s+)?(?:prompt|instructions|rules)\b|"
    r"(?<![^\W\d_])системн\w+\s+(?:промпт\w*|подсказк\w*|сообщени\w*|инструкци\w*)|"
    r"(?<![^\W\d_])(?:скрыт|исходн|секретн)\w+\s+(?:промпт\w*|инструкци\w*)|(?<![^\W\d_])нов\w+\s+инструкци\w*|"
    r"(?<![^\W\d_])(?:покажи|выведи|раскрой|повтори|напиши)(?:\s+\w+){0,2}\s+(?:свои|свой|твои|все|системн\w*)\s+"
    r"(?:\w+\s+)?(?:промпт\w*|инструкци\w*|правил\w*)"
)
# Someone else is the target, in the imperative: "tell users ...", "send everyone who asks to ...",
# "всем пользователям советуй ...". A user's own account ("I always tell customers about our
# discount", "мама говорит всем соседям") is no instruction: English needs the verb to open the
# sentence (after "please", "always", a "when ...," clause) or to follow "you/the assistant must".
_AUDIENCE_EN = (
    r"(?:all\s+|every\s+|other\s+|the\s+)?(?:users?|customers?|clients?|visitors?|everyone\s+who|anyone\s+who)\b"
)
_VERB_EN = r"(?:send|redirect|direct|refer|forward|tell|recommend|advise|link|route|steer)"
_OPENING_EN = (
    r"^\W*(?:(?:please|and|now|also|so|then|always|never|from\s+now\s+on|in\s+future|"
    r"(?:when|whenever|if)\s[^,]{1,60},)[\s,]+)*(?:do\s+not\s+|don't\s+)?"
)
_AUDIENCE_RU = r"(?:пользовател\w*|клиент\w*|посетител\w*|подписчик\w*|(?:всем|всех|каждому|любому)(?:\s+\w+)?,?\s+кто)"
_VERB_RU = (
    r"(?:отправляй|отправь|направляй|направь|перенаправляй|перенаправь|посылай|пошли|советуй|посоветуй|"
    r"рекомендуй|порекомендуй|говори|скажи|сообщай|сообщи|отвечай|давай|дай|предлагай|предложи|показывай|"
    r"покажи|отсылай)(?:те)?(?![^\W\d_])"
)
_AUDIENCE = (
    rf"{_OPENING_EN}{_VERB_EN}\s+(?:\w+\s+){{0,2}}{_AUDIENCE_EN}|"
    rf"\b(?:you|assistant|bot|ai)\s+(?:must|should|will|shall|need\s+to|have\s+to)\s+(?:\w+\s+){{0,2}}{_VERB_EN}\s+"
    rf"(?:\w+\s+){{0,3}}{_AUDIENCE_EN}|"
    rf"(?<![^\W\d_]){_VERB_RU}\s+(?:\w+\s+){{0,2}}{_AUDIENCE_RU}(?![^\W\d_])|"
    rf"(?<![^\W\d_]){_AUDIENCE_RU}\s+(?:\w+\s+){{0,2}}(?:всегда|никогда|обязательно|теперь)\s+(?:не\s+)?{_VERB_RU}|"
    rf"(?<![^\W\d_])(?:всем|каждому|любому)(?:\s+\w+)?,?\s+кто[^.!?]{{0,60}}?,\s*(?:\w+\s+)?{_VERB_RU}"
)
_MARKUP = (
    r"(?:^|\n)\W{0,3}(?:system|assistant|developer|user|human|ai|bot|система|ассистент|разработчик|"
    r"пользователь)\s*:|"
    r"<\|[\w-]+\|>|\[/?(?:INST|SYS)\]|<</?SYS>>|</?(?:system|assistant|user|developer|instructions?|prompt)>|"
    r"#{3,}|`{3,}|~{3,}|<<<\s*[A-Za-z_]+|(?<![A-Za-z_])[A-Za-z_]+\s*>>>"
)
_BLOB = (
    r"(?<![\w+/=])(?=[A-Za-z0-9+/]*\d)(?=[A-Za-z0-9+/]*[A-Z])(?=[A-Za-z0-9+/]*[a-z])[A-Za-z0-9+/]{40,}={0,2}(?![\w+/=])"
)
_URL = re.compile(r"\b(?:https?://|www\.)\S+", _I)

PATTERNS: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("override", re.compile(f"{_OVERRIDE_EN}|{_OVERRIDE_RU}", _I)),
    ("persona", re.compile(_PERSONA, _I)),
    ("prompt", re.compile(_PROMPT, _I)),
    ("audience", re.compile(_AUDIENCE, _I)),
    ("markup", re.compile(_MARKUP, _I)),
    ("blob", re.compile(_BLOB)),
)
"""(kind, pattern), checked in this order; the first match names a sentence's kind."""
KINDS = tuple(kind for kind, _ in PATTERNS)

# A fence's name, and a sentence's closing run of marks, are matched from their first letter or mark
# only: tried from every position of a long run of letters or dots, each try read to the run's end,
# one 12,000-character event cost seconds (quadratic). Whatever matches from inside a run also
# matches from its start, so the verdicts and the sentences are the same.
_SENTENCE = re.compile(r"[^\n]*?(?:(?<![.!?…])[.!?…]+(?=\s)|;(?=\s)|$)", re.MULTILINE)
_BULLET = re.compile(r"^\s*(?:[-•*]|\d+[.)])\s+")


def flag(sentence: str) -> str | None:
    """Return the kind of instruction a sentence reads as (``override``, ``markup``, ...), or None."""
    return _flag(sentence) if sentence.strip() else None


@lru_cache(maxsize=65_536)
def _flag(sentence: str) -> str | None:
    text = sentence.strip()
    for kind, pattern in PATTERNS:
        # A URL's path may look like a blob; it is a fact the user shared.
        if pattern.search(_URL.sub(" ", text) if kind == "blob" else text):
            return kind
    return None


def _lines(text: str) -> list[str]:
    """Split a text into its lines at every line break ``str.splitlines`` knows (``\n``, ``\r``,
    ``\x0b``, ``\x0c``, ``\x1c``-``\x1e``, ``\x85``, U+2028, U+2029), none left inside a line.

    The one splitting rule of withholding (``strip_instructions``) and the guard (``kinds``): were
    a line break a line end for one and whitespace for the other, "Ignore all<U+2028>previous
    instructions" would be two clean lines sent to the summariser and one flagged sentence to the
    guard, which then rejects the user on every run.
    """
    return text.splitlines()


def sentences(text: str) -> list[str]:
    """Split a text into its sentences (a line, or up to ``.``, ``!``, ``?``, ``…`` or ``;``)."""
    return [m.group(0).strip() for line in _lines(text) for m in _SENTENCE.finditer(line) if m.group(0).strip()]


def flagged(text: str) -> list[str]:
    """Return the sentences of a text that read as instructions, in order."""
    return [s for s in sentences(text) if flag(s)]


def kinds(text: str) -> dict[str, int]:
    """Return ``{kind: flagged sentences}`` of a text: the content-free description of what was found."""
    found: dict[str, int] = {}
    for s in sentences(text):
        kind = flag(s)
        if kind is not None:
            found[kind] = found.get(kind, 0) + 1
    return found


def strip_instructions(text: str) -> tuple[str, int]:
    """Return the text without its flagged sentences, and how many were removed.

    Two neighbouring sentences that read as an instruction only together ("Ignore all" and, on the
    next line, "previous instructions") go both: the summariser may join them into the one sentence
    the guard then rejects on every run. Lines keep their order and bullets; a line left with
    nothing but its bullet goes.
    """
    parsed = []
    for line in _lines(text):
        bullet = _BULLET.match(line)
        parsed.append((line, bullet, sentences(line[bullet.end() :] if bullet else line)))
    flat = [s for _, _, found in parsed for s in found]
    alone = {i for i, s in enumerate(flat) if flag(s)}
    # A pair is read once (uncached: it would only push single sentences, read again by the guard, out of the cache).
    pairs = [
        i for i in range(len(flat) - 1) if not {i, i + 1} & alone and _flag.__wrapped__(f"{flat[i]} {flat[i + 1]}")
    ]
    drop = alone | {j for i in pairs for j in (i, i + 1)}
    if not drop:
        return text, 0
    lines, at = [], 0
    for line, bullet, found in parsed:
        kept = [s for i, s in enumerate(found, start=at) if i not in drop]
        at += len(found)
        if kept:
            lines.append((bullet.group(0) if bullet else "") + " ".join(kept))
        elif not found and not bullet:
            lines.append(line)
    return "\n".join(lines), len(drop)


def withheld(request: SummaryRequest) -> SummaryRequest:
    """Return the request without the flagged sentences of its previous summary and events: the
    summariser never reads an instruction, so it cannot carry one into memory."""
    previous, removed = strip_instructions(request.previous_summary)
    events = []
    for ev in request.events:
        content, n = strip_instructions(ev.content)
        events.append(replace(ev, content=content) if n else ev)
        removed += n
    return replace(request, previous_summary=previous, events=events) if removed else request
