"""Fair sharing of a busy backend: per-key queues in turn, priority, max_queue_wait, hang-ups while queued."""

from __future__ import annotations

import asyncio
import statistics
from typing import Any

import aiohttp
import pytest

from bench.bench_fairness import MODEL, serial_backend, waits_of_the_quiet_key
from plugins.fair_share import FairQueue, Waiter
from tests.conftest import ADMIN, RunningGateway, StartGateway, eventually

SERVICE = 0.05


async def _one_slot_gateway(aiohttp_server: Any, start_gateway: StartGateway, **ratelimit: Any) -> RunningGateway:
    backend = await aiohttp_server(serial_backend(SERVICE))
    url = str(backend.make_url("")).rstrip("/")
    plugins: dict[str, Any] = {"tests.keys_plugin": None}
    if ratelimit.pop("enabled", True):
        plugins["ratelimit"] = ratelimit
    backends = [{"name": "one-slot", "url": url, "models": [MODEL], "max_concurrency": 1}]
    return await start_gateway(backends=backends, plugins=plugins)


async def _post(url: str, key: str) -> tuple[int, dict[str, Any], Any]:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{url}/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"}) as r,
    ):
        return r.status, await r.json(), r.headers


async def test_a_quiet_key_waits_at_most_two_service_times_behind_a_flood(
    aiohttp_server: Any, start_gateway: StartGateway
) -> None:
    fair = await _one_slot_gateway(aiohttp_server, start_gateway)
    waits = await waits_of_the_quiet_key(fair.url, SERVICE, requests=8, flood=20)
    assert statistics.median(waits) <= 2 * SERVICE, waits
    fifo = await _one_slot_gateway(aiohttp_server, start_gateway, enabled=False)
    waits = await waits_of_the_quiet_key(fifo.url, SERVICE, requests=2, flood=20)
    assert statistics.median(waits) > 10 * SERVICE, waits  # behind the flood's backlog


async def test_a_client_that_hangs_up_while_queued_leaves_the_queue_at_once(
    aiohttp_server: Any, start_gateway: StartGateway
) -> None:
    gateway = await _one_slot_gateway(aiohttp_server, start_gateway)
    plugin = gateway.state.plugins.pm.get_plugin("ratelimit")
    busy = asyncio.create_task(_post(gateway.url, "ann"))
    await eventually(lambda: gateway.state.registry.for_model(MODEL)[0].in_flight == 1)
    queued = asyncio.create_task(_post(gateway.url, "ben,max_concurrency=5"))  # a cap: its calls are counted
    await eventually(lambda: len(plugin.queue) == 1 and plugin.running.get("key:id-ben") == 1)
    queued.cancel()
    await eventually(lambda: len(plugin.queue) == 0 and not plugin.running.get("key:id-ben"), timeout=0.2)
    assert (await busy)[0] == 200
    assert not any(plugin.held.values())


async def test_a_request_waiting_longer_than_max_queue_wait_gets_429_with_retry_after(
    aiohttp_server: Any, start_gateway: StartGateway
) -> None:
    gateway = await _one_slot_gateway(aiohttp_server, start_gateway, max_queue_wait=0.02)
    results = await asyncio.gather(*[_post(gateway.url, "cat") for _ in range(3)])
    refused = [(body, headers) for status, body, headers in results if status == 429]
    assert refused and len(refused) < 3
    body, headers = refused[0]
    assert body["error"]["code"] == "queue_timeout" and headers["Retry-After"] == "5"
    assert "every backend serving it is at its max_concurrency" in body["error"]["message"]


async def test_a_high_priority_key_is_served_before_waiting_keys(
    aiohttp_server: Any, start_gateway: StartGateway
) -> None:
    gateway = await _one_slot_gateway(aiohttp_server, start_gateway)
    plugin = gateway.state.plugins.pm.get_plugin("ratelimit")
    finished: list[str] = []

    async def send(key: str) -> None:
        assert (await _post(gateway.url, key))[0] == 200
        finished.append(key.split(",")[0])

    tasks = [asyncio.create_task(send("dan"))]
    await eventually(lambda: gateway.state.registry.for_model(MODEL)[0].in_flight == 1)
    tasks += [asyncio.create_task(send(name)) for name in ("eve", "fay")]
    await eventually(lambda: len(plugin.queue) == 2)
    tasks.append(asyncio.create_task(send("teacher,priority=high")))
    await asyncio.gather(*tasks)
    assert finished[:2] == ["dan", "teacher"]


async def test_keys_take_turns_and_an_idle_key_keeps_its_place() -> None:
    queue, order = FairQueue(), []
    waiters = [Waiter(key, MODEL) for key in ("a", "a", "a", "b", "c")]
    for waiter in waiters:
        queue.add(waiter)
    slots = 4

    def admit(waiter: Waiter) -> bool:
        nonlocal slots
        if not slots:
            return False
        slots -= 1
        order.append(waiter.key)
        return True

    assert queue.dispatch(admit) == 4 and order == ["a", "b", "c", "a"]
    late = Waiter("b", MODEL)  # b's queue was empty, but its turn has not passed: it is next
    queue.add(late)
    slots = 1
    assert queue.dispatch(admit) == 1 and order[-1] == "b" and len(queue) == 1
    queue.remove(waiters[2])
    assert len(queue) == 0
    with pytest.raises(asyncio.InvalidStateError):
        waiters[2].future.result()  # never admitted


