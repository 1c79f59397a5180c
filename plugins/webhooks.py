"""webhooks: POST the gateway's events as JSON to configured URLs, signed, retried, off the request path.

Events (see ``plugins/_events.py``): ``backend.up``, ``backend.down``, ``backend.registered``,
``backend.removed``, ``budget.exceeded`` (at most once a minute per key) and ``request.failed``
(at most ``failed_per_minute`` per model). Each is signed with HMAC-SHA256 over the body:
``X-Multiverse-Signature: sha256=<hex>``, with ``secret`` (write ``${WEBHOOK_SECRET}``).

Hooks only put the event in a bounded queue (full: dropped and logged); a background task
delivers it, retrying a connection error, a timeout, a 429 or a 5xx with exponential backoff.
Like registrations, a URL that reaches a private address is refused unless allowed
(``allow_private``, by default ``admin.allow_private_backends``), checked at each delivery and
by the resolver, so a name cannot be re-pointed later. Logs name a URL's host, never its path.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import ipaddress
import json
import random
import socket
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import aiohttp

from gateway import hookimpl
from gateway.config import ConfigError
from gateway.netguard import PublicOnlyResolver, address_problem
from gateway.validate import positive
from plugins._events import EVENTS, backend_event, call_event

if TYPE_CHECKING:
    from gateway.call import Call
    from gateway.registry import Backend
    from gateway.state import Gateway


def _urls(value: list[str]) -> str | None:
    if not value:
        return "give at least one URL to POST events to"
    for url in value:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            return f"each must be an http:// or https:// URL, got {url.split('?')[0]!r}"
    return None


def _events(value: list[str]) -> str | None:
    unknown = [name for name in value if name not in EVENTS]
    return f"unknown event {unknown[0]!r}; known: {', '.join(EVENTS)}" if unknown else None


def _not_negative(value: int) -> str | None:
    return None if value >= 0 else f"must be 0 or more, got {value}"


def _secret(value: str) -> str | None:
    return None if len(value) >= 16 else "must be at least 16 characters (e.g. `openssl rand -hex 32`)"


@dataclass(frozen=True)
class Options:
    urls: list[str] = field(metadata={"doc": "where to POST each event", "check": _urls})
    secret: str = field(metadata={"doc": "HMAC-SHA256 key for X-Multiverse-Signature; write ${ENV}", "check": _secret})
    events: list[str] = field(
        default_factory=lambda: list(EVENTS), metadata={"doc": "which events to send", "check": _events}
    )
    timeout: float = field(default=5.0, metadata={"doc": "seconds one delivery may take", "check": positive})
    retries: int = field(default=3, metadata={"doc": "retries after a failed delivery", "check": _not_negative})
    backoff: float = field(
        default=1.0, metadata={"doc": "seconds before the first retry (doubled each time)", "check": positive}
    )
    queue_size: int = field(
        default=1000, metadata={"doc": "events waiting at most; more are dropped", "check": positive}
    )
    failed_per_minute: int = field(
        default=10, metadata={"doc": "request.failed events per model per minute at most", "check": positive}
    )
    allow_private: bool | None = field(
        default=None, metadata={"doc": "allow private addresses; unset: as admin.allow_private_backends"}
    )


class Plugin:
    def __init__(self, options: Options) -> None:
        self.options = options
        self.queue: asyncio.Queue[dict[str, Any]] | None = None
        self.session: aiohttp.ClientSession | None = None
        self.allow_private = bool(options.allow_private)
        self.sent: dict[tuple[str, str], int] = {}  # (event, model or key) -> sent in the current minute
        self.minute = 0
        self.dropped = self.delivered = self.failed = self.refused = 0
        self.log: Any = None

    @hookimpl
    def startup(self, gateway: Gateway) -> None:
        options = self.options
        if options.allow_private is None:
            self.allow_private = gateway.config.admin.allow_private_backends
        for url in options.urls:  # an address written in the config is refused now; names at each delivery
            problem = None if self.allow_private else _literal_problem(urlsplit(url).hostname or "")
            if problem:
                raise ConfigError([f"plugins.webhooks.urls: {_host(url)} is {problem}; {_ALLOW}"])
        self.log = gateway.log.bind(plugin="webhooks")
        self.queue = asyncio.Queue(maxsize=options.queue_size)
        resolver = None if self.allow_private else PublicOnlyResolver(set())
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(resolver=resolver),
            timeout=aiohttp.ClientTimeout(total=options.timeout),
            cookie_jar=aiohttp.DummyCookieJar(),
        )
        gateway.start_task(self._drain(), name="webhooks")

    @hookimpl
    async def shutdown(self) -> None:
        if self.session is not None:
            await self.session.close()

    # -- from the hooks: put in the queue, never wait ---------------------------------------------

    @hookimpl
    def backend_status_changed(self, backend: Backend, event: str, reason: str | None) -> None:
        self.emit(backend_event(backend, event, reason))

    @hookimpl
    def request_complete(self, call: Call) -> None:
        if call.status < 400 and call.error is None:
            return  # the common case, at once
        found = call_event(call)
        if found is None:
            return
        data = found["data"]
        budget = found["event"] == "budget.exceeded"
        per = (found["event"], (data["key"] or "") if budget else data["model"])
        if self._within(per, 1 if budget else self.options.failed_per_minute):
            self.emit(found)

    def _within(self, per: tuple[str, str], limit: int) -> bool:
        minute = int(time.monotonic() // 60)
        if minute != self.minute:
            self.minute, self.sent = minute, {}
        sent = self.sent.get(per, 0)
        if sent >= limit:
            return False
        self.sent[per] = sent + 1
        return True

    def emit(self, event: dict[str, Any] | None) -> None:
        """Queue an event for delivery; drop it (and log) when the queue is full."""
        if event is None or self.queue is None or event["event"] not in self.options.events:
            return
        try:
            self.queue.put_nowait(event)
        except asyncio.QueueFull:
            self.dropped += 1
            self.log.warning("webhook_dropped", event=event["event"], dropped=self.dropped, reason="queue full")

    # -- the background task -------------------------------------------------------------------------

    async def _drain(self) -> None:
        assert self.queue is not None
        while True:
            event = await self.queue.get()
            body = json.dumps(event, separators=(",", ":")).encode()
            signature = hmac.new(self.options.secret.encode(), body, hashlib.sha256).hexdigest()
            headers = {
                "Content-Type": "application/json",
                "User-Agent": "multiverse-gateway-webhooks",
                "X-Multiverse-Event": event["event"],
                "X-Multiverse-Delivery": event["id"],
                "X-Multiverse-Signature": f"sha256={signature}",
            }
            await asyncio.gather(*(self._deliver(url, body, headers) for url in self.options.urls))

    async def _deliver(self, url: str, body: bytes, headers: dict[str, str]) -> None:
        """POST one event to one URL, retrying with backoff; log the outcome (the host, never the path)."""
        assert self.session is not None
        problem = None if self.allow_private else await _address_problem(urlsplit(url).hostname or "")
        if problem:
            self.refused += 1
            self.log.warning("webhook_refused", host=_host(url), reason=f"{problem}; {_ALLOW}")
            return
        why = ""
        for attempt in range(self.options.retries + 1):
            if attempt:
                delay = self.options.backoff * 2 ** (attempt - 1)
                await asyncio.sleep(delay * random.uniform(0.8, 1.2))
            try:
                async with self.session.post(url, data=body, headers=headers, allow_redirects=False) as response:
                    await response.read()
                    if response.status < 300:
                        self.delivered += 1
                        return
                    why = f"HTTP {response.status}"
                    if response.status < 500 and response.status not in (408, 429):
                        break  # the receiver refuses it: retrying will not help
            except (aiohttp.ClientError, TimeoutError, OSError) as exc:
                why = f"{type(exc).__name__}" if isinstance(exc, TimeoutError) else f"{type(exc).__name__}: {exc}"
        self.failed += 1
        self.log.warning("webhook_failed", host=_host(url), event=headers["X-Multiverse-Event"], reason=why[:200])


_ALLOW = "webhooks go to public addresses unless plugins.webhooks.allow_private (or admin.allow_private_backends)"


def _host(url: str) -> str:
    return urlsplit(url).hostname or "?"


def _literal_problem(host: str) -> str | None:
    try:
        return address_problem(ipaddress.ip_address(host))
    except ValueError:
        return None  # a name: resolved at each delivery


async def _address_problem(host: str) -> str | None:
    """Why ``host`` is not a public address (every address it resolves to is checked), or None."""
    literal = _literal_problem(host)
    if literal is not None:
        return literal
    try:
        ipaddress.ip_address(host)
        return None
    except ValueError:
        pass
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, 443, type=socket.SOCK_STREAM)
    except OSError:
        return "a host name that cannot be resolved"
    for info in infos:
        problem = address_problem(ipaddress.ip_address(str(info[4][0]).split("%", 1)[0]))
        if problem:
            return f"resolving to {problem}"
    return None
