"""Invalid UTF-8 in an event: a named, content-free outcome, never a bare InvalidBSON.

MongoDB stores strings without checking their UTF-8; the embedded SecantusDB refuses such a
document at the wire ("invalid BSON in body"), so these tests decode real invalid bytes with
pymongo's own decoder, as the driver does with a server's reply. Decoded strictly (the driver's
default, and the fold's before) they raise InvalidBSON, which named no event and repeated every run.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import bson
import pytest
from bson.codec_options import CodecOptions

from butler_memory.core.errors import InvalidEventError, StoreError
from butler_memory.core.settings import Settings
from butler_memory.fold.chunks import pack_chunks
from butler_memory.llm.offline import OfflineSummarizer
from butler_memory.storage.events import undecodable_field
from butler_memory.storage.mongo import event_digest, lenient, sanitized_errors

SECRET = "Anna-secret"


def stored(event_id: str, content: str, *, broken: bool = False) -> bytes:
    """Return an event's BSON as a server would send it; ``broken``: its content's bytes made invalid UTF-8."""
    raw = bson.encode(
        {"_id": event_id, "user_id": "u1", "role": "user", "content": content, "created_at": datetime(2026, 1, 1)}
    )
    if broken:
        marker = content.encode()
        raw = raw.replace(marker, marker[:-2] + b"\xff\xfe")  # same length: the BSON stays well-formed
    return raw


def test_an_undecodable_event_is_named_and_handed_over_the_others_are_chunked() -> None:
    options: CodecOptions[Any] = lenient(CodecOptions())
    events = [
        bson.decode(stored("e0", "first turn"), options),
        bson.decode(stored("e1", f"{SECRET} hi", broken=True), options),
        bson.decode(stored("e2", "third turn"), options),
    ]
    assert [undecodable_field(ev) for ev in events] == [None, "content", None]
    bad: list[tuple[Any, InvalidEventError]] = []

    chunks = list(
        pack_chunks("u1", events, Settings(), OfflineSummarizer(), "en", lambda: "", lambda i, e: bad.append((i, e)))
    )

    assert [[ev["_id"] for ev in chunk] for chunk in chunks] == [["e0", "e2"]]
    ((event_id, error),) = bad
    assert event_id == "e1" and error.field == "content" and error.problem == "is not valid UTF-8"
    assert SECRET not in str(error), str(error)


def test_an_undecodable_event_fails_a_rebuild_naming_it() -> None:
    """Without a handler (re-fold, forget), the event is named; the bytes are never quoted."""
    event = bson.decode(stored("e1", f"{SECRET} hi", broken=True), lenient(CodecOptions()))
    with pytest.raises(InvalidEventError, match=r"event e1: field 'content' is not valid UTF-8") as info:
        list(pack_chunks("u1", [event], Settings(), OfflineSummarizer(), "en", lambda: ""))
    assert SECRET not in str(info.value)


def test_an_event_with_an_undecodable_field_name_is_handed_over_not_chunked() -> None:
    """A top-level field name not valid UTF-8 is named (escaped, encodable) and the event handed over (third review)."""
    good = bson.decode(stored("e0", "first turn"), lenient(CodecOptions()))
    raw = bson.encode({**bson.decode(stored("e1", "second turn")), "tagX": 1})
    bad = bson.decode(raw.replace(b"tagX", b"ta\xff\xfe"), lenient(CodecOptions()))  # same length: well-formed
    handed: list[tuple[Any, InvalidEventError]] = []

    chunks = list(
        pack_chunks(
            "u1", [good, bad], Settings(), OfflineSummarizer(), "en", lambda: "", lambda i, e: handed.append((i, e))
        )
    )

    assert [[ev["_id"] for ev in chunk] for chunk in chunks] == [["e0"]]
    ((event_id, error),) = handed
    assert event_id == "e1" and error.field == "ta\\udcff\\udcfe" and error.problem == "is not valid UTF-8"
    bson.encode({"field": error.field, "problem": str(error)})  # as the quarantine record stores it: encodable
    assert [event_digest(ev) for ev in chunks[0]], "what the commit computes for the chunk"


def test_sanitized_errors_name_a_bson_error_by_type_only() -> None:
    with pytest.raises(StoreError, match=r"user 'u1': a MongoDB document could not be decoded during compression"):
        with sanitized_errors("u1", "compression"):
            bson.decode(stored("e1", f"{SECRET} hi", broken=True))