async def test_a_key_whose_only_waiter_gave_up_keeps_no_place_once_nobody_waits() -> None:
    queue, order = FairQueue(), []
    gave_up = Waiter("a", MODEL)
    queue.add(gave_up)
    queue.remove(gave_up)  # timed out or hung up, and no dispatch since: the queue is empty
    queue.add(Waiter("b", MODEL))
    queue.add(Waiter("a", MODEL))

    def admit_one(waiter: Waiter) -> bool:
        if order:
            return False
        order.append(waiter.key)
        return True

    assert queue.dispatch(admit_one) == 1 and order == ["b"]  # b came first; a's old place is gone


async def test_a_waiter_that_gave_up_is_never_admitted_and_leaks_no_slot() -> None:
    """A queued request cancelled between its future's cancellation and its cleanup (a hang-up, a timeout)
    must not be handed a slot: before, dispatch reserved one for it and then raised InvalidStateError."""
    queue, reserved = FairQueue(), []
    gone, next_one = Waiter("a", "m"), Waiter("b", "m")
    queue.add(gone)
    queue.add(next_one)
    gone.future.cancel()  # what cancelling the waiting task does to the future it awaits

    def admit(waiter: Waiter) -> bool:
        reserved.append(waiter.key)
        return True

    assert queue.dispatch(admit) == 1
    assert reserved == ["b"] and next_one.future.done() and len(queue) == 0


async def test_a_request_queued_by_a_client_that_hung_up_frees_its_place_for_the_next(
    aiohttp_server: Any, start_gateway: StartGateway
) -> None:
    gateway = await _one_slot_gateway(aiohttp_server, start_gateway, max_queue_wait=10)
    plugin = gateway.state.plugins.pm.get_plugin("ratelimit")
    one_slot = gateway.state.registry.backends["config:one-slot"]
    busy = asyncio.create_task(_post(gateway.url, "flood"))
    await eventually(lambda: one_slot.in_flight == 1)
    impatient = [asyncio.create_task(_post(gateway.url, f"gone{i}")) for i in range(3)]
    await eventually(lambda: len(plugin.queue) == 3)
    for task in impatient:  # three clients hang up while queued
        task.cancel()
    await asyncio.gather(*impatient, return_exceptions=True)
    await busy
    status, _, _ = await asyncio.wait_for(_post(gateway.url, "next"), timeout=5)
    assert status == 200 and len(plugin.queue) == 0
    await eventually(lambda: sum(plugin.held.values()) == 0 and one_slot.in_flight == 0)


async def test_a_backend_registered_with_max_concurrency_after_start_up_is_queued_for(
    aiohttp_server: Any, start_gateway: StartGateway
) -> None:
    """Slots are kept for backends that declare a limit, whenever they arrive: a gateway that started with no
    limited backend (and so had no slot to keep per request) queues for one registered later."""
    backend = await aiohttp_server(serial_backend(SERVICE))
    gateway = await start_gateway(
        backends=[], plugins={"tests.keys_plugin": None, "ratelimit": {"max_queue_wait": 0.02}}
    )
    assert not gateway.state.registry.any_limited
    registration = {"endpoint_url": str(backend.make_url("")).rstrip("/"), "model_name": MODEL, "max_concurrency": 1}
    reply = await gateway.post("/admin/register", registration, headers=ADMIN)
    assert reply.status == 201, reply.body
    results = await asyncio.gather(*[_post(gateway.url, "dan") for _ in range(3)])
    assert [body["error"]["code"] for status, body, _ in results if status == 429] != []
    assert all(body["error"]["code"] == "queue_timeout" for status, body, _ in results if status == 429)


async def test_a_waiting_request_takes_a_slot_that_frees_up_without_an_answer_ending(
    aiohttp_server: Any, start_gateway: StartGateway
) -> None:
    """Slots also appear when no answer ends (here a backend registered while a request waits): the queue looks
    for them every 0.1 s while anyone waits, and keeps no timer when nobody does."""
    slow = await aiohttp_server(serial_backend(1.0))
    backends = [{"name": "slow", "url": str(slow.make_url("")).rstrip("/"), "models": [MODEL], "max_concurrency": 1}]
    gateway = await start_gateway(
        backends=backends, plugins={"tests.keys_plugin": None, "ratelimit": {"max_queue_wait": 10}}
    )
    plugin = gateway.state.plugins.pm.get_plugin("ratelimit")

    def looking() -> bool:
        return any(task.get_name() == "ratelimit" for task in gateway.state.tasks)

    assert not looking()
    busy = asyncio.create_task(_post(gateway.url, "ann"))
    await eventually(lambda: gateway.state.registry.backends["config:slow"].in_flight == 1)
    queued = asyncio.create_task(_post(gateway.url, "ben"))
    await eventually(lambda: len(plugin.queue) == 1 and looking())
    fast = await aiohttp_server(serial_backend(SERVICE))
    registration = {"endpoint_url": str(fast.make_url("")).rstrip("/"), "model_name": MODEL, "max_concurrency": 1}
    reply = await gateway.post("/admin/register", registration, headers=ADMIN)
    assert reply.status == 201, reply.body
    status, _, _ = await asyncio.wait_for(queued, timeout=0.6)  # the slow backend's answer takes 1 s
    assert status == 200 and not busy.done()
    await eventually(lambda: not looking(), timeout=0.5)
    assert (await busy)[0] == 200
