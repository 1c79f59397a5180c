"""``multiverse agent`` without ``--public-url``: it dials out to the gateway and serves requests over that connection.

The student's machine accepts no connection at all: the agent opens one WebSocket to the
gateway (through the same HTTPS front door and any proxy), says ``hello`` with its models,
and forwards each request the gateway sends to the local model server, streaming the answer
back chunk for chunk. It honours ``pause``/``resume`` per request and cancels a request at
once when the gateway says ``cancel``. Heartbeats carry the load. If the connection drops it
reconnects with backoff and jitter, as the same backend.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from typing import TYPE_CHECKING, Any

import aiohttp

from gateway.agent_frames import (
    MAX_FRAME,
    PATH,
    TOKEN_HEADER,
    FrameError,
    control,
    header_pairs,
    pieces,
    read_control,
    read_data,
)

if TYPE_CHECKING:
    from gateway.agent import Agent

_NOT_SENT = frozenset({"host", "content-length", "transfer-encoding", "connection", "content-encoding"})
MAX_BODY = 64 << 20
"""The largest request body the agent takes from the gateway."""


class _Request:
    """One request the gateway sent: its body as it arrives, then the task forwarding it."""

    def __init__(self, path: str, headers: list[tuple[str, str]]) -> None:
        self.path, self.headers = path, headers
        self.body: list[bytes] = []
        self.size = 0
        self.task: asyncio.Task[None] | None = None
        self.flowing = asyncio.Event()
        self.flowing.set()


class DialOut:
    def __init__(self, agent: Agent) -> None:
        self.agent = agent
        self.requests: dict[int, _Request] = {}
        self.link: aiohttp.ClientWebSocketResponse | None = None

    @property
    def url(self) -> str:
        base = self.agent.options.gateway.rstrip("/")
        return ("ws" + base[4:] if base.startswith("http") else base) + PATH

    def auth(self) -> dict[str, str]:
        headers = {"Authorization": f"Bearer {self.agent.options.key}"}
        if not self.agent.options.key.startswith("mvb-"):
            headers[TOKEN_HEADER] = self.agent.state["agent_token"]
        return headers

    async def run(self, session: aiohttp.ClientSession) -> None:
        """Stay connected until stopped: reconnect with exponential backoff and jitter."""
        agent, backoff = self.agent, 0.5
        from gateway.agent import Refused

        while not agent.stop.is_set():
            models = await agent._backend_models()
            if models:
                try:
                    async with session.ws_connect(
                        self.url, headers=self.auth(), max_msg_size=MAX_FRAME, heartbeat=30.0, autoping=True
                    ) as ws:
                        self.link = ws
                        if await self._connected(ws, models):
                            backoff = 0.5
                            await self._serve(ws, session)
                except aiohttp.WSServerHandshakeError as exc:
                    if exc.status == 404:
                        raise Refused(
                            "the gateway has no agent endpoints: its admin enables `plugins: {leases: {}}`"
                        ) from None
                    if exc.status in (401, 403):
                        raise Refused(f"the gateway refused the key (HTTP {exc.status})") from None
                    self._down(f"HTTP {exc.status}")
                except (aiohttp.ClientError, TimeoutError, FrameError) as exc:
                    self._down(type(exc).__name__)
                finally:
                    self.link = None
                    await self._drop_all()
            wait = backoff * random.uniform(0.5, 1.5) if models else agent.options.interval
            backoff = min(backoff * 2, 30.0)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(agent.stop.wait(), wait)

    def _down(self, reason: str) -> None:
        line = f"gateway unreachable at {self.agent.options.gateway} ({reason}); reconnecting with backoff"
        self.agent._change("gateway_down", True, line)

    async def _connected(self, ws: aiohttp.ClientWebSocketResponse, models: list[str]) -> bool:
        agent = self.agent
        hello = {"name": agent.name, "models": models, "interval": agent.options.interval, "load": await agent._load()}
        await ws.send_str(control("hello", **hello))
        answer = read_control(await ws.receive_str(timeout=10.0))
        agent._change("gateway_down", False, f"gateway reachable at {agent.options.gateway}")
        if answer["t"] == "refused":
            from gateway.agent import Refused

            raise Refused(f"the gateway refused the agent (HTTP {answer.get('status')}): {answer.get('message')}")
        if agent.registered is None:
            agent.say(
                f"registered as {answer.get('name')} ({answer.get('registration_id')}) over an outbound connection "
                f"serving {', '.join(answer.get('models') or [])} (no tunnel needed)"
            )
        else:
            agent.say(f"reconnected as {answer.get('name')} ({answer.get('registration_id')})")
        agent.registered = answer
        return True

    async def _serve(self, ws: aiohttp.ClientWebSocketResponse, session: aiohttp.ClientSession) -> None:
        beats = asyncio.create_task(self._beat(ws))
        leaving = asyncio.create_task(self._leave_when_stopped())
        try:
            async for message in ws:
                if message.type == aiohttp.WSMsgType.BINARY:
                    self._body(ws, session, message.data)
                elif message.type == aiohttp.WSMsgType.TEXT:
                    if self._control(read_control(message.data)):
                        return
                else:
                    break
        finally:
            beats.cancel()
            leaving.cancel()
        if not self.agent.stop.is_set() and not self.agent.flags.get("backend_down"):
            self._down("the connection closed")

    def _control(self, message: dict[str, Any]) -> bool:
        """Act on a control message; True once the agent has left."""
        kind, stream_id = message["t"], message.get("id")
        request = self.requests.get(stream_id) if isinstance(stream_id, int) else None
        if kind == "req" and isinstance(stream_id, int) and stream_id not in self.requests:
            path = str(message.get("path", ""))
            if not path.startswith("/v1/"):
                raise FrameError("a request for a path outside /v1/")
            self.requests[stream_id] = _Request(path, header_pairs(message.get("headers")))
        elif kind == "cancel" and request is not None:
            self.requests.pop(stream_id, None)  # type: ignore[arg-type]
            if request.task is not None:
                request.task.cancel()
        elif kind == "pause" and request is not None:
            request.flowing.clear()
        elif kind == "resume" and request is not None:
            request.flowing.set()
        elif kind == "left":
            self.agent.say("kept as offline at the gateway" if message.get("kept") else "removed from the gateway")
            self.agent.registered = None
            return True
        elif kind == "drained":
            self.agent.say(f"draining: {message.get('in_flight', 0)} request(s) in flight")
        return False

    def _body(self, ws: aiohttp.ClientWebSocketResponse, session: aiohttp.ClientSession, frame: bytes) -> None:
        stream_id, end, payload = read_data(frame)
        request = self.requests.get(stream_id)
        if request is None or request.task is not None:
            return  # cancelled meanwhile
        request.size += len(payload)
        if request.size > MAX_BODY:
            raise FrameError(f"a request body over {MAX_BODY} bytes")
        request.body.append(payload)
        if end:
            request.task = asyncio.create_task(self._forward(ws, session, stream_id, request))

    async def _forward(
        self, ws: aiohttp.ClientWebSocketResponse, session: aiohttp.ClientSession, stream_id: int, request: _Request
    ) -> None:
        """Send one request to the local model server and stream its answer back, chunk for chunk."""
        url = self.agent.backend + request.path
        headers = [(k, v) for k, v in request.headers if k.lower() not in _NOT_SENT]
        try:
            async with session.post(url, data=b"".join(request.body), headers=headers, allow_redirects=False) as answer:
                kept = [[k, v] for k, v in answer.headers.items() if k.lower() not in _NOT_SENT]
                if "Content-Encoding" not in answer.headers and answer.content_length is not None:
                    kept.append(["Content-Length", str(answer.content_length)])
                await ws.send_str(control("res", id=stream_id, status=answer.status, headers=kept))
                async for chunk in answer.content.iter_any():
                    await request.flowing.wait()
                    for frame in pieces(stream_id, chunk, end=False):
                        await ws.send_bytes(frame)
                await ws.send_bytes(pieces(stream_id, b"", end=True)[0])
        except (aiohttp.ClientError, TimeoutError) as exc:
            with contextlib.suppress(aiohttp.ClientError, ConnectionResetError):
                await ws.send_str(control("err", id=stream_id, message=f"its backend failed: {type(exc).__name__}"))
        finally:
            self.requests.pop(stream_id, None)

    async def _beat(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        """Heartbeats with the load, over the connection (the connection itself is the lease)."""
        interval = self.agent.options.interval
        with contextlib.suppress(aiohttp.ClientError, ConnectionResetError):
            while True:
                await asyncio.sleep(interval)
                models = await self.agent._backend_models()
                if not models:  # the model server is down: leave routing now, connect again once it answers
                    await ws.close()
                    return
                await ws.send_str(control("beat", models=models, interval=interval, load=await self.agent._load()))

    async def _leave_when_stopped(self) -> None:
        await self.agent.stop.wait()
        with contextlib.suppress(aiohttp.ClientError, ConnectionResetError):
            await self.leave()

    async def _drop_all(self) -> None:
        tasks = [r.task for r in self.requests.values() if r.task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self.requests.clear()

    async def leave(self) -> None:
        """Drain (the gateway sends nothing new; running requests finish), then leave, over the connection."""
        ws = self.link
        if ws is None or ws.closed:
            self.agent.say("not connected to the gateway: its registration stays until it connects again")
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.agent.options.drain_timeout
        await ws.send_str(control("drain"))
        while any(r.task is not None and not r.task.done() for r in self.requests.values()) and loop.time() < deadline:
            await asyncio.sleep(0.1)
        await ws.send_str(control("leave", keep=self.agent.options.keep))
