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
