"""Issue 9: `multiverse agent` (a real subprocess) keeping fake backends registered through heartbeat leases."""

from __future__ import annotations

import asyncio
import signal
import sqlite3
import stat
from pathlib import Path

import aiohttp

from tests.agent_process import start_agent
from tests.conftest import ADMIN, ADMIN_KEY, RunningGateway, StartBackend, StartGateway, eventually
from tests.test_auth import call, issue

LEASES = {"leases": {}}


def registered(gateway: RunningGateway) -> list[str]:
    return [b.id for b in gateway.state.registry.backends.values() if b.source == "api"]


async def test_the_agent_registers_discovers_models_and_keeps_one_identity_across_restarts(
    start_backend: StartBackend, start_gateway: StartGateway, tmp_path: Path
) -> None:
    backend = await start_backend(models=["tiny", "small"])
    moved = await start_backend(models=["tiny", "small"])
    gateway = await start_gateway(plugins=LEASES)
    state = tmp_path / "agent.json"
    agent = await start_agent(gateway.url, ADMIN_KEY, backend.url, state, "--name", "ana-laptop")
    line = await agent.wait_for("registered as ana-laptop")
    assert "serving tiny, small" in line and ADMIN_KEY not in agent.output
    assert stat.S_IMODE(state.stat().st_mode) == 0o600
    [first] = registered(gateway)
    assert (await gateway.chat(model="small")).status == 200
    assert await agent.stop(signal.SIGKILL) == -signal.SIGKILL  # no drain: the registration stays
    again = await start_agent(
        gateway.url, ADMIN_KEY, backend.url, state, "--name", "ana-laptop", "--public-url", moved.url
    )
    await again.wait_for("registered as ana-laptop")
    await eventually(lambda: gateway.state.registry.backends[first].url == moved.url)
    assert registered(gateway) == [first]  # the same backend, moved in place: no duplicate
    assert (await gateway.chat(model="tiny")).status == 200 and moved.seen
    assert await again.stop() == 0
    await again.wait_for("removed from the gateway")
    assert registered(gateway) == []


async def test_without_heartbeats_the_lease_runs_out_and_a_heartbeat_brings_it_back(
    start_backend: StartBackend, start_gateway: StartGateway, tmp_path: Path
) -> None:
    backend = await start_backend(models=["tiny"])
    gateway = await start_gateway(plugins=LEASES)
    state = tmp_path / "agent.json"
    agent = await start_agent(gateway.url, ADMIN_KEY, backend.url, state, interval=0.3)
    await agent.wait_for("registered as")
    assert (await gateway.chat(model="tiny")).status == 200
    await agent.stop(signal.SIGKILL)
    await asyncio.sleep(1.2)  # 3 intervals of 0.3 s: the lease is over, long before any probe would tell
    refused = await gateway.chat(model="tiny")
    assert refused.status == 503 and refused.json()["error"]["code"] == "no_backend_available"
    explained = (await gateway.post("/v1/route/explain", {"model": "tiny", "messages": []})).json()
    assert "lease expired" in str(explained)
    [backend_id] = registered(gateway)
    assert gateway.state.registry.backends[backend_id].status == "unknown"  # nothing was written for it
    back = await start_agent(gateway.url, ADMIN_KEY, backend.url, state, interval=0.3)
    await back.wait_for("registered as")
    assert (await gateway.chat(model="tiny")).status == 200
    await back.stop()


async def test_a_heartbeat_that_changes_nothing_writes_nothing(
    start_backend: StartBackend, start_gateway: StartGateway, tmp_path: Path
) -> None:
    backend = await start_backend(models=["tiny"])
    gateway = await start_gateway(plugins=LEASES)
    agent = await start_agent(gateway.url, ADMIN_KEY, backend.url, tmp_path / "a.json", interval=0.2)
    await agent.wait_for("registered as")
    await asyncio.sleep(0.5)
    watcher = sqlite3.connect(gateway.state.config.database_path)
    before = watcher.execute("PRAGMA data_version").fetchone()[0]
    [backend_id] = registered(gateway)
    beats = gateway.state.registry.backends[backend_id].notes["agent"]["last_heartbeat"]
    await asyncio.sleep(1.0)  # about five heartbeats
    assert gateway.state.registry.backends[backend_id].notes["agent"]["last_heartbeat"] > beats
    assert watcher.execute("PRAGMA data_version").fetchone()[0] == before  # no other connection committed
    watcher.close()
    await agent.stop()


