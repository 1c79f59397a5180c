"""Issue 7 §3: what a backend sends is untrusted, what a client sends is bounded, logs tell the truth."""

from __future__ import annotations

import asyncio
import gzip
import json
from collections.abc import Iterator
from typing import Any

import aiohttp
import pytest
import structlog
from aiohttp import web

from gateway import logs
from tests.conftest import ADMIN, StartBackend, StartGateway, closed_port_url
from tests.fake_backend import FakeBackend
from tests.test_response_path import CHAT, post, raw_backend

COMPLETION = {"id": "c1", "object": "chat.completion", "model": "echo", "choices": []}


async def _redirect(request: web.Request) -> web.Response:
    await request.read()
    return web.Response(status=307, headers={"Location": "http://elsewhere.example/v1/chat/completions"})


async def test_a_backend_redirect_is_a_failed_attempt_never_passed_on(
    aiohttp_server: Any, start_backend: StartBackend, start_gateway: StartGateway
) -> None:
    redirecting = await raw_backend(aiohttp_server, _redirect)
    gateway = await start_gateway(redirecting, await start_backend())
    status, body, headers = await post(gateway.base_url + "/chat/completions")
    assert status == 200 and headers["X-Multiverse-Backend"] == "b1" and body["object"] == "chat.completion"
    alone = await start_gateway(redirecting)
    status, body, headers = await post(alone.base_url + "/chat/completions", allow_redirects=False)
    assert status == 502 and "Location" not in headers
    assert "redirect" in body["error"]["message"] and "elsewhere" not in body["error"]["message"]


async def _huge(request: web.Request) -> web.Response:
    await request.read()
    return web.json_response({**COMPLETION, "padding": "x" * 300_000})


async def test_a_non_stream_answer_over_the_size_limit_is_a_502_and_the_next_backend_is_tried(
    aiohttp_server: Any, start_backend: StartBackend, start_gateway: StartGateway
) -> None:
    huge = await raw_backend(aiohttp_server, _huge)
    limit = {"max_response_bytes": 100_000}
    gateway = await start_gateway(huge, await start_backend(), routing=limit)
    status, _, headers = await post(gateway.base_url + "/chat/completions")
    assert status == 200 and headers["X-Multiverse-Backend"] == "b1" and headers["X-Multiverse-Attempts"] == "2"
    alone = await start_gateway(huge, routing=limit)
    status, body, _ = await post(alone.base_url + "/chat/completions")
    assert status == 502 and "b0" in body["error"]["message"] and "max_response_bytes" in body["error"]["message"]


async def test_client_strings_are_bounded_in_errors_and_logs(
    start_backend: StartBackend, start_gateway: StartGateway
) -> None:
    gateway = await start_gateway(await start_backend(), server={"max_body_bytes": 16 * 1024 * 1024})
    status, body, _ = await post(gateway.base_url + "/chat/completions", {**CHAT, "model": "m" * 300})
    assert status == 400 and body["error"]["param"] == "model" and "256" in body["error"]["message"]
    with structlog.testing.capture_logs() as captured:
        status, text, _ = await post(gateway.base_url + "/chat/completions", {**CHAT, "model": "m" * 8_000_000})
    assert status == 400 and len(json.dumps(text)) < 1000
    assert captured and all(len(repr(e)) < 2000 for e in captured)


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/route/explain"])
async def test_json_nested_too_deep_is_a_400_in_the_envelope(
    path: str, start_backend: StartBackend, start_gateway: StartGateway
) -> None:
    gateway = await start_gateway(await start_backend())
    deep = b'{"model": "echo", "messages": [], "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    status, body, _ = await post(gateway.url + path, None, data=deep, headers={"Content-Type": "application/json"})
    assert status == 400 and body["error"]["type"] == "invalid_request_error" and "nested" in body["error"]["message"]


async def test_backends_are_asked_for_identity_and_get_a_gzip_body_decoded(
    start_backend: StartBackend, start_gateway: StartGateway
) -> None:
    backend = await start_backend()
    gateway = await start_gateway(backend)
    status, _, _ = await post(gateway.base_url + "/chat/completions", headers={"Accept-Encoding": "gzip"})
    assert status == 200 and backend.seen[-1].headers["Accept-Encoding"] == "identity"
    packed = gzip.compress(json.dumps(CHAT).encode())
    gzipped = {"Content-Encoding": "gzip", "Content-Type": "application/json"}
    status, _, _ = await post(gateway.base_url + "/chat/completions", None, data=packed, headers=gzipped)
    assert status == 200 and json.loads(backend.seen[-1].body) == CHAT
    assert "Content-Encoding" not in backend.seen[-1].headers
    status, body, _ = await post(gateway.base_url + "/chat/completions", None, data=b"not gzip", headers=gzipped)
    assert status == 400 and body["error"]["type"] == "invalid_request_error" and "gzip" in body["error"]["message"]
    assert len(backend.seen) == 2


