"""The dashboard plugin's data: who may read it, what a snapshot holds after real traffic, the live stream."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp

from plugins._dashboard_stats import OTHER_MODEL
from tests.conftest import ADMIN, ADMIN_KEY, RunningGateway, StartBackend, StartGateway, closed_port_url

DASHBOARD = {"dashboard": {"interval": 0.2}}
KEYS = {"tests.bearer_identity": {"admins": ["ada"]}}


async def _snapshot(gateway: RunningGateway, headers: dict[str, str] = ADMIN) -> dict[str, Any]:
    reply = await gateway.get("/dashboard/api/snapshot", headers=headers)
    assert reply.status == 200, reply.body
    assert reply.headers["Cache-Control"] == "no-store"
    data: dict[str, Any] = reply.json()
    return data


async def test_the_page_and_its_assets_are_served_without_data_or_secrets(
    start_backend: StartBackend, start_gateway: StartGateway
) -> None:
    gateway = await start_gateway(await start_backend(), plugins=DASHBOARD)
    page = await gateway.get("/dashboard")
    assert page.status == 200 and page.headers["Content-Type"].startswith("text/html")
    assert "script-src 'self'" in page.headers["Content-Security-Policy"]
    assert page.headers["Referrer-Policy"] == "no-referrer"
    html = page.body.decode()
    assert 'id="login-form"' in html and ADMIN_KEY not in html
    assert 'name="' not in html.split('id="login-form"')[1].split("</form>")[0]  # nothing to submit in a URL
    script = await gateway.get("/dashboard/static/dashboard.js")
    assert script.status == 200 and script.headers["Content-Type"].startswith("text/javascript")
    assert b"X-API-Key" in script.body and b"sessionStorage" in script.body
    assert (await gateway.get("/dashboard/static/dashboard.css")).status == 200
    assert (await gateway.get("/dashboard/static/..%2Fdashboard.py")).status == 404
    assert (await gateway.get("/dashboard/static/index.htm")).status == 404


async def test_data_needs_an_admin_or_readonly_key_and_refuses_in_openais_envelope(
    start_backend: StartBackend, start_gateway: StartGateway
) -> None:
    gateway = await start_gateway(await start_backend(), plugins={**DASHBOARD, **KEYS})
    for path in ("/dashboard/api/snapshot", "/dashboard/api/events"):
        missing = await gateway.get(path)
        assert missing.status == 401 and missing.json()["error"]["code"] == "invalid_admin_key"
        wrong = await gateway.get(path, headers={"X-API-Key": "not-the-key"})
        assert wrong.status == 401 and "is not valid" in wrong.json()["error"]["message"]
        user = await gateway.get(path, headers={"Authorization": "Bearer grace"})  # role user
        assert user.status == 403 and user.json()["error"]["type"] == "permission_error"
        assert "readonly" in user.json()["error"]["message"]
    snapshot = await _snapshot(gateway, {"Authorization": "Bearer ada"})  # role admin through the hook
    assert snapshot["caller"] == {"name": "ada", "role": "admin"}


async def test_a_snapshot_shows_backends_traffic_top_lists_and_the_story_of_a_failure(
    start_backend: StartBackend, start_gateway: StartGateway
) -> None:
    good = await start_backend(name="gpu-good")
    bad = await start_backend(name="gpu-bad", mode="error")
    gateway = await start_gateway(
        bad, good, plugins={**DASHBOARD, **KEYS}, routing={"strategy": "round_robin", "max_attempts": 2}
    )
    for _ in range(4):
        assert (await gateway.post("/v1/chat/completions", _chat("hi"), {"Authorization": "Bearer ada"})).status == 200
    assert (await gateway.chat("hi", model="no-such-model")).status == 404
    bad.mode = "ok"
    snapshot = await _snapshot(gateway)

    names = {b["name"]: b for b in snapshot["backends"]}
    assert set(names) == {"gpu-good", "gpu-bad"}
    good_card = names["gpu-good"]
    assert good_card["models"] == ["echo"] and good_card["owner"] == "gateway.yaml"
    assert good_card["level"] == "unknown" and good_card["served"] == 4
    assert len(good_card["latency_ms"]) == 4 and all(ms >= 0 for ms in good_card["latency_ms"])
    assert names["gpu-bad"]["failed"] >= 1 and names["gpu-bad"]["latency_ms"] == []

    traffic = snapshot["traffic"]
    assert traffic["requests_1m"] == 5 and traffic["failed_1m"] == 1
    assert traffic["error_rate_1m"] == 0.2 and len(traffic["requests_per_second"]) == 60
    assert sum(traffic["requests_per_second"]) * traffic["bin_seconds"] == 5
    assert snapshot["top"]["models"] == [{"name": "echo", "requests": 4}, {"name": OTHER_MODEL, "requests": 1}]
    assert snapshot["top"]["keys"][0]["name"] == "ada" and snapshot["top"]["keys"][0]["requests"] == 4

    [failed] = snapshot["failures"]
    assert failed["status"] == 404 and failed["model"] == OTHER_MODEL and "no-such-model" in failed["error"]
    assert snapshot["summary"]["requests_total"] == 5


async def test_a_failover_is_told_attempt_by_attempt(start_backend: StartBackend, start_gateway: StartGateway) -> None:
    down = await start_backend(name="gpu-down")
    down.url = closed_port_url()
    broken = await start_backend(name="gpu-500", mode="error")
    gateway = await start_gateway(down, broken, plugins=DASHBOARD, routing={"max_attempts": 2})
    assert (await gateway.chat("hi")).status >= 500
    [failed] = (await _snapshot(gateway))["failures"]
    story = [(a["backend"], a["outcome"]) for a in failed["attempts"]]
    assert story == [("gpu-down", "connect_error"), ("gpu-500", "http_error")]
    assert failed["attempts"][1]["status"] == 500 and failed["key"] == "(anonymous)"


async def test_the_stream_sends_snapshots_and_a_changed_backend_at_once(
    start_backend: StartBackend, start_gateway: StartGateway
) -> None:
    gateway = await start_gateway(await start_backend(name="gpu-0"), plugins={"dashboard": {"interval": 30}})
    backend = next(iter(gateway.state.registry.backends.values()))
    async with (
        aiohttp.ClientSession() as session,
        session.get(gateway.url + "/dashboard/api/events", headers=ADMIN) as response,
    ):
        assert response.status == 200 and response.headers["Content-Type"].startswith("text/event-stream")
        first = await _next_snapshot(response)
        assert [b["name"] for b in first["backends"]] == ["gpu-0"]
        await gateway.state.registry.set_status(backend, "unhealthy", "connection refused")
        changed = await asyncio.wait_for(_next_snapshot(response), 5)  # far sooner than the 30 s interval
        assert changed["backends"][0]["level"] == "down"
        assert changed["backends"][0]["why"] == "unhealthy: connection refused"


async def _next_snapshot(response: aiohttp.ClientResponse) -> dict[str, Any]:
    event = None
    async for raw in response.content:
        line = raw.decode().strip()
        if line.startswith("event:"):
            event = line[6:].strip()
        elif line.startswith("data:") and event == "snapshot":
            data: dict[str, Any] = json.loads(line[5:])
            return data
    raise AssertionError("the stream ended without a snapshot")


def _chat(content: str) -> dict[str, Any]:
    return {"model": "echo", "messages": [{"role": "user", "content": content}]}
