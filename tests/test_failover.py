"""Failover before the first byte; the backend's own errors passed on when nothing else can serve."""

from __future__ import annotations

import time

import aiohttp

from tests.conftest import StartBackend, StartGateway, closed_port_url
from tests.fake_backend import FakeBackend

CHAT = {"model": "echo", "messages": [{"role": "user", "content": "hello"}]}


async def _post(url: str, body: dict[str, object] = CHAT) -> tuple[int, dict[str, object], dict[str, str]]:
    async with aiohttp.ClientSession() as session, session.post(url + "/v1/chat/completions", json=body) as response:
        return response.status, await response.json(), dict(response.headers)


def _dead(models: list[str] | None = None) -> FakeBackend:
    return FakeBackend(models=models or ["echo"], url=closed_port_url())


async def test_dead_backend_is_skipped_for_every_request(
    start_backend: StartBackend, start_gateway: StartGateway
) -> None:
    good = await start_backend()
    gateway = await start_gateway(_dead(), good)
    for _ in range(6):
        status, body, headers = await _post(gateway.url)
        assert status == 200, body
        assert headers["X-Multiverse-Backend"] == "b1"
    assert len(good.seen) == 6


async def test_5xx_fails_over_and_the_next_backend_answers(
    start_backend: StartBackend, start_gateway: StartGateway
) -> None:
    broken = await start_backend(mode="error", error_status=502)
    good = await start_backend()
    gateway = await start_gateway(broken, good)
    for _ in range(4):
        status, _, _ = await _post(gateway.url)
        assert status == 200
    assert len(broken.seen) == 2  # round robin put it first every other request
    assert len(good.seen) == 4


async def test_when_every_backend_errors_the_last_error_is_passed_on(
    start_backend: StartBackend, start_gateway: StartGateway
) -> None:
    payload = {"error": {"message": "CUDA out of memory", "type": "server_error"}}
    first = await start_backend(mode="error", error_status=500, error_payload=payload)
    second = await start_backend(mode="error", error_status=500, error_payload=payload)
    gateway = await start_gateway(first, second)
    status, body, _ = await _post(gateway.url)
    assert status == 500
    assert body == payload
    assert len(first.seen) == len(second.seen) == 1


async def test_client_errors_are_passed_on_without_retrying(
    start_backend: StartBackend, start_gateway: StartGateway
) -> None:
    payload = {"error": {"message": "max_tokens is too large", "type": "invalid_request_error"}}
    first = await start_backend(mode="error", error_status=400, error_payload=payload)
    second = await start_backend(mode="error", error_status=400, error_payload=payload)
    gateway = await start_gateway(first, second)
    status, body, _ = await _post(gateway.url)
    assert (status, body) == (400, payload)
    assert len(first.seen) + len(second.seen) == 1


async def test_every_backend_down_fails_fast_with_503_naming_the_model(start_gateway: StartGateway) -> None:
    gateway = await start_gateway(_dead(), _dead())
    started = time.perf_counter()
    status, body, _ = await _post(gateway.url)
    assert time.perf_counter() - started < 2
    assert status == 503
    message = body["error"]["message"]  # type: ignore[index]
    assert "model 'echo'" in message and "b0" in message and "b1" in message


async def test_max_attempts_caps_the_backends_tried(start_backend: StartBackend, start_gateway: StartGateway) -> None:
    good = await start_backend()
    gateway = await start_gateway(_dead(), _dead(), good, routing={"max_attempts": 2})
    statuses = [(await _post(gateway.url))[0] for _ in range(3)]
    # rotation puts the good backend within the first two tries for two of the three requests
    assert sorted(statuses) == [200, 200, 503]


async def test_backend_silent_past_read_timeout_is_failed_over(
    start_backend: StartBackend, start_gateway: StartGateway
) -> None:
    hanging = await start_backend(mode="hang")
    good = await start_backend()
    gateway = await start_gateway(hanging, good, routing={"read_timeout": 0.3})
    started = time.perf_counter()
    status, _, headers = await _post(gateway.url)
    assert status == 200 and headers["X-Multiverse-Backend"] == "b1"
    assert time.perf_counter() - started < 2
