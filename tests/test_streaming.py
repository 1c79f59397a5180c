"""Streams pass through unbuffered; failures and hang-ups end them cleanly."""

from __future__ import annotations

import asyncio
import json
import time

import aiohttp
import openai
import pytest

from tests.conftest import StartBackend, StartGateway

CHAT = {"model": "echo", "stream": True, "messages": [{"role": "user", "content": "hi"}]}


async def test_first_chunk_arrives_before_the_second_is_sent(
    start_backend: StartBackend, start_gateway: StartGateway
) -> None:
    backend = await start_backend(chunks=2, delay=1.0)
    gateway = await start_gateway(backend)
    arrivals: list[tuple[float, bytes]] = []
    async with aiohttp.ClientSession() as session:
        started = time.perf_counter()
        async with session.post(gateway.base_url + "/chat/completions", json=CHAT) as response:
            assert response.status == 200
            assert response.headers["Content-Type"].startswith("text/event-stream")
            async for chunk in response.content.iter_any():
                arrivals.append((time.perf_counter() - started, chunk))
    first_at, first = arrivals[0]
    assert b'"w0"' in first and b'"w1"' not in first, "chunk 1 was held back and merged with chunk 2"
    assert first_at < 0.5, f"chunk 1 reached the client {first_at:.2f}s after the request"
    second_at = next(t for t, c in arrivals if b'"w1"' in c or b"\\u0020w1" in c or b" w1" in c)
    assert second_at >= 0.9 and second_at - first_at >= 0.8


async def test_stream_through_sdk_yields_chunks_as_they_come(
    start_backend: StartBackend, start_gateway: StartGateway
) -> None:
    backend = await start_backend(chunks=3, delay=0.4)
    gateway = await start_gateway(backend)
    client = openai.AsyncOpenAI(base_url=gateway.base_url, api_key="x", max_retries=0)
    started = time.perf_counter()
    times = []
    stream = await client.chat.completions.create(**CHAT)
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            times.append(time.perf_counter() - started)
    assert len(times) == 3
    assert times[0] < 0.3 and times[1] - times[0] > 0.3 and times[2] - times[1] > 0.3
    await client.close()


async def test_backend_dying_mid_stream_ends_with_an_error_the_sdk_raises(
    start_backend: StartBackend, start_gateway: StartGateway
) -> None:
    backend = await start_backend(mode="die_after", chunks=5, die_after=2)
    gateway = await start_gateway(backend)
    client = openai.AsyncOpenAI(base_url=gateway.base_url, api_key="x", max_retries=0)
    received = []
    stream = await client.chat.completions.create(**CHAT)
    with pytest.raises(openai.APIError) as failure:
        async for chunk in stream:
            received.append(chunk.choices[0].delta.content)
    assert received == ["w0", " w1"]
    assert "failed mid-stream" in str(failure.value.message)
    await client.close()


async def test_client_hanging_up_mid_stream_cancels_the_backend(
    start_backend: StartBackend, start_gateway: StartGateway
) -> None:
    backend = await start_backend(chunks=100, delay=0.1)
    gateway = await start_gateway(backend, plugins={"tests.observer_plugin": None})
    completed = gateway.state.plugins.pm.get_plugin("tests.observer_plugin").calls
    async with aiohttp.ClientSession() as session:
        response = await session.post(gateway.base_url + "/chat/completions", json=CHAT)
        await response.content.readany()
        response.close()
    for _ in range(50):
        if backend.cancelled and completed:
            break
        await asyncio.sleep(0.05)
    assert backend.cancelled == 1, "the backend kept generating for a client that left"
    assert completed[0].client_disconnected


async def test_client_hanging_up_before_first_byte_cancels_the_backend(
    start_backend: StartBackend, start_gateway: StartGateway
) -> None:
    backend = await start_backend(mode="hang")
    gateway = await start_gateway(backend)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=0.3)) as session:
        with pytest.raises(asyncio.TimeoutError):
            await session.post(gateway.base_url + "/chat/completions", json=CHAT)
    for _ in range(40):
        if backend.cancelled:
            break
        await asyncio.sleep(0.05)
    assert backend.cancelled == 1


async def test_resume_streams_continues_on_another_backend(
    start_backend: StartBackend, start_gateway: StartGateway
) -> None:
    dying = await start_backend(mode="die_after", chunks=6, die_after=2)
    healthy = await start_backend(chunks=6)
    gateway = await start_gateway(dying, healthy, routing={"resume_streams": True})
    client = openai.AsyncOpenAI(base_url=gateway.base_url, api_key="x", max_retries=0)
    raw = await client.chat.completions.with_raw_response.create(**CHAT)
    assert raw.headers["X-Multiverse-Backend"] == "b0"
    pieces = [c.choices[0].delta.content async for c in raw.parse() if c.choices and c.choices[0].delta.content]
    assert "".join(pieces) == "w0 w1 w2 w3 w4 w5", "one coherent answer across the two backends"
    continuation = json.loads(healthy.seen[-1].body)
    assert continuation["messages"][-1] == {"role": "assistant", "content": "w0 w1"}
    assert continuation["continue_final_message"] is True and continuation["add_generation_prompt"] is False
    await client.close()


async def test_resume_streams_gives_the_error_event_when_no_one_can_continue(
    start_backend: StartBackend, start_gateway: StartGateway
) -> None:
    dying = await start_backend(mode="die_after", chunks=6, die_after=3)
    gateway = await start_gateway(dying, routing={"resume_streams": True})
    client = openai.AsyncOpenAI(base_url=gateway.base_url, api_key="x", max_retries=0)
    received = []
    with pytest.raises(openai.APIError, match="failed mid-stream"):
        async for chunk in await client.chat.completions.create(**CHAT):
            received.append(chunk.choices[0].delta.content)
    assert received == ["w0", " w1", " w2"]
    await client.close()


def test_partial_events_are_held_back_until_whole() -> None:
    from gateway.pump import _split_events

    event = b'data: {"choices": [{"text": " upon", "index": 0}]}\r\n\r\n'
    assert _split_events(event[:10]) == (b"", event[:10])
    rest = b'data: {"choices": [{"text": " a ti'
    assert _split_events(event + rest) == (event, rest)
    assert _split_events(b"data: 1\n\ndata: 2\n\n") == (b"data: 1\n\ndata: 2\n\n", b"")


def test_the_continuation_asks_to_go_on_from_the_text_so_far() -> None:
    from gateway.call import Call
    from gateway.resume import Continuation

    call = Call(None, None, "r", "completions", b"", {"model": "m", "prompt": "Once", "stream": True})  # type: ignore[arg-type]
    resume = Continuation(call)
    assert call.listeners == [resume.feed]
    resume.feed(b'data: {"choices": [{"text": " upon", "index": 0}]}\r\n\r\n')
    assert json.loads(resume.body()) == {"model": "m", "prompt": "Once upon", "stream": True}


def test_a_recorder_keeps_an_answer_up_to_its_limit_then_only_counts() -> None:
    from gateway.pump import Recorder

    recorder = Recorder(10)
    for chunk in (b"12345", b"6789", b"abc", b"d"):
        recorder(chunk)
    assert (recorder.chunks, recorder.size, recorder.overflow) == ([b"12345", b"6789"], 9, 4)
