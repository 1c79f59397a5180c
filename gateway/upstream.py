"""Talking to one backend: the headers it gets, opening a request, reading a bounded answer.

Every way a backend can fail a step becomes a ``BackendFailed`` carrying the attempt's
outcome and a reason that names no address (clients without the admin key see it).
"""

from __future__ import annotations

import asyncio
import email.utils
import os
import time
from collections.abc import Awaitable, MutableMapping
from typing import TYPE_CHECKING, Any, TypeVar

import aiohttp
from aiohttp import web
from multidict import CIMultiDict

from gateway.netguard import NotPublic

if TYPE_CHECKING:
    from gateway.call import Attempt, Call
    from gateway.transport import Upstream

HOP_BY_HOP = frozenset(
    {
        "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te",
        "trailer", "trailers", "transfer-encoding", "upgrade", "proxy-connection",
    }
)  # fmt: skip
# Never sent to a backend: hop-by-hop, recomputed, the client's own credentials, or encodings
# (aiohttp has already decoded a compressed request body; the gateway reads answers, so asks for identity).
_NOT_FORWARDED = HOP_BY_HOP | {
    "host", "content-length", "authorization", "x-api-key", "cookie", "content-encoding", "accept-encoding",
    "x-request-id",
}  # fmt: skip
# Not copied back to the client: hop-by-hop, recomputed by the gateway, or a backend's cookies.
_NOT_RETURNED = HOP_BY_HOP | {"content-length", "set-cookie"}
RETRY_STATUSES = frozenset({408, 429})
CLIENT_GONE = (ConnectionResetError, aiohttp.ClientConnectionResetError)
T = TypeVar("T")


class BackendFailed(Exception):
    """A backend could not answer; the next candidate may. ``response`` is its own error, if it sent one."""

    def __init__(self, outcome: str, reason: str, response: web.Response | None = None) -> None:
        super().__init__(reason)
        self.outcome = outcome
        self.reason = reason
        self.response = response


def without(headers: Any, drop: frozenset[str]) -> CIMultiDict[str]:
    """A copy of ``headers`` without the named ones, and without those their Connection header names.

    Copying whole and deleting a few (in C) is ~3x faster than filtering header by header.
    """
    out: CIMultiDict[str] = CIMultiDict(headers)
    if "Connection" in out:
        drop = drop | {t.strip().lower() for t in out["Connection"].split(",")}
    for name in drop:
        if name in out:
            del out[name]
    return out


def forward_headers(request: web.Request, call: Call) -> CIMultiDict[str]:
    """What every backend of this call gets: the client's headers, cleaned, with a UUID request id."""
    out = without(request.headers, _NOT_FORWARDED)
    out["X-Request-ID"] = call.upstream_id
    out["Accept-Encoding"] = "identity"
    return out


def returned_headers(upstream: Upstream, call: Call) -> CIMultiDict[str]:
    out = without(upstream.headers, _NOT_RETURNED)
    add_call_headers(out, call)  # into the backend's copy: not into a dict first, then copied again
    return out


def call_headers(call: Call) -> dict[str, str]:
    """The gateway's own headers on an answer, and those plugins set: never a backend's address."""
    out: dict[str, str] = {}
    add_call_headers(out, call)
    return out


def add_call_headers(out: MutableMapping[str, str], call: Call) -> None:
    """Set ``call_headers``'s headers in ``out``."""
    out["X-Request-ID"] = call.request_id
    out["X-Multiverse-Model"] = call.model
    out["X-Multiverse-Route"] = call.route
    out["X-Multiverse-Attempts"] = str(len(call.attempts))
    if call.backend is not None:
        out["X-Multiverse-Backend"] = call.backend.name
    if call.response_headers:
        out.update(call.response_headers)


