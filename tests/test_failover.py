"""Failover before the first byte; the backend's own errors passed on when nothing else can serve."""

from __future__ import annotations

import json
import time
from typing import Any

import aiohttp
import openai
import pytest

from tests.conftest import ADMIN, StartBackend, StartGateway, closed_port_url, eventually
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


async def test_backend_silent_past_ttft_timeout_is_failed_over(
    start_backend: StartBackend, start_gateway: StartGateway
) -> None:
    hanging = await start_backend(mode="hang")
    good = await start_backend()
    gateway = await start_gateway(hanging, good, routing={"ttft_timeout": 0.3})
    started = time.perf_counter()
    status, _, headers = await _post(gateway.url)
    assert status == 200 and headers["X-Multiverse-Backend"] == "b1"
    assert time.perf_counter() - started < 2


# -- retries, timeouts, fallbacks -------------------------------------------------------

OBSERVE = {"tests.observer_plugin": None}


def _observed(gateway: Any) -> list[Any]:
    return gateway.state.plugins.pm.get_plugin("tests.observer_plugin").calls


async def test_429_is_retried_elsewhere_and_its_retry_after_recorded(
    start_backend: StartBackend, start_gateway: StartGateway
) -> None:
    busy = await start_backend(mode="error", error_status=429, error_headers={"Retry-After": "7"})
    good = await start_backend()
    gateway = await start_gateway(busy, good, plugins=OBSERVE)
    status, _, headers = await _post(gateway.url)
    assert status == 200 and headers["X-Multiverse-Backend"] == "b1" and headers["X-Multiverse-Attempts"] == "2"
    (failure,) = _observed(gateway)[0].failures
    assert (failure.backend.name, failure.status, failure.retry_after) == ("b0", 429, 7.0)


@pytest.mark.parametrize(("header", "recorded"), [("inf", 3600.0), ("1e999", 3600.0), ("nan", None), ("-5", 0.0)])
async def test_a_retry_after_out_of_bounds_is_read_within_them(
    start_backend: StartBackend, start_gateway: StartGateway, header: str, recorded: float | None
) -> None:
    """A backend's Retry-After is untrusted: infinite would keep it away for good and is no JSON number."""
    busy = await start_backend(mode="error", error_status=429, error_headers={"Retry-After": header})
    gateway = await start_gateway(busy, await start_backend(), plugins={**OBSERVE, "requestlog": {}})
    status, _, headers = await _post(gateway.url)
    assert status == 200 and headers["X-Multiverse-Attempts"] == "2"
    (failure,) = _observed(gateway)[0].failures
    assert failure.retry_after == recorded
    reply = await gateway.get(f"/admin/requests/{headers['X-Request-ID']}", headers=ADMIN)
    logged = json.loads(reply.body, parse_constant=lambda name: pytest.fail(f"{name} in the request log's JSON"))
    assert logged["attempts"][0]["retry_after"] == recorded


async def test_408_is_retried_and_when_all_are_busy_the_429_is_passed_on(
    start_backend: StartBackend, start_gateway: StartGateway
) -> None:
    timeout = await start_backend(mode="error", error_status=408)
    busy = await start_backend(mode="error", error_status=429, error_headers={"Retry-After": "3"})
    gateway = await start_gateway(timeout, busy)
    status, body, headers = await _post(gateway.url)
    assert status == 429 and headers["Retry-After"] == "3"
    assert "fake failure 429" in body["error"]["message"]
    assert len(timeout.seen) == len(busy.seen) == 1


async def test_slow_first_token_fails_over_before_any_byte(
    start_backend: StartBackend, start_gateway: StartGateway
) -> None:
    slow = await start_backend(first_delay=5, chunks=2)
    fast = await start_backend(chunks=2)
    gateway = await start_gateway(slow, fast, routing={"ttft_timeout": 0.3})
    started = time.perf_counter()
    client = openai.AsyncOpenAI(base_url=gateway.base_url, api_key="x", max_retries=0)
    stream = await client.chat.completions.create(**CHAT, stream=True)
    text = "".join([c.choices[0].delta.content or "" async for c in stream])
    assert text == "w0 w1" and time.perf_counter() - started < 2
    await client.close()


async def test_a_stalled_stream_is_cut_and_counted(start_backend: StartBackend, start_gateway: StartGateway) -> None:
    stalling = await start_backend(chunks=3, delay=30)
    gateway = await start_gateway(stalling, routing={"stall_timeout": 0.3}, plugins=OBSERVE)
    client = openai.AsyncOpenAI(base_url=gateway.base_url, api_key="x", max_retries=0)
    stream = await client.chat.completions.create(**CHAT, stream=True)
    received = []
    started = time.perf_counter()
    with pytest.raises(openai.APIError, match=r"stalled: no chunk for 0\.3s"):
        async for chunk in stream:
            received.append(chunk.choices[0].delta.content)
    assert received == ["w0"] and time.perf_counter() - started < 2
    await eventually(lambda: bool(_observed(gateway)))
    (failure,) = _observed(gateway)[0].failures
    assert failure.mid_stream and failure.backend.name == "b0"
    assert gateway.state.registry.backends["config:b0"].failed == 1
    await eventually(lambda: stalling.cancelled == 1)  # the backend was hung up on
    await client.close()


