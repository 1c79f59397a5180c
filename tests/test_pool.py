"""The relay's keep-alive pool (gateway/pool.py) against real HTTP/1.1 servers on real sockets.

``RawBackend`` speaks HTTP byte for byte, so a test decides exactly how an answer is framed
(Content-Length, chunked, until EOF) and when the backend drops a kept-alive connection.
"""

from __future__ import annotations

import asyncio
import errno
import shutil
import socket
import ssl
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.abc import AbstractResolver
from multidict import CIMultiDict

from gateway.netguard import PublicOnlyResolver
from gateway.pool import MAX_NAMES, Pool
from gateway.upstream import _os_reason, describe
from tests.conftest import StartGateway, closed_port_url, eventually

JSON = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"
CHUNKED = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n"
)
UNTIL_EOF = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n\r\n{}"
HEADERS = CIMultiDict({"Content-Type": "application/json", "Accept-Encoding": "identity"})
Script = Callable[[int], bytes | None]
"""What the backend does with its n-th request: the bytes to send, b"" to hang, None to drop the connection."""


class RawBackend:
    """A real HTTP/1.1 server; ``close_after`` closes each connection once it has answered."""

    def __init__(self, script: Script, close_after: bool = False) -> None:
        self.script = script
        self.close_after = close_after
        self.heads: list[bytes] = []
        self.connection_of: list[int] = []  # which connection each request came on
        self.connections = 0
        self.hung_up = 0  # connections the client closed
        self.url = ""
        self._server: asyncio.Server | None = None

    async def start(self, tls: ssl.SSLContext | None = None) -> RawBackend:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=tls)
        port = self._server.sockets[0].getsockname()[1]
        self.url = f"{'https' if tls else 'http'}://127.0.0.1:{port}"
        return self

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        number = self.connections
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    self.hung_up += 1
                    return
                length = next(
                    (
                        int(line.split(b":")[1])
                        for line in head.split(b"\r\n")
                        if line.lower().startswith(b"content-length:")
                    ),
                    0,
                )
                await reader.readexactly(length)
                self.heads.append(head)
                self.connection_of.append(number)
                answer = self.script(len(self.heads))
                if answer is None:
                    return
                if not answer:
                    if await reader.read() == b"":
                        self.hung_up += 1
                    return
                writer.write(answer)
                await writer.drain()
                if self.close_after:
                    return
        finally:
            writer.close()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()


StartRaw = Callable[..., Awaitable[RawBackend]]


@pytest.fixture
async def raw() -> AsyncIterator[StartRaw]:
    """``await raw(script, close_after=False, tls=None)``: a RawBackend listening on a free port."""
    started: list[RawBackend] = []

    async def start(script: Script, close_after: bool = False, tls: ssl.SSLContext | None = None) -> RawBackend:
        backend = RawBackend(script, close_after)
        started.append(backend)
        return await backend.start(tls)

    yield start
    for backend in started:
        await backend.close()


@pytest.fixture
async def pool() -> AsyncIterator[Pool]:
    pool = Pool(connect_timeout=5)
    yield pool
    await pool.close()


async def _get(pool: Pool, url: str, read: bool = True) -> bytes:
    answer = await pool.post(url + "/v1/chat/completions", HEADERS, b'{"model": "m"}', None)
    try:
        return await answer.content.read() if read else b""
    finally:
        answer.release()


@pytest.mark.parametrize("framing", [JSON, CHUNKED], ids=["content-length", "chunked"])
async def test_a_connection_is_reused_after_a_complete_answer(raw: StartRaw, pool: Pool, framing: bytes) -> None:
    backend = await raw(lambda n: framing)
    for _ in range(3):
        assert await _get(pool, backend.url) == b"{}"
    assert backend.connection_of == [1, 1, 1]


