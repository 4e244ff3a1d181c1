"""The pure parts of the erasure scrub: whole-id replacement, the forms ids are stored in, LIKE escaping."""

from __future__ import annotations

import json
import re

import pytest

from butler_memory.operations.erasure import id_pattern
from butler_memory.orchestration.airflow_scrub import MARK, _like, _stored_forms, redact


def patterns(*ids: str) -> list[re.Pattern[str]]:
    return [id_pattern(form) for form in _stored_forms(list(ids))]


def test_only_whole_ids_are_replaced_in_nested_values_and_keys() -> None:
    value = {"user_ids": ["u1", "u10", "xu1"], "u1": {"label": "user u1, not u1.5"}, "n": 3}
    assert redact(value, patterns("u1")) == {
        "user_ids": [MARK, "u10", "xu1"],
        MARK: {"label": f"user {MARK}, not u1.5"},
        "n": 3,
    }


@pytest.mark.parametrize("other", ["alice@example.com", "alice+work", "alice:2", "tg:alice"])
def test_erasing_a_user_leaves_another_id_that_contains_theirs_whole(other: str) -> None:
    """An id containing the erased one (e-mail, tag, shard, scheme prefix) is another user's (second review)."""
    value = {"user_ids": ["alice", other], "backlog": {other: 30}, "label": f"{other} +1"}
    assert redact(value, patterns("alice")) == {
        "user_ids": [MARK, other],
        "backlog": {other: 30},
        "label": f"{other} +1",
    }


def test_an_erased_id_in_free_text_is_replaced_between_quotes_brackets_and_commas() -> None:
    """Free text names ids quoted, bracketed or in lists; those characters end an id, others do not (second review)."""
    text = "user 'alice': failed; [alice, \"alice\"] (alice) alice@example.com tg:alice alice"
    assert redact(text, patterns("alice")) == (
        f"user '{MARK}': failed; [{MARK}, \"{MARK}\"] ({MARK}) alice@example.com tg:alice {MARK}"
    )


def test_an_id_is_found_as_json_text_stores_it() -> None:
    odd = 'Анна "A" \\ 1'
    forms = _stored_forms([odd])
    assert odd in forms and json.dumps(odd)[1:-1] in forms and json.dumps(odd, ensure_ascii=False)[1:-1] in forms
    stored = json.dumps({"user_id": odd})  # how a JSON column's text holds it (ASCII-escaped)
    assert any(form in stored for form in forms)
    assert odd not in redact(json.loads(stored), patterns(odd)).values()


def test_like_patterns_escape_wildcards() -> None:
    assert _like("u_1%\\") == "%u\\_1\\%\\\\%"