async def test_per_backend_timeouts_override_the_global_ones(
    start_backend: StartBackend, start_gateway: StartGateway
) -> None:
    hanging, good = await start_backend(mode="hang"), await start_backend()
    backends = [
        {"name": "impatient", "url": hanging.url, "models": ["echo"], "ttft_timeout": 0.2},
        {"name": "good", "url": good.url, "models": ["echo"]},
    ]
    gateway = await start_gateway(backends=backends, routing={"ttft_timeout": 30})
    started = time.perf_counter()
    status, _, headers = await _post(gateway.url)
    assert status == 200 and headers["X-Multiverse-Backend"] == "good"
    assert time.perf_counter() - started < 2


async def test_the_deadline_bounds_all_tries(start_backend: StartBackend, start_gateway: StartGateway) -> None:
    first, second = await start_backend(mode="hang"), await start_backend(mode="hang")
    gateway = await start_gateway(first, second, routing={"deadline": 0.5, "ttft_timeout": 10})
    started = time.perf_counter()
    status, body, _ = await _post(gateway.url)
    elapsed = time.perf_counter() - started
    assert status == 504 and 0.45 < elapsed < 1.5
    message = body["error"]["message"]
    assert "no backend started answering model 'echo' within routing.deadline (0.5s)" in message
    assert body["error"]["code"] == "deadline_exceeded"


async def test_fallback_models_serve_when_the_first_cannot(
    start_backend: StartBackend, start_gateway: StartGateway
) -> None:
    small = await start_backend(models=["small"])
    backends = [
        {"name": "big-box", "url": closed_port_url(), "models": ["big"]},
        {"name": "small-box", "url": small.url, "models": ["small"]},
    ]
    gateway = await start_gateway(
        backends=backends, routing={"fallbacks": {"big": ["medium", "small"], "ghost": ["small"]}}
    )
    client = openai.AsyncOpenAI(base_url=gateway.base_url, api_key="x", max_retries=0)
    raw = await client.chat.completions.with_raw_response.create(model="big", messages=CHAT["messages"])
    answer = raw.parse()
    assert answer.model == "small" and answer.choices[0].message.content == "hello"
    assert raw.headers["X-Multiverse-Model"] == "small" and raw.headers["X-Multiverse-Attempts"] == "2"
    assert json.loads(small.seen[-1].body)["model"] == "small"
    # a model no backend serves at all falls back too
    assert (await client.chat.completions.create(model="ghost", messages=CHAT["messages"])).model == "small"
    await client.close()


async def test_a_backend_key_is_sent_to_that_backend_only(
    start_backend: StartBackend, start_gateway: StartGateway
) -> None:
    keyed = await start_backend()
    backends = [{"name": "keyed", "url": keyed.url, "models": ["echo"], "api_key": "sk-backend-only"}]
    gateway = await start_gateway(backends=backends)
    async with aiohttp.ClientSession() as session:
        headers = {"Authorization": "Bearer sk-client"}
        async with session.post(gateway.base_url + "/chat/completions", json=CHAT, headers=headers) as response:
            assert response.status == 200
        async with session.get(gateway.url + "/admin/servers", headers=ADMIN) as response:
            listed = await response.text()
    assert keyed.seen[-1].headers["Authorization"] == "Bearer sk-backend-only"
    assert "sk-backend-only" not in listed and '"has_api_key": true' in listed


async def test_a_body_that_is_not_json_is_failed_over(start_backend: StartBackend, start_gateway: StartGateway) -> None:
    garbage, truncated, good = (
        await start_backend(mode="garbage"),
        await start_backend(mode="truncated"),
        await start_backend(),
    )
    gateway = await start_gateway(garbage, truncated, good)
    status, body, headers = await _post(gateway.url)
    assert (
        status == 200
        and headers["X-Multiverse-Backend"] == "b2"
        and body["choices"][0]["message"]["content"] == "hello"
    )
    alone = await start_gateway(garbage, truncated)
    status, body, _ = await _post(alone.url)
    assert status == 502 and body["error"]["code"] == "bad_backend_response"
    assert "b0: answered HTTP 200 with a body that is not JSON" in body["error"]["message"]
    assert "b1: answered HTTP 200 with a body that is not JSON" in body["error"]["message"]
