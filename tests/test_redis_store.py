"""The Redis store against a real redis-server: the Store contract, atomic buckets, and two gateways sharing a limit."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from gateway.config import ConfigError
from gateway.redis_store import RedisStore
from gateway.store import MemoryStore, Store
from tests.conftest import StartBackend, StartGateway
from tests.redis_server import redis_url  # noqa: F401  (the fixture)


@pytest.fixture(params=["memory", "redis"])
async def store(request: pytest.FixtureRequest) -> AsyncIterator[Store]:
    made: Store = MemoryStore() if request.param == "memory" else RedisStore(request.getfixturevalue("redis_url"))
    yield made
    await made.close()


async def test_both_stores_keep_the_same_contract(store: Store) -> None:
    assert await store.take("b", 2, rate=10, capacity=2) == 0.0
    assert 0.05 < await store.take("b", 1, rate=10, capacity=2) <= 0.1  # nothing taken
    await asyncio.sleep(0.11)
    assert await store.take("b", 1, rate=10, capacity=2) == 0.0
    assert await store.take("b", -5, rate=10, capacity=2) == 0.0  # a refund never overfills
    assert 1.9 < await store.peek("b", rate=10, capacity=2) <= 2
    assert await store.take("b", 5, rate=10, capacity=2, force=True) == 0.0  # a debt
    assert await store.peek("b", rate=10, capacity=2) < -2.5
    assert await store.take("never", 1, rate=0, capacity=0) == float("inf")
    wait, left = await store.take_level("level", 3, rate=0.001, capacity=10)  # taken: what is left after it
    assert wait == 0.0 and 6.99 < left < 7.01
    wait, left = await store.take_level("level", 8, rate=0.001, capacity=10)  # refused: nothing taken
    assert wait > 900 and 6.99 < left < 7.01 and 6.99 < await store.peek("level", rate=0.001, capacity=10) < 7.01
    slow = (0.001, 10)  # refill a second, capacity: slow enough that the test's own time changes no figure
    wait, left, other_wait, other_left = await store.take_pair("p", 1, *slow, "q", 4, *slow)  # both taken
    assert wait == other_wait == 0.0 and 8.99 < left < 9.01 and 5.99 < other_left < 6.01
    wait, left, other_wait, other_left = await store.take_pair("p", 1, *slow, "q", 7, *slow)  # the other refuses
    assert wait == 0.0 and other_wait > 900 and 8.99 < left < 9.01 and 5.99 < other_left < 6.01  # neither taken
    assert 8.99 < await store.peek("p", *slow) < 9.01
    wait, _, other_wait, _ = await store.take_pair("p", 1, 0, 0, "q", 1, *slow)
    assert wait == float("inf") and other_wait == 0.0 and 5.99 < await store.peek("q", *slow) < 6.01
    assert await store.add("c", 1.5) == 1.5 and await store.add("c", 1) == 2.5
    assert await store.add("t", 1, ttl=0.05) == 1
    await store.set("v", b"\x00bytes", ttl=0.05)
    assert await store.get("v") == b"\x00bytes" and await store.get("absent") is None
    await asyncio.sleep(0.08)
    assert await store.get("v") is None and await store.add("t", 1) == 1
    await store.delete("c")
    assert await store.add("c", 0) == 0


async def test_two_clients_racing_never_take_more_than_the_bucket_holds(redis_url: str) -> None:  # noqa: F811
    one, two = RedisStore(redis_url), RedisStore(redis_url)
    try:
        takes = [s.take("race", 1, rate=0.001, capacity=10) for _ in range(40) for s in (one, two)]
        results = await asyncio.gather(*takes)
    finally:
        await one.close()
        await two.close()
    assert sum(1 for wait in results if wait == 0.0) == 10


async def test_two_clients_racing_for_a_pair_take_both_or_neither_and_never_more(redis_url: str) -> None:  # noqa: F811
    one, two = RedisStore(redis_url), RedisStore(redis_url)
    try:
        pairs = [s.take_pair("rq", 1, 0.001, 10, "tk", 80, 0.001, 1000) for _ in range(40) for s in (one, two)]
        results = await asyncio.gather(*pairs)
        requests_left = await one.peek("rq", rate=0.001, capacity=10)
        tokens_left = await one.peek("tk", rate=0.001, capacity=1000)
        expiries = [await one.client.pttl(key) for key in ("rq", "tk")]  # both buckets expire once full again
        wait, _, other_wait, _ = await one.take_pair("p0", 1, 0.001, 10, "q0", 1, 0, 0)  # the other never refills
    finally:
        await one.close()
        await two.close()
    assert sum(1 for wait, _, other, _ in results if wait == other == 0.0) == 10  # the requests bucket's ten
    assert -0.1 < requests_left < 0.1 and 199 < tokens_left < 201  # ten of each taken: none without the other
    assert all(ttl > 1000 for ttl in expiries)
    assert wait == 0.0 and other_wait == float("inf")


async def test_token_corrections_reach_redis_in_batches_and_at_shutdown(
    redis_url: str,  # noqa: F811
    start_backend: StartBackend,
    start_gateway: StartGateway,
) -> None:
    plugins = {"tests.keys_plugin": None, "ratelimit": {}}
    gateway = await start_gateway(await start_backend(), plugins=plugins, state={"redis": redis_url})
    store = RedisStore(redis_url)
    body = {"model": "echo", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 500}
    try:
        async with aiohttp.ClientSession(headers={"Authorization": "Bearer hal,tpm=1000"}) as session:
            async with session.post(gateway.url + "/v1/chat/completions", json=body) as response:
                assert response.status == 200 and int(response.headers["x-ratelimit-remaining-tokens"]) < 550
            for _ in range(100):  # the answer used 8 tokens: the rest of the estimate comes back in the next batch
                if await store.peek("ratelimit:tokens:key:id-hal", 1000 / 60, 1000) > 990:
                    break
                await asyncio.sleep(0.02)
            assert await store.peek("ratelimit:tokens:key:id-hal", 1000 / 60, 1000) > 990
            ian = {"Authorization": "Bearer ian,tpm=1000"}
            async with session.post(gateway.url + "/v1/chat/completions", json=body, headers=ian) as response:
                assert response.status == 200
        await gateway.server.close()  # at once: the batch still owed is sent before the store closes
        assert await store.peek("ratelimit:tokens:key:id-ian", 1000 / 60, 1000) > 990
    finally:
        await store.close()


async def test_two_gateways_on_one_redis_enforce_one_rpm_limit_between_them(
    redis_url: str,  # noqa: F811
    start_backend: StartBackend,
    start_gateway: StartGateway,
) -> None:
    backend = await start_backend()
    shared: dict[str, Any] = {"state": {"redis": redis_url}, "plugins": {"tests.keys_plugin": None, "ratelimit": {}}}
    first = await start_gateway(backend, **shared)
    second = await start_gateway(backend, **shared)
    statuses = []
    async with aiohttp.ClientSession(headers={"Authorization": "Bearer ivy,rpm=4"}) as session:
        for gateway in (first, second) * 3:
            body = {"model": "echo", "messages": [{"role": "user", "content": "hi"}]}
            async with session.post(gateway.url + "/v1/chat/completions", json=body) as response:
                statuses.append(response.status)
    assert statuses == [200, 200, 200, 200, 429, 429]  # four between them, not four each


async def test_an_unreachable_redis_stops_start_up_with_a_clear_message(start_gateway: StartGateway) -> None:
    with pytest.raises(ConfigError) as refused:
        await start_gateway(state={"redis": "redis://:secret@127.0.0.1:1/0"})
    message = "\n".join(refused.value.problems)
    assert "state.redis: cannot reach Redis at 127.0.0.1:1" in message and "secret" not in message


def test_state_redis_must_be_a_redis_url(gateway_config: Any) -> None:
    with pytest.raises(ConfigError) as refused:
        gateway_config(state={"redis": "localhost:6379"})
    assert "state.redis: must be a Redis URL such as redis://localhost:6379/0" in "\n".join(refused.value.problems)


@pytest.mark.parametrize("where", ["memory", "redis"])
async def test_a_request_refused_for_tokens_takes_nothing_from_either_bucket(
    where: str, request: pytest.FixtureRequest, start_backend: StartBackend, start_gateway: StartGateway
) -> None:
    state = {"redis": request.getfixturevalue("redis_url")} if where == "redis" else {}
    plugins = {"tests.keys_plugin": None, "ratelimit": {}}
    gateway = await start_gateway(await start_backend(), plugins=plugins, state=state)
    store: Store = gateway.state.store
    await store.take("ratelimit:tokens:key:id-fay", 900, rate=1000 / 60, capacity=1000)  # about 100 left
    body = {"model": "echo", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 500}
    async with (
        aiohttp.ClientSession(headers={"Authorization": "Bearer fay,rpm=10,tpm=1000"}) as session,
        session.post(gateway.url + "/v1/chat/completions", json=body) as response,
    ):
        refusal = await response.json()
    assert response.status == 429 and "1000 tokens a minute for key 'fay'" in refusal["error"]["message"]
    assert response.headers["x-ratelimit-remaining-requests"] == "10"  # both buckets or neither: none was taken
    assert 9.9 < await store.peek("ratelimit:requests:key:id-fay", rate=10 / 60, capacity=10) <= 10
    assert await store.peek("ratelimit:tokens:key:id-fay", rate=1000 / 60, capacity=1000) < 150  # no refund of
    # tokens it never took
