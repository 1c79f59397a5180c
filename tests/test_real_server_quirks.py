"""Issue 7 §4: what real servers (llama-cpp-python's above all) do, and the gateway copes with."""

from __future__ import annotations

import asyncio
import re
import uuid
from typing import Any

import openai
import pytest
from aiohttp import web

from gateway.demo import completion_body
from gateway.registry import UNHEALTHY
from tests.conftest import StartGateway, eventually
from tests.test_response_path import CHAT, post, raw_backend


async def _uuid_ids_only(request: web.Request) -> web.Response:
    """Like llama-cpp-python's server: an X-Request-ID that is not a UUID gets a bare 400."""
    given = request.headers.get("X-Request-ID")
    try:
        uuid.UUID(given or "")
    except ValueError:
        return web.Response(status=400)
    body = await request.json()
    return web.json_response(completion_body("chat", body["model"], "hi", "hello"))


CLIENT_UUID = "0190d3c4-5e6f-7a8b-9c0d-1e2f3a4b5c6d"


@pytest.mark.parametrize(
    "client_id", [None, "trace-1", CLIENT_UUID, CLIENT_UUID.upper(), "0190d3c45-e6f-7a8b-9c0d-1e2f3a4b5c6d"]
)
async def test_a_backend_that_takes_only_uuid_request_ids_is_served(
    client_id: str | None, aiohttp_server: Any, start_gateway: StartGateway
) -> None:
    """The backend gets the client's id when it is a UUID in canonical text, else one of the gateway's own
    (36 characters with a hyphen out of place is no canonical UUID, though ``uuid.UUID`` would take it)."""
    seen: list[str] = []

    async def backend(request: web.Request) -> web.Response:
        seen.append(request.headers.get("X-Request-ID", ""))
        return await _uuid_ids_only(request)

    gateway = await start_gateway(await raw_backend(aiohttp_server, backend))
    headers = {"X-Request-ID": client_id} if client_id else {}
    status, body, answered = await post(gateway.base_url + "/chat/completions", headers=headers)
    assert status == 200 and body["object"] == "chat.completion"
    if client_id:
        assert answered["X-Request-ID"] == client_id  # the client's own id comes back to it
    else:
        uuid.UUID(answered["X-Request-ID"])  # the gateway's id is a UUID
    [sent] = seen
    assert (sent == client_id) is (client_id is not None and client_id.lower() == CLIENT_UUID)
    assert re.fullmatch(r"[0-9a-fA-F]{8}(-[0-9a-fA-F]{4}){3}-[0-9a-fA-F]{12}", sent)