async def test_an_answer_without_length_is_read_to_eof_and_not_reused(raw: StartRaw, pool: Pool) -> None:
    backend = await raw(lambda n: UNTIL_EOF, close_after=True)
    assert await _get(pool, backend.url) == b"{}"
    assert await _get(pool, backend.url) == b"{}"
    assert backend.connection_of == [1, 2]


async def test_connection_close_is_honoured(raw: StartRaw, pool: Pool) -> None:
    closing = JSON.replace(b"Content-Length", b"Connection: close\r\nContent-Length")
    backend = await raw(lambda n: closing)
    await _get(pool, backend.url)
    await _get(pool, backend.url)
    assert backend.connection_of == [1, 2]


async def test_an_answer_released_half_read_closes_its_connection(raw: StartRaw, pool: Pool) -> None:
    half = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 10\r\n\r\n{}"
    backend = await raw(lambda n: half if n == 1 else JSON)
    await _get(pool, backend.url, read=False)
    await eventually(lambda: backend.hung_up == 1)
    assert await _get(pool, backend.url) == b"{}"
    assert backend.connection_of == [1, 2]


async def test_a_cancelled_request_closes_its_connection(raw: StartRaw, pool: Pool) -> None:
    backend = await raw(lambda n: b"" if n == 1 else JSON)  # the first request is never answered
    waiting = asyncio.ensure_future(_get(pool, backend.url))
    await eventually(lambda: len(backend.heads) == 1)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    await eventually(lambda: backend.hung_up == 1)
    assert await _get(pool, backend.url) == b"{}"
    assert backend.connection_of == [1, 2]


async def test_a_kept_alive_connection_dropped_as_the_request_left_is_retried_once_fresh(
    raw: StartRaw, pool: Pool
) -> None:
    backend = await raw(lambda n: None if n == 2 else JSON)  # drops the kept-alive connection on request 2
    await _get(pool, backend.url)
    assert await _get(pool, backend.url) == b"{}"
    assert backend.connection_of == [1, 1, 2]


async def test_a_fresh_connection_dropped_is_not_retried(raw: StartRaw, pool: Pool) -> None:
    backend = await raw(lambda n: None)
    with pytest.raises(aiohttp.ServerDisconnectedError) as caught:
        await _get(pool, backend.url)
    assert describe(caught.value) == "the connection was closed"
    assert backend.connection_of == [1]


async def test_a_reused_connection_that_broke_off_mid_answer_is_not_retried(raw: StartRaw, pool: Pool) -> None:
    backend = await raw(lambda n: JSON if n == 1 else JSON[:20])
    await _get(pool, backend.url)
    backend.close_after = True  # the second answer: a head cut short, then the connection closed
    with pytest.raises(aiohttp.ClientError):
        await _get(pool, backend.url)
    assert backend.connection_of == [1, 1]


async def test_oversized_answer_headers_are_refused(raw: StartRaw, pool: Pool) -> None:
    huge = b"HTTP/1.1 200 OK\r\nX-Filler: " + b"x" * 20000 + b"\r\nContent-Length: 2\r\n\r\n{}"
    backend = await raw(lambda n: huge)
    with pytest.raises(aiohttp.ClientResponseError) as caught:
        await _get(pool, backend.url)
    assert describe(caught.value) == "ClientResponseError"
    await eventually(lambda: backend.hung_up == 1)


async def test_informational_answers_are_skipped(raw: StartRaw, pool: Pool) -> None:
    backend = await raw(lambda n: b"HTTP/1.1 103 Early Hints\r\nLink: </x>\r\n\r\n" + JSON)
    assert await _get(pool, backend.url) == b"{}"
    assert await _get(pool, backend.url) == b"{}"
    assert backend.connection_of == [1, 1]


