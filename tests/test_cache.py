"""The cache plugin: exact-match hits, streams replayed event for event, what is never cached, LRU and store."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import aiohttp
import openai
import orjson
import pytest
from aiohttp.test_utils import make_mocked_request

from gateway.call import Call
from gateway.store import MemoryStore
from plugins._cache_entries import Entry, MemoryLRU
from plugins.cache import _canonical, stored_key
from tests.conftest import StartBackend, StartGateway

IDENTITY = "tests.bearer_identity"
ASK: dict[str, Any] = {
    "model": "echo",
    "messages": [{"role": "user", "content": "the same question"}],
    "temperature": 0,
}


def client(gateway: Any, key: str = "alice") -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=gateway.base_url, api_key=key, max_retries=0)


async def ask(gateway: Any, key: str = "alice", headers: dict[str, str] | None = None, **body: Any) -> tuple[str, str]:
    """(the answer's text, its X-Multiverse-Cache header)."""
    raw = await client(gateway, key).chat.completions.with_raw_response.create(
        **{**ASK, **body}, extra_headers=headers or {}
    )
    answer = raw.parse()
    return answer.choices[0].message.content or "", raw.headers["X-Multiverse-Cache"]


async def test_a_second_identical_deterministic_request_is_a_hit_and_the_backend_is_not_called(
    start_backend: StartBackend, start_gateway: StartGateway
) -> None:
    backend = await start_backend()
    gateway = await start_gateway(backend, plugins={"cache": {}})
    first, second = await ask(gateway), await ask(gateway)
    assert first == ("the same question", "miss") and second == ("the same question", "hit")
    assert len(backend.seen) == 1
    assert await ask(gateway, user="someone else") == ("the same question", "hit")  # 'user' is not in the key
    assert (await ask(gateway, temperature=0.5))[1] == "bypass"  # not deterministic
    assert (await ask(gateway, temperature=0.5, seed=7))[1] == "miss"  # a seed makes it so
    assert len(backend.seen) == 3


async def test_a_stream_hit_replays_the_same_events(start_backend: StartBackend, start_gateway: StartGateway) -> None:
    backend = await start_backend(chunks=5)
    gateway = await start_gateway(backend, plugins={"cache": {}, "usage": {}})

    async def raw_stream() -> tuple[bytes, str]:
        async with (
            aiohttp.ClientSession() as session,
            session.post(gateway.base_url + "/chat/completions", json={**ASK, "stream": True}) as response,
        ):
            return await response.read(), response.headers["X-Multiverse-Cache"]

    (live, first), (replayed, second) = await raw_stream(), await raw_stream()
    assert (first, second) == ("miss", "hit") and replayed == live and len(backend.seen) == 1

    sdk_live = await client(gateway).chat.completions.create(**ASK, stream=True, seed=1)
    live_chunks = [c.model_dump() async for c in sdk_live]
    sdk_hit = await client(gateway).chat.completions.create(**ASK, stream=True, seed=1)
    assert [c.model_dump() async for c in sdk_hit] == live_chunks and len(backend.seen) == 2
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in live_chunks) == "w0 w1 w2 w3 w4"
    assert all(c["usage"] is None for c in live_chunks)  # the usage event the usage plugin asked for stays hidden


async def test_a_stream_cut_mid_way_is_never_cached(start_backend: StartBackend, start_gateway: StartGateway) -> None:
    backend = await start_backend(chunks=5, mode="die_after", die_after=2)
    gateway = await start_gateway(backend, plugins={"cache": {}})
    with pytest.raises(openai.APIError):
        async for _ in await client(gateway).chat.completions.create(**ASK, stream=True):
            pass
    backend.mode = "ok"
    raw = await client(gateway).chat.completions.with_raw_response.create(**ASK, stream=True)
    assert raw.headers["X-Multiverse-Cache"] == "miss"
    assert len([c async for c in raw.parse()]) > 0 and len(backend.seen) == 2
    assert (await ask(gateway, stream=False))[1] == "miss"  # a stream's entry never answers a plain request


async def test_no_cache_bypasses_and_refreshes_no_store_leaves_it_alone(
    start_backend: StartBackend, start_gateway: StartGateway
) -> None:
    backend = await start_backend()
    gateway = await start_gateway(backend, plugins={"cache": {}})
    assert (await ask(gateway, headers={"Cache-Control": "no-store"}))[1] == "bypass"
    assert (await ask(gateway))[1] == "miss"  # no-store kept nothing
    assert (await ask(gateway, headers={"Cache-Control": "no-cache"}))[1] == "bypass"
    assert (await ask(gateway))[1] == "hit"
    assert len(backend.seen) == 3


