"""Anthropic's Messages API with the official SDK: relayed to backends that speak it, translated for the rest."""

from __future__ import annotations

import json
from typing import Any

import aiohttp
import anthropic
import pytest
from aiohttp import web

from tests.conftest import StartBackend, StartGateway
from tests.surface_backend import Surface

TOOL = {"name": "weather", "description": "the weather", "input_schema": {"type": "object", "properties": {}}}


def sdk(gateway: Any) -> anthropic.AsyncAnthropic:
    return anthropic.AsyncAnthropic(base_url=gateway.url, api_key="client-key", max_retries=0)


async def test_relayed_to_a_backend_that_speaks_messages(aiohttp_server, start_gateway: StartGateway) -> None:  # type: ignore[no-untyped-def]
    surface = Surface("native")
    server = await aiohttp_server(surface.app())
    url = str(server.make_url("")).rstrip("/")
    gateway = await start_gateway(
        backends=[{"name": "native", "url": url, "models": ["m"], "endpoints": ["messages", "messages/count_tokens"]}]
    )
    client = sdk(gateway)
    message = await client.messages.create(model="m", max_tokens=16, messages=[{"role": "user", "content": "hi"}])
    assert message.content[0].text == "native speaks Messages"  # type: ignore[union-attr]
    counted = await client.messages.count_tokens(model="m", messages=[{"role": "user", "content": "hi"}])
    assert counted.input_tokens == 7
    await client.close()
    _, endpoint, headers, body = surface.seen[0]
    assert endpoint == "messages" and json.loads(body)["max_tokens"] == 16
    lowered = {k.lower(): v for k, v in headers.items()}
    assert "x-api-key" not in lowered and "authorization" not in lowered
    assert lowered["anthropic-version"]


async def test_errors_in_anthropic_shape(start_backend: StartBackend, start_gateway: StartGateway) -> None:
    gateway = await start_gateway(await start_backend(models=["echo"]))
    client = sdk(gateway)
    with pytest.raises(anthropic.NotFoundError) as unknown:
        await client.messages.create(model="llama", max_tokens=8, messages=[{"role": "user", "content": "hi"}])
    assert unknown.value.body == {
        "type": "error",
        "error": {"type": "not_found_error", "message": unknown.value.body["error"]["message"]},  # type: ignore[index]
    }
    assert "no backend of model 'echo' serves /v1/messages" in str(
        (await gateway.post("/v1/messages", {"model": "echo", "max_tokens": 1, "messages": []})).json()["error"]
    )
    await client.close()
    async with aiohttp.ClientSession() as session, session.post(f"{gateway.url}/v1/messages", data=b"{") as bad:
        assert bad.status == 400
        shaped = await bad.json()
        assert shaped["type"] == "error" and shaped["error"]["type"] == "invalid_request_error"
    missing = await gateway.get("/v1/messages/nope")
    assert missing.status in (404, 405) and missing.json()["type"] == "error"


async def test_translated_for_a_chat_backend(start_backend: StartBackend, start_gateway: StartGateway) -> None:
    backend = await start_backend(models=["echo"])
    gateway = await start_gateway(backend, plugins={"messages_to_chat": {}})
    client = sdk(gateway)
    message = await client.messages.create(
        model="echo", max_tokens=64, system="be brief", messages=[{"role": "user", "content": "one two three"}]
    )
    assert message.content[0].text == "one two three"  # type: ignore[union-attr]
    assert message.model == "echo" and message.stop_reason == "end_turn"
    assert message.usage.output_tokens > 0
    sent = backend.seen[0].json()
    assert sent["messages"][0] == {"role": "system", "content": "be brief"}
    assert backend.seen[0].path == "/v1/chat/completions"

    async with client.messages.stream(
        model="echo", max_tokens=64, messages=[{"role": "user", "content": "four five six"}]
    ) as stream:
        text = "".join([piece async for piece in stream.text_stream])
        final = await stream.get_final_message()
    assert text == "four five six" and final.stop_reason == "end_turn"
    assert final.usage.output_tokens > 0
    counted = await client.messages.count_tokens(model="echo", messages=[{"role": "user", "content": "hi"}])
    assert counted.input_tokens > 0
    await client.close()


def tool_backend() -> web.Application:
    """A chat backend that always calls the tool ``weather`` with {"city": "Oslo"}."""
    call = {"index": 0, "id": "call_1", "type": "function", "function": {"name": "weather", "arguments": ""}}

    async def chat(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        assert body["tools"][0]["function"]["name"] == "weather"
        if not body.get("stream"):
            message = {
                "role": "assistant",
                "content": None,
                "tool_calls": [{**call, "function": {"name": "weather", "arguments": '{"city": "Oslo"}'}}],
            }
            return web.json_response({"id": "c1", "choices": [{"index": 0, "message": message,
                                                                "finish_reason": "tool_calls"}],
                                      "usage": {"prompt_tokens": 5, "completion_tokens": 3}})  # fmt: skip
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        deltas = [
            {"role": "assistant", "content": "Let me look."},
            {"tool_calls": [call]},
            {"tool_calls": [{"index": 0, "function": {"arguments": '{"city": '}}]},
            {"tool_calls": [{"index": 0, "function": {"arguments": '"Oslo"}'}}]},
        ]
        for delta in deltas:
            chunk = {"id": "c1", "choices": [{"index": 0, "delta": delta, "finish_reason": None}]}
            await response.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
        done = {"id": "c1", "choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]}
        usage = {"id": "c1", "choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 3}}
        for last in (done, usage):
            await response.write(b"data: " + json.dumps(last).encode() + b"\n\n")
        await response.write(b"data: [DONE]\n\n")
        return response

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    return app


async def test_tool_use_translated_both_ways(aiohttp_server, start_gateway: StartGateway) -> None:  # type: ignore[no-untyped-def]
    server = await aiohttp_server(tool_backend())
    url = str(server.make_url("")).rstrip("/")
    gateway = await start_gateway(
        backends=[{"name": "t", "url": url, "models": ["m"]}], plugins={"messages_to_chat": {}}
    )
    client = sdk(gateway)
    asked = [{"role": "user", "content": "weather?"}]
    message = await client.messages.create(model="m", max_tokens=64, messages=asked, tools=[TOOL])  # type: ignore[list-item]
    assert message.stop_reason == "tool_use"
    block = message.content[0]
    assert block.type == "tool_use" and block.input == {"city": "Oslo"} and block.name == "weather"
    assert message.usage.input_tokens == 5
    async with client.messages.stream(model="m", max_tokens=64, messages=asked, tools=[TOOL]) as stream:  # type: ignore[list-item]
        final = await stream.get_final_message()
    assert [b.type for b in final.content] == ["text", "tool_use"]
    assert final.content[1].input == {"city": "Oslo"}  # type: ignore[union-attr]
    assert final.stop_reason == "tool_use" and final.usage.output_tokens == 3
    await client.close()
