"""Secrets never reach the logs, whatever field or text they hide in."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
import structlog

from gateway import logs


@pytest.fixture
def json_logs() -> Iterator[None]:
    yield
    structlog.reset_defaults()


def test_secrets_are_redacted_by_key_and_in_text(json_logs: None, capsys: pytest.CaptureFixture[str]) -> None:
    logs.configure("info", "json")  # here, not in a fixture: capsys swaps sys.stdout only while the test runs
    logs.get_logger("test").info(
        "backend_call",
        api_key="sk-live-123",
        headers={"Authorization": "Bearer tok-abc", "X-API-Key": "adm-456", "Accept": "json"},
        detail="upstream said: Authorization: Bearer tok-xyz was rejected",
        admin_token="adm-789",
        items=[{"password": "hunter2"}],
        model="echo",
    )
    line = json.loads(capsys.readouterr().out)
    dumped = json.dumps(line)
    for secret in ("sk-live-123", "tok-abc", "adm-456", "tok-xyz", "adm-789", "hunter2"):
        assert secret not in dumped
    assert line["api_key"] == "[redacted]" and line["headers"]["Accept"] == "json"
    assert line["detail"] == "upstream said: Authorization: Bearer [redacted] was rejected"
    assert line["model"] == "echo" and line["event"] == "backend_call" and line["level"] == "info"


def test_debug_lines_are_dropped_at_info(json_logs: None, capsys: pytest.CaptureFixture[str]) -> None:
    logs.configure("info", "json")
    logs.get_logger("test").debug("noise")
    assert capsys.readouterr().out == ""
