"""The chunk pump: the one place a streamed answer is written to the client.

A live backend's stream and a plugin's replayed stream (``ChunkSource``, e.g. a cache
hit) go through the same writes, so headers, counts, ``usage`` and chunk listeners
behave the same for both. Listeners cost nothing when none is attached.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import aiohttp
from aiohttp import web

from gateway.logs import get_logger
from gateway.upstream import describe

if TYPE_CHECKING:
    from gateway.call import Call

log = get_logger("gateway.pump")
_USAGE_MARK = b'"prompt_tokens"'
_EVENT_END = b"\n\n"
MAX_EVENT_BYTES = 1 << 20
"""The longest SSE event held back whole (for a chunk filter or a resumable stream); longer is a broken stream."""


@dataclass
class ChunkSource:
    """An answer a plugin replays as a stream, chunk for chunk (``answer_request`` may return one)."""

    chunks: Iterable[bytes] | AsyncIterable[bytes]
    status: int = 200
    headers: Mapping[str, str] = field(default_factory=lambda: {"Content-Type": "text/event-stream"})


class EventStream(web.StreamResponse):
    """A streamed answer whose headers leave with its first chunk: one write and one packet, not two.

    aiohttp's ``StreamResponse`` sends its headers alone at ``prepare()``; a relay only prepares
    once the first chunk is in hand, so the client woke twice for nothing.
    """

    _send_headers_immediately = False


async def write(response: web.StreamResponse, call: Call, chunk: bytes, last: bool = False) -> None:
    """Send one chunk to the client (through the call's filters) and let the call's listeners see it.

    ``last``: nothing follows, so the chunk leaves with the end of the response in one write.
    """
    if _USAGE_MARK in chunk:
        call.usage = body_usage(chunk) or call.usage  # OpenAI sends it in the last event before [DONE]
    if call.filters:
        chunk = _filtered(call, chunk)
        if not chunk:
            return
    await (response.write_eof(chunk) if last else response.write(chunk))
    call.bytes_out += len(chunk)
    call.chunks += 1
    if call.listeners:
        _tell(call, chunk)


def _filtered(call: Call, chunk: bytes) -> bytes:
    assert call.filters is not None
    for chunk_filter in list(call.filters):
        try:
            chunk = chunk_filter(chunk)
        except Exception:
            call.filters.remove(chunk_filter)
            log.exception("chunk_filter_failed", request_id=call.request_id, filter=_name(chunk_filter))
        if not chunk:
            return b""
    return chunk


def _name(fn: object) -> str:
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', fn)}"


def _tell(call: Call, chunk: bytes) -> None:
    assert call.listeners is not None
    for listener in list(call.listeners):
        try:
            listener(chunk)
        except Exception:
            call.listeners.remove(listener)
            log.exception("chunk_listener_failed", request_id=call.request_id, listener=_name(listener))


async def pump(
    response: web.StreamResponse,
    call: Call,
    content: aiohttp.StreamReader,
    chunk: bytes,
    stall: float,
    whole_events: bool,
) -> str | None:
    """Copy one backend's stream to the client; return why it broke, or None at its end.

    With ``whole_events`` only complete SSE events are passed on (a resumed stream must
    never carry half an event from the backend that died); the rest waits for its end.
    """
    loop = asyncio.get_running_loop()
    backend = call.backend
    pending = b""
    try:
        async with asyncio.timeout(None) as stall_guard:
            while chunk:
                if whole_events:
                    chunk, pending = _split_events(pending + chunk if pending else chunk)
                    if len(pending) > MAX_EVENT_BYTES:  # never hold (and rescan) an endless "event"
                        return f"sent an SSE event over {MAX_EVENT_BYTES} bytes without ending it"
                if chunk:
                    await write(response, call, chunk, not pending and content.at_eof() and not content.exception())
                now = loop.time()
                if backend is not None:
                    backend.active_at = now
                stall_guard.reschedule(now + stall)
                try:
                    chunk = await content.readany()
                except aiohttp.ClientError as exc:
                    return describe(exc)
                stall_guard.reschedule(None)
    except TimeoutError:
        return f"stalled: no chunk for {stall:g}s (routing.stall_timeout)"
    if pending:
        await write(response, call, pending)
    return None


def _split_events(data: bytes) -> tuple[bytes, bytes]:
    """(whole events, the unfinished rest)."""
    if data.endswith(_EVENT_END):
        return data, b""
    cut = max(data.rfind(_EVENT_END), data.rfind(b"\r\n\r\n"))
    if cut < 0:
        return b"", data
    end = cut + (2 if data[cut : cut + 2] == _EVENT_END else 4)
    return data[:end], data[end:]


async def replay(call: Call, source: ChunkSource, headers: Mapping[str, str]) -> web.StreamResponse:
    """Send a plugin's ``ChunkSource`` to the client through the same writes as a live stream."""
    response = web.StreamResponse(status=source.status, headers={**source.headers, **headers})
    call.status = source.status
    await response.prepare(call.request)
    call.response = response  # from here on, an error can only end this response, never start another
    call.first_byte_at = call.first_byte_at or time.perf_counter()
    if isinstance(source.chunks, AsyncIterable):
        async for chunk in source.chunks:
            await write(response, call, chunk)
    else:
        for chunk in source.chunks:
            await write(response, call, chunk)
    await response.write_eof()
    return response


class Recorder:
    """A chunk listener that keeps a call's answer up to ``limit`` bytes (``call.on_chunk(Recorder(...))``).

    Past the limit it keeps nothing more and says so in ``overflow``: a backend's endless stream
    never becomes the gateway's memory.
    """

    __slots__ = ("chunks", "limit", "overflow", "size")

    def __init__(self, limit: int) -> None:
        self.chunks: list[bytes] = []
        self.limit = limit
        self.size = 0
        self.overflow = 0  # bytes seen but not kept

    def __call__(self, chunk: bytes) -> None:
        if self.overflow or self.size + len(chunk) > self.limit:
            self.overflow += len(chunk)
            return
        self.chunks.append(chunk)
        self.size += len(chunk)


def sse_error(message: str, code: str = "backend_failed") -> bytes:
    """An error event in OpenAI's envelope: how a stream that already started says it failed."""
    payload = {"error": {"message": message, "type": "server_error", "param": None, "code": code}}
    return b"event: error\ndata: " + json.dumps(payload).encode() + b"\n\n"


def body_usage(body: bytes) -> dict[str, Any] | None:
    """The ``usage`` object of a JSON answer, read without parsing the rest (it may be megabytes)."""
    at = body.rfind(b'"usage"')
    if at < 0:
        return None
    start = body.find(b"{", at, at + 32)
    if start < 0:
        return None
    end = body.find(b"}", start)  # usage is flat but for *_details objects: stop at its first closing brace
    if end > 0 and body.find(b"{", start + 1, end) < 0:
        return _object_at(body[start : end + 1])
    return _object_at(body[start : start + 4096])


_DECODER = json.JSONDecoder()
MOST_COUNT = 2**32  # a token count past this is made up (no answer has it); SQLite's SUMs of them stay in range
NUMBER = (int, float)  # a tuple: isinstance against ``int | float`` builds the union each call, twice as slow
DICT_OR_NONE = (dict, type(None))


def _object_at(data: bytes) -> dict[str, Any] | None:
    try:
        value, _ = _DECODER.raw_decode(data.decode("utf-8", "replace"))
    except ValueError:
        return None
    if isinstance(value, dict) and all(_count(v) or isinstance(v, DICT_OR_NONE) for v in value.values()):
        return value
    return None  # not OpenAI's usage, or counts a backend made up (negative, past MOST_COUNT): none taken


def _count(value: object) -> bool:
    return isinstance(value, NUMBER) and 0 <= value <= MOST_COUNT