async def test_per_key_keeps_each_keys_answers_apart(start_backend: StartBackend, start_gateway: StartGateway) -> None:
    backend = await start_backend()
    gateway = await start_gateway(backend, plugins={IDENTITY: {}, "cache": {"per_key": True}})
    assert [(await ask(gateway, key))[1] for key in ("alice", "bob", "alice", "bob")] == ["miss", "miss", "hit", "hit"]
    assert len(backend.seen) == 2


async def test_the_store_backend_keeps_answers_in_gateway_store(
    start_backend: StartBackend, start_gateway: StartGateway
) -> None:
    backend = await start_backend(chunks=3)
    gateway = await start_gateway(backend, plugins={"cache": {"backend": "store", "ttl": 60}})
    assert isinstance(gateway.state.store, MemoryStore)
    assert [(await ask(gateway))[1] for _ in range(2)] == ["miss", "hit"]
    sdk = await client(gateway).chat.completions.create(**ASK, stream=True)
    live = [c.model_dump() async for c in sdk]
    sdk = await client(gateway).chat.completions.create(**ASK, stream=True)
    assert [c.model_dump() async for c in sdk] == live and len(backend.seen) == 2
    plugin = gateway.state.plugins.pm.get_plugin("cache")
    assert len(plugin.memory) == 0 and len(gateway.state.store._values) == 2  # type: ignore[attr-defined]


async def test_a_hit_is_recorded_in_usage_with_its_tokens_and_no_cost(
    start_backend: StartBackend, start_gateway: StartGateway
) -> None:
    prices = {"echo": {"cost_per_1k_prompt_tokens": 1.0, "cost_per_second": 10.0}}
    gateway = await start_gateway(
        await start_backend(), plugins={IDENTITY: {}, "cache": {}, "usage": {}}, models=prices
    )
    await ask(gateway), await ask(gateway)
    plugin = gateway.state.plugins.pm.get_plugin("usage")
    await plugin.flush()
    async with gateway.state.registry.db.execute(
        "SELECT cache_hit, prompt_tokens, cost, backend, backend_seconds FROM usage_requests ORDER BY id"
    ) as cursor:
        miss, hit = [tuple(r) for r in await cursor.fetchall()]
    assert miss[0] == 0 and miss[2] > 3 / 1000 and miss[3] == "b0" and miss[4] > 0
    assert hit == (1, 3, 0.0, None, 0.0)


async def test_the_same_request_with_its_fields_in_another_order_is_a_hit(
    start_backend: StartBackend, start_gateway: StartGateway
) -> None:
    backend = await start_backend()
    gateway = await start_gateway(backend, plugins={"cache": {}})
    asked = {"model": "echo", "temperature": 0, "messages": [{"role": "user", "content": "ordre ✓"}]}
    shuffled = {"messages": [{"content": "ordre ✓", "role": "user"}], "temperature": 0, "model": "echo"}
    async with aiohttp.ClientSession() as session:
        answers = []
        for body in (asked, shuffled, {**asked, "max_tokens": 5}):
            async with session.post(f"{gateway.base_url}/chat/completions", json=body) as response:
                answers.append(response.headers["X-Multiverse-Cache"])
    assert answers == ["miss", "hit", "miss"]  # another field is another request
    assert len(backend.seen) == 2


def test_the_canonical_text_is_sorted_compact_json_of_any_request() -> None:
    value = ["chat/completions", "k1", {"z": [1.5, True, {"b": 'é\n"', "a": -0.0}], "m": "✓"}]
    shuffled = ["chat/completions", "k1", {"m": "✓", "z": [1.5, True, {"a": -0.0, "b": 'é\n"'}]}]
    text = '["chat/completions","k1",{"m":"✓","z":[1.5,true,{"a":-0.0,"b":"é\\n\\""}]}]'.encode()
    assert _canonical(value) == _canonical(shuffled) == text  # orjson's
    # what orjson refuses (an integer past 64 bits, a lone surrogate) gets json's text, marked apart
    big = ["chat/completions", "k1", {"a": 10**30}]
    assert _canonical(big) == b'json:["chat/completions","k1",{"a":1000000000000000000000000000000}]'
    assert _canonical(["x", {"a": "\ud800"}]) == b'json:["x",{"a":"\xed\xa0\x80"}]'
    # orjson writes NaN and infinity as null: a text with null is json's, where they differ
    assert _canonical([None, 1]) == b"json:[null,1]"
    texts = {_canonical([x]) for x in (None, float("nan"), float("inf"), float("-inf"), json.loads("1e999"))}
    assert texts == {b"json:[null]", b"json:[NaN]", b"json:[Infinity]", b"json:[-Infinity]"}


