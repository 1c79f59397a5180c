"""One HTTP/1.1 exchange on a pooled connection: the request's bytes out, the answer's head in.

The connection is aiohttp's own client protocol (``ResponseHandler``: llhttp in C, flow
control, read timeouts), so a backend that breaks off, resets or sends a malformed head
fails with the very aiohttp exceptions ``gateway.upstream`` already maps to attempt
outcomes. What this skips is everything ``ClientSession`` wraps around it per request
(URL objects, cookie jar, tracing, timers, the connector's bookkeeping), which the relay
never uses.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import aiohttp
from aiohttp.client_proto import ResponseHandler
from aiohttp.client_reqrep import RequestInfo
from aiohttp.helpers import parse_content_type
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.http_writer import _serialize_headers
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

if TYPE_CHECKING:
    from gateway.pool import Origin, Pool

READ_BUFSIZE = 2**16
"""What aiohttp's session reads ahead before pausing the socket (its ``read_bufsize`` default)."""
_ONE_WRITE = 16384
"""Bodies up to this size leave in the same write as the head: one syscall, usually one packet."""
_NO_HEADERS: CIMultiDictProxy[str] = CIMultiDictProxy(CIMultiDict())


class Connection(ResponseHandler):
    """aiohttp's client protocol, noting whether the backend has sent a byte since the request left.

    Only a reused connection that fails before any byte may be retried (see ``Pool.post``).
    """

    answered = False

    def data_received(self, data: bytes) -> None:
        self.answered = True
        super().data_received(data)


def abort(connection: Connection) -> None:
    """Close without a graceful TLS shutdown (aiohttp's connector aborts too: ssl_shutdown_timeout=0)."""
    transport = connection.transport
    if transport is not None:
        transport.abort()
    connection.close()


def request_head(path: str, host: str, headers: CIMultiDict[str], length: int) -> bytes:
    """The request line and headers as aiohttp's session sends them for ``post(data=bytes)``.

    Its C serialiser refuses a CR or LF in a value, so no header can split the request.
    """
    out: CIMultiDict[str] = CIMultiDict() if "Host" in headers else CIMultiDict(Host=host)
    out.extend(headers)
    if "Accept" not in out:
        out["Accept"] = "*/*"
    if "Content-Type" not in out:
        out["Content-Type"] = "application/octet-stream"
    out["Content-Length"] = str(length)
    return _serialize_headers(f"POST {path} HTTP/1.1", out)


async def exchange(
    connection: Connection, path: str, head: bytes, body: bytes, read_timeout: float | None
) -> tuple[Any, aiohttp.StreamReader]:
    """Send one request and wait for its answer's head: (message, payload), 1xx answers skipped."""
    connection.answered = False
    connection.set_response_params(read_until_eof=True, auto_decompress=False, read_bufsize=READ_BUFSIZE)
    connection.read_timeout = read_timeout
    transport = connection.transport
    if transport is None:
        raise aiohttp.ServerDisconnectedError()
    if len(body) <= _ONE_WRITE:
        transport.write(head + body)
    else:
        transport.write(head)
        transport.write(body)
    if read_timeout:
        connection.start_timeout()
    while True:
        try:
            message, payload = await connection.read()
        except HttpProcessingError as exc:  # a malformed or oversized head; the session raises the same
            info = RequestInfo(URL(path), "POST", _NO_HEADERS, URL(path))
            raise aiohttp.ClientResponseError(
                info, (), status=exc.code, message=exc.message, headers=exc.headers
            ) from exc
        if not 100 <= message.code < 200 or message.code == 101:
            return message, payload


class Answer:
    """A backend's answer on a pooled connection: what the relay reads of an ``Upstream``.

    ``release()`` hands the connection to the pool, which keeps it only if the protocol says the
    body was read to its end, nothing else came and the backend did not ask to close.
    """

    __slots__ = ("_connection", "_content_type", "_origin", "_pool", "content", "headers", "status")

    def __init__(
        self, pool: Pool, origin: Origin, connection: Connection, message: Any, payload: aiohttp.StreamReader
    ) -> None:
        self._pool = pool
        self._origin = origin
        self._connection: Connection | None = connection
        self._content_type: str | None = None
        self.status: int = message.code
        self.headers: CIMultiDictProxy[str] = message.headers
        self.content = payload

    @property
    def content_type(self) -> str:
        """The media type, lower-cased and without parameters; ``application/octet-stream`` if none (as aiohttp)."""
        if self._content_type is None:
            raw = self.headers.get("Content-Type")
            self._content_type = "application/octet-stream" if raw is None else parse_content_type(raw)[0]
        return self._content_type

    @property
    def content_length(self) -> int | None:
        length = self.headers.get("Content-Length")
        return None if length is None else int(length)

    def release(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None:
            self._pool.put(self._origin, connection)

    def close(self) -> None:
        """Drop the connection at once (a TLS backend is not waited on for its close_notify)."""
        connection, self._connection = self._connection, None
        if connection is not None:
            abort(connection)
