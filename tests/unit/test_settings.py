"""Settings: defaults, layering, type coercion and refusals that name the setting."""

from __future__ import annotations

import pytest

from butler_memory.core.settings import Settings, SettingsError


def test_defaults_match_the_documented_product_defaults() -> None:
    s = Settings()
    assert (s.threshold, s.keep_last_n, s.summary_language, s.summary_max_tokens) == (50, 20, "ru", 300)
    assert s.lock_key("u1") == "butler:memory:lock:u1"


def test_env_values_are_coerced_to_the_field_types() -> None:
    s = Settings.from_env(
        {
            "BUTLER_MEMORY_THRESHOLD": "80",
            "BUTLER_MEMORY_ARCHIVE_ENABLED": "false",
            "BUTLER_MEMORY_LLM_TIMEOUT_SECONDS": "30",
        }
    )
    assert s.threshold == 80 and isinstance(s.threshold, int)
    assert s.archive_enabled is False
    assert s.llm_timeout_seconds == 30.0


def test_layers_apply_in_order_env_then_json_then_overrides() -> None:
    base = Settings.from_env({"BUTLER_MEMORY_THRESHOLD": "80", "BUTLER_MEMORY_KEEP_LAST_N": "10"})
    layered = Settings.from_json('{"threshold": 90}', base=base).replace(keep_last_n=15)
    assert (layered.threshold, layered.keep_last_n) == (90, 15)


@pytest.mark.parametrize(
    ("values", "fragment"),
    [
        ({"threshold": "many"}, "threshold must be an integer"),
        ({"threshold": 0}, "threshold must be a positive number"),
        ({"threshold": True}, "threshold must be an integer"),
        ({"keep_last_n": 60}, "keep_last_n (60) must not exceed threshold (50)"),
        ({"archive_enabled": "maybe"}, "archive_enabled must be true or false"),
        ({"summarizer": "gpt"}, "summarizer 'gpt' is not one of"),
        ({"lock_key_pattern": "lock:static"}, "must contain '{user_id}'"),
        ({"llm_timeout_seconds": 200}, "under half of lock_ttl_seconds"),
        ({"max_event_chars": 100_000}, "prompt_budget_tokens (6000) is too small"),
        ({"no_such_setting": 1}, "unknown setting(s): no_such_setting"),
        ({"events_collection": 5}, "events_collection must be a string"),
        # NaN is neither <= 0 nor >= anything: it passed every range check (issue 26, item 8).
        ({"llm_timeout_seconds": float("nan")}, "llm_timeout_seconds must be a finite number, got nan"),
        ({"llm_timeout_seconds": "NaN"}, "llm_timeout_seconds must be a finite number"),
        ({"redis_timeout_seconds": "inf"}, "redis_timeout_seconds must be a finite number, got inf"),
        ({"language_guard_min_share": float("nan")}, "language_guard_min_share must be a finite number"),
    ],
)
def test_bad_values_are_refused_with_the_setting_named(values: dict, fragment: str) -> None:
    with pytest.raises(SettingsError) as info:
        Settings.from_mapping(values)
    assert fragment in str(info.value)


def test_nan_from_the_environment_and_json_is_refused() -> None:
    with pytest.raises(SettingsError, match="llm_timeout_seconds must be a finite number"):
        Settings.from_env({"BUTLER_MEMORY_LLM_TIMEOUT_SECONDS": "nan"})
    with pytest.raises(SettingsError, match="redis_timeout_seconds must be a finite number"):
        Settings.from_json('{"redis_timeout_seconds": NaN}')


def test_json_source_errors_name_the_source() -> None:
    with pytest.raises(SettingsError, match="Airflow Variable 'butler_memory' is not valid JSON"):
        Settings.from_json("{threshold: 3}", source="Airflow Variable 'butler_memory'")
    with pytest.raises(SettingsError, match="must be a JSON object, got list"):
        Settings.from_json("[1, 2]")


