"""Connections to the gateway's own server, with raw sockets: half-close, idle keep-alive, slow headers."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from gateway import config as config_mod
from gateway.app import create_app
from gateway.server import GatewayServer
from gateway.state import GATEWAY
from tests.conftest import StartBackend


@pytest.fixture
async def serve(
    start_backend: StartBackend, gateway_config: Callable[..., config_mod.GatewayConfig]
) -> AsyncIterator[Callable[..., Any]]:
    servers: list[GatewayServer] = []

    async def start(**server: Any) -> GatewayServer:
        backend = await start_backend()
        config = gateway_config(
            server={"port": 0, **server}, backends=[{"name": "b", "url": backend.url, "models": ["echo"]}]
        )
        gateway = GatewayServer(create_app(config), config.server)
        await gateway.start()
        servers.append(gateway)
        return gateway

    yield start
    for gateway in servers:
        await gateway.stop()


def _chat(port: int) -> bytes:
    body = json.dumps({"model": "echo", "messages": [{"role": "user", "content": "half closed"}]}).encode()
    head = f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
    return head.encode() + f"Content-Length: {len(body)}\r\n\r\n".encode() + body


async def test_a_client_that_half_closes_after_its_request_gets_the_answer(serve: Callable[..., Any]) -> None:
    server = await serve()
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(_chat(server.port))
    await writer.drain()
    writer.write_eof()  # shutdown(SHUT_WR): "that was my whole request"
    answer = await asyncio.wait_for(reader.read(), 5)  # until the gateway closes the connection
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    assert json.loads(body)["choices"][0]["message"]["content"] == "half closed"
    writer.close()


async def test_an_idle_half_closed_connection_is_closed_at_once(serve: Callable[..., Any]) -> None:
    server = await serve()
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write_eof()
    assert await asyncio.wait_for(reader.read(), 2) == b""
    writer.close()


async def test_an_idle_keep_alive_connection_is_closed_after_keepalive_timeout(serve: Callable[..., Any]) -> None:
    server = await serve(keepalive_timeout=0.3)
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(f"GET /health HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\n\r\n".encode())
    assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 200")
    answered = time.monotonic()
    await asyncio.wait_for(reader.read(), 3)  # the rest of the body, then the close
    assert 0.25 < time.monotonic() - answered < 2
    writer.close()


async def test_slow_headers_get_a_408_after_header_timeout(serve: Callable[..., Any]) -> None:
    server = await serve(header_timeout=0.3)
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    started = time.monotonic()
    writer.write(b"GET /health HTTP/1.1\r\nHost: x\r\n")

    async def slowloris() -> None:  # one more header line every 0.1 s, never finishing
        while not writer.is_closing():
            await asyncio.sleep(0.1)
            writer.write(b"X-Slow: y\r\n")

    trickle = asyncio.create_task(slowloris())
    answer = await asyncio.wait_for(reader.read(), 3)
    trickle.cancel()
    assert time.monotonic() - started < 1.5
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408")
    assert "server.header_timeout" in json.loads(body)["error"]["message"]
    writer.close()


async def test_headers_sent_in_time_are_served(serve: Callable[..., Any]) -> None:
    server = await serve(header_timeout=0.3)
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    for line in (b"GET /health HTTP/1.1\r\n", b"Host: x\r\n", b"Connection: close\r\n", b"\r\n"):
        writer.write(line)
        await asyncio.sleep(0.05)
    assert (await asyncio.wait_for(reader.read(), 3)).startswith(b"HTTP/1.1 200")
    writer.close()


async def test_a_queued_request_whose_client_closed_leaves_the_queue(
    aiohttp_server: Any, gateway_config: Callable[..., config_mod.GatewayConfig]
) -> None:
    """With the gateway's own server a closed and a half-closed client look alike (EOF): one still in the
    fair queue gives up at once, instead of occupying the busy backend for nobody."""
    served: list[str] = []
    one_at_a_time = asyncio.Lock()

    async def chat(request: web.Request) -> web.Response:
        body = await request.json()
        async with one_at_a_time:
            await asyncio.sleep(0.3)
            served.append(body["messages"][0]["content"])
        return web.json_response({"id": "c", "object": "chat.completion", "choices": []})

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    backend = await aiohttp_server(app)
    url = str(backend.make_url("")).rstrip("/")
    config = gateway_config(
        server={"port": 0},
        backends=[{"name": "one-slot", "url": url, "models": ["echo"], "max_concurrency": 1}],
        plugins={"ratelimit": {"max_queue_wait": 30}},
    )
    server = GatewayServer(create_app(config), config.server)
    await server.start()
    try:
        queue = server.app[GATEWAY].plugins.pm.get_plugin("ratelimit").queue

        async def ask(text: str) -> int:
            body = {"model": "echo", "messages": [{"role": "user", "content": text}]}
            async with (
                aiohttp.ClientSession() as session,
                session.post(f"http://127.0.0.1:{server.port}/v1/chat/completions", json=body) as response,
            ):
                return response.status

        first = asyncio.create_task(ask("first"))
        await asyncio.sleep(0.05)
        for _ in range(2):  # two clients send their request and close their socket while it is queued
            _, writer = await asyncio.open_connection("127.0.0.1", server.port)
            writer.write(_chat(server.port))
            await writer.drain()
            writer.close()
        await asyncio.sleep(0.1)
        assert len(queue) == 0  # both left at once
        assert await first == 200 and await asyncio.wait_for(ask("second"), 5) == 200
        assert served == ["first", "second"]
    finally:
        await server.stop()