async def test_a_request_with_nan_or_infinity_is_not_answered_with_the_one_with_null(
    start_backend: StartBackend, start_gateway: StartGateway
) -> None:
    backend = await start_backend(models=["echo"])
    gateway = await start_gateway(backend, plugins={"cache": {}})
    answers = []
    async with aiohttp.ClientSession() as session:
        for top_p in (b"null", b"NaN", b"1e999", b"1" + b"0" * 400 + b".0", b"NaN", b"1e999"):  # the two: infinity
            body = b'{"model":"echo","messages":[{"role":"user","content":"hi"}],"seed":1,"top_p":' + top_p + b"}"
            headers = {"Content-Type": "application/json"}
            async with session.post(f"{gateway.base_url}/chat/completions", data=body, headers=headers) as response:
                answers.append(response.headers["X-Multiverse-Cache"])
    assert answers == ["miss", "miss", "miss", "hit", "hit", "hit"]


def test_the_memory_lru_evicts_the_least_recently_used_by_size() -> None:
    lru = MemoryLRU(max_bytes=3 * (1000 + 256 + 1))  # an entry's size counts its key's length (1 here)
    entries = {k: Entry(False, (k.encode() * 1000,), None) for k in "abcd"}
    for k in "abc":
        lru.put(k, entries[k], ttl=60)
    assert lru.get("a") is entries["a"]  # a is now the most recent
    lru.put("d", entries["d"], ttl=60)
    assert ("b" in lru, "a" in lru, "c" in lru, "d" in lru) == (False, True, True, True)
    assert lru.bytes == 3 * (entries["a"].size + 1) and lru.evictions == 1
    lru.put("huge", Entry(False, (b"x" * 10_000,), None), ttl=60)
    assert "huge" not in lru and len(lru) == 3
    lru.put("gone", entries["a"], ttl=-1)
    assert lru.get("gone") is None


def test_the_memory_lru_counts_a_keys_length_in_its_size() -> None:
    """The memory cache is keyed by the request's text: a long prompt weighs as much as a long answer."""
    lru = MemoryLRU(max_bytes=10_000)
    small = Entry(False, (b"{}",), None)
    lru.put(b"k" * 9_000, small, ttl=60)
    assert lru.bytes == small.size + 9_000
    lru.put(b"q" * 9_000, small, ttl=60)  # both together are too much: the older key goes
    assert (b"k" * 9_000 in lru, b"q" * 9_000 in lru, lru.bytes) == (False, True, small.size + 9_000)
    lru.put(b"x" * 10_000, small, ttl=60)  # larger than the whole cache with its key: never kept
    assert b"x" * 10_000 not in lru and len(lru) == 1


def test_an_entry_round_trips_through_bytes_and_a_damaged_value_is_refused() -> None:
    entry = Entry(True, (b"data: 1\n\n", b"", b"data: [DONE]\n\n"), {"prompt_tokens": 1})
    assert Entry.decode(entry.encode()) == entry
    assert Entry.decode(entry.encode()[:-3]) is None and Entry.decode(b"\x80garbage") is None


@pytest.mark.parametrize("per_key", [False, True])
async def test_a_usual_requests_key_is_orjsons_text(
    start_backend: StartBackend, start_gateway: StartGateway, per_key: bool
) -> None:
    """The fast path: a request without null, NaN or infinity is keyed by orjson's text, with or without
    ``per_key`` (json's text, 7 to 15 times slower, only where orjson's would be ambiguous)."""
    gateway = await start_gateway(await start_backend(), plugins={"cache": {"per_key": per_key}})
    body = {"model": "echo", "messages": [{"role": "user", "content": "hi"}], "temperature": 0}
    request = make_mocked_request("POST", "/v1/chat/completions")
    call = Call(gateway.state, request, "k-1", "chat/completions", b"", body)
    cache = gateway.state.plugins.pm.get_plugin("cache")
    text = orjson.dumps(["chat/completions", "", body], option=orjson.OPT_SORT_KEYS)
    assert not text.startswith(b"json:") and b"null" not in text
    assert cache.key(call) == text  # the memory cache's key; a shared store's is its hash:
    assert stored_key(cache.key(call)) == "cache:" + hashlib.blake2b(text, digest_size=20).hexdigest()


async def test_in_memory_a_request_too_long_to_keep_with_its_answer_is_not_kept(
    start_backend: StartBackend, start_gateway: StartGateway
) -> None:
    """The memory cache's key is the request's text, so ``max_entry_mb`` bounds the request and the answer
    together: one long request can no longer take a whole ``max_mb`` cache for itself."""
    gateway = await start_gateway(await start_backend(), plugins={"cache": {"max_entry_mb": 0.002}})  # ~2 KB
    outcomes = []
    for padding in ("", "", "x" * 3_000, "x" * 3_000):
        raw = await client(gateway).chat.completions.with_raw_response.create(**ASK, extra_body={"padding": padding})
        outcomes.append(raw.headers["X-Multiverse-Cache"])
    assert outcomes == ["miss", "hit", "miss", "miss"]
    cache = gateway.state.plugins.pm.get_plugin("cache")
    assert len(cache.memory) == 1 and cache.memory.bytes <= 0.002 * 2**20