async def step(attempt: Attempt, work: Awaitable[T], until: float, outcome: str, too_late: str) -> T:
    """Await a step of talking to a backend; a timeout or client error becomes a BackendFailed."""
    try:
        async with asyncio.timeout_at(until):
            return await work
    except TimeoutError:
        raise BackendFailed(outcome, too_late) from None
    except aiohttp.ClientConnectorError as exc:
        raise BackendFailed("connect_error", f"could not connect ({_os_reason(exc)})") from None
    except aiohttp.ClientError as exc:
        raise BackendFailed("connect_error" if attempt.first_byte is None else "stalled", describe(exc)) from None


async def read_bounded(attempt: Attempt, upstream: Upstream, stall: float, limit: int, setting: str) -> bytes:
    """A whole answer body: at most ``limit`` bytes, and never ``stall`` seconds without a byte."""
    length = upstream.content_length
    if length is not None and length > limit:
        raise BackendFailed("bad_answer", f"its answer is {length} bytes, over {setting} ({limit})")
    content = upstream.content
    if content.is_eof() and content.total_bytes <= limit:  # all of it is here already (small, on a LAN): no wait
        return content.read_nowait()
    loop = asyncio.get_running_loop()
    parts: list[bytes] = []
    size = 0
    while True:
        chunk = await step(attempt, content.readany(), loop.time() + stall, "stalled", f"stalled for {stall:g}s")
        if not chunk:
            return parts[0] if len(parts) == 1 else b"".join(parts)
        size += len(chunk)
        if size > limit:
            raise BackendFailed("bad_answer", f"its answer is over {setting} ({limit} bytes)")
        parts.append(chunk)


MAX_RETRY_AFTER = 3600.0
"""The longest a backend may ask to be left alone: a larger Retry-After (``inf``, ``1e999``) is read as this."""


def retry_after(value: str | None) -> float | None:
    """Seconds from a Retry-After header: a number, or an HTTP date; between 0 and MAX_RETRY_AFTER, or None.

    A backend's header is untrusted: ``inf`` would keep it out of rotation for good (the circuit breaker's
    busy window) and is no JSON number (the request log, the dashboard's events); ``nan`` means nothing."""
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            seconds = email.utils.parsedate_to_datetime(value).timestamp() - time.time()
        except (TypeError, ValueError, OverflowError):
            return None
    if seconds != seconds:  # NaN
        return None
    return min(MAX_RETRY_AFTER, max(0.0, seconds))


_BLANK = b" \t\r\n"
_CLOSING = {ord("{"): ord("}"), ord("["): ord("]")}


def looks_like_json(body: bytes) -> bool:
    """Whether a backend's answer is shaped like whole JSON: it opens with { or [ and closes to match.

    Catches an HTML error page from a tunnel and a body cut short, in constant time: a
    full parse would cost more than the rest of the request for a large embedding.
    """
    start, end = 0, len(body) - 1
    while start <= end and body[start] in _BLANK:
        start += 1
    while end > start and body[end] in _BLANK:
        end -= 1
    return start < end and _CLOSING.get(body[start]) == body[end]


def describe(exc: BaseException) -> str:
    """What went wrong, without the backend's address (aiohttp puts it in most messages)."""
    if isinstance(exc, asyncio.TimeoutError):
        return "timed out"
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return "the connection was closed"
    if isinstance(exc, aiohttp.ClientPayloadError):
        return "the answer broke off (ClientPayloadError)"
    if isinstance(exc, aiohttp.ClientOSError):
        return f"connection error ({_os_reason(exc)})"
    return type(exc).__name__


def _os_reason(exc: aiohttp.ClientOSError) -> str:
    """The OS's words for the error ("Connection refused"): asyncio's own text carries the address."""
    if isinstance(exc, aiohttp.ClientConnectorDNSError):
        if isinstance(exc.os_error, NotPublic):
            return "its address is not public, and admin.allow_private_backends is off"
        return "its host name does not resolve"
    code = exc.os_error.errno if isinstance(exc, aiohttp.ClientConnectorError) else exc.errno
    return os.strerror(code) if code and code > 0 else type(exc).__name__