async def _html(request: web.Request) -> web.Response:
    await request.read()
    return web.Response(text="<html>login to the tunnel</html>", content_type="text/html")


async def test_a_stream_request_answered_with_html_fails_over(
    aiohttp_server: Any, start_backend: StartBackend, start_gateway: StartGateway
) -> None:
    html = await raw_backend(aiohttp_server, _html)
    gateway = await start_gateway(html, await start_backend())
    status, text, headers = await post(gateway.base_url + "/chat/completions", {**CHAT, "stream": True})
    assert status == 200 and headers["Content-Type"] == "text/event-stream" and headers["X-Multiverse-Backend"] == "b1"
    assert text.endswith("data: [DONE]\n\n")
    alone = await start_gateway(html)
    status, body, _ = await post(alone.base_url + "/chat/completions", {**CHAT, "stream": True})
    assert status == 502 and "text/html" in body["error"]["message"]


async def _trickle(request: web.Request) -> web.StreamResponse:
    await request.read()
    response = web.StreamResponse(headers={"Content-Type": "application/json"})
    await response.prepare(request)
    body = json.dumps(COMPLETION).encode()
    step = len(body) // 8 + 1
    for i in range(0, len(body), step):
        await response.write(body[i : i + step])
        await asyncio.sleep(0.2)
    await response.write_eof()
    return response


async def test_stall_timeout_is_silence_between_bytes_for_a_whole_body_too(
    aiohttp_server: Any, start_gateway: StartGateway
) -> None:
    gateway = await start_gateway(await raw_backend(aiohttp_server, _trickle), routing={"stall_timeout": 0.5})
    status, body, _ = await post(gateway.base_url + "/chat/completions")
    assert status == 200 and body == COMPLETION  # ~1.6 s in all, never 0.5 s silent


async def test_clients_see_backend_names_never_addresses(
    start_backend: StartBackend, start_gateway: StartGateway
) -> None:
    dead = FakeBackend(url=closed_port_url())
    gateway = await start_gateway(dead, await start_backend())
    status, _, headers = await post(gateway.base_url + "/chat/completions")
    assert status == 200 and headers["X-Multiverse-Backend"] == "b1"
    status, explained, _ = await post(gateway.url + "/v1/route/explain")
    assert status == 200 and "b0" in json.dumps(explained)
    alone = await start_gateway(dead)
    status, body, _ = await post(alone.base_url + "/chat/completions")
    assert status == 503 and "b0" in body["error"]["message"] and "refused" in body["error"]["message"]
    for seen in (body, explained, dict(headers)):
        assert "127.0.0.1" not in json.dumps(seen)


# -- §3.13 logs ------------------------------------------------------------------------------------


@pytest.fixture
def json_logs() -> Iterator[None]:
    yield
    structlog.reset_defaults()


def test_token_counts_are_logged_and_secrets_are_not(json_logs: None, capsys: pytest.CaptureFixture[str]) -> None:
    logs.configure("info", "json")
    usage = {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}
    logs.get_logger("test").info(
        "request", usage=usage, max_tokens=64, prompt_tokens=7, token="t-1", admin_token="t-2", api_key="k", secret="s"
    )
    line = json.loads(capsys.readouterr().out)
    assert line["usage"] == usage and (line["max_tokens"], line["prompt_tokens"]) == (64, 7)
    assert {line[k] for k in ("token", "admin_token", "api_key", "secret")} == {"[redacted]"}


async def test_failures_are_logged_at_warning_with_their_cause_and_reach_the_backends_last_error(
    start_backend: StartBackend, start_gateway: StartGateway
) -> None:
    dying = await start_backend(mode="die_after", die_after=2, chunks=6)
    gateway = await start_gateway(dying)
    with structlog.testing.capture_logs() as captured:
        status, text, _ = await post(gateway.base_url + "/chat/completions", {**CHAT, "stream": True})
        assert status == 200 and "event: error" in text
        dying.mode = "error"
        status, _, _ = await post(gateway.base_url + "/chat/completions")
        assert status == 500
    broken_stream, passed_on = [e for e in captured if e["event"] == "request"]
    assert broken_stream["log_level"] == "warning" and "mid-stream" in broken_stream["error"]
    assert passed_on["log_level"] == "warning" and "HTTP 500" in passed_on["error"]
    async with aiohttp.ClientSession() as session, session.get(gateway.url + "/admin/servers", headers=ADMIN) as r:
        (server,) = (await r.json())["servers"]
    assert server["last_error"] == "HTTP 500"


async def _endless_event(request: web.Request) -> web.StreamResponse:
    """A hostile backend: one SSE event that never ends, 64 KB at a time."""
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    await response.write(b"data: ")
    for _ in range(64):  # 4 MiB in all, never a blank line
        await response.write(b"x" * 65536)
    await response.write_eof()
    return response


