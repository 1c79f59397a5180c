"""The reliability promise under injected faults: if a healthy backend can serve, the request
succeeds; if none can, a clear error comes fast. Real processes, real signals."""

from __future__ import annotations

import asyncio
import signal
import time
from typing import Any

import aiohttp

from tests.faults.conftest import ADMIN, CHAT, FIGURES, BackendProc, Outcome, free_port, load, record


async def test_one_of_three_killed_under_load_loses_nothing(lab: Any) -> None:
    backends = await lab.backends(3, latency=0.02)
    gateway = await lab.gateway(backends)
    running = asyncio.create_task(load(gateway.url, count=600, concurrency=8))
    await asyncio.sleep(0.4)
    backends[1].kill()
    outcome = await running
    record("1. one of three backends killed (SIGKILL) under load", outcome)
    assert outcome.failed == 0, outcome.errors[:3]
    killed = (await gateway.servers())["b1"]
    FIGURES["passive detection: failed tries before the killed backend's circuit opened"] = str(
        killed["requests_failed"]
    )
    assert killed["notes"]["circuit"]["chat/completions"]["state"] in ("open", "half_open")


async def test_all_killed_every_request_fails_fast_naming_the_model(lab: Any) -> None:
    backends = await lab.backends(2)
    gateway = await lab.gateway(backends)
    for backend in backends:
        backend.kill()
    outcome = await load(gateway.url, count=100, concurrency=4)
    record("2. all backends killed", outcome)
    assert set(outcome.statuses) == {503}
    assert all("'echo'" in message for message in outcome.errors)
    assert outcome.p99 < 3.0  # routing.deadline


async def test_paused_mid_stream_the_stall_timeout_ends_it(lab: Any) -> None:
    backend = await lab.backend(chunks=50, delay=0.1)
    gateway = await lab.gateway([backend])
    started = time.perf_counter()
    received, error = [], None
    stream = {**CHAT, "stream": True}
    async with (
        aiohttp.ClientSession() as session,
        session.post(gateway.url + "/v1/chat/completions", json=stream) as response,
    ):
        async for line in response.content:
            if line.startswith(b'data: {"id"') and not received:
                backend.signal(signal.SIGSTOP)
            if line.startswith(b"data: "):
                received.append(line)
            if line.startswith(b"event: error"):
                error = line
    elapsed = time.perf_counter() - started
    backend.signal(signal.SIGCONT)
    assert error is not None and b"stalled" in received[-1]
    assert elapsed < 1 + 1.5  # stall_timeout plus slack
    circuit = (await gateway.servers())["b0"]["notes"]["circuit"]["chat/completions"]
    assert circuit["state"] == "open" and "stalled" in circuit["reason"]
    record("3. backend paused (SIGSTOP) mid-stream", Outcome([502], [elapsed], ["stream ended with an error event"]))


async def test_restart_on_a_new_url_with_put_moves_traffic(lab: Any) -> None:
    first, second = await lab.backends(2, latency=0.01)
    gateway = await lab.gateway([])
    ids = []
    async with aiohttp.ClientSession(headers=ADMIN) as session:
        for backend in (first, second):
            async with session.post(
                gateway.url + "/admin/register", json={"endpoint_url": backend.url, "model_name": "echo"}
            ) as r:
                ids.append((await r.json())["registration_id"])
        running = asyncio.create_task(load(gateway.url, seconds=2.5, concurrency=6))
        await asyncio.sleep(0.5)
        moved = await BackendProc(free_port()).start(latency=0.01)
        lab.adopt(moved)
        async with session.put(f"{gateway.url}/admin/register/{ids[0]}", json={"endpoint_url": moved.url}) as r:
            assert r.status == 200
        first.kill()
        outcome = await running
    record("4. backend restarts on a new URL, re-registers with PUT", outcome)
    assert outcome.failed == 0, outcome.errors[:3]
    after = await load(gateway.url, count=60, concurrency=4)  # traffic has moved, whatever the timing under load
    assert after.failed == 0, after.errors[:3]
    assert (await moved.control())["seen"] >= 20


async def test_a_flapping_backend_costs_no_request(lab: Any) -> None:
    steady, flapping = await lab.backends(2, latency=0.01)
    gateway = await lab.gateway([steady, flapping])

    async def flap() -> None:
        for _ in range(2):
            await asyncio.sleep(1)
            flapping.kill()
            await asyncio.sleep(1)
            await flapping.start(latency=0.01)

    flapper = asyncio.create_task(flap())
    outcome = await load(gateway.url, seconds=4.5, concurrency=6)
    await flapper
    record("5. flapping backend (up 1 s, down 1 s)", outcome)
    assert outcome.failed == 0, outcome.errors[:3]


async def test_429_with_retry_after_is_honoured(lab: Any) -> None:
    busy = await lab.backend(mode="error", error_status=429, error_headers={"Retry-After": "2"})
    other = await lab.backend(latency=0.01)
    gateway = await lab.gateway([busy, other])
    outcome = await load(gateway.url, seconds=3, concurrency=4)
    record("6. 429 with Retry-After: 2", outcome)
    assert outcome.failed == 0
    seen_by_busy = (await busy.control())["seen"]
    assert seen_by_busy <= 4 + 2, f"{seen_by_busy} requests reached the busy backend in 3 s"
    assert (await other.control())["seen"] > 50


async def test_garbage_answers_give_a_clear_502(lab: Any) -> None:
    backend = await lab.backend(mode="garbage")
    gateway = await lab.gateway([backend], max_attempts=1)
    garbage = await load(gateway.url, count=20, concurrency=2)
    await backend.control(mode="truncated")
    await asyncio.sleep(1.1)  # the circuit's cool-down
    truncated = await load(gateway.url, count=1, concurrency=1)
    for outcome in (garbage, truncated):
        assert outcome.statuses[0] == 502
        assert "b0: answered HTTP 200 with a body that is not JSON" in outcome.errors[0]
    record("7. backend answers non-JSON / truncated JSON", garbage)
    await backend.control(mode="ok")
    await asyncio.sleep(1.1)
    assert (await load(gateway.url, count=5, concurrency=1)).failed == 0  # and the gateway is fine


async def test_detection_and_recovery_times(lab: Any) -> None:
    backend = await lab.backend()
    gateway = await lab.gateway([backend])

    async def wait_status(wanted: str) -> float:
        started = time.monotonic()
        while (await gateway.servers())["b0"]["status"] != wanted:
            await asyncio.sleep(0.02)
        return time.monotonic() - started

    await wait_status("healthy")
    backend.kill()
    detected = await wait_status("unhealthy")
    await asyncio.sleep(2)  # let the probe back off
    await backend.start()
    recovered = await wait_status("healthy")
    FIGURES["active detection: seconds from SIGKILL to unhealthy (interval 0.5 s, unhealthy_after 2)"] = (
        f"{detected:.2f}"
    )
    FIGURES["recovery: seconds from restart to healthy (probe backoff capped at 2 s)"] = f"{recovered:.2f}"
    # unhealthy_after 2: two failed probes, each due an interval after the last one ended and allowed
    # its 0.5 s timeout, so up to 2 x (0.5 + 0.5) s by design, plus polling and a loaded machine's slack
    assert detected < 2.5 and recovered < 2.5
