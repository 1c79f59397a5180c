"""Hosted providers as backends: fake ones on loopback that check the key header and answer in their shape."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
import structlog
from aiohttp import web
from openai import AsyncOpenAI

from tests.conftest import ADMIN, StartGateway, closed_port_url

pytestmark = pytest.mark.asyncio

KEY = "sk-test-provider-0123456789abcdef"


@dataclass
class Provider:
    """An OpenAI-compatible provider: its endpoints under ``prefix``, a bearer key it accepts."""

    prefix: str = ""  # /openai (Groq), /api (OpenRouter), /v1beta/openai (Gemini: no /v1 below it)
    key: str = KEY
    version: str = "/v1"
    refuse: int | None = None  # answer every request with this status (401, 403)
    busy: bool = False  # answer 429 with Retry-After
    listed: str = "gpt-4o-mini"  # the id GET /models lists (Gemini: models/gemini-2.0-flash)
    seen: list[tuple[str, str]] = field(default_factory=list)  # (path, Authorization) of each request
    url: str = ""

    def app(self) -> web.Application:
        app = web.Application()
        base = self.prefix + self.version
        app.router.add_post(base + "/chat/completions", self._chat)
        app.router.add_get(base + "/models", self._models)
        return app

    def _refusal(self, request: web.Request) -> web.Response | None:
        given = request.headers.get("Authorization", "")
        self.seen.append((request.path, given))
        if self.busy:
            error = {"message": "Rate limit reached for gpt-4o-mini", "type": "requests", "code": "rate_limit_exceeded"}
            return web.json_response({"error": error}, status=429, headers={"Retry-After": "30"})
        if self.refuse is None and given == f"Bearer {self.key}":
            return None
        shown = given.removeprefix("Bearer ")[:12]  # OpenAI quotes the start of a wrong key back
        error = {"message": f"Incorrect API key provided: {shown}***.", "type": "invalid_request_error"}
        return web.json_response({"error": {**error, "code": "invalid_api_key"}}, status=self.refuse or 401)

    async def _chat(self, request: web.Request) -> web.Response:
        refusal = self._refusal(request)
        if refusal is not None:
            return refusal
        body = await request.json()
        message = {"role": "assistant", "content": f"hosted answer from {body['model']}"}
        return web.json_response({
            "id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": body["model"],
            "choices": [{"index": 0, "message": message, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 1000, "completion_tokens": 1000, "total_tokens": 2000},
        })  # fmt: skip

    async def _models(self, request: web.Request) -> web.Response:
        refusal = self._refusal(request)
        return refusal or web.json_response({"object": "list", "data": [{"id": self.listed, "object": "model"}]})


@pytest.fixture
async def start_provider(aiohttp_server: Any) -> Any:
    async def start(**fields: Any) -> Provider:
        provider = Provider(**fields)
        server = await aiohttp_server(provider.app())
        provider.url = str(server.make_url("")).rstrip("/") + provider.prefix
        return provider

    return start


def hosted(provider: Provider, name: str = "openai", **fields: Any) -> dict[str, Any]:
    return {"name": name, "url": provider.url, "models": ["gpt-4o-mini"], "api_key": "${OPENAI_API_KEY}", **fields}


async def test_the_key_comes_from_the_environment_and_is_never_shown(
    start_provider: Any, start_gateway: StartGateway, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    provider = await start_provider(prefix="/openai")  # Groq's base URL: https://api.groq.com/openai
    gateway = await start_gateway(backends=[hosted(provider)])
    client = AsyncOpenAI(base_url=gateway.base_url, api_key="unused")
    answer = await client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}])
    assert answer.choices[0].message.content == "hosted answer from gpt-4o-mini"
    assert provider.seen == [("/openai/v1/chat/completions", f"Bearer {KEY}")]
    servers = await gateway.get("/admin/servers", headers=ADMIN)
    assert KEY not in servers.body.decode()
    [listed] = [s for s in servers.json()["servers"] if s["name"] == "openai"]
    assert listed["has_api_key"] is True


async def test_a_base_url_that_ends_in_its_version_takes_api_path_empty(
    start_provider: Any, start_gateway: StartGateway, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    gemini = await start_provider(prefix="/v1beta/openai", version="", listed="models/gemini-2.0-flash")
    backend = {**hosted(gemini, "gemini", api_path=""), "models": ["gemini-2.0-flash"]}
    gateway = await start_gateway(backends=[backend], plugins={"health": {}})
    reply = await gateway.chat(model="gemini-2.0-flash")
    assert reply.status == 200, reply.body
    assert gemini.seen[-1] == ("/v1beta/openai/chat/completions", f"Bearer {KEY}")
    probed = await gateway.post("/admin/health/probe", {}, headers=ADMIN)
    assert [p["probe"] for p in probed.json()["backends"]] == ["healthy"]
    assert gemini.seen[-1] == ("/v1beta/openai/models", f"Bearer {KEY}")


async def test_a_refused_key_is_a_configuration_error_logged_once_and_never_echoed(
    start_provider: Any, start_gateway: StartGateway, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-wrong-key-9876543210")
    provider = await start_provider()
    gateway = await start_gateway(backends=[hosted(provider)])
    with structlog.testing.capture_logs() as logs:
        first = await gateway.chat(model="gpt-4o-mini")
        second = await gateway.chat(model="gpt-4o-mini")
    assert first.status == 502
    assert first.json()["error"]["code"] == "provider_key_refused"
    assert "api_key" in first.json()["error"]["message"]
    for reply in (first, second):
        assert "sk-wrong" not in reply.body.decode() and "Incorrect API key" not in reply.body.decode()
    assert second.status == 503 and second.json()["error"]["code"] == "provider_key_refused"
    assert len(provider.seen) == 1  # taken out of routing after the first refusal
    refusals = [entry for entry in logs if entry["event"] == "backend_key_refused"]
    assert len(refusals) == 1 and "OPENAI_API_KEY" in refusals[0]["detail"]
    assert not [entry for entry in logs if entry["event"] == "backend_failed"]
    assert "sk-wrong" not in json.dumps(logs, default=str)
    [backend] = gateway.state.registry.backends.values()
    assert (backend.status, backend.failed) == ("mismatched", 0)


async def test_a_refused_key_fails_over_to_the_next_backend(
    start_provider: Any, start_gateway: StartGateway, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-wrong-key-9876543210")
    wrong = await start_provider()
    right = await start_provider(key="sk-other-provider-key-0000")
    other = {**hosted(right, "openrouter"), "api_key": "sk-other-provider-key-0000"}
    gateway = await start_gateway(backends=[hosted(wrong), other], plugins={"circuit_breaker": {}})
    replies = [await gateway.chat(model="gpt-4o-mini") for _ in range(4)]
    assert [r.status for r in replies] == [200] * 4
    assert {r.backend for r in replies} == {"openrouter"}
    assert len(wrong.seen) == 1


async def test_a_403_is_not_passed_on_and_keeps_the_backend_in_routing(
    start_provider: Any, start_gateway: StartGateway, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    provider = await start_provider(refuse=403)  # e.g. a flagged prompt, or a model the account may not use
    gateway = await start_gateway(backends=[hosted(provider)], plugins={"circuit_breaker": {}})
    with structlog.testing.capture_logs() as logs:
        replies = [await gateway.chat(model="gpt-4o-mini") for _ in range(4)]
    assert [r.status for r in replies] == [502] * 4
    assert all(KEY[:12] not in r.body.decode() for r in replies)
    assert len(provider.seen) == 4  # not taken out, and no circuit opened: not counted as the backend's failure
    assert len([e for e in logs if e["event"] == "backend_key_refused"]) == 1
    [backend] = gateway.state.registry.backends.values()
    assert backend.routable and backend.failed == 0 and "circuit" not in backend.notes


async def test_a_providers_429_retry_after_is_honoured(
    start_provider: Any, start_gateway: StartGateway, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    limited = await start_provider(busy=True)
    spare = await start_provider()
    backends = [hosted(limited), hosted(spare, "together")]
    gateway = await start_gateway(backends=backends, plugins={"circuit_breaker": {}})
    replies = [await gateway.chat(model="gpt-4o-mini") for _ in range(4)]
    assert [r.status for r in replies] == [200] * 4
    assert len(limited.seen) == 1  # skipped for its Retry-After (30 s) after the first 429
    servers = await gateway.get("/admin/servers", headers=ADMIN)
    assert "open" not in json.dumps([s["notes"] for s in servers.json()["servers"]])


async def test_a_fallback_to_a_paid_model_only_for_keys_allowed_it(
    start_provider: Any, start_gateway: StartGateway, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    provider = await start_provider()
    students_gpu = {"name": "gpu", "url": closed_port_url(), "models": ["gemma-3-270m"]}
    gateway = await start_gateway(
        backends=[students_gpu, hosted(provider)],
        routing={"fallbacks": {"gemma-3-270m": ["gpt-4o-mini"]}},
        models={"gpt-4o-mini": {"cost_per_1k_prompt_tokens": 0.15, "cost_per_1k_completion_tokens": 0.6}},
        plugins={"auth": {}, "usage": {}},
    )
    keys = {}
    for name, models in (("student", ["gemma-3-270m"]), ("teacher", ["gemma-3-270m", "gpt-4o-mini"])):
        made = await gateway.post("/admin/keys", {"name": name, "models": models}, headers=ADMIN)
        assert made.status == 201, made.body
        keys[name] = {"Authorization": f"Bearer {made.json()['key']}"}
    body = {"model": "gemma-3-270m", "messages": [{"role": "user", "content": "hi"}]}
    student = await gateway.post("/v1/chat/completions", body, headers=keys["student"])
    assert student.status == 503, student.body
    assert "gpt-4o-mini" not in student.body.decode()
    assert provider.seen == []
    teacher = await gateway.post("/v1/chat/completions", body, headers=keys["teacher"])
    assert teacher.status == 200 and teacher.backend == "openai"
    assert teacher.json()["model"] == "gpt-4o-mini"
    assert provider.seen == [("/v1/chat/completions", f"Bearer {KEY}")]
    usage = await gateway.get("/admin/usage", headers=ADMIN)
    [teachers] = [row for row in usage.json()["data"] if row["key"] == "teacher"]
    assert teachers["cost"] == pytest.approx(1000 / 1000 * 0.15 + 1000 / 1000 * 0.6)  # the paid model's prices


async def test_a_registered_backend_whose_key_was_refused_is_routed_again_once_its_key_changes(
    start_provider: Any, start_gateway: StartGateway
) -> None:
    provider = await start_provider()
    gateway = await start_gateway()
    registration = {"endpoint_url": provider.url, "models": ["gpt-4o-mini"], "api_key": "sk-typo"}
    made = await gateway.post("/admin/register", registration, headers=ADMIN)
    assert made.status in (200, 201), made.body
    assert (await gateway.chat(model="gpt-4o-mini")).status == 502
    [backend] = gateway.state.registry.backends.values()
    assert backend.status == "mismatched" and "api_key" in (backend.last_error or "")
    async with aiohttp.ClientSession() as session:
        fixed = {"api_key": KEY}
        url = f"{gateway.url}/admin/register/{backend.id}"
        async with session.put(url, json=fixed, headers=ADMIN) as response:
            assert response.status == 200, await response.text()
    reply = await gateway.chat(model="gpt-4o-mini")
    assert reply.status == 200, reply.body
