"""Issue 11: `multiverse agent` without --public-url dials out and serves requests over one WebSocket (no tunnel)."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import random
import re
import signal
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import aiohttp
import openai
import pytest

from gateway.agent_frames import MAX_FRAME, PATH, TOKEN_HEADER, control, data_frame, read_control
from gateway.agent_link import AgentLink
from tests.agent_process import AgentProcess, start_agent
from tests.conftest import ADMIN_KEY, FakeBackend, RunningGateway, StartBackend, StartGateway, eventually

CLOSED = (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.CLOSING, aiohttp.WSMsgType.ERROR)
WORD = re.compile(rb'"content": " ?(w\d+)"')
PRIVATE_OFF = {"api_key": ADMIN_KEY, "allow_private_backends": False}


async def dialed(
    start_gateway: StartGateway, backend: FakeBackend, tmp_path: Path, *more: FakeBackend, **sections: object
) -> tuple[RunningGateway, AgentProcess]:
    """A gateway that refuses private URLs, and an agent that dialed in to serve ``backend``."""
    gateway = await start_gateway(*more, plugins={"leases": {}}, admin=PRIVATE_OFF, **sections)
    agent = await start_agent(
        gateway.url, ADMIN_KEY, backend.url, tmp_path / "agent.json", "--name", "ana", dial_out=True
    )
    await agent.wait_for("over an outbound connection")
    return gateway, agent


def link_of(gateway: RunningGateway) -> AgentLink:
    [backend] = [b for b in gateway.state.registry.backends.values() if b.source == "api"]
    assert isinstance(backend.transport, AgentLink)
    return backend.transport


async def test_the_openai_sdk_gets_chat_and_completions_through_an_agent_that_dialed_out(
    start_backend: StartBackend, start_gateway: StartGateway, tmp_path: Path
) -> None:
    backend = await start_backend(models=["tiny"])
    gateway, agent = await dialed(start_gateway, backend, tmp_path)
    refused = await gateway.post(
        "/admin/register", {"endpoint_url": backend.url, "models": ["tiny"]}, {"X-API-Key": ADMIN_KEY}
    )
    assert refused.status == 400  # the local server cannot be registered by URL: only the agent reaches it
    client = openai.AsyncOpenAI(base_url=gateway.base_url, api_key="unused", max_retries=0)
    chat = await client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hello there"}])
    assert chat.choices[0].message.content == "hello there"
    text = await client.completions.create(model="tiny", prompt="one two")
    assert text.choices[0].text == "one two"
    words = []
    async for chunk in await client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "a b c d"}], stream=True
    ):
        words.extend(c.delta.content for c in chunk.choices if c.delta.content)
    assert words == ["a", " b", " c", " d"]
    pieces = [c.choices[0].text async for c in await client.completions.create(model="tiny", prompt="x y", stream=True)]
    assert "".join(pieces) == "x y"
    servers = (await gateway.get("/admin/servers", {"X-API-Key": ADMIN_KEY})).json()
    [entry] = [s for s in servers["servers"] if s["source"] == "api"] if isinstance(servers, dict) else servers
    assert entry["notes"]["agent"]["transport"].startswith("agent connection")
    assert ADMIN_KEY not in agent.output
    assert await agent.stop() == 0
    await agent.wait_for("removed from the gateway")


async def test_sixteen_streams_share_one_connection_chunk_for_chunk_and_a_slow_reader_delays_none(
    start_backend: StartBackend, start_gateway: StartGateway, tmp_path: Path
) -> None:
    backend = await start_backend(models=["tiny"], chunks=20, delay=0.02)
    by_url = await start_backend(models=["tiny-http"], chunks=20, delay=0.02, name="by-url")
    gateway, agent = await dialed(start_gateway, backend, tmp_path, by_url)

    def body(model: str) -> dict[str, object]:
        return {"model": model, "messages": [{"role": "user", "content": "hi"}], "stream": True}

    async with aiohttp.ClientSession() as session:
        slow = await session.post(gateway.url + "/v1/chat/completions", json=body("tiny"))  # read later, if at all

        async def one(model: str) -> tuple[list[bytes], list[float], float]:
            started = time.perf_counter()
            arrivals = []
            async with session.post(gateway.url + "/v1/chat/completions", json=body(model)) as response:
                assert response.status == 200
                chunks = []
                async for chunk in response.content.iter_any():
                    chunks.append(chunk)
                    arrivals.append(time.perf_counter())
            return chunks, [b - a for a, b in itertools.pairwise(arrivals[:20])], time.perf_counter() - started

        both = await asyncio.gather(*(one(m) for _ in range(16) for m in ("tiny", "tiny-http")))  # interleaved
        slow.close()
    assert len({id(b.transport) for b in gateway.state.registry.backends.values() if b.source == "api"}) == 1
    alone = 0
    for chunks, _, took in both:
        carrying = [WORD.findall(c) for c in chunks]
        assert WORD.findall(b"".join(chunks)) == [f"w{i}".encode() for i in range(20)]  # all, in order
        alone += sum(len(ws) == 1 for ws in carrying)
        assert took < 20 * 0.02 + 1.5  # the slow reader held up no one
    # Each word (sent 20 ms apart) comes in its own chunk. Client, gateway and backends share this event
    # loop, so a stall of a loaded CI machine can let the client read two at once (CI saw 1 of 640); a
    # relay that held or batched chunks would merge most of them.
    assert alone >= 0.95 * 20 * len(both), alone
    through_agent = statistics.median(g for _, gaps, _ in both[0::2] for g in gaps)
    over_http = statistics.median(g for _, gaps, _ in both[1::2] for g in gaps)
    # The goal is 0.3 ms (met in docs/benchmarks.md, separate processes). Here the client, the
    # gateway and both backends share one event loop with 32 streams: measured +0.03 to +0.35 ms on a
    # quiet 2-core machine, +2 ms with both cores busy elsewhere, so the bound (a quarter of the 20 ms
    # between words) catches a relay that holds chunks back, not noise; the benchmark measures the goal.
    assert through_agent - over_http < 0.005, (through_agent, over_http)
    await agent.stop(signal.SIGKILL)


async def test_a_client_that_hangs_up_mid_stream_cancels_the_request_on_the_agents_side(
    start_backend: StartBackend, start_gateway: StartGateway, tmp_path: Path
) -> None:
    backend = await start_backend(models=["tiny"], chunks=100, delay=0.05)
    gateway, agent = await dialed(start_gateway, backend, tmp_path)
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    async with aiohttp.ClientSession() as session:
        response = await session.post(gateway.url + "/v1/chat/completions", json=body)
        assert b"w0" in await response.content.readany()
        response.close()
    await eventually(lambda: backend.cancelled == 1, timeout=3.0)
    await eventually(lambda: not link_of(gateway).streams)
    assert (await gateway.chat(model="tiny")).status == 200  # the connection serves on
    await agent.stop(signal.SIGKILL)


async def test_killing_the_agent_takes_its_backend_out_at_once_loses_no_request_and_a_restart_is_the_same_backend(
    start_backend: StartBackend, start_gateway: StartGateway, tmp_path: Path
) -> None:
    remote = await start_backend(models=["tiny"], latency=0.2, name="by-url")
    local = await start_backend(models=["tiny"], latency=0.2)
    gateway, agent = await dialed(start_gateway, local, tmp_path, remote)
    [registration] = [b for b in gateway.state.registry.backends.values() if b.source == "api"]
    statuses: list[int] = []
    stop = asyncio.Event()

    async def client() -> None:
        while not stop.is_set():
            statuses.append((await gateway.chat("ping", model="tiny")).status)

    clients = [asyncio.create_task(client()) for _ in range(8)]
    await eventually(lambda: len(local.seen) >= 4)
    await agent.stop(signal.SIGKILL)
    killed = time.monotonic()
    await eventually(lambda: registration.transport is None, timeout=1.0)
    assert time.monotonic() - killed < 1.0
    explain = await gateway.post("/v1/route/explain", {"model": "tiny", "messages": []})
    assert "not connected" in str(explain.json())
    served_before = len(local.seen)
    await asyncio.sleep(0.5)
    again = await start_agent(
        gateway.url, ADMIN_KEY, local.url, tmp_path / "agent.json", "--name", "ana", dial_out=True
    )
    await again.wait_for("over an outbound connection")
    await eventually(lambda: len(local.seen) > served_before + 2)
    stop.set()
    await asyncio.gather(*clients)
    assert statuses and set(statuses) == {200}, statuses  # nothing lost, though the agent died under load
    assert [b.id for b in gateway.state.registry.backends.values() if b.source == "api"] == [registration.id]
    await again.stop(signal.SIGKILL)


async def raw_agent(session: aiohttp.ClientSession, gateway: RunningGateway) -> aiohttp.ClientWebSocketResponse:
    """A hand-driven agent connection: the test plays the agent, frame by frame."""
    headers = {"X-API-Key": ADMIN_KEY, TOKEN_HEADER: "raw-agent-token-0123456789"}
    ws = await session.ws_connect(gateway.url + PATH, headers=headers, max_msg_size=0)
    await ws.send_str(control("hello", name="raw", models=["tiny"], interval=1.0))
    assert read_control(await ws.receive_str(timeout=5))["t"] == "welcome"
    return ws


async def test_a_client_that_does_not_read_pauses_only_its_own_request(
    start_gateway: StartGateway,
) -> None:
    gateway = await start_gateway(plugins={"leases": {}}, admin=PRIVATE_OFF)
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    sse = {"Content-Type": "text/event-stream"}
    async with aiohttp.ClientSession() as agent_side, aiohttp.ClientSession() as clients:
        ws = await raw_agent(agent_side, gateway)
        messages: asyncio.Queue[dict[str, object]] = asyncio.Queue()
        seen: list[dict[str, object]] = []

        async def read() -> None:
            async for message in ws:
                if message.type == aiohttp.WSMsgType.TEXT:
                    seen.append(read_control(message.data))
                    await messages.put(seen[-1])

        reader = asyncio.create_task(read())
        stalling = asyncio.create_task(clients.post(gateway.url + "/v1/chat/completions", json=body))  # never read
        first = await asyncio.wait_for(messages.get(), 5)
        assert first["t"] == "req"
        await ws.send_str(control("res", id=first["id"], status=200, headers=[[k, v] for k, v in sse.items()]))
        event = b"data: " + b"x" * 8000 + b"\n\n"
        sent = 0
        while not any(m["t"] == "pause" and m["id"] == first["id"] for m in seen) and sent < 64 << 20:
            await ws.send_bytes(data_frame(int(first["id"]), event * 8))  # type: ignore[call-overload]
            sent += len(event) * 8
            await asyncio.sleep(0.001)
        assert any(m["t"] == "pause" for m in seen), f"no pause after {sent} bytes"
        started = time.perf_counter()
        other = asyncio.create_task(clients.post(gateway.url + "/v1/chat/completions", json=body))
        second = await asyncio.wait_for(messages.get(), 5)
        while second["t"] != "req":
            second = await asyncio.wait_for(messages.get(), 5)
        await ws.send_str(control("res", id=second["id"], status=200, headers=[[k, v] for k, v in sse.items()]))
        await ws.send_bytes(data_frame(int(second["id"]), b"data: [DONE]\n\n", end=True))  # type: ignore[call-overload]
        answer = await other
        assert await answer.read() == b"data: [DONE]\n\n" and time.perf_counter() - started < 1.0
        stalled = await stalling
        await stalled.content.read(1 << 20)  # the stalled client reads: its request flows again
        await eventually(lambda: any(m["t"] == "resume" for m in seen))
        stalled.close()
        await eventually(lambda: any(m["t"] == "cancel" for m in seen))
        reader.cancel()
        await ws.close()


async def test_a_fuzzing_agent_is_disconnected_and_logged_and_never_takes_the_gateway_down(
    start_backend: StartBackend, start_gateway: StartGateway, tmp_path: Path
) -> None:
    backend = await start_backend(models=["tiny"])
    rng = random.Random(11)
    bad: list[Callable[[], str | bytes]] = [
        lambda: rng.randbytes(rng.randrange(0, 12)),
        lambda: data_frame(rng.randrange(1, 1 << 32), b"stray"),
        lambda: "not json {",
        lambda: json.dumps([1, 2]),
        lambda: control("res", id=rng.randrange(100, 1 << 31), status=200, headers=[]),
        lambda: control("res", id="x"),
        lambda: control(rng.choice(["", "req", "welcome", "nope"]), id=1),
        lambda: "x" * (MAX_FRAME + 10),
        lambda: control("beat", models=[], interval=-1),
        lambda: control("hello", name=7, models="tiny"),
    ]
    gateway = await start_gateway(plugins={"leases": {}}, admin=PRIVATE_OFF)
    deadline = time.monotonic() + 15
    async with aiohttp.ClientSession() as session:
        for round_ in range(40):
            if time.monotonic() > deadline:
                break
            ws = (
                await raw_agent(session, gateway)
                if round_ % 2
                else await session.ws_connect(
                    gateway.url + PATH, headers={"X-API-Key": ADMIN_KEY, TOKEN_HEADER: "raw-agent-token-0123456789"}
                )
            )
            frame = rng.choice(bad)()
            await (ws.send_bytes(frame) if isinstance(frame, bytes) else ws.send_str(frame))
            with contextlib.suppress(TimeoutError):
                while (await ws.receive(timeout=1.0)).type not in CLOSED:
                    pass
            assert ws.closed or ws.close_code is not None or (round_ % 2 == 0 and isinstance(frame, str))
            await ws.close()
    assert (await gateway.get("/v1/models")).status == 200
    agent = await start_agent(gateway.url, ADMIN_KEY, backend.url, tmp_path / "a.json", "--name", "ana", dial_out=True)
    await agent.wait_for("over an outbound connection")
    assert (await gateway.chat(model="tiny")).status == 200
    await agent.stop(signal.SIGKILL)


async def test_a_model_server_that_stops_answering_takes_its_backend_out_until_it_answers_again(
    start_backend: StartBackend, start_gateway: StartGateway, tmp_path: Path
) -> None:
    backend = await start_backend(models=["tiny"])
    gateway, agent = await dialed(start_gateway, backend, tmp_path)
    link = link_of(gateway)
    backend.models_status = 503  # GET /v1/models fails: the agent hangs up rather than take requests
    await eventually(lambda: link.closed, timeout=3.0)
    await agent.wait_for("backend down at")
    assert (await gateway.chat(model="tiny")).status == 503
    backend.models_status = 200
    await agent.wait_for("reconnected as ana")
    assert (await gateway.chat(model="tiny")).status == 200
    await agent.stop(signal.SIGKILL)


@pytest.mark.parametrize("resume", [False, True])
async def test_a_stream_answering_when_the_agent_dies_ends_with_an_error_event_or_resumes(
    start_backend: StartBackend, start_gateway: StartGateway, tmp_path: Path, resume: bool
) -> None:
    local = await start_backend(models=["tiny"], chunks=40, delay=0.05)
    remote = await start_backend(models=["tiny"], chunks=40, name="by-url")
    routing = {"resume_streams": resume, "strategy": "round_robin"}
    gateway, agent = await dialed(start_gateway, local, tmp_path, remote, routing=routing)
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    async with aiohttp.ClientSession() as session:
        for _ in range(2):  # round robin: one of the two goes through the agent
            async with session.post(gateway.url + "/v1/chat/completions", json=body) as response:
                if response.headers["X-Multiverse-Backend"] != "ana":
                    await response.read()
                    continue
                assert b"w0" in await response.content.readany()
                await agent.stop(signal.SIGKILL)
                rest = await response.read()
    if resume:
        assert b"event: error" not in rest and b"w39" in rest and b"[DONE]" in rest  # continued on by-url
    else:
        assert b"event: error" in rest and b"failed mid-stream" in rest
