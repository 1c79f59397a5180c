"""The real openai SDK, sync and async, against a gateway on a real port."""

from __future__ import annotations

import asyncio
import uuid

import openai
import pytest

from tests.conftest import StartBackend, StartGateway

MESSAGES = [{"role": "user", "content": "the quick brown fox"}]


@pytest.fixture
async def gateway(start_backend: StartBackend, start_gateway: StartGateway):  # type: ignore[no-untyped-def]
    backend = await start_backend(models=["echo", "other"])
    return await start_gateway(backend)


async def test_async_client_uses_every_endpoint(gateway) -> None:  # type: ignore[no-untyped-def]
    client = openai.AsyncOpenAI(base_url=gateway.base_url, api_key="unused", max_retries=0)
    models = [m.id async for m in client.models.list()]
    assert models == ["echo", "other"]

    chat = await client.chat.completions.create(model="echo", messages=MESSAGES)
    assert chat.choices[0].message.content == "the quick brown fox"
    assert chat.model == "echo"

    stream = await client.chat.completions.create(model="echo", messages=MESSAGES, stream=True)
    pieces = [c.choices[0].delta.content async for c in stream if c.choices and c.choices[0].delta.content]
    assert "".join(pieces) == "the quick brown fox"

    text = await client.completions.create(model="other", prompt="one two")
    assert text.choices[0].text == "one two"

    text_stream = await client.completions.create(model="other", prompt="one two", stream=True)
    assert "".join([c.choices[0].text async for c in text_stream]) == "one two"

    embedded = await client.embeddings.create(model="echo", input=["a", "b"])
    assert len(embedded.data) == 2 and len(embedded.data[0].embedding) == 8
    await client.close()


async def test_sync_client_uses_every_endpoint(gateway) -> None:  # type: ignore[no-untyped-def]
    def use_sdk() -> dict[str, object]:
        with openai.OpenAI(base_url=gateway.base_url, api_key="unused", max_retries=0) as client:
            stream = client.chat.completions.create(model="echo", messages=MESSAGES, stream=True)
            return {
                "models": [m.id for m in client.models.list()],
                "chat": client.chat.completions.create(model="echo", messages=MESSAGES).choices[0].message.content,
                "stream": "".join(c.choices[0].delta.content or "" for c in stream if c.choices),
                "text": client.completions.create(model="echo", prompt="x y").choices[0].text,
                "embedding": client.embeddings.create(model="echo", input="x").data[0].embedding,
            }

    got = await asyncio.to_thread(use_sdk)
    assert got["models"] == ["echo", "other"]
    assert got["chat"] == got["stream"] == "the quick brown fox"
    assert got["text"] == "x y"
    assert isinstance(got["embedding"], list) and len(got["embedding"]) == 8


async def test_sdk_raises_typed_errors(gateway) -> None:  # type: ignore[no-untyped-def]
    client = openai.AsyncOpenAI(base_url=gateway.base_url, api_key="unused", max_retries=0)
    with pytest.raises(openai.NotFoundError) as not_found:
        await client.chat.completions.create(model="llama-3", messages=MESSAGES)
    assert "model 'llama-3' is not served here; available: echo, other" in str(not_found.value)
    assert not_found.value.code == "model_not_found"

    with pytest.raises(openai.BadRequestError) as bad:
        await client.chat.completions.create(model="", messages=MESSAGES)
    assert "'model' must be a non-empty string" in str(bad.value)
    await client.close()


async def test_backend_sees_body_as_sent_and_no_client_key(
    start_backend: StartBackend, start_gateway: StartGateway
) -> None:
    backend = await start_backend()
    gateway = await start_gateway(backend)
    client = openai.AsyncOpenAI(base_url=gateway.base_url, api_key="sk-client-secret", max_retries=0)
    raw = await client.chat.completions.with_raw_response.create(
        model="echo", messages=MESSAGES, extra_headers={"X-Request-ID": "req-from-client"}
    )
    assert raw.headers["x-request-id"] == "req-from-client"
    assert raw.headers["x-multiverse-backend"] == "b0"
    seen = backend.seen[-1]
    assert "sk-client-secret" not in str(seen.headers)
    assert "Authorization" not in seen.headers
    # the client's own id stays with the client and the logs; a backend gets a UUID (some refuse anything else)
    assert str(uuid.UUID(seen.headers["X-Request-ID"])) == seen.headers["X-Request-ID"]
    assert b'"model":"echo"' in seen.body  # the SDK's compact JSON, forwarded byte for byte
    await client.close()
