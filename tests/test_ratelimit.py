"""The ratelimit plugin: requests and tokens a minute, concurrency caps, headers, through the real openai SDK."""

from __future__ import annotations

import asyncio
import sqlite3
from typing import Any

import aiohttp
import openai
import pytest

from gateway.store import MemoryStore
from plugins._buckets import Bucket, settle, settle_pair
from tests.conftest import ADMIN_KEY, RunningGateway, StartBackend, StartGateway, eventually
from tests.test_auth import issue

KEYS = "tests.keys_plugin"
MESSAGES = [{"role": "user", "content": "the quick brown fox"}]


async def _gateway(start_backend: StartBackend, start_gateway: StartGateway, **options: Any) -> RunningGateway:
    backend = await start_backend(latency=options.pop("latency", 0.0))
    return await start_gateway(backend, plugins={KEYS: None, "ratelimit": options})


def _client(gateway: RunningGateway, key: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=gateway.base_url, api_key=key, max_retries=0)


async def _chat(url: str, key: str, **extra: Any) -> tuple[int, dict[str, Any], Any]:
    headers = {"Authorization": f"Bearer {key}"}
    body = {"model": "echo", "messages": MESSAGES, **extra}
    async with (
        aiohttp.ClientSession() as session,
        session.post(url + "/v1/chat/completions", json=body, headers=headers) as response,
    ):
        return response.status, await response.json(), response.headers


async def test_over_its_rpm_a_key_gets_the_sdks_rate_limit_error_with_retry_after(
    start_backend: StartBackend, start_gateway: StartGateway
) -> None:
    gateway = await _gateway(start_backend, start_gateway)
    async with _client(gateway, "alice,rpm=2") as client, _client(gateway, "bob,rpm=2") as other:
        await _rpm_limit(client, other)


async def _rpm_limit(client: openai.AsyncOpenAI, other: openai.AsyncOpenAI) -> None:
    first = await client.chat.completions.with_raw_response.create(model="echo", messages=MESSAGES)
    assert first.headers["x-ratelimit-limit-requests"] == "2"
    assert first.headers["x-ratelimit-remaining-requests"] == "1"
    assert first.headers["x-ratelimit-reset-requests"].endswith("s")  # 30s until full again
    await client.chat.completions.create(model="echo", messages=MESSAGES)
    with pytest.raises(openai.RateLimitError) as refused:
        await client.chat.completions.create(model="echo", messages=MESSAGES)
    assert "rate limit: 2 requests a minute for key 'alice'; retry in 30 s" in str(refused.value)
    assert refused.value.code == "rate_limit_exceeded"
    headers = refused.value.response.headers
    assert headers["retry-after"] == "30" and headers["x-ratelimit-remaining-requests"] == "0"
    # one key's limit is not another's
    assert (await other.chat.completions.create(model="echo", messages=MESSAGES)).choices


async def test_the_sdk_waits_for_retry_after_and_then_succeeds(
    start_backend: StartBackend, start_gateway: StartGateway
) -> None:
    gateway = await _gateway(start_backend, start_gateway)
    for _ in range(60):  # the whole minute's burst; then one request a second
        await _chat(gateway.url, "carol,rpm=60")
    started = asyncio.get_running_loop().time()
    async with openai.AsyncOpenAI(base_url=gateway.base_url, api_key="carol,rpm=60", max_retries=1) as client:
        retried = await client.chat.completions.with_raw_response.create(model="echo", messages=MESSAGES)
    waited = asyncio.get_running_loop().time() - started
    assert retried.retries_taken == 1 and 0.9 <= waited < 3  # it honoured "Retry-After: 1"


async def test_option_defaults_cover_keys_without_limits_and_anonymous_callers_by_address(
    start_backend: StartBackend, start_gateway: StartGateway
) -> None:
    gateway = await _gateway(start_backend, start_gateway, rpm=3, anonymous_rpm=1)
    statuses = [(await _chat(gateway.url, "anonymous"))[0] for _ in range(2)]
    assert statuses == [200, 429]
    status, body, headers = await _chat(gateway.url, "anonymous")
    assert status == 429 and "anonymous client 127.0.0.1" in body["error"]["message"] and headers["Retry-After"] == "60"
    statuses = [(await _chat(gateway.url, "dave"))[0] for _ in range(4)]
    assert statuses == [200, 200, 200, 429]


