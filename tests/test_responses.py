"""The Responses API: relayed byte for byte, and a conversation's follow-ups kept on the backend holding it."""

from __future__ import annotations

from typing import Any

import aiohttp
import openai
import pytest

from tests.conftest import ADMIN, RunningGateway, StartGateway
from tests.surface_backend import Surface


@pytest.fixture
async def pair(aiohttp_server, start_gateway: StartGateway) -> tuple[RunningGateway, Surface, Surface]:  # type: ignore[no-untyped-def]
    surfaces = [Surface("s1"), Surface("s2")]
    entries: list[dict[str, Any]] = []
    for surface in surfaces:
        server = await aiohttp_server(surface.app())
        entries.append({"name": surface.name, "url": str(server.make_url("")).rstrip("/"), "models": ["m"]})
    gateway = await start_gateway(backends=entries)
    return gateway, surfaces[0], surfaces[1]


async def test_follow_ups_go_to_the_backend_holding_the_response(pair) -> None:  # type: ignore[no-untyped-def]
    gateway, s1, s2 = pair
    client = openai.AsyncOpenAI(base_url=gateway.base_url, api_key="unused", max_retries=0)
    first = await client.responses.create(model="m", input="hi")
    holder = s1 if first.id in s1.responses else s2
    for _ in range(4):  # round robin would alternate; the conversation stays put
        follow = await client.responses.create(model="m", input="more", previous_response_id=first.id)
        assert follow.output_text == f"{holder.name} answers after {first.id}"

    stream = await client.responses.create(model="m", input="hi", stream=True)
    events = [event async for event in stream]
    assert [e.type for e in events] == ["response.created", "response.output_text.delta", "response.completed"]
    streamed_id = events[0].response.id
    streamed_holder = s1 if streamed_id in s1.responses else s2
    for _ in range(3):
        follow = await client.responses.create(model="m", input="more", previous_response_id=streamed_id)
        assert follow.output_text == f"{streamed_holder.name} answers after {streamed_id}"

    fetched = await client.responses.retrieve(first.id)
    assert fetched.id == first.id
    await client.responses.delete(first.id)
    assert first.id not in holder.responses
    with pytest.raises(openai.NotFoundError) as forgotten:
        await client.responses.retrieve(first.id)
    assert "is not known to this gateway" in str(forgotten.value)
    await client.close()


async def test_body_relayed_as_sent(pair) -> None:  # type: ignore[no-untyped-def]
    gateway, s1, s2 = pair
    sent = b'{"model":"m",  "input": "x", "store": true}'
    async with aiohttp.ClientSession() as session, session.post(f"{gateway.base_url}/responses", data=sent) as answer:
        assert answer.status == 200
        body = await answer.read()
    holder = s1 if s1.seen else s2
    assert holder.seen[0][3] == sent
    assert body == (await gateway.get(f"/v1/responses/{holder.responses and next(iter(holder.responses))}")).body


async def test_a_response_whose_backend_is_gone_is_404(aiohttp_server, start_gateway: StartGateway) -> None:  # type: ignore[no-untyped-def]
    surface = Surface("s1")
    server = await aiohttp_server(surface.app())
    gateway = await start_gateway()
    body = {"endpoint_url": str(server.make_url("")).rstrip("/"), "models": ["m"], "name": "laptop"}
    registered = (await gateway.post("/admin/register", body, ADMIN)).json()
    client = openai.AsyncOpenAI(base_url=gateway.base_url, api_key="unused", max_retries=0)
    first = await client.responses.create(model="m", input="hi")
    async with aiohttp.ClientSession() as session:
        url = f"{gateway.url}/admin/register/{registered['registration_id']}"
        async with session.delete(url, headers=ADMIN) as removed:
            assert removed.status in (200, 204)
    with pytest.raises(openai.NotFoundError) as gone:
        await client.responses.create(model="m", input="more", previous_response_id=first.id)
    assert "held by backend laptop, which is no longer registered" in str(gone.value)
    assert gone.value.code == "response_backend_gone"
    await client.close()
