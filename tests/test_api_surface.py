"""The OpenAI endpoints beyond chat, relayed byte for byte: audio, images, rerank, score, moderations."""

from __future__ import annotations

import io
import struct
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import openai
import pytest

from tests.conftest import ADMIN, StartGateway
from tests.surface_backend import SPEECH, Surface

StartSurface = Callable[..., Awaitable[tuple[Surface, dict[str, Any]]]]


def wav(seconds: float = 0.1, rate: int = 8000) -> bytes:
    """A small WAV-like payload: a RIFF header and silence."""
    samples = b"\x00\x00" * int(seconds * rate)
    header = b"RIFF" + struct.pack("<I", 36 + len(samples)) + b"WAVEfmt "
    header += struct.pack("<IHHIIHH", 16, 1, 1, rate, rate * 2, 2, 16) + b"data" + struct.pack("<I", len(samples))
    return header + samples


@pytest.fixture
def start_surface(aiohttp_server) -> StartSurface:  # type: ignore[no-untyped-def]
    async def start(name: str, models: list[str], **config: Any) -> tuple[Surface, dict[str, Any]]:
        surface = Surface(name)
        server = await aiohttp_server(surface.app())
        url = str(server.make_url("")).rstrip("/")
        return surface, {"name": name, "url": url, "models": models, **config}

    return start


@pytest.mark.filterwarnings("ignore:deprecated:DeprecationWarning")
async def test_sdk_uses_audio_images_and_moderations(start_surface: StartSurface, start_gateway: StartGateway) -> None:
    surface, entry = await start_surface("s1", ["whisper", "tts", "sd", "guard"])
    gateway = await start_gateway(backends=[entry])
    client = openai.AsyncOpenAI(base_url=gateway.base_url, api_key="unused", max_retries=0)

    heard = await client.audio.transcriptions.create(model="whisper", file=("a.wav", io.BytesIO(wav())))
    assert heard.text == f"heard {len(wav())} bytes as whisper by s1"
    as_text = await client.audio.transcriptions.create(
        model="whisper", file=("a.wav", io.BytesIO(wav())), response_format="text"
    )
    translated = await client.audio.translations.create(model="whisper", file=("a.wav", io.BytesIO(wav())))
    assert translated.text.endswith("by s1")
    assert as_text.strip() == f"heard {len(wav())} bytes"
    speech = await client.audio.speech.create(model="tts", voice="alloy", input="hello")
    assert speech.read() == SPEECH
    image = await client.images.generate(model="sd", prompt="a cat")
    assert image.data and image.data[0].b64_json == "aW1n"
    moderated = await client.moderations.create(model="guard", input="hi")
    assert moderated.results[0].flagged is False
    await client.close()
    assert [s[1] for s in surface.seen] == [
        "audio/transcriptions", "audio/transcriptions", "audio/translations",
        "audio/speech", "images/generations", "moderations",
    ]  # fmt: skip
    assert all("authorization" not in {k.lower() for k in s[2]} for s in surface.seen)


async def test_rerank_and_score_relayed_byte_for_byte(start_surface: StartSurface, start_gateway: StartGateway) -> None:
    surface, entry = await start_surface("s1", ["bge"])
    gateway = await start_gateway(backends=[entry])
    sent = b'{ "model" : "bge", "query": "q", "documents": ["a", "b"] }'
    async with aiohttp.ClientSession() as session:
        for endpoint in ("rerank", "score"):
            async with session.post(f"{gateway.base_url}/{endpoint}", data=sent) as response:
                assert response.status == 200
                assert (await response.json())["by"] == "s1"
                assert response.headers["X-Multiverse-Backend"] == "s1"
    assert [s[3] for s in surface.seen] == [sent, sent]


async def test_endpoints_declared_route_and_refuse(start_surface: StartSurface, start_gateway: StartGateway) -> None:
    chat_only, chat_entry = await start_surface("chat", ["m"], endpoints=["chat/completions"])
    images, images_entry = await start_surface("images", ["m"], endpoints=["images/generations"])
    gateway = await start_gateway(backends=[chat_entry, images_entry])
    for _ in range(3):
        reply = await gateway.post("/v1/images/generations", {"model": "m", "prompt": "p"})
        assert reply.status == 200 and reply.backend == "images"
    refused = await gateway.post("/v1/moderations", {"model": "m", "input": "x"})
    assert refused.status == 404
    error = refused.json()["error"]
    assert error["code"] == "endpoint_not_served"
    assert "no backend of model 'm' serves /v1/moderations" in error["message"]
    assert not chat_only.seen and len(images.seen) == 3