@pytest.mark.parametrize("value", ["--5", "²", "1_000", " 7 8"])
def test_an_unparsable_integer_from_the_environment_is_a_settings_error_naming_it(value: str) -> None:
    """Text that only looks like digits ("--5", a superscript) is refused naming the setting (second review)."""
    with pytest.raises(SettingsError, match="threshold must be an integer"):
        Settings.from_env({"BUTLER_MEMORY_THRESHOLD": value})


@pytest.mark.parametrize(
    ("name", "pattern"),
    [
        ("lock_key_pattern", "butler:memory:lock:{user_id}:{shard}"),
        ("lock_key_pattern", "lock:{user_id}:{}"),
        ("lock_key_pattern", "lock:{user_id}{"),
        ("lock_key_pattern", "lock:{{user_id}}"),
        ("backoff_key_pattern", "backoff:{user_id}:{0}"),
        ("token_budget_key_pattern", "tokens:{day}:{user_id}"),
        ("token_budget_key_pattern", "tokens:{day!x}"),
    ],
)
def test_a_redis_key_pattern_that_cannot_be_rendered_is_refused_naming_it(name: str, pattern: str) -> None:
    """A key pattern is rendered with its field as settings are built, not at the first lock (second review)."""
    with pytest.raises(SettingsError, match=name):
        Settings(**{name: pattern})


@pytest.mark.parametrize(
    ("changes", "pair"),
    [
        ({"quarantine_collection": "user_memory"}, "events_collection and quarantine_collection"),
        ({"archive_collection": "user_memory"}, "events_collection and archive_collection"),
        ({"history_collection": "user_profiles"}, "profiles_collection and history_collection"),
        ({"runs_collection": "user_memory_archive"}, "archive_collection and runs_collection"),
        ({"state_collection": "memory_batch_folds"}, "batch_collection and state_collection"),
    ],
)
def test_two_roles_on_one_collection_are_refused_naming_both(changes: dict[str, str], pair: str) -> None:
    """Each *_collection names a collection of its own: two roles on one lose events (second review)."""
    with pytest.raises(SettingsError, match=pair):
        Settings(**changes)


def test_an_integer_setting_beyond_what_mongodb_stores_is_refused() -> None:
    """An integer setting above 2**63 - 1 (BSON's int64) is refused here, not overflowing a query (second review)."""
    with pytest.raises(SettingsError, match=r"threshold \(100000000000000000000\) must be at most 9223372036854775807"):
        Settings.from_env({"BUTLER_MEMORY_THRESHOLD": str(10**20)})
    assert Settings(daily_token_budget=2**63 - 1).daily_token_budget == 2**63 - 1


@pytest.mark.parametrize(
    "values",
    [
        {"mongo_write_concern": "²"},  # str.isdigit() is True, int() refuses it
        {"mongo_write_concern": "9" * 5000},  # over Python's int-from-text digit limit
        {"threshold": "9" * 5000},
        {"threshold": 10**5000},  # an int whose text the message could not show
        {"llm_timeout_seconds": 10**400},  # an integer (a JSON Variable's) too large for a float
    ],
    ids=[
        "write-concern-superscript",
        "write-concern-5000-digits",
        "integer-5000-digits",
        "huge-int",
        "float-from-huge-int",
    ],
)
def test_a_bad_setting_is_a_settings_error_naming_it(values: dict[str, object]) -> None:
    """Text int() refuses and numbers float() cannot hold fail as a SettingsError naming the setting (third review)."""
    ((name, _),) = values.items()
    with pytest.raises(SettingsError, match=name):
        Settings.from_mapping(values)


def test_a_json_integer_over_the_digit_limit_is_a_settings_error() -> None:
    """json.loads raises a plain ValueError past Python's digit limit: still the source's SettingsError (third review)."""
    with pytest.raises(SettingsError, match="JSON is not valid JSON"):
        Settings.from_json('{"threshold": ' + "9" * 5000 + "}")