async def test_tokens_are_estimated_up_front_and_corrected_with_the_real_usage(
    start_backend: StartBackend, start_gateway: StartGateway
) -> None:
    gateway = await _gateway(start_backend, start_gateway)
    status, _, headers = await _chat(gateway.url, "erin,tpm=1000", max_tokens=500)
    assert status == 200 and headers["x-ratelimit-limit-tokens"] == "1000"
    estimated = 1000 - int(headers["x-ratelimit-remaining-tokens"])
    assert 520 < estimated < 560  # max_tokens plus the body's length / 4
    store: MemoryStore = gateway.state.store  # type: ignore[assignment]
    left = await store.peek("ratelimit:tokens:key:id-erin", rate=1000 / 60, capacity=1000)
    assert 990 < left <= 1000  # the answer used 8 tokens: the rest of the estimate came back
    status, body, _ = await _chat(gateway.url, "erin,tpm=1000", max_tokens=5000)
    assert status == 429 and body["error"]["code"] == "request_too_large"
    assert "lower max_tokens" in body["error"]["message"]


async def test_a_refusal_by_either_limit_carries_the_headers_of_both(
    start_backend: StartBackend, start_gateway: StartGateway
) -> None:
    gateway = await _gateway(start_backend, start_gateway)
    assert (await _chat(gateway.url, "gus,rpm=1,tpm=100000"))[0] == 200
    status, body, headers = await _chat(gateway.url, "gus,rpm=1,tpm=100000")  # its one request a minute is used
    assert status == 429 and "1 requests a minute" in body["error"]["message"]
    assert headers["x-ratelimit-remaining-requests"] == "0" and headers["x-ratelimit-limit-tokens"] == "100000"
    assert 99_000 < int(headers["x-ratelimit-remaining-tokens"]) <= 100_000
    assert headers["x-ratelimit-reset-tokens"].endswith("ms")  # the first answer's tokens: back within a second


async def test_a_request_its_tokens_refuse_costs_none_of_its_requests(
    start_backend: StartBackend, start_gateway: StartGateway
) -> None:
    gateway = await _gateway(start_backend, start_gateway)
    store: MemoryStore = gateway.state.store  # type: ignore[assignment]
    store.take_now("ratelimit:tokens:key:id-fay", 900, 1000 / 60, 1000)  # another gateway's worth: 100 left
    status, body, headers = await _chat(gateway.url, "fay,rpm=2,tpm=1000", max_tokens=500)
    assert status == 429 and body["error"]["code"] == "rate_limit_exceeded"
    assert "tokens a minute" in body["error"]["message"]
    assert headers["x-ratelimit-remaining-requests"] == "2" and int(headers["Retry-After"]) >= 20  # ~425 more at 16.7/s
    assert await store.peek("ratelimit:requests:key:id-fay", rate=2 / 60, capacity=2) == pytest.approx(2, abs=0.01)
    assert [(await _chat(gateway.url, "fay,rpm=2,tpm=1000"))[0] for _ in range(2)] == [429, 429]  # still no tokens
    assert await store.peek("ratelimit:requests:key:id-fay", rate=2 / 60, capacity=2) == pytest.approx(2, abs=0.01)


async def test_an_underestimate_becomes_a_debt_the_next_request_waits_for() -> None:
    store = MemoryStore()
    assert await store.take("t", 90, rate=1, capacity=100) == 0.0
    assert await store.take("t", 50, rate=1, capacity=100, force=True) == 0.0  # the real cost was higher
    assert await store.peek("t", rate=1, capacity=100) < -39
    assert await store.take("t", 1, rate=1, capacity=100) > 40


async def test_a_keys_concurrency_cap_is_released_after_errors_and_hang_ups(
    start_backend: StartBackend, start_gateway: StartGateway
) -> None:
    gateway = await _gateway(start_backend, start_gateway, latency=0.3)
    key = "frank,max_concurrency=1"
    first = asyncio.create_task(_chat(gateway.url, key))
    await eventually(lambda: gateway.state.registry.for_model("echo")[0].in_flight == 1)
    status, body, headers = await _chat(gateway.url, key)
    assert status == 429 and "at most 1 requests at once for key 'frank'" in body["error"]["message"]
    assert headers["Retry-After"] == "1"
    assert (await first)[0] == 200
    hung_up = asyncio.create_task(_chat(gateway.url, key))
    await eventually(lambda: gateway.state.registry.for_model("echo")[0].in_flight == 1)
    hung_up.cancel()  # the client hangs up mid-request
    plugin = gateway.state.plugins.pm.get_plugin("ratelimit")
    await eventually(lambda: not plugin.running, timeout=1)
    assert (await _chat(gateway.url, key))[0] == 200


