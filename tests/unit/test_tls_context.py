"""The LLM client's TLS context is built once per process and follows the CA settings it came from."""

from __future__ import annotations

import ssl

import certifi
import pytest

from butler_memory.llm import openai_summarizer as summarizer


def test_built_once_and_shared(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SSL_CERT_FILE", raising=False)
    monkeypatch.delenv("SSL_CERT_DIR", raising=False)
    first = summarizer.tls_context()
    assert isinstance(first, ssl.SSLContext)
    assert first.verify_mode == ssl.CERT_REQUIRED and first.check_hostname
    assert summarizer.tls_context() is first


def test_rebuilt_when_the_ca_settings_change(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SSL_CERT_DIR", raising=False)
    monkeypatch.delenv("SSL_CERT_FILE", raising=False)
    default = summarizer.tls_context()
    monkeypatch.setenv("SSL_CERT_FILE", certifi.where())
    custom = summarizer.tls_context()
    assert custom is not default
    assert custom.cert_store_stats()["x509_ca"] > 0  # the bundle named by SSL_CERT_FILE was loaded
    assert summarizer.tls_context() is custom


def test_warm_up_does_no_io_and_leaves_the_context_built(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(summarizer, "_TLS_CONTEXT", None)
    summarizer.warm_up()  # the client points at 127.0.0.1:9 (discard): any request would fail
    assert summarizer._TLS_CONTEXT is not None