def _empty(status: int) -> Any:
    async def answer(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(status=status)

    return answer


@pytest.mark.parametrize("status", [400, 500])
@pytest.mark.parametrize("stream", [False, True])
async def test_an_empty_backend_error_reaches_the_client_in_the_envelope_naming_the_backend(
    status: int, stream: bool, aiohttp_server: Any, start_gateway: StartGateway
) -> None:
    gateway = await start_gateway(await raw_backend(aiohttp_server, _empty(status)))
    message = f"backend b0 answered {status} with an empty body"
    got, body, headers = await post(gateway.base_url + "/chat/completions", {**CHAT, "stream": stream})
    assert (got, body["error"]["message"]) == (status, message) and headers["Content-Type"] == "application/json"
    client = openai.AsyncOpenAI(base_url=gateway.base_url, api_key="x", max_retries=0)
    with pytest.raises(openai.APIStatusError) as raised:
        await client.chat.completions.create(model="echo", messages=CHAT["messages"], stream=stream)  # type: ignore[call-overload]
    assert raised.value.status_code == status and message in str(raised.value)
    await client.close()


async def test_a_json_backend_error_passes_as_it_is(aiohttp_server: Any, start_gateway: StartGateway) -> None:
    payload = {"error": {"message": "n_ctx exceeded", "type": "invalid_request_error", "code": 400}}

    async def refuse(request: web.Request) -> web.Response:
        await request.read()
        return web.json_response(payload, status=400)

    gateway = await start_gateway(await raw_backend(aiohttp_server, refuse))
    assert (await post(gateway.base_url + "/chat/completions"))[:2] == (400, payload)


class OneAtATime:
    """A server that works on one request at a time: GET /v1/models waits while it generates."""

    def __init__(self) -> None:
        self.generating = False
        self.hang_probes = False

    async def answer(self, request: web.Request) -> web.StreamResponse:
        if request.method == "GET":
            while self.generating or self.hang_probes:
                await asyncio.sleep(0.02)
            return web.json_response({"object": "list", "data": [{"id": "echo", "object": "model"}]})
        await request.read()
        self.generating = True
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        try:
            for _ in range(8):
                await response.write(b'data: {"choices":[{"index":0,"delta":{"content":"w "}}]}\n\n')
                await asyncio.sleep(0.1)
            await response.write(b"data: [DONE]\n\n")
        finally:
            self.generating = False
        return response


async def test_a_busy_backend_is_not_marked_unhealthy_but_a_silent_idle_one_is(
    aiohttp_server: Any, start_gateway: StartGateway
) -> None:
    server = OneAtATime()
    health = {"health": {"interval": 0.2, "timeout": 0.15, "unhealthy_after": 2}}
    gateway = await start_gateway(await raw_backend(aiohttp_server, server.answer), plugins=health)
    (backend,) = gateway.state.registry.backends.values()
    await eventually(lambda: backend.status == "healthy", timeout=2)
    status, text, _ = await post(gateway.base_url + "/chat/completions", {**CHAT, "stream": True})  # ~0.8 s
    assert status == 200 and text.endswith("data: [DONE]\n\n")
    assert backend.status == "healthy"  # its probes hung all along, while it streamed to us
    server.hang_probes = True  # now it is idle and silent: that is a dead backend
    await eventually(lambda: backend.status == UNHEALTHY, timeout=2)


async def test_a_failing_endpoint_opens_its_own_circuit_not_the_backends(
    aiohttp_server: Any, start_gateway: StartGateway
) -> None:
    async def chat_only(request: web.Request) -> web.Response:
        body = await request.json()
        if request.path.endswith("embeddings"):
            error = {"error": {"message": "Llama model must be created with embedding=True", "type": "server_error"}}
            return web.json_response(error, status=500)
        return web.json_response(completion_body("chat", body["model"], "hi", "hello"))

    gateway = await start_gateway(
        await raw_backend(aiohttp_server, chat_only), plugins={"circuit_breaker": {"consecutive_failures": 3}}
    )
    embed = {"model": "echo", "input": "hello"}
    for _ in range(3):
        assert (await post(gateway.base_url + "/embeddings", embed))[0] == 500
    status, body, _ = await post(gateway.base_url + "/embeddings", embed)
    assert status == 503 and "echo" in body["error"]["message"]  # embeddings' circuit is open
    assert (await post(gateway.base_url + "/chat/completions"))[0] == 200


async def test_an_unknown_path_under_v1_lists_the_endpoints_served(start_gateway: StartGateway) -> None:
    gateway = await start_gateway()
    status, body, _ = await post(gateway.base_url + "/assistants", {"model": "echo", "input": "hi"})
    assert status == 404 and body["error"]["type"] == "not_found_error"
    message = body["error"]["message"]
    assert "/v1/assistants" in message and all(
        f"/v1/{e}" in message for e in ("chat/completions", "completions", "embeddings", "models")
    )


def test_the_gateways_request_ids_are_version_7_uuids_in_time_order() -> None:
    import time
    import uuid

    from gateway.call import new_id

    before = time.time_ns() // 1_000_000
    made = []
    for _ in range(2000):
        made.append(new_id())
        if len(made) % 500 == 0:
            time.sleep(0.002)  # a few milliseconds apart now and then
    after = time.time_ns() // 1_000_000
    assert len(set(made)) == 2000
    for value in made:
        parsed = uuid.UUID(value)
        assert (str(parsed), parsed.version, parsed.variant) == (value, 7, uuid.RFC_4122)
        assert before <= parsed.int >> 80 <= after  # its first 48 bits: the time in milliseconds
    milliseconds = [uuid.UUID(value).int >> 80 for value in made]
    assert milliseconds == sorted(milliseconds) and len(set(milliseconds)) > 1  # text order is time order
    assert sorted(made, key=lambda v: v[:13]) == made
