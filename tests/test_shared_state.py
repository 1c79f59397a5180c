"""Several gateways on one Redis: one budget and one cache between them, not one each."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import openai
import pytest

from tests.conftest import StartBackend, StartGateway, eventually
from tests.redis_server import redis_url  # noqa: F401  (a fixture)

MESSAGES = [{"role": "user", "content": "one two three four"}]


def client(gateway: Any, key: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=gateway.base_url, api_key=key, max_retries=0)


async def test_two_gateways_on_one_redis_enforce_one_budget(
    redis_url: str,  # noqa: F811
    start_backend: StartBackend,
    start_gateway: StartGateway,
    tmp_path: Path,
) -> None:
    backend = await start_backend()
    prices = {"echo": {"cost_per_1k_prompt_tokens": 1500.0}}  # 4 prompt tokens: 6.0 a request
    plugins = {"tests.bearer_identity": {"budgets": {"alice": 10.0}}, "usage": {"flush_interval": 0.05}}
    shared: dict[str, Any] = {"state": {"redis": redis_url}, "plugins": plugins, "models": prices}
    first = await start_gateway(backend, **shared)
    second = await start_gateway(backend, **shared, storage={"sqlite": str(tmp_path / "second.db")})
    await client(first, "alice").chat.completions.create(model="echo", messages=MESSAGES)
    await client(second, "alice").chat.completions.create(model="echo", messages=MESSAGES)  # 12.0 spent between them
    usage = [g.state.plugins.pm.get_plugin("usage") for g in (first, second)]
    await eventually(lambda: all(u.spent.get("k-alice") == 12.0 for u in usage))
    for gateway in (first, second):  # each refuses: the other's spend counts too
        with pytest.raises(openai.RateLimitError) as refused:
            await client(gateway, "alice").chat.completions.create(model="echo", messages=MESSAGES)
        assert "spent 12.0000 of its budget of 10.0000" in str(refused.value)
    assert len(backend.seen) == 2


async def test_two_gateways_on_one_redis_share_one_cache(
    redis_url: str,  # noqa: F811
    start_backend: StartBackend,
    start_gateway: StartGateway,
    tmp_path: Path,
) -> None:
    backend = await start_backend()
    shared: dict[str, Any] = {"state": {"redis": redis_url}, "plugins": {"cache": {"backend": "store"}}}
    first = await start_gateway(backend, **shared)
    second = await start_gateway(backend, **shared, storage={"sqlite": str(tmp_path / "second.db")})
    body: dict[str, Any] = {"model": "echo", "messages": MESSAGES, "temperature": 0}
    miss = await client(first, "x").chat.completions.with_raw_response.create(**body)
    hit = await client(second, "x").chat.completions.with_raw_response.create(**body)
    assert (miss.headers["x-multiverse-cache"], hit.headers["x-multiverse-cache"]) == ("miss", "hit")
    assert hit.parse().choices[0].message.content == miss.parse().choices[0].message.content
    assert len(backend.seen) == 1