async def test_the_request_carries_what_aiohttps_session_sent(raw: StartRaw, pool: Pool) -> None:
    backend = await raw(lambda n: JSON)
    await _get(pool, backend.url)
    lines = backend.heads[0].decode().split("\r\n")
    port = backend.url.rsplit(":", 1)[1]
    assert lines[0] == "POST /v1/chat/completions HTTP/1.1"
    assert lines[1] == f"Host: 127.0.0.1:{port}"
    assert {"Content-Type: application/json", "Accept-Encoding: identity", "Accept: */*", "Content-Length: 14"} <= set(
        lines
    )
    with pytest.raises(ValueError):  # a header cannot split the request
        await pool.post(backend.url + "/v1/x", CIMultiDict({"X-Bad": "a\r\nInjected: 1"}), b"{}", None)
    await _get(pool, backend.url + "/café%20au%2Flait")  # a base path as registered: sent percent-encoded, once
    assert backend.heads[1].split(b"\r\n")[0] == b"POST /caf%C3%A9%20au%2Flait/v1/chat/completions HTTP/1.1"


async def test_connect_failures_name_no_address(pool: Pool) -> None:
    url = closed_port_url()
    with pytest.raises(aiohttp.ClientConnectorError) as caught:
        await _get(pool, url)
    assert caught.value.os_error.errno == errno.ECONNREFUSED
    assert _os_reason(caught.value) == "Connection refused"
    with pytest.raises(aiohttp.ClientConnectorDNSError) as dns:
        await _get(pool, "http://no-such-host.invalid")
    assert _os_reason(dns.value) == "its host name does not resolve"


async def test_host_names_resolve_through_the_gateways_resolver(raw: StartRaw) -> None:
    backend = await raw(lambda n: JSON)
    by_name = backend.url.replace("127.0.0.1", "localhost")
    pool = Pool()
    try:
        assert await _get(pool, by_name) == b"{}"
        assert await _get(pool, by_name) == b"{}"
    finally:
        await pool.close()
    assert backend.connection_of == [1, 1]
    guarded = Pool(PublicOnlyResolver(set()))  # a registered host re-pointed at a private address (DNS rebinding)
    try:
        with pytest.raises(aiohttp.ClientConnectorDNSError):
            await _get(guarded, by_name)
    finally:
        await guarded.close()


class _Loopback(AbstractResolver):
    """Every name is 127.0.0.1: a tunnel's ever-new host names, as the gateway meets them over weeks."""

    async def resolve(self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET) -> list[Any]:
        return [{"hostname": host, "host": "127.0.0.1", "port": port, "family": socket.AF_INET, "proto": 0, "flags": 0}]

    async def close(self) -> None:
        return None


@pytest.mark.parametrize("ttl", [0, 60], ids=["expired", "all-fresh"])
async def test_host_names_that_come_and_go_are_not_remembered_without_bound(raw: StartRaw, ttl: float) -> None:
    backend = await raw(lambda n: JSON)
    port = backend.url.rsplit(":", 1)[1]
    pool = Pool(_Loopback(), dns_ttl=ttl)  # 0: every lookup expires at once, as a tunnel name no longer used does
    try:
        for i in range(MAX_NAMES + 50):
            assert await _get(pool, f"http://tunnel-{i}.test:{port}") == b"{}"
        assert len(pool._dns) <= MAX_NAMES and len(pool._targets) <= MAX_NAMES
    finally:
        await pool.close()


class _Flaky(_Loopback):
    """A resolver (aiodns, a plugin's) that fails once with its own exception, not an OSError."""

    failed = False

    async def resolve(self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET) -> list[Any]:
        if not self.failed:
            self.failed = True
            raise RuntimeError("resolver broke")
        return await super().resolve(host, port, family)


async def test_a_resolver_failing_its_own_way_is_a_dns_error_and_is_not_remembered(raw: StartRaw) -> None:
    backend = await raw(lambda n: JSON)
    url = backend.url.replace("127.0.0.1", "flaky.test")
    pool = Pool(_Flaky())
    try:
        with pytest.raises(aiohttp.ClientConnectorDNSError) as failed:
            await _get(pool, url)
        assert (
            "resolver broke" not in str(failed.value) and _os_reason(failed.value) == "its host name does not resolve"
        )
        assert await _get(pool, url) == b"{}"  # asked again, not the cached failure
    finally:
        await pool.close()