async def test_an_sse_event_that_never_ends_is_cut_at_a_bound(aiohttp_server: Any, start_gateway: StartGateway) -> None:
    """When the gateway holds back partial events (a chunk filter, here usage's), a backend must not make it
    buffer and rescan an endless one: before, the CPU and memory grew with the square of its size."""
    backend = await raw_backend(aiohttp_server, _endless_event)
    gateway = await start_gateway(backend, plugins={"usage": {}, "tests.observer_plugin": None})
    status, text, _ = await post(gateway.base_url + "/chat/completions", {**CHAT, "stream": True})
    assert status == 200 and "event: error" in text and "xxxx" not in text
    call = gateway.state.plugins.pm.get_plugin("tests.observer_plugin").calls[-1]
    assert "SSE event over 1048576 bytes" in (call.error or "")
    assert call.attempts[-1].outcome == "stalled"


async def test_usage_a_backend_makes_up_is_not_taken(aiohttp_server: Any, start_gateway: StartGateway) -> None:
    """A student's backend reporting negative tokens must not lower anyone's spend: such usage is ignored."""

    async def lying(request: web.Request) -> web.Response:
        usage = {"prompt_tokens": -10_000_000, "completion_tokens": 3, "total_tokens": -9_999_997}
        return web.json_response({"id": "c", "object": "chat.completion", "choices": [], "usage": usage})

    gateway = await start_gateway(await raw_backend(aiohttp_server, lying), plugins={"tests.observer_plugin": None})
    status, _, _ = await post(gateway.base_url + "/chat/completions")
    assert status == 200
    assert gateway.state.plugins.pm.get_plugin("tests.observer_plugin").calls[-1].usage is None


def _answer_with_usage(counts: dict[str, Any]) -> Any:
    async def answer(request: web.Request) -> web.Response:
        body = await request.json()
        usage = counts if body["messages"][0]["content"] == "lie" else {"prompt_tokens": 2, "completion_tokens": 1}
        return web.json_response({**COMPLETION, "usage": {**usage, "total_tokens": sum(usage.values())}})

    return answer


async def test_token_counts_no_answer_has_are_not_taken_and_cost_nobody_their_usage_rows(
    aiohttp_server: Any, start_gateway: StartGateway
) -> None:
    """A backend answering 10**30 prompt tokens made usage's whole batch fail to bind (SQLite's integers end at
    2**63): every other request of that flush went unrecorded. Counts past 2**32 are not taken, like negative ones."""
    backend = await raw_backend(aiohttp_server, _answer_with_usage({"prompt_tokens": 10**30, "completion_tokens": 3}))
    gateway = await start_gateway(backend, plugins={"usage": {"flush_interval": 60}})
    for content in ("hello", "lie", "hello"):
        status, _, _ = await post(gateway.base_url + "/chat/completions", {**CHAT, "messages": [
            {"role": "user", "content": content}]})  # fmt: skip
        assert status == 200
    async with (
        aiohttp.ClientSession() as session,
        session.get(gateway.url + "/admin/usage", params={"group_by": "model"}, headers=ADMIN) as response,
    ):
        assert response.status == 200
        [echo] = (await response.json())["data"]
    assert (echo["requests"], echo["estimated_requests"]) == (3, 1)  # the made-up one counted from its text
    assert echo["prompt_tokens"] < 100


async def test_a_backends_made_up_token_count_holds_a_key_back_a_minute_at_most(
    aiohttp_server: Any, start_gateway: StartGateway
) -> None:
    """A count within bounds but absurd (10**9 tokens) would leave the key a debt of ~10**9 tokens: refused for
    months by the backend's word. One answer's correction is at most the key's tpm: a minute's worth."""
    backend = await raw_backend(aiohttp_server, _answer_with_usage({"prompt_tokens": 10**9, "completion_tokens": 3}))
    gateway = await start_gateway(backend, plugins={"tests.keys_plugin": None, "ratelimit": {}})
    headers = {"Authorization": "Bearer ivy,tpm=6000"}
    lie = {**CHAT, "messages": [{"role": "user", "content": "lie"}], "max_tokens": 10}
    assert (await post(gateway.base_url + "/chat/completions", lie, headers=headers))[0] == 200
    url = gateway.base_url + "/chat/completions"
    status, body, answer = await post(url, {**CHAT, "max_tokens": 10}, headers=headers)
    assert status == 429 and body["error"]["code"] == "rate_limit_exceeded"  # the answer's tokens were taken...
    assert int(answer["Retry-After"]) <= 61  # ...up to a minute of them (6,000), not 10**9 at 100 a second
    level = await gateway.state.store.peek("ratelimit:tokens:key:id-ivy", rate=100, capacity=6000)
    assert -6000 < level < 0
