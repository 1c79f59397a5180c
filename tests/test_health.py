"""The health plugin: probes, transitions after N failures / M successes, routing follows."""

from __future__ import annotations

import asyncio
import time

import aiohttp

from tests.conftest import ADMIN, StartBackend, StartGateway, closed_port_url, eventually
from tests.fake_backend import FakeBackend

FAST = {"health": {"interval": 0.05, "timeout": 0.5, "unhealthy_after": 2, "healthy_after": 2}}


async def _models(url: str) -> list[str]:
    async with aiohttp.ClientSession() as session, session.get(url + "/v1/models") as response:
        return [m["id"] for m in (await response.json())["data"]]


async def test_failing_backend_goes_unhealthy_then_recovers(
    start_backend: StartBackend, start_gateway: StartGateway
) -> None:
    flaky = await start_backend(models=["solo", "shared"])
    steady = await start_backend(models=["shared"])
    gateway = await start_gateway(flaky, steady, plugins=FAST)
    registry = gateway.state.registry
    b0 = registry.backends["config:b0"]
    await eventually(lambda: b0.status == "healthy")
    assert await _models(gateway.url) == ["shared", "solo"]

    flaky.models_status = 503
    await eventually(lambda: b0.status == "unhealthy")
    assert b0.last_error == "GET /v1/models answered HTTP 503"
    assert await _models(gateway.url) == ["shared"]
    async with aiohttp.ClientSession() as session:
        for _ in range(4):
            async with session.post(gateway.base_url + "/completions", json={"model": "shared", "prompt": "x"}) as r:
                assert r.headers["X-Multiverse-Backend"] == "b1"
        async with session.post(gateway.base_url + "/completions", json={"model": "solo", "prompt": "x"}) as r:
            body = await r.json()
            assert r.status == 503 and "every backend serving model 'solo' is unhealthy" in body["error"]["message"]
        async with session.get(gateway.url + "/admin/servers?status=unhealthy", headers=ADMIN) as r:
            (listed,) = (await r.json())["servers"]
            assert listed["name"] == "b0" and listed["last_error"] == b0.last_error

    flaky.models_status = 200
    await eventually(lambda: b0.status == "healthy")
    assert b0.last_error is None
    assert await _models(gateway.url) == ["shared", "solo"]


async def test_thresholds_are_respected(start_backend: StartBackend, start_gateway: StartGateway) -> None:
    backend = await start_backend(models_status=500)
    plugins = {"health": {"interval": 3600, "unhealthy_after": 2, "healthy_after": 2}}
    gateway = await start_gateway(backend, plugins=plugins)
    health = gateway.state.plugins.pm.get_plugin("health")
    b0 = gateway.state.registry.backends["config:b0"]
    await eventually(lambda: "config:b0" in health.tracks and health.tracks["config:b0"].streak == -1)  # start-up round
    assert b0.status == "unknown"
    far = time.monotonic() + 10**6  # every backend is due
    await health.probe_due(gateway.state, now=far)
    assert b0.status == "unhealthy"
    backend.models_status = 200
    await health.probe_due(gateway.state, now=far)
    assert b0.status == "unhealthy"
    await health.probe_due(gateway.state, now=far)
    assert b0.status == "healthy"


async def test_unreachable_and_hanging_backends_are_marked_unhealthy(
    start_backend: StartBackend, start_gateway: StartGateway
) -> None:
    hanging = await start_backend(mode="hang")
    dead = FakeBackend(url=closed_port_url())
    plugins = {"health": {"interval": 0.05, "timeout": 0.2, "unhealthy_after": 1}}
    gateway = await start_gateway(hanging, dead, plugins=plugins)
    backends = gateway.state.registry.backends
    await eventually(lambda: all(b.status == "unhealthy" for b in backends.values()))
    assert backends["config:b0"].last_error == "GET /v1/models timed out after 0.2s"
    assert backends["config:b1"].last_error == "GET /v1/models failed: ClientConnectorError"


async def test_registered_backend_health_is_persisted(start_backend: StartBackend, start_gateway: StartGateway) -> None:
    backend = await start_backend(models_status=500)
    gateway = await start_gateway(backends=[], plugins={"health": {"interval": 0.05, "unhealthy_after": 1}})
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            gateway.url + "/admin/register", json={"endpoint_url": backend.url, "model_name": "echo"}, headers=ADMIN
        ) as r,
    ):
        rid = (await r.json())["registration_id"]
    registry = gateway.state.registry
    await eventually(lambda: registry.backends[rid].status == "unhealthy")
    async with registry.db.execute("SELECT status, last_error FROM backends WHERE id = ?", (rid,)) as cursor:
        row = await cursor.fetchone()
    assert tuple(row) == ("unhealthy", "GET /v1/models answered HTTP 500")


async def test_unhealthy_backends_are_probed_with_backoff_and_readmitted(
    start_backend: StartBackend, start_gateway: StartGateway
) -> None:
    backend = await start_backend(models_status=500)
    plugins = {"health": {"interval": 0.05, "unhealthy_after": 1, "max_interval": 0.4}}
    gateway = await start_gateway(backend, plugins=plugins)
    b0 = gateway.state.registry.backends["config:b0"]
    await eventually(lambda: b0.status == "unhealthy")
    started, before = time.monotonic(), len(backend.probes)
    await asyncio.sleep(1.5)
    probes = len(backend.probes) - before
    assert 3 <= probes <= 12, f"{probes} probes in 1.5 s: no backoff (30 without)"
    backend.models_status = 200
    started = time.monotonic()
    await eventually(lambda: b0.status == "healthy", timeout=3)
    assert time.monotonic() - started < 0.4 * 1.2 + 0.2


async def test_a_backend_listing_other_models_is_flagged_not_routed(
    start_backend: StartBackend, start_gateway: StartGateway
) -> None:
    backend = await start_backend(models=["echo", "llama"], listed_models=["echo"])
    gateway = await start_gateway(backend, plugins={"health": {"interval": 0.05}})
    b0 = gateway.state.registry.backends["config:b0"]
    await eventually(lambda: b0.status == "mismatched")
    assert b0.last_error == "registered for llama, which GET /v1/models does not list"
    assert await _models(gateway.url) == []
    url = gateway.url + "/admin/servers?status=mismatched"
    async with aiohttp.ClientSession() as session, session.get(url, headers=ADMIN) as r:
        assert [s["name"] for s in (await r.json())["servers"]] == ["b0"]
    backend.listed_models = None
    await eventually(lambda: b0.status == "healthy")


async def test_probes_carry_the_backend_key(start_backend: StartBackend, start_gateway: StartGateway) -> None:
    backend = await start_backend()
    backends = [{"name": "keyed", "url": backend.url, "models": ["echo"], "api_key": "sk-probe-key"}]
    gateway = await start_gateway(backends=backends, plugins={"health": {"interval": 0.05, "path": "/health"}})
    await eventually(lambda: gateway.state.registry.backends["config:keyed"].status == "healthy")
    assert backend.probes[0]["Authorization"] == "Bearer sk-probe-key"