async def test_a_clean_exit_drains_running_streams_then_keeps_the_backend_offline(
    start_backend: StartBackend, start_gateway: StartGateway, tmp_path: Path
) -> None:
    backend = await start_backend(models=["tiny"], chunks=12, delay=0.15)
    gateway = await start_gateway(plugins=LEASES)
    agent = await start_agent(gateway.url, ADMIN_KEY, backend.url, tmp_path / "a.json", "--keep")
    await agent.wait_for("registered as")
    running = asyncio.create_task(gateway.chat(model="tiny", stream=True))
    await eventually(lambda: len(backend.seen) == 1)
    agent.process.send_signal(signal.SIGTERM)
    await agent.wait_for("draining: 1 request(s) in flight")
    during = await gateway.chat(model="tiny")
    assert during.status == 503  # no new request goes to a draining backend
    answer = await running
    assert answer.status == 200 and answer.body.count(b'"chat.completion.chunk"') >= 12
    assert answer.body.rstrip().endswith(b"data: [DONE]") and b'"error"' not in answer.body
    assert await agent.stop() == 0
    await agent.wait_for("kept as offline")
    [backend_id] = registered(gateway)
    kept = gateway.state.registry.backends[backend_id]
    assert kept.status == "unhealthy" and kept.last_error is not None and "offline" in kept.last_error


async def test_the_agent_exits_non_zero_with_the_reason_when_its_key_is_refused(
    start_backend: StartBackend, start_gateway: StartGateway, tmp_path: Path
) -> None:
    backend = await start_backend(models=["tiny"])
    gateway = await start_gateway(plugins={"auth": {}, **LEASES})
    secret = "mvk-not-a-key-the-gateway-issued-000000"
    agent = await start_agent(gateway.url, secret, backend.url, tmp_path / "a.json")
    assert await agent.stop(None, timeout=15) == 2
    assert "refused: the gateway refused the key (HTTP 401)" in agent.output
    assert secret not in agent.output
    no_leases = await start_gateway()
    agent = await start_agent(no_leases.url, ADMIN_KEY, backend.url, tmp_path / "b.json")
    assert await agent.stop(None, timeout=15) == 2 and "plugins: {leases: {}}" in agent.output


async def test_a_host_key_touches_only_its_own_agents_registration(
    start_backend: StartBackend, start_gateway: StartGateway, tmp_path: Path
) -> None:
    backend = await start_backend(models=["tiny"])
    gateway = await start_gateway(plugins={"auth": {}, **LEASES})
    ana = await issue(gateway, name="ana", role="host")
    beto = await issue(gateway, name="beto", role="host")
    agent = await start_agent(gateway.url, ana["key"], backend.url, tmp_path / "ana.json")
    await agent.wait_for("registered as")
    [backend_id] = registered(gateway)
    assert gateway.state.registry.backends[backend_id].owner_key == ana["id"]
    token = (tmp_path / "ana.json").read_text()
    stolen = token.split('"agent_token": "')[1].split('"')[0]
    body = {"name": "x", "endpoint_url": backend.url, "models": ["tiny"], "agent_token": stolen}
    status, refused = await call("POST", gateway.url + "/admin/agent/heartbeat", body, {"X-API-Key": beto["key"]})
    assert status == 403 and refused["error"]["code"] == "not_owner"
    status, refused = await call("POST", f"{gateway.url}/admin/register/{backend_id}/drain", {}, {
        "X-API-Key": beto["key"]
    })  # fmt: skip
    assert status == 403
    await agent.stop()


async def test_without_the_auth_plugin_a_backend_token_from_the_admin_registers_one_backend(
    start_backend: StartBackend, start_gateway: StartGateway, tmp_path: Path
) -> None:
    backend = await start_backend(models=["tiny"])
    gateway = await start_gateway(plugins=LEASES)
    status, issued = await call("POST", gateway.url + "/admin/agent/tokens", {"name": "ana"})
    assert status == 201 and issued["token"].startswith("mvb-")
    agent = await start_agent(gateway.url, issued["token"], backend.url, tmp_path / "a.json", "--name", "ana")
    await agent.wait_for("registered as ana")
    [backend_id] = registered(gateway)
    assert gateway.state.registry.backends[backend_id].owner_key == issued["owner_key"]
    assert issued["token"] not in agent.output
    status, refused_token = await call("GET", gateway.url + "/admin/servers", headers={"X-API-Key": issued["token"]})
    assert (
        status == 401 and refused_token["error"]["code"] == "invalid_admin_key"
    )  # the token is good for its own agent's routes only
    await agent.stop()
    await agent.wait_for("removed from the gateway")


async def test_a_public_url_that_changes_under_load_moves_without_a_failed_request(
    start_backend: StartBackend, start_gateway: StartGateway, tmp_path: Path
) -> None:
    old, new = await start_backend(models=["tiny"]), await start_backend(models=["tiny"])
    gateway = await start_gateway(plugins=LEASES)
    url_file = tmp_path / "tunnel-url"
    url_file.write_text(old.url)
    agent = await start_agent(
        gateway.url, ADMIN_KEY, old.url, tmp_path / "a.json", "--public-url-file", str(url_file), interval=0.2
    )
    await agent.wait_for("registered as")
    statuses: list[int] = []

    async def load() -> None:
        for _ in range(60):
            statuses.append((await gateway.chat(model="tiny")).status)
            await asyncio.sleep(0.02)

    running = asyncio.create_task(load())
    await asyncio.sleep(0.3)
    url_file.write_text(new.url)
    await agent.wait_for("URL changed")
    await running
    assert set(statuses) == {200} and len(statuses) == 60
    assert old.seen and new.seen and len(registered(gateway)) == 1
    await agent.stop()


