"""The gateway's end of an agent's connection: a ``Transport`` that multiplexes requests over one WebSocket.

Each request has its own id and its own buffer (an aiohttp ``StreamReader``, as an HTTP
answer's body is): the socket reader only ever appends to it, so a slow client never stalls
the connection. A buffer over its high-water mark sends ``pause`` for that request alone, and
``resume`` once the client has read it down. An agent that breaks the protocol (a bad frame, a
reply to a request it was never sent, bytes past ``pause``) is disconnected; its requests fail:
those not yet answering fail over, streams end with an error event (or resume elsewhere).
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import TYPE_CHECKING, Any

import aiohttp
from aiohttp import web
from aiohttp.base_protocol import BaseProtocol
from multidict import CIMultiDict, CIMultiDictProxy

from gateway.agent_frames import FrameError, control, header_pairs, pieces, read_data
from gateway.transport import Upstream

if TYPE_CHECKING:
    from gateway.call import Call
    from gateway.registry import Backend
    from gateway.state import Gateway

WINDOW = 64 << 10
"""Bytes buffered per request before ``pause`` (aiohttp pauses at twice its limit)."""
OVERRUN = 4 << 20
"""Bytes an agent may still send for a request after ``pause`` (in flight) before it counts as misbehaving."""


class AgentDisconnected(aiohttp.ServerDisconnectedError):
    """The agent's connection closed while a request was on it."""


class AgentRefused(aiohttp.ClientConnectionError):
    """The agent could not get an answer from its own backend (it said why)."""


class _Window(BaseProtocol):
    """The flow control of one request: aiohttp's buffer asks to pause and resume; the agent is told."""

    def __init__(self, link: AgentLink, stream_id: int) -> None:
        super().__init__(asyncio.get_running_loop())
        self.link, self.stream_id, self.since_pause = link, stream_id, 0

    @property
    def connected(self) -> bool:
        return True

    def pause_reading(self) -> None:
        if not self._reading_paused:
            self._reading_paused, self.since_pause = True, 0
            self.link.send_soon(control("pause", id=self.stream_id))

    def resume_reading(self, resume_parser: bool = True) -> None:
        if self._reading_paused:
            self._reading_paused = False
            self.link.send_soon(control("resume", id=self.stream_id))


class AgentAnswer:
    """One request's answer over the connection, read like an aiohttp ``ClientResponse``."""

    def __init__(self, link: AgentLink, stream_id: int) -> None:
        self.link, self.stream_id = link, stream_id
        self.window = _Window(link, stream_id)
        self.content = aiohttp.StreamReader(self.window, WINDOW, loop=asyncio.get_running_loop())
        self.status = 0
        self.headers: CIMultiDictProxy[str] = CIMultiDictProxy(CIMultiDict())
        self.head: asyncio.Future[AgentAnswer] = asyncio.get_running_loop().create_future()

    @property
    def content_type(self) -> str:
        return self.headers.get("Content-Type", "application/octet-stream").split(";")[0].strip().lower()

    @property
    def content_length(self) -> int | None:
        value = self.headers.get("Content-Length", "")
        return int(value) if value.isdigit() else None

    def release(self) -> None:
        self.close()

    def close(self) -> None:
        """Done with it: a request still under way is cancelled on the agent's side."""
        if self.link.streams.pop(self.stream_id, None) is not None and not self.link.closed:
            self.link.send_soon(control("cancel", id=self.stream_id))

    def fail(self, error: BaseException) -> None:
        if not self.head.done():
            self.head.set_exception(error)
        elif not self.content.is_eof():
            self.content.set_exception(error)


class AgentLink:
    """One connected agent: sends it requests (``open``) and sorts what it sends back (``received``)."""

    def __init__(self, ws: web.WebSocketResponse, number: int) -> None:
        self.ws, self.number = ws, number
        self.streams: dict[int, AgentAnswer] = {}
        self.next_id = 0
        self.sent = 0  # requests sent so far: a reply to an id past it is to one never sent
        self.closed = False
        self._sending: set[asyncio.Task[None]] = set()

    def __repr__(self) -> str:
        return f"agent connection {self.number}"

    async def open(
        self,
        gateway: Gateway,
        call: Call,
        backend: Backend,
        headers: CIMultiDict[str],
        body: bytes,
        timeout: aiohttp.ClientTimeout | None,
    ) -> Upstream:
        if self.closed:
            raise AgentDisconnected()
        self.next_id = self.next_id % 0xFFFFFFFE + 1
        self.sent = max(self.sent, self.next_id)
        answer = AgentAnswer(self, self.next_id)
        self.streams[answer.stream_id] = answer
        try:
            sent = [(k, v) for k, v in headers.items()]
            await self.ws.send_str(control("req", id=answer.stream_id, path=f"/v1/{call.endpoint}", headers=sent))
            for frame in pieces(answer.stream_id, body, end=True):
                await self.ws.send_bytes(frame)
            return await answer.head
        except ConnectionResetError:
            answer.close()
            raise AgentDisconnected() from None
        except BaseException:  # timed out, or the client left: the agent stops too
            answer.close()
            raise

    def send_soon(self, text: str) -> None:
        """Send a control message from synchronous code (a buffer's pause, a cancel)."""
        if self.closed:
            return
        task = asyncio.get_running_loop().create_task(self._send(text))
        self._sending.add(task)
        task.add_done_callback(self._sending.discard)

    async def _send(self, text: str) -> None:
        with contextlib.suppress(ConnectionResetError, RuntimeError):  # closing: its reader ends every request
            await self.ws.send_str(text)

    def received(self, message: dict[str, Any] | bytes) -> None:
        """Hand a reply to its request; FrameError if it breaks the protocol."""
        if isinstance(message, bytes):
            stream_id, end, payload = read_data(message)
            answer = self._answer(stream_id)
            if answer is None:
                return
            if not answer.head.done():
                raise FrameError(f"body bytes for request {stream_id} before its headers")
            if answer.window._reading_paused:
                answer.window.since_pause += len(payload)
                if answer.window.since_pause > OVERRUN:
                    raise FrameError(f"request {stream_id}: over {OVERRUN} bytes sent after pause")
            if payload:
                answer.content.feed_data(payload)
            if end:
                self.streams.pop(stream_id, None)
                answer.content.feed_eof()
            return
        kind = message["t"]
        if kind == "res":
            answer = self._answer(message.get("id"))
            status = message.get("status")
            if answer is None:
                return
            if answer.head.done() or type(status) is not int or not 100 <= status <= 599:
                raise FrameError(f"a second or malformed 'res' for request {answer.stream_id}")
            answer.status = status
            answer.headers = CIMultiDictProxy(CIMultiDict(header_pairs(message.get("headers"))))
            answer.head.set_result(answer)
        elif kind == "err":
            answer = self._answer(message.get("id"))
            if answer is None:
                return
            self.streams.pop(answer.stream_id, None)
            answer.fail(AgentRefused(str(message.get("message", ""))[:200]))
        else:
            raise FrameError(f"an unknown message type {kind[:40]!r}")

    def _answer(self, stream_id: Any) -> AgentAnswer | None:
        """The request a reply is for; None for one already let go of (its last bytes may still be under way)."""
        answer = self.streams.get(stream_id) if type(stream_id) is int else None
        if answer is None and not (type(stream_id) is int and 0 < stream_id <= self.sent):
            raise FrameError(f"a reply to request {stream_id!r}, which was never sent")
        return answer

    def lost(self) -> None:
        """The connection ended: every request on it fails."""
        self.closed = True
        for answer in list(self.streams.values()):
            answer.fail(AgentDisconnected())
        self.streams.clear()
