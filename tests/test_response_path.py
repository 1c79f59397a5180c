"""Issue 7 §1: every outcome recorded right (status, attempts, usage), one response per request,
and observers that never hold up the client."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import structlog
from aiohttp import web

from tests.conftest import ADMIN, StartBackend, StartGateway, closed_port_url, eventually
from tests.fake_backend import FakeBackend
from tests.test_plugins import write_plugin

CHAT = {"model": "echo", "messages": [{"role": "user", "content": "hello there"}]}
OBSERVE = {"tests.observer_plugin": None}
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


async def raw_backend(aiohttp_server: Any, handler: Handler, models: list[str] | None = None) -> FakeBackend:
    """A backend that answers every request with ``handler``: for shapes the fake cannot take."""
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    server = await aiohttp_server(app)
    return FakeBackend(models=models or ["echo"], url=str(server.make_url("")).rstrip("/"))


async def post(url: str, body: Any = CHAT, **kwargs: Any) -> tuple[int, Any, Any]:
    """POST to the gateway; (status, JSON or text, headers)."""
    async with aiohttp.ClientSession() as session, session.post(url, json=body, **kwargs) as response:
        text = await response.text()
        try:
            return response.status, json.loads(text), response.headers
        except ValueError:
            return response.status, text, response.headers


def observed(gateway: Any) -> list[Any]:
    return gateway.state.plugins.pm.get_plugin("tests.observer_plugin").calls


async def raw_exchange(url: str, path: str, body: bytes) -> bytes:
    """One request on a raw socket, read to the end: every byte the gateway sent, status lines included."""
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(
        f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
        + body
    )
    await writer.drain()
    data = await asyncio.wait_for(reader.read(-1), 5)
    writer.close()
    return data


# -- §1.1 the status the client got ------------------------------------------------------------


@pytest.mark.parametrize("status", [500, 429])
async def test_a_passed_on_backend_error_is_recorded_as_its_status(
    status: int, start_backend: StartBackend, start_gateway: StartGateway
) -> None:
    backend = await start_backend(mode="error", error_status=status)
    gateway = await start_gateway(backend, plugins=OBSERVE)
    with structlog.testing.capture_logs() as logs:
        got, body, _ = await post(gateway.base_url + "/chat/completions")
    assert got == status and f"fake failure {status}" in body["error"]["message"]
    (line,) = [e for e in logs if e["event"] == "request"]
    assert line["status"] == status and line["log_level"] == "warning"
    assert observed(gateway)[-1].status == status
    async with aiohttp.ClientSession() as session, session.get(gateway.url + "/admin/stats", headers=ADMIN) as r:
        stats = await r.json()
    assert stats["requests"] == {"total": 1, "failed": 1}


# -- §1.2 one response, whatever fails after it started ------------------------------------------

RAISING_REPLAY = """
from gateway import hookimpl
from gateway.pump import ChunkSource

async def chunks():
    yield b'data: {"choices":[{"index":0,"delta":{"content":"half"}}]}\\n\\n'
    raise RuntimeError("the cache entry is corrupt")

class Plugin:
    @hookimpl
    async def answer_request(self, call):
        return ChunkSource(chunks())
"""


async def test_a_replay_that_raises_mid_way_ends_its_one_response_with_an_error_event(
    tmp_path: Path, start_backend: StartBackend, start_gateway: StartGateway
) -> None:
    path = write_plugin(tmp_path, RAISING_REPLAY)
    gateway = await start_gateway(await start_backend(), plugins={path: None, **OBSERVE})
    with structlog.testing.capture_logs() as logs:
        raw = await raw_exchange(gateway.url, "/v1/chat/completions", json.dumps({**CHAT, "stream": True}).encode())
        await eventually(lambda: bool(observed(gateway)))
    assert raw.count(b"HTTP/1.1 ") == 1 and raw.startswith(b"HTTP/1.1 200")
    assert b'"content":"half"' in raw
    event = raw[raw.index(b"event: error") :]
    error = json.loads(event.split(b"data: ", 1)[1].split(b"\n", 1)[0])["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "server_error"
    (crash,) = [e for e in logs if e["event"] == "request_crashed"]
    assert crash["plugin"] == path and crash["log_level"] == "error"
    call = observed(gateway)[-1]
    assert call.status == 200 and "the cache entry is corrupt" in call.error


# -- §1.3 request_complete always fires, after the client has its answer --------------------------

WAITING_OBSERVER = """
import asyncio
from gateway import hookimpl