async def test_least_loaded_prefers_the_backend_whose_agent_reports_less_load(
    start_backend: StartBackend, start_gateway: StartGateway, tmp_path: Path
) -> None:
    busy = await start_backend(
        models=["tiny"], metrics_text="vllm:num_requests_running 3\nvllm:num_requests_waiting 4\n"
    )
    idle = await start_backend(models=["tiny"], metrics_text="vllm:num_requests_running 0\n")
    gateway = await start_gateway(plugins={**LEASES, "least_loaded": {}}, routing={"strategy": "least_loaded"})
    agents = [
        await start_agent(gateway.url, ADMIN_KEY, b.url, tmp_path / f"{n}.json", "--name", n)
        for n, b in (("busy", busy), ("idle", idle))
    ]
    for agent in agents:
        await agent.wait_for("registered as")

    def notes() -> dict[str, dict[str, object]]:
        return {b.name: b.notes.get("agent", {}) for b in gateway.state.registry.backends.values()}

    await eventually(lambda: len(notes()) == 2 and all("load" in n for n in notes().values()))
    assert notes()["busy"]["load"] == 7 and notes()["busy"]["load_source"] == "vllm /metrics"
    answers = [await gateway.chat(model="tiny") for _ in range(10)]
    assert {a.backend for a in answers} == {"idle"}
    async with aiohttp.ClientSession() as session, session.get(gateway.url + "/admin/servers", headers=ADMIN) as r:
        shown = (await r.json())["servers"]
    assert {s["name"]: s["notes"]["agent"]["load"] for s in shown} == {"busy": 7, "idle": 0}
    for agent in agents:
        await agent.stop()


async def test_the_agent_says_once_that_the_gateway_is_unreachable_and_keeps_trying(
    start_backend: StartBackend, tmp_path: Path
) -> None:
    from gateway.testing import closed_port_url

    backend = await start_backend(models=["tiny"])
    agent = await start_agent(closed_port_url(), ADMIN_KEY, backend.url, tmp_path / "a.json", interval=0.2)
    await agent.wait_for("gateway unreachable")
    await asyncio.sleep(1.0)
    assert agent.process.returncode is None
    assert sum("gateway unreachable" in line for line in agent.lines) == 1
    assert await agent.stop() == 0


async def test_a_restarted_gateway_keeps_the_leases_and_an_admin_drain_holds_across_heartbeats(
    start_backend: StartBackend, start_gateway: StartGateway, tmp_path: Path
) -> None:
    backend = await start_backend(models=["tiny"])
    gateway = await start_gateway(plugins=LEASES)
    agent = await start_agent(gateway.url, ADMIN_KEY, backend.url, tmp_path / "a.json", interval=0.3)
    await agent.wait_for("registered as")
    [backend_id] = registered(gateway)
    status, drained = await call("POST", f"{gateway.url}/admin/register/{backend_id}/drain", {})
    assert status == 200 and drained["draining"] is True
    await agent.wait_for("drained by the gateway's admin")
    await asyncio.sleep(0.7)  # two more heartbeats: the admin's drain holds
    assert (await gateway.chat(model="tiny")).status == 503
    await agent.stop(signal.SIGKILL)
    restarted = await start_gateway(plugins=LEASES)  # a second gateway on the same database: as after a restart
    assert (await restarted.chat(model="tiny")).status == 200  # one lease of grace for the agent to call again
    await asyncio.sleep(1.2)
    assert (await restarted.chat(model="tiny")).status == 503  # it did not: no traffic


async def test_a_backend_that_stops_answering_loses_its_lease_and_gets_it_back(
    start_backend: StartBackend, start_gateway: StartGateway, tmp_path: Path
) -> None:
    backend = await start_backend(models=["tiny"])
    gateway = await start_gateway(plugins=LEASES)
    agent = await start_agent(gateway.url, ADMIN_KEY, backend.url, tmp_path / "a.json", interval=0.3)
    await agent.wait_for("registered as")
    backend.models_status = 503
    assert "GET /v1/models answered HTTP 503" in await agent.wait_for("backend down at")
    await asyncio.sleep(1.2)
    assert (await gateway.chat(model="tiny")).status == 503  # no heartbeats while it is down: no traffic
    backend.models_status = 200
    await agent.wait_for("backend up at")
    await asyncio.sleep(0.5)
    assert (await gateway.chat(model="tiny")).status == 200
    assert sum("backend down" in line for line in agent.lines) == 1
    await agent.stop()