async def test_a_new_endpoint_fails_over(start_surface: StartSurface, start_gateway: StartGateway) -> None:
    first, first_entry = await start_surface("first", ["sd"])
    second, second_entry = await start_surface("second", ["sd"])
    gateway = await start_gateway(backends=[first_entry, second_entry], routing={"strategy": "round_robin"})
    first.fail = 1
    reply = await gateway.post("/v1/images/generations", {"model": "sd", "prompt": "p"})
    assert reply.status == 200 and reply.backend == "second"
    assert reply.headers["X-Multiverse-Attempts"] == "2"
    assert len(first.seen) == len(second.seen) == 1


async def test_upload_limit_is_its_own_setting(start_surface: StartSurface, start_gateway: StartGateway) -> None:
    surface, entry = await start_surface("s1", ["whisper"])
    gateway = await start_gateway(backends=[entry], server={"max_upload_bytes": 2000, "max_body_bytes": 100_000})
    client = openai.AsyncOpenAI(base_url=gateway.base_url, api_key="unused", max_retries=0)
    with pytest.raises(openai.APIStatusError) as too_large:
        await client.audio.transcriptions.create(model="whisper", file=("a.wav", io.BytesIO(wav(1.0))))
    assert too_large.value.status_code == 413
    assert "raise server.max_upload_bytes" in str(too_large.value)
    small = await client.audio.transcriptions.create(model="whisper", file=("a.wav", io.BytesIO(wav(0.05))))
    assert small.text.startswith("heard")
    with pytest.raises(openai.BadRequestError) as no_model:
        await client.audio.transcriptions.create(model="", file=("a.wav", io.BytesIO(wav(0.05))))
    assert "'model'" in str(no_model.value)
    await client.close()
    not_a_form = await gateway.post("/v1/audio/transcriptions", {"model": "whisper"})
    assert not_a_form.status == 400 and "multipart/form-data" in not_a_form.json()["error"]["message"]
    assert len(surface.seen) == 1


async def test_a_fallback_model_is_written_into_the_form(
    start_surface: StartSurface, start_gateway: StartGateway
) -> None:
    surface, entry = await start_surface("s1", ["whisper-small"])
    gateway = await start_gateway(backends=[entry], routing={"fallbacks": {"whisper": ["whisper-small"]}})
    async with aiohttp.ClientSession() as session:
        form = aiohttp.FormData()
        form.add_field("file", wav(), filename="a.wav")
        form.add_field("model", "whisper")
        async with session.post(f"{gateway.base_url}/audio/transcriptions", data=form) as response:
            assert response.status == 200
            assert (await response.json())["text"].endswith("as whisper-small by s1")
    sent = surface.seen[0][3]
    assert sent.count(wav()) == 1


async def test_a_registration_declares_its_endpoints(start_surface: StartSurface, start_gateway: StartGateway) -> None:
    surface, entry = await start_surface("s1", ["m"])
    gateway = await start_gateway()
    bad = await gateway.post(
        "/admin/register", {"endpoint_url": entry["url"], "models": ["m"], "endpoints": ["x"]}, ADMIN
    )
    assert bad.status == 400 and "unknown endpoint 'x'" in bad.json()["error"]["message"]
    body = {"endpoint_url": entry["url"], "models": ["m"], "endpoints": ["rerank"]}
    registered = await gateway.post("/admin/register", body, ADMIN)
    assert registered.status == 201 and registered.json()["endpoints"] == ["rerank"]
    assert (await gateway.post("/v1/rerank", {"model": "m", "query": "q", "documents": []})).status == 200
    assert (await gateway.post("/v1/score", {"model": "m", "text_1": "a", "text_2": "b"})).status == 404
    assert len(surface.seen) == 1
