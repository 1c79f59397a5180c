"""Secrets never reach the logs, whatever field or text they hide in."""

from __future__ import annotations

import io
import json
import logging
import sys
from collections.abc import Iterator

import aiohttp
import pytest
import structlog

from gateway import logs
from tests.conftest import StartBackend, StartGateway


@pytest.fixture
def json_logs() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    structlog.reset_defaults()
    root.handlers, root.level = handlers, level  # configure() pointed them at this test's stdout


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


def test_the_request_line_written_directly_is_the_line_structlog_writes(
    json_logs: None, capsys: pytest.CaptureFixture[str]
) -> None:
    logs.configure("info", "json")
    fields = {"request_id": "r1", "model": "Bearer sk-abc", "api_key": "k", "status": 200, "prompt_tokens": 3}
    logs.get_logger("gateway").warning("request", **fields)
    logs.request_line(logs.get_logger("gateway"), logging.WARNING, "request", dict(fields))
    through_chain, direct = (json.loads(line) for line in capsys.readouterr().out.splitlines())
    assert through_chain.pop("timestamp")[:10] == direct.pop("timestamp")[:10]
    assert list(direct.items()) == list(through_chain.items())  # same fields, order and redaction
    assert direct["model"] == "Bearer [redacted]" and direct["api_key"] == "[redacted]"


def test_the_direct_request_line_keeps_the_level_threshold(json_logs: None, capsys: pytest.CaptureFixture[str]) -> None:
    logs.configure("warning", "json")
    logs.request_line(logs.get_logger("gateway"), logging.INFO, "request", {"status": 200})
    assert capsys.readouterr().out == ""
    logs.request_line(logs.get_logger("gateway"), logging.WARNING, "request", {"status": 500})
    assert json.loads(capsys.readouterr().out)["level"] == "warning"


def test_a_line_orjson_refuses_is_written_by_json_and_nothing_is_lost(
    json_logs: None, capsys: pytest.CaptureFixture[str]
) -> None:
    """Lines are orjson's compact JSON; a line with text past ASCII (which a stdout in another encoding could not
    take), or a value orjson refuses (a lone surrogate from a client, an integer past 64 bits), is json's,
    escaped, through structlog's chain and the direct request line alike."""
    logs.configure("info", "json")
    logs.get_logger("gateway").info("plain", model="m", latency_ms=1.5)
    logs.get_logger("gateway").info("odd", model="bad \ud800", tokens=2**64, where=object)
    logs.request_line(logs.get_logger("gateway"), logging.INFO, "request", {"model": "x\udfff", "n": -(2**70)})
    logs.request_line(logs.get_logger("gateway"), logging.INFO, "request", {"model": "日本é"})
    out = capsys.readouterr().out
    assert out.isascii()
    plain, odd, request, other_script = out.splitlines()
    assert plain.startswith('{"model":"m","latency_ms":1.5,"event":"plain"')  # compact
    assert json.loads(odd)["model"] == "bad \ud800" and json.loads(odd)["tokens"] == 2**64
    assert json.loads(odd)["where"] == "<class 'object'>"  # structlog's fallback for what JSON has no form of
    assert json.loads(request)["model"] == "x\udfff" and json.loads(request)["n"] == -(2**70)
    assert other_script.startswith('{"model":"\\u65e5\\u672c\\u00e9","event":"request"')


async def test_a_log_that_cannot_be_written_still_lets_the_observers_release_the_call(
    json_logs: None, monkeypatch: pytest.MonkeyPatch, start_backend: StartBackend, start_gateway: StartGateway
) -> None:
    """``multiverse serve | head``: once the pipe is closed every log line fails. The request's observers run all
    the same: ratelimit gives its concurrency slot back, so a key capped at one request at once is not locked
    out for good after its first."""
    closed = io.StringIO()
    closed.close()
    monkeypatch.setattr(sys, "stdout", closed)
    logs.configure("info", "json")
    gateway = await start_gateway(
        await start_backend(), plugins={"tests.keys_plugin": None, "ratelimit": {"max_concurrency": 1}}
    )
    statuses = []
    async with aiohttp.ClientSession() as session:
        for _ in range(3):
            body = {"model": "echo", "messages": [{"role": "user", "content": "hi"}]}
            async with session.post(
                gateway.url + "/v1/chat/completions", json=body, headers={"Authorization": "Bearer ana"}
            ) as response:
                statuses.append(response.status)
    assert statuses == [200, 200, 200]
    assert gateway.state.plugins.pm.get_plugin("ratelimit").running == {}