async def test_a_connect_timeout_is_a_timeout_naming_no_address() -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)  # never accepts: once its queue is full, the kernel drops new handshakes
        address = listener.getsockname()
        queued = [socket.socket() for _ in range(4)]
        for sock in queued:
            sock.setblocking(False)
            sock.connect_ex(address)
        pool = Pool(connect_timeout=0.2)
        try:
            with pytest.raises(aiohttp.ConnectionTimeoutError) as caught:
                await _get(pool, f"http://127.0.0.1:{address[1]}")
        finally:
            await pool.close()
            for sock in queued:
                sock.close()
    assert str(address[1]) not in str(caught.value)
    assert isinstance(caught.value, TimeoutError)  # gateway.upstream.step: outcome "timeout"


async def test_a_read_timeout_fails_the_read(raw: StartRaw, pool: Pool) -> None:
    backend = await raw(lambda n: b"")
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=5, sock_read=0.1)
    with pytest.raises(TimeoutError):
        await pool.post(backend.url + "/v1/x", HEADERS, b"{}", timeout)
    await eventually(lambda: backend.hung_up == 1)


async def test_closing_the_pool_closes_idle_connections(raw: StartRaw) -> None:
    backend = await raw(lambda n: JSON)
    pool = Pool()
    await _get(pool, backend.url)
    await pool.close()
    await eventually(lambda: backend.hung_up == 1)


async def test_idle_connections_are_closed_after_the_keepalive(raw: StartRaw) -> None:
    backend = await raw(lambda n: JSON)
    pool = Pool(keepalive=0.2)
    try:
        await _get(pool, backend.url)
        await eventually(lambda: backend.hung_up == 1)  # closed by the sweep, with no request to trigger it
        await _get(pool, backend.url)
    finally:
        await pool.close()
    assert backend.connection_of == [1, 2]


def _certificate(folder: Path) -> tuple[Path, Path]:
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command to make a certificate (neither trustme nor cryptography is installed)")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )  # fmt: skip
    return cert, key


async def test_a_tls_backend_is_verified_and_its_connection_reused(raw: StartRaw, tmp_path: Path) -> None:
    cert, key = _certificate(tmp_path)
    server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_tls.load_cert_chain(cert, key)
    backend = await raw(lambda n: JSON, tls=server_tls)
    trusting = ssl.create_default_context(cafile=str(cert))
    pool = Pool(tls=trusting)
    try:
        assert await _get(pool, backend.url) == b"{}"
        assert await _get(pool, backend.url) == b"{}"
    finally:
        await pool.close()
    assert backend.connection_of == [1, 1]
    untrusting = Pool()  # the system's trust store does not know this certificate
    try:
        with pytest.raises(aiohttp.ClientConnectorCertificateError):
            await _get(untrusting, backend.url)
    finally:
        await untrusting.close()


async def test_the_gateway_relays_over_one_kept_alive_connection(raw: StartRaw, start_gateway: StartGateway) -> None:
    answer = b'{"id": "c", "object": "chat.completion", "choices": []}'
    ok = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(answer), answer)
    backend = await raw(lambda n: ok)
    gateway = await start_gateway(backends=[{"name": "raw", "url": backend.url, "models": ["m"]}])
    async with aiohttp.ClientSession() as client:
        for _ in range(3):
            async with client.post(
                gateway.url + "/v1/chat/completions",
                json={"model": "m", "messages": [{"role": "user", "content": "hi"}]},
            ) as response:
                assert response.status == 200, await response.text()
    posts = [c for head, c in zip(backend.heads, backend.connection_of, strict=True) if head.startswith(b"POST")]
    assert len(posts) == 3 and len(set(posts)) == 1
