"""The relay's connections to HTTP backends: a keep-alive pool per origin (scheme, host, port).

A connection goes back to the pool only after a complete answer (``Answer.release``); idle
ones are kept at most ``KEEPALIVE`` seconds (aiohttp's default) and ``MAX_IDLE`` per origin.
Failures are raised as the aiohttp exceptions its connector raises, so ``gateway.upstream``
maps them to the same attempt outcomes, with no address in the reason.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import ssl
from collections import deque
from dataclasses import dataclass
from typing import NamedTuple
from urllib.parse import urlsplit

import aiohappyeyeballs
import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.client_reqrep import ConnectionKey
from aiohttp.resolver import DefaultResolver
from multidict import CIMultiDict
from yarl import URL

from gateway.http1 import Answer, Connection, abort, exchange, request_head

KEEPALIVE = 15.0
"""Seconds an idle connection is kept (aiohttp's ``keepalive_timeout``); servers often keep theirs 5 to 75."""
MAX_IDLE = 100
"""Idle connections kept per origin; past that the oldest is closed."""
DNS_TTL = 60.0
"""Seconds a host name's addresses are reused (the session had ``ttl_dns_cache=60``)."""
MAX_NAMES = 1024
"""Host names (and URLs) remembered; registrations behind tunnels change names often."""
HAPPY_EYEBALLS_DELAY = 0.25
_DEFAULT_PORTS = {"http": 80, "https": 443}
AddrInfo = tuple[int, int, int, str, tuple[str, int] | tuple[str, int, int, int]]


class Origin(NamedTuple):
    scheme: str
    host: str
    port: int


@dataclass(frozen=True, slots=True)
class _Target:
    """What one endpoint URL means to the pool, worked out once per URL."""

    origin: Origin
    path: str
    host_header: str
    key: ConnectionKey  # what aiohttp's connector errors carry
    addresses: list[AddrInfo] | None  # an IP literal's, else None: resolve


class Pool:
    """Keep-alive HTTP/1.1 connections to backends, and ``post`` for the relay."""

    def __init__(
        self,
        resolver: AbstractResolver | None = None,
        connect_timeout: float | None = None,
        tls: ssl.SSLContext | None = None,
        keepalive: float = KEEPALIVE,
        dns_ttl: float = DNS_TTL,
    ) -> None:
        self._resolver = resolver or DefaultResolver()
        self._connect_timeout = connect_timeout
        self._tls = tls or _tls_context()
        self._keepalive = keepalive
        self._dns_ttl = dns_ttl
        self._sweeping: asyncio.TimerHandle | None = None
        self._idle: dict[Origin, deque[tuple[float, Connection]]] = {}
        self._targets: dict[str, _Target] = {}
        self._dns: dict[tuple[str, int], tuple[float, asyncio.Task[list[AddrInfo]]]] = {}
        self._closed = False

    async def post(
        self, url: str, headers: CIMultiDict[str], body: bytes, timeout: aiohttp.ClientTimeout | None
    ) -> Answer:
        """POST ``body`` to ``url`` and return the answer once its head is in.

        Of ``timeout`` only the connect and ``sock_read`` limits apply; the relay bounds the
        rest with its own deadlines. A reused connection that fails before the backend sent a
        byte is the stale keep-alive race (the backend closed it as the request left): the
        request is sent once more on a fresh connection: the backend never answered it, the
        same condition on which the relay sends the same body to the next backend.
        """
        target = self._targets.get(url) or self._target(url)
        head = request_head(target.path, target.host_header, headers, len(body))
        connect_timeout, read_timeout = self._connect_timeout, None
        if timeout is not None:
            connect_timeout = timeout.sock_connect or timeout.connect or connect_timeout
            read_timeout = timeout.sock_read
        connection = self._idle_connection(target.origin)
        reused = connection is not None
        if connection is None:
            connection = await self._connect(target, connect_timeout)
        try:
            try:
                message, payload = await exchange(connection, target.path, head, body, read_timeout)
            except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError):
                if not reused or connection.answered:
                    raise
                abort(connection)
                connection = await self._connect(target, connect_timeout)
                message, payload = await exchange(connection, target.path, head, body, read_timeout)
        except BaseException:  # failed, timed out or cancelled: never reuse a connection mid-exchange
            abort(connection)
            raise
        return Answer(self, target.origin, connection, message, payload)

    def put(self, origin: Origin, connection: Connection) -> None:
        """Take back a connection whose answer was read to its end, unless it must close."""
        if self._closed or connection.should_close or not connection.is_connected():
            abort(connection)
            return
        idle = self._idle.get(origin)
        if idle is None:
            idle = self._idle[origin] = deque()
        loop = asyncio.get_running_loop()
        now = loop.time()
        while idle and (now - idle[0][0] >= self._keepalive or len(idle) >= MAX_IDLE):
            abort(idle.popleft()[1])
        idle.append((now, connection))
        if self._sweeping is None:
            self._sweeping = loop.call_later(self._keepalive, self._sweep)

    def _sweep(self) -> None:
        """Close connections idle too long, also those to backends no longer asked (aiohttp's cleanup)."""
        self._sweeping = None
        loop = asyncio.get_running_loop()
        now = loop.time()
        for origin, idle in list(self._idle.items()):
            while idle and now - idle[0][0] >= self._keepalive:
                abort(idle.popleft()[1])
            if not idle:
                del self._idle[origin]
        if self._idle:
            self._sweeping = loop.call_later(self._keepalive, self._sweep)

    def _idle_connection(self, origin: Origin) -> Connection | None:
        """The most recently used idle connection still open (fewest chances the backend dropped it)."""
        idle = self._idle.get(origin)
        if not idle:
            return None
        now = asyncio.get_running_loop().time()
        while idle:
            since, connection = idle.pop()
            if now - since < self._keepalive and connection.is_connected() and not connection.should_close:
                return connection
            abort(connection)
        return None

    async def _connect(self, target: _Target, timeout: float | None) -> Connection:
        addresses = target.addresses or await self._resolve(target)
        loop = asyncio.get_running_loop()
        tls = self._tls if target.origin.scheme == "https" else None
        try:
            async with asyncio.timeout(timeout):
                sock = await aiohappyeyeballs.start_connection(
                    addresses, happy_eyeballs_delay=HAPPY_EYEBALLS_DELAY, loop=loop
                )
                _, connection = await loop.create_connection(
                    lambda: Connection(loop), sock=sock, ssl=tls, server_hostname=target.origin.host if tls else None
                )
        except ssl.CertificateError as exc:
            raise aiohttp.ClientConnectorCertificateError(target.key, exc) from exc
        except ssl.SSLError as exc:
            raise aiohttp.ClientConnectorSSLError(target.key, exc) from exc
        except OSError as exc:
            if exc.errno is None and isinstance(exc, TimeoutError):  # ours, not the kernel's ETIMEDOUT
                raise aiohttp.ConnectionTimeoutError("connecting timed out") from None
            raise aiohttp.ClientConnectorError(target.key, exc) from exc
        return connection

    async def _resolve(self, target: _Target) -> list[AddrInfo]:
        """A host name's addresses, cached ``DNS_TTL`` seconds; one lookup however many ask at once."""
        host, port = target.origin.host, target.origin.port
        loop = asyncio.get_running_loop()
        cached = self._dns.get((host, port))
        if cached is None or cached[0] <= loop.time():
            if len(self._dns) >= MAX_NAMES:  # tunnel host names come and go: forget the expired ones
                self._dns = {name: entry for name, entry in self._dns.items() if entry[0] > loop.time()}
                while len(self._dns) >= MAX_NAMES:  # still full: the oldest lookups go
                    del self._dns[next(iter(self._dns))]
            lookup = loop.create_task(self._lookup(host, port))
            lookup.add_done_callback(_retrieved)
            cached = self._dns[(host, port)] = (loop.time() + self._dns_ttl, lookup)
        try:
            return await asyncio.shield(cached[1])
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # OSError, or whatever another resolver raises: a connect error, not cached
            if self._dns.get((host, port)) is cached:
                del self._dns[(host, port)]
            error = (
                exc if isinstance(exc, OSError) else OSError(f"the host name did not resolve ({type(exc).__name__})")
            )
            raise aiohttp.ClientConnectorDNSError(target.key, error) from exc

    async def _lookup(self, host: str, port: int) -> list[AddrInfo]:
        return _addr_infos(await self._resolver.resolve(host, port, family=socket.AF_UNSPEC))

    def _target(self, url: str) -> _Target:
        parts = urlsplit(url)
        scheme, host = parts.scheme, parts.hostname or ""
        port = parts.port or _DEFAULT_PORTS[scheme]
        shown = f"[{host}]" if ":" in host else host
        host_header = shown if port == _DEFAULT_PORTS[scheme] else f"{shown}:{port}"
        key = ConnectionKey(host, port, scheme == "https", True, None, None, None)
        addresses = None  # resolve: a resolver that checks addresses (netguard's) sees an IP literal too
        if not getattr(self._resolver, "checks_addresses", False):
            try:
                ipaddress.ip_address(host)
            except ValueError:
                pass
            else:
                addresses = _addr_infos([_literal(host, port)])
        path = URL(url).raw_path or "/"  # percent-encoded once, as aiohttp's session sent it (yarl)
        target = _Target(Origin(scheme, host, port), path, host_header, key, addresses)
        if len(self._targets) >= MAX_NAMES:  # registrations come and go: the oldest URL worked out goes
            del self._targets[next(iter(self._targets))]
        self._targets[url] = target
        return target

    async def close(self) -> None:
        """Close every idle connection; one in use is closed when its answer is released."""
        self._closed = True
        if self._sweeping is not None:
            self._sweeping.cancel()
        for idle in self._idle.values():
            for _, connection in idle:
                abort(connection)
        self._idle.clear()
        for _, lookup in self._dns.values():
            lookup.cancel()
        self._dns.clear()
        await self._resolver.close()


def _retrieved(lookup: asyncio.Task[list[AddrInfo]]) -> None:
    """Mark a lookup's failure as seen: its waiters may all have been cancelled (no 'never retrieved' log)."""
    if not lookup.cancelled():
        lookup.exception()


def _literal(host: str, port: int) -> ResolveResult:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    return {"hostname": host, "host": host, "port": port, "family": family, "proto": 0, "flags": 0}


def _addr_infos(hosts: list[ResolveResult]) -> list[AddrInfo]:
    """Resolver results as ``getaddrinfo`` tuples for happy eyeballs (as aiohttp's connector converts them)."""
    out: list[AddrInfo] = []
    for found in hosts:
        host, port = found["host"], found["port"]
        if ":" in host:
            out.append((socket.AF_INET6, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", (host, port, 0, 0)))
        else:
            out.append((socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", (host, port)))
    return out


def _tls_context() -> ssl.SSLContext:
    """What aiohttp's session verifies https backends with: the system's trust store, HTTP/1.1 by ALPN."""
    context = ssl.create_default_context()
    context.set_alpn_protocols(["http/1.1"])
    return context