class Plugin:
    def __init__(self):
        self.release = None
        self.done = []

    @hookimpl
    async def request_complete(self, call):
        self.release = self.release or asyncio.Event()
        await self.release.wait()
        self.done.append((call.endpoint, call.status))
"""


@pytest.mark.parametrize(
    ("path", "body", "status"),
    [
        ("/v1/chat/completions", b"{not json", 400),
        ("/v1/route/explain", json.dumps(CHAT).encode(), 200),
        ("/v1/chat/completions", json.dumps(CHAT).encode(), 200),
    ],
)
async def test_request_complete_fires_for_every_request_and_never_holds_up_the_client(
    path: str, body: bytes, status: int, tmp_path: Path, start_backend: StartBackend, start_gateway: StartGateway
) -> None:
    plugin_path = write_plugin(tmp_path, WAITING_OBSERVER)
    gateway = await start_gateway(await start_backend(), plugins={plugin_path: None})
    plugin = gateway.state.plugins.pm.get_plugin(plugin_path)
    async with aiohttp.ClientSession() as session:
        sending = session.post(gateway.url + path, data=body, headers={"Content-Type": "application/json"})
        async with await asyncio.wait_for(sending, 2) as response:
            answer = await asyncio.wait_for(response.read(), 2)
            assert response.status == status, answer
            assert json.loads(answer)
    assert plugin.done == []  # the observer is still waiting, and the client has its whole answer
    await eventually(lambda: plugin.release is not None, timeout=2)
    plugin.release.set()
    await eventually(lambda: len(plugin.done) == 1, timeout=2)
    assert plugin.done[0][1] == status


# -- §1.4 attempts ---------------------------------------------------------------------------------


async def test_each_attempt_of_a_failed_over_call_has_its_outcome(
    aiohttp_server: Any, start_backend: StartBackend, start_gateway: StartGateway
) -> None:
    dead = FakeBackend(url=closed_port_url())
    hanging = await start_backend(mode="hang")
    broken = await start_backend(mode="error", error_status=500)
    garbage = await start_backend(mode="garbage")
    good = await start_backend()
    gateway = await start_gateway(
        dead, hanging, broken, garbage, good, plugins=OBSERVE, routing={"max_attempts": 5, "ttft_timeout": 0.3}
    )
    status, _, headers = await post(gateway.base_url + "/chat/completions")
    assert status == 200 and headers["X-Multiverse-Attempts"] == "5"
    attempts = observed(gateway)[-1].attempts
    assert [(a.backend.name, a.outcome) for a in attempts] == [
        ("b0", "connect_error"),
        ("b1", "timeout"),
        ("b2", "http_error"),
        ("b3", "bad_answer"),
        ("b4", "ok"),
    ]
    assert [a.status for a in attempts] == [None, None, 500, 200, 200]
    assert all(a.ended is not None and a.ended >= a.started for a in attempts)
    assert "127.0.0.1" not in (attempts[0].reason or "x127.0.0.1")


async def test_a_stream_that_dies_mid_way_is_a_stalled_attempt(
    start_backend: StartBackend, start_gateway: StartGateway
) -> None:
    dying = await start_backend(mode="die_after", die_after=2, chunks=6)
    gateway = await start_gateway(dying, plugins=OBSERVE)
    status, text, _ = await post(gateway.base_url + "/chat/completions", {**CHAT, "stream": True})
    assert status == 200 and "event: error" in text
    (attempt,) = observed(gateway)[-1].attempts
    assert (attempt.outcome, attempt.mid_stream, attempt.first_byte is not None) == ("stalled", True, True)


async def test_a_client_that_hangs_up_mid_stream_leaves_a_client_gone_attempt(
    start_backend: StartBackend, start_gateway: StartGateway
) -> None:
    slow = await start_backend(chunks=50, delay=0.05)
    gateway = await start_gateway(slow, plugins=OBSERVE)
    async with (
        aiohttp.ClientSession() as session,
        session.post(gateway.base_url + "/chat/completions", json={**CHAT, "stream": True}) as response,
    ):
        assert b"data: " in await response.content.readany()
    await eventually(lambda: bool(observed(gateway)), timeout=3)
    call = observed(gateway)[-1]
    (attempt,) = call.attempts
    assert attempt.outcome == "client_gone" and not attempt.failed
    assert call.client_disconnected and call.error is None


async def test_least_latency_times_each_attempt_from_when_it_was_tried(
    start_backend: StartBackend, start_gateway: StartGateway
) -> None:
    hanging, fast = await start_backend(mode="hang"), await start_backend()
    gateway = await start_gateway(
        hanging,
        fast,
        plugins={"least_latency": {"explore": 0}, **OBSERVE},
        routing={"strategy": "least_latency", "ttft_timeout": 0.4},
    )
    status, _, headers = await post(gateway.base_url + "/chat/completions")
    assert status == 200 and headers["X-Multiverse-Attempts"] == "2"  # b0 timed out first
    strategy = gateway.state.plugins.strategy
    fast_id = observed(gateway)[-1].attempts[1].backend.id
    assert strategy.per_kb[fast_id] < 0.1  # measured from call start it would be over 0.4 / 0.3 KB


async def test_a_half_open_trial_whose_client_hangs_up_does_not_close_the_circuit(
    start_backend: StartBackend, start_gateway: StartGateway
) -> None:
    hung = await start_backend(mode="hang")
    gateway = await start_gateway(
        hung,
        plugins={"circuit_breaker": {"consecutive_failures": 1, "cooldown": 0.1}, **OBSERVE},
        routing={"ttft_timeout": 0.3},
    )
    status, _, _ = await post(gateway.base_url + "/chat/completions")
    assert status == 503
    breaker = gateway.state.plugins.pm.get_plugin("circuit_breaker")
    (circuit,) = breaker.circuits.values()
    assert circuit.state == "open"
    await asyncio.sleep(0.15)  # cooled down: the next request is the trial
    with pytest.raises(asyncio.TimeoutError):
        await asyncio.wait_for(post(gateway.base_url + "/chat/completions"), 0.1)
    await eventually(lambda: len(observed(gateway)) == 2, timeout=2)
    assert observed(gateway)[-1].attempts[0].outcome == "client_gone"
    assert circuit.state != "closed" and circuit.trial is None


# -- §1.5 usage ----------------------------------------------------------------------------------

USAGE = {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}


async def _usage_stream(request: web.Request) -> web.StreamResponse:
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    delta = {"id": "c1", "object": "chat.completion.chunk", "model": "echo"}
    await response.write(
        b"data: " + json.dumps({**delta, "choices": [{"index": 0, "delta": {"content": "hi"}}]}).encode()
    )
    await response.write(b"\n\n")
    await response.write(b"data: " + json.dumps({**delta, "choices": [], "usage": USAGE}).encode() + b"\n\n")
    await response.write(b"data: [DONE]\n\n")
    return response


async def test_usage_is_read_from_a_body_and_from_a_streams_last_chunk(
    aiohttp_server: Any, start_backend: StartBackend, start_gateway: StartGateway
) -> None:
    gateway = await start_gateway(await start_backend(), plugins=OBSERVE)
    with structlog.testing.capture_logs() as logs:
        status, body, _ = await post(gateway.base_url + "/chat/completions")
    assert status == 200 and observed(gateway)[-1].usage == body["usage"] and body["usage"]["total_tokens"] > 0
    (line,) = [e for e in logs if e["event"] == "request"]
    assert (line["prompt_tokens"], line["completion_tokens"]) == (
        body["usage"]["prompt_tokens"],
        body["usage"]["completion_tokens"],
    )
    streaming = await raw_backend(aiohttp_server, _usage_stream)
    gateway = await start_gateway(streaming, plugins=OBSERVE)
    request = {**CHAT, "stream": True, "stream_options": {"include_usage": True}}
    status, text, _ = await post(gateway.base_url + "/chat/completions", request)
    assert status == 200 and text.endswith("data: [DONE]\n\n")
    assert observed(gateway)[-1].usage == USAGE
