"""The webhooks plugin: events POSTed to a real receiver on loopback, signed, retried, never in a request's way."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
from typing import Any

import pytest
from aiohttp import web

from gateway.config import ConfigError
from tests.conftest import ADMIN, StartBackend, StartGateway, eventually

SECRET = "a-shared-secret-of-32-characters"


class Receiver:
    """A webhook endpoint: keeps what it got; answers ``statuses`` in turn (then 200), or hangs while ``hang``."""

    def __init__(self, statuses: tuple[int, ...] = (), hang: bool = False) -> None:
        self.got: list[tuple[dict[str, str], bytes]] = []
        self.statuses = list(statuses)
        self.hang = hang
        self.release = asyncio.Event()
        self.url = ""

    async def handle(self, request: web.Request) -> web.Response:
        self.got.append((dict(request.headers), await request.read()))
        if self.hang:
            await self.release.wait()
        return web.Response(status=self.statuses.pop(0) if self.statuses else 200)

    def events(self) -> list[dict[str, Any]]:
        return [json.loads(body) for _, body in self.got]


@pytest.fixture
async def receiver(aiohttp_server: Any) -> Any:
    async def start(**fields: Any) -> Receiver:
        hook = Receiver(**fields)
        app = web.Application()
        app.router.add_post("/hook", hook.handle)
        server = await aiohttp_server(app)
        hook.url = str(server.make_url("/hook"))
        return hook

    return start


def signed(headers: dict[str, str], body: bytes) -> bool:
    expected = "sha256=" + hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
    return hmac.compare_digest(headers["X-Multiverse-Signature"], expected)


async def test_events_are_signed_and_a_failed_delivery_is_retried(
    start_backend: StartBackend, start_gateway: StartGateway, receiver: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    hook = await receiver(statuses=(500,))
    monkeypatch.setenv("WEBHOOK_SECRET", SECRET)
    broken = await start_backend(name="broken", mode="error")
    options = {"urls": [hook.url], "secret": "${WEBHOOK_SECRET}", "backoff": 0.05}
    gateway = await start_gateway(broken, plugins={"webhooks": options})
    assert (await gateway.chat("hi")).status == 500
    await eventually(lambda: len(hook.got) == 2)
    (first_headers, first), (headers, body) = hook.got
    assert first == body and first_headers["X-Multiverse-Delivery"] == headers["X-Multiverse-Delivery"], "a retry"
    assert signed(headers, body)
    event = json.loads(body)
    assert event["event"] == headers["X-Multiverse-Event"] == "request.failed"
    assert event["data"]["status"] == 500 and event["data"]["backend"] == "broken"
    assert event["data"]["attempts"][0]["reason"] == "HTTP 500"
    assert SECRET not in body.decode() and broken.url not in body.decode()


async def test_backend_events_and_request_failed_is_rate_limited(
    start_backend: StartBackend, start_gateway: StartGateway, receiver: Any
) -> None:
    hook = await receiver()
    broken = await start_backend(name="broken", mode="error")
    extra = await start_backend(models=["other"])
    plugins = {
        "webhooks": {"urls": [hook.url], "secret": SECRET, "failed_per_minute": 2},
        "health": {"interval": 0.1, "unhealthy_after": 1},
    }
    gateway = await start_gateway(broken, plugins=plugins)
    for _ in range(5):
        assert (await gateway.chat("hi")).status == 500
    registration = {"endpoint_url": extra.url, "model_name": "other", "owner_name": "Ada"}
    created = await gateway.post("/admin/register", registration, headers=ADMIN)
    assert created.status == 201
    registered = gateway.state.registry.backends[created.json()["registration_id"]]
    await eventually(lambda: registered.status == "healthy")
    extra.models_status = 503
    await eventually(lambda: registered.status == "unhealthy")
    await gateway.state.registry.remove(registered)

    def names() -> list[str]:
        return [e["event"] for e in hook.events()]

    await eventually(lambda: "backend.removed" in names())
    assert names().count("request.failed") == 2, "at most failed_per_minute per model"
    backend_events = [e for e in hook.events() if e["data"].get("backend") == created.json()["name"]]
    assert [e["event"] for e in backend_events] == [
        "backend.registered",
        "backend.up",
        "backend.down",
        "backend.removed",
    ]
    assert backend_events[2]["data"]["reason"] == "GET /v1/models answered HTTP 503"
    assert all(signed(headers, body) for headers, body in hook.got)


async def test_budget_exceeded_is_sent_once_a_minute_per_key(
    start_backend: StartBackend, start_gateway: StartGateway, receiver: Any
) -> None:
    hook = await receiver()
    backend = await start_backend()
    plugins = {
        "tests.bearer_identity": {"budgets": {"carol": 0.0}},
        "usage": {},
        "webhooks": {"urls": [hook.url], "secret": SECRET, "events": ["budget.exceeded"]},
    }
    gateway = await start_gateway(backend, plugins=plugins)
    body = {"model": "echo", "messages": [{"role": "user", "content": "hi"}]}
    for _ in range(3):
        refused = await gateway.post("/v1/chat/completions", body, headers={"Authorization": "Bearer carol"})
        assert refused.status == 429 and refused.json()["error"]["code"] == "budget_exceeded"
    await eventually(lambda: len(hook.got) == 1)
    await asyncio.sleep(0.2)
    assert [(e["event"], e["data"]["key"]) for e in hook.events()] == [("budget.exceeded", "carol")]


async def test_a_hanging_receiver_never_slows_a_request(
    start_backend: StartBackend, start_gateway: StartGateway, receiver: Any
) -> None:
    hook = await receiver(hang=True)
    broken = await start_backend(mode="error")
    options = {"urls": [hook.url], "secret": SECRET, "timeout": 30, "queue_size": 2}
    gateway = await start_gateway(broken, plugins={"webhooks": options})
    try:
        for _ in range(20):  # each fails, each is an event: the queue fills, the receiver never answers
            reply = await asyncio.wait_for(gateway.chat("hi"), timeout=5)
            assert reply.status == 500
        await eventually(lambda: len(hook.got) == 1)
        plugin = gateway.state.plugins.pm.get_plugin("webhooks")
        assert plugin.dropped > 0 and plugin.delivered == 0
    finally:
        hook.release.set()


async def test_private_addresses_are_refused_unless_allowed(
    start_backend: StartBackend, start_gateway: StartGateway, receiver: Any
) -> None:
    hook = await receiver()
    backend = await start_backend(mode="error")
    literal = {"urls": [hook.url], "secret": SECRET, "allow_private": False}
    with pytest.raises(ConfigError, match=r"127\.0\.0\.1 is a loopback address; webhooks go to public addresses"):
        await start_gateway(backend, plugins={"webhooks": literal})
    by_name = {**literal, "urls": [hook.url.replace("127.0.0.1", "localhost")]}
    gateway = await start_gateway(backend, plugins={"webhooks": by_name})
    assert (await gateway.chat("hi")).status == 500
    plugin = gateway.state.plugins.pm.get_plugin("webhooks")
    await eventually(lambda: plugin.refused == 1)
    assert hook.got == [], "nothing reached the private address"
