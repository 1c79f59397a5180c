"""Two gateways on one SQLite file see each other's registrations within a second."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp

from tests.conftest import ADMIN, StartBackend, StartGateway, eventually

CHAT = {"model": "gemma-3-270m", "messages": [{"role": "user", "content": "hi"}]}


async def _call(method: str, url: str, body: Any = None, headers: dict[str, str] | None = ADMIN) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as session, session.request(method, url, json=body, headers=headers) as response:
        return response.status, await response.json()


async def test_a_registration_through_one_gateway_is_served_by_the_other(
    start_backend: StartBackend, start_gateway: StartGateway
) -> None:
    backend = await start_backend(models=["gemma-3-270m"])
    moved = await start_backend(models=["gemma-3-270m"])
    first, second = await start_gateway(backends=[]), await start_gateway(backends=[])
    assert first.state.registry.db_path == second.state.registry.db_path

    registered = time.monotonic()
    status, created = await _call("POST", first.url + "/admin/register", {"endpoint_url": backend.url})
    assert status == 201
    await eventually(lambda: bool(second.state.registry.for_model("gemma-3-270m")), timeout=1.5)
    assert time.monotonic() - registered < 1.5
    assert (await _call("POST", second.base_url + "/chat/completions", CHAT, None))[0] == 200
    assert len(backend.seen) == 1
    seen_by_second = second.state.registry.backends[created["registration_id"]]
    assert seen_by_second.served == 1

    # an edit that keeps the URL keeps the other gateway's counters; a new URL takes effect
    rid = created["registration_id"]
    assert (await _call("PUT", f"{first.url}/admin/register/{rid}", {"owner_name": "Ada"}))[0] == 200
    await eventually(lambda: second.state.registry.backends[rid].owner_name == "Ada", timeout=1.5)
    assert second.state.registry.backends[rid] is seen_by_second and seen_by_second.served == 1
    assert (await _call("PUT", f"{first.url}/admin/register/{rid}", {"endpoint_url": moved.url}))[0] == 200
    await eventually(lambda: second.state.registry.backends[rid].url == moved.url, timeout=1.5)
    assert (await _call("POST", second.base_url + "/chat/completions", CHAT, None))[0] == 200
    assert len(moved.seen) == 1 and len(backend.seen) == 1

    # removed through the first, the second stops routing to it
    assert (await _call("DELETE", f"{first.url}/admin/register/{rid}"))[0] == 200
    await eventually(lambda: not second.state.registry.for_model("gemma-3-270m"), timeout=1.5)
    status, body = await _call("POST", second.base_url + "/chat/completions", CHAT, None)
    assert status == 404 and body["error"]["code"] == "model_not_found"
    assert len(moved.seen) == 1


async def test_gateways_opening_one_new_database_at_once_all_start(tmp_path: Any, gateway_config: Any) -> None:
    """Workers start together on a new database: each would add the same columns and plugin tables."""
    from gateway.registry import Registry

    config = gateway_config(storage={"sqlite": str(tmp_path / "new.db")})
    registries = [Registry(config.database_path, config.backends) for _ in range(4)]
    await asyncio.gather(*(r.open() for r in registries))
    versions = await asyncio.gather(
        *(r.migrate("counter", ["CREATE TABLE counter_hits (n INTEGER)"]) for r in registries)
    )
    assert versions == [1, 1, 1, 1]
    for registry in registries:
        await registry.close()