async def test_a_refusal_by_a_later_plugin_releases_the_key_slot(
    start_backend: StartBackend, start_gateway: StartGateway, tmp_path: Any
) -> None:
    refuse = tmp_path / "refuse.py"
    refuse.write_text(
        "from gateway import hookimpl\nfrom gateway.errors import GatewayError\n"
        "@hookimpl\ndef before_request(call):\n    raise GatewayError(403, 'no')\n"
    )
    backend = await start_backend()
    gateway = await start_gateway(backend, plugins={KEYS: None, "ratelimit": {}, str(refuse): None})
    for _ in range(3):
        assert (await _chat(gateway.url, "gina,max_concurrency=1"))[0] == 403
    assert not gateway.state.plugins.pm.get_plugin("ratelimit").running


async def test_explain_takes_nothing(start_backend: StartBackend, start_gateway: StartGateway) -> None:
    gateway = await _gateway(start_backend, start_gateway)
    headers = {"Authorization": "Bearer hal,rpm=1"}
    async with aiohttp.ClientSession() as session:
        for _ in range(3):
            body = {"model": "echo", "messages": MESSAGES}
            async with session.post(gateway.url + "/v1/route/explain", json=body, headers=headers) as response:
                assert response.status == 200
    assert (await _chat(gateway.url, "hal,rpm=1"))[0] == 200


async def test_a_keys_limits_are_kept_while_its_identity_lasts_and_redone_when_it_changes(
    start_backend: StartBackend, start_gateway: StartGateway
) -> None:
    """The real auth plugin hands out one Identity per key until the keys table changes; ratelimit works a key's
    limits out once for it, and again for the new one (here an rpm raised in the database)."""
    gateway = await start_gateway(
        await start_backend(), plugins={"auth": {"refresh_interval": 0.1}, "ratelimit": {"max_queue_wait": 1}}
    )
    created = await issue(gateway, name="ana", role="user", rpm=2)
    statuses = [(await _chat(gateway.url, created["key"]))[0] for _ in range(3)]
    assert statuses == [200, 200, 429]
    database = sqlite3.connect(gateway.state.config.database_path)
    try:
        database.execute("UPDATE auth_keys SET rpm = 100 WHERE id = ?", (created["id"],))
        database.commit()
    finally:
        database.close()

    for _ in range(30):  # auth reloads the table within 0.1 s
        await asyncio.sleep(0.1)
        status, _, headers = await _chat(gateway.url, created["key"])
        if status == 200:
            break
    assert status == 200 and headers["x-ratelimit-limit-requests"] == "100"
    # a bound on the estimate: a max_tokens past any float counts as too large, never as a hook's failure
    status, refused, _ = await _chat(gateway.url, ADMIN_KEY, max_tokens=10**400)
    assert status == 200  # the admin key has no tpm: nothing to estimate
    big = await issue(gateway, name="bo", role="user", tpm=1000)
    status, refused, _ = await _chat(gateway.url, big["key"], max_tokens=10**400)
    assert status == 429 and refused["error"]["code"] == "request_too_large", refused


def test_settle_writes_the_reset_openai_clients_read() -> None:
    """Seconds until the bucket is full again, rounded to the millisecond as before the Bucket refactor
    (1000 of 64000 tokens a minute: 0.9375 s, 938ms; the rate's division alone rounded to 937ms)."""
    headers: dict[str, str] = {}
    settle(Bucket.of("tokens", "key:k", 64_000, "key 'k'"), 1000.0, 0.0, 63_000.0, headers)
    assert headers == {
        "x-ratelimit-limit-tokens": "64000",
        "x-ratelimit-remaining-tokens": "63000",
        "x-ratelimit-reset-tokens": "938ms",
    }


def test_settle_pair_writes_for_both_buckets_what_settle_writes_for_each() -> None:
    """The pair's granted path sets the six headers itself (no call a bucket): the same text as settle's."""
    requests, tokens = Bucket.of("requests", "key:k", 60, "key 'k'"), Bucket.of("tokens", "key:k", 64_000, "key 'k'")
    for left, tokens_left in ((59.0, 63_000.0), (0.4, 12.7), (60.0, 64_000.0), (1.0, 0.0)):
        paired: dict[str, str] = {}
        settle_pair(requests, tokens, 1000.0, (0.0, left, 0.0, tokens_left), paired)
        each: dict[str, str] = {}
        settle(requests, 1.0, 0.0, left, each)
        settle(tokens, 1000.0, 0.0, tokens_left, each)
        assert paired == each and len(paired) == 6, (left, tokens_left)
