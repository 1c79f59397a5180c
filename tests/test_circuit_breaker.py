"""Passive health: real failures open a backend's circuit; a trial request closes it."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp

from tests.conftest import ADMIN, StartBackend, StartGateway

CHAT = {"model": "echo", "messages": [{"role": "user", "content": "hi"}]}


async def _send(gateway: Any, n: int = 1) -> list[tuple[int, str | None]]:
    out = []
    async with aiohttp.ClientSession() as session:
        for _ in range(n):
            async with session.post(gateway.base_url + "/chat/completions", json=CHAT) as response:
                await response.read()
                out.append((response.status, response.headers.get("X-Multiverse-Backend")))
    return out


def _circuit(gateway: Any, name: str) -> dict[str, Any]:
    return gateway.state.registry.backends[f"config:{name}"].notes.get("circuit", {}).get("chat/completions", {})


async def test_failures_in_a_row_open_the_circuit_and_a_trial_closes_it(
    start_backend: StartBackend, start_gateway: StartGateway
) -> None:
    flaky, steady = await start_backend(mode="error", error_status=500), await start_backend()
    options = {"consecutive_failures": 2, "cooldown": 0.3}
    gateway = await start_gateway(flaky, steady, plugins={"circuit_breaker": options})
    assert {s for s, _ in await _send(gateway, 6)} == {200}  # every request served despite b0
    assert len(flaky.seen) == 2, "the circuit should open after two failures"
    assert _circuit(gateway, "b0")["state"] == "open"
    assert "2 failures in a row, last: HTTP 500" in _circuit(gateway, "b0")["reason"]
    async with aiohttp.ClientSession() as session, session.get(gateway.url + "/admin/servers", headers=ADMIN) as r:
        shown = {s["name"]: s["notes"] for s in (await r.json())["servers"]}
    assert shown["b0"]["circuit"]["chat/completions"]["state"] == "open" and shown["b1"] == {}

    flaky.mode = "ok"  # it recovers; after the cool-down one trial request goes to it
    await asyncio.sleep(0.35)
    served_by = [b for _, b in await _send(gateway, 4)]
    assert "b0" in served_by and _circuit(gateway, "b0")["state"] == "closed"


async def test_a_failed_trial_opens_the_circuit_again(start_backend: StartBackend, start_gateway: StartGateway) -> None:
    flaky, steady = await start_backend(mode="error", error_status=503), await start_backend()
    gateway = await start_gateway(
        flaky, steady, plugins={"circuit_breaker": {"consecutive_failures": 1, "cooldown": 0.2}}
    )
    await _send(gateway, 2)
    assert len(flaky.seen) == 1
    await asyncio.sleep(0.25)
    assert {s for s, _ in await _send(gateway, 4)} == {200}
    assert len(flaky.seen) == 2  # exactly one trial
    assert _circuit(gateway, "b0")["state"] == "open"
    assert _circuit(gateway, "b0")["reason"].startswith("trial request failed: HTTP 503")


async def test_the_error_ratio_opens_the_circuit(start_backend: StartBackend, start_gateway: StartGateway) -> None:
    backend = await start_backend()
    options = {"consecutive_failures": 100, "error_ratio": 0.5, "window": 4, "min_requests": 4}
    gateway = await start_gateway(backend, plugins={"circuit_breaker": options}, routing={"max_attempts": 1})
    statuses = []
    for mode in ("ok", "error", "ok", "error"):
        backend.mode = mode
        statuses += [s for s, _ in await _send(gateway)]
    assert statuses == [200, 500, 200, 500]
    assert _circuit(gateway, "b0")["reason"].startswith("2 of the last 4 requests failed")
    backend.mode = "ok"
    (refused,) = await _send(gateway)
    assert refused[0] == 503 and len(backend.seen) == 4


async def test_retry_after_keeps_traffic_away_for_that_long(
    start_backend: StartBackend, start_gateway: StartGateway
) -> None:
    busy = await start_backend(mode="error", error_status=429, error_headers={"Retry-After": "1"})
    other = await start_backend()
    gateway = await start_gateway(busy, other, plugins={"circuit_breaker": {"consecutive_failures": 1}})
    assert {s for s, _ in await _send(gateway, 6)} == {200}
    assert len(busy.seen) == 1 and _circuit(gateway, "b0") == {}  # skipped, not counted as broken
    busy.mode = "ok"
    await asyncio.sleep(1.05)
    assert "b0" in [b for _, b in await _send(gateway, 2)]
