"""health: probe every backend; unhealthy after N failures, healthy again after M successes.

A probe is a cheap ``GET {url}{path}`` (never a completion), carrying the
backend's own key if it has one, and at most one at a time per backend.
Unhealthy backends are probed less and less often (exponential backoff with
jitter, capped), and re-admitted on their own once they answer again. With
``path: /v1/models``, a backend that no longer lists the models it was
registered for is marked ``mismatched`` and gets no traffic.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import aiohttp
from aiohttp import web

from gateway import hookimpl
from gateway.admin_auth import allow
from gateway.identity import Identity
from gateway.refused import FIX
from gateway.registry import HEALTHY, MISMATCHED, PENDING, UNHEALTHY, Backend
from gateway.transport import dialed_in
from gateway.validate import positive

if TYPE_CHECKING:
    from gateway.state import Gateway


def _path(value: str) -> str | None:
    return None if value.startswith("/") else f"must start with '/', got {value!r}"


@dataclass(frozen=True)
class Options:
    interval: float = field(default=10.0, metadata={"doc": "seconds between probes", "check": positive})
    timeout: float = field(default=5.0, metadata={"doc": "seconds a probe may take", "check": positive})
    unhealthy_after: int = field(
        default=3, metadata={"doc": "consecutive failures to mark unhealthy", "check": positive}
    )
    healthy_after: int = field(default=1, metadata={"doc": "consecutive successes to mark healthy", "check": positive})
    path: str = field(default="/v1/models", metadata={"doc": "what to GET; /health also works", "check": _path})
    max_interval: float = field(
        default=60.0, metadata={"doc": "longest wait between probes of an unhealthy backend", "check": positive}
    )


@dataclass
class Track:
    url: str
    streak: int = 0  # > 0: consecutive successes, < 0: consecutive failures
    next_probe: float = 0.0


BUSY = "busy"  # a probe timed out while our own requests show the backend working: not a failure


class Plugin:
    def __init__(self, options: Options | None = None) -> None:
        self.options = options or Options()
        self.tracks: dict[str, Track] = {}

    @hookimpl
    def startup(self, gateway: Gateway) -> None:
        gateway.every(min(self.options.interval, 1.0), lambda: self.probe_due(gateway), name="health")

    async def probe_due(self, gateway: Gateway, now: float | None = None) -> None:
        """Probe, concurrently, every backend whose turn has come; each at most once."""
        now = time.monotonic() if now is None else now
        backends = [  # not approved yet, or reached only through its agent's connection (which is its health)
            b for b in gateway.registry.backends.values() if b.status != PENDING and not dialed_in(b.url)
        ]
        tracks = {}
        for backend in backends:  # a backend that moved to a new URL starts afresh
            track = self.tracks.get(backend.id)
            tracks[backend.id] = track if track is not None and track.url == backend.url else Track(backend.url)
        self.tracks = tracks
        due = [b for b in backends if tracks[b.id].next_probe <= now]
        await asyncio.gather(*(self._probe(gateway, b, tracks[b.id]) for b in due))

    async def _probe(self, gateway: Gateway, backend: Backend, track: Track) -> tuple[str, str | None]:
        """Probe once and apply the result; returns it (the probe's own verdict, not yet the backend's status)."""
        started = time.perf_counter()
        status, error = await self._check(gateway, backend)
        seconds = round(time.perf_counter() - started, 4)  # shown in /admin/servers; the metrics plugin reads it
        backend.notes["health"] = {"probe_seconds": seconds, "result": status, "probed_at": time.time()}
        options = self.options
        if status == BUSY:
            track.next_probe = time.monotonic() + options.interval
            return status, error
        if status == HEALTHY:
            track.streak = max(track.streak, 0) + 1
            if backend.status != HEALTHY and track.streak >= options.healthy_after:
                await self._transition(gateway, backend, HEALTHY, None)
        elif status == MISMATCHED:
            track.streak = 0
            if backend.status != MISMATCHED or backend.last_error != error:
                await self._transition(gateway, backend, MISMATCHED, error)
        else:
            track.streak = min(track.streak, 0) - 1
            if backend.status != UNHEALTHY and -track.streak >= options.unhealthy_after:
                await self._transition(gateway, backend, UNHEALTHY, error)
        wait = options.interval
        if backend.status == UNHEALTHY:  # back off: 2x per further failure, capped, +-20 % jitter
            extra = max(0, -track.streak - options.unhealthy_after)
            wait = min(options.max_interval, options.interval * 2 ** min(extra, 16)) * random.uniform(0.8, 1.2)
        track.next_probe = time.monotonic() + wait
        return status, error

    @hookimpl
    def register_routes(self) -> list[web.RouteDef]:
        return [web.post("/admin/health/probe", allow("readonly")(self.probe_now))]

    async def probe_now(self, request: web.Request, gateway: Gateway, caller: Identity) -> web.Response:
        """``POST /admin/health/probe``: probe every approved backend now, whatever its turn; each result, timed."""
        backends = [b for b in gateway.registry.backends.values() if b.status != PENDING]
        return web.json_response({"backends": await asyncio.gather(*(self._probe_timed(gateway, b) for b in backends))})

    async def _probe_timed(self, gateway: Gateway, backend: Backend) -> dict[str, object]:
        track = self.tracks.get(backend.id)
        if track is None or track.url != backend.url:
            track = self.tracks[backend.id] = Track(backend.url)
        started = time.perf_counter()
        probe, error = await self._probe(gateway, backend, track)
        took = round((time.perf_counter() - started) * 1000, 2)
        return {"registration_id": backend.id, "name": backend.name, "probe": probe, "error": error, "ms": took,
                "status": backend.status}  # fmt: skip

    async def _check(self, gateway: Gateway, backend: Backend) -> tuple[str, str | None]:
        path = self.options.path
        headers = backend.auth_headers()
        try:
            timeout = aiohttp.ClientTimeout(total=self.options.timeout)
            async with gateway.http.get(
                _probe_url(backend, path), timeout=timeout, allow_redirects=False, headers=headers
            ) as response:
                body = await response.read()
        except TimeoutError:
            if self._busy(backend):
                return BUSY, None
            return UNHEALTHY, f"GET {path} timed out after {self.options.timeout:g}s"
        except (aiohttp.ClientError, ValueError) as exc:  # ValueError: a URL aiohttp cannot use (an old registration)
            return UNHEALTHY, f"GET {path} failed: {type(exc).__name__}"
        if response.status == 401:  # the same key as its requests carry: no use routing to it (gateway.refused)
            return MISMATCHED, f"GET {path}: the provider refused its api_key (HTTP 401); {FIX}"
        if response.status != 200:
            return UNHEALTHY, f"GET {path} answered HTTP {response.status}"
        if path == "/v1/models":
            missing = sorted(set(backend.models) - _listed_models(body))
            if missing:
                return MISMATCHED, f"registered for {', '.join(missing)}, which GET /v1/models does not list"
        return HEALTHY, None

    def _busy(self, backend: Backend) -> bool:
        """Whether our own traffic shows the backend working: bytes lately, or requests on it that it was
        serving a little before. A server that works on one request at a time answers no probe meanwhile."""
        quiet = time.monotonic() - backend.active_at
        return quiet < self.options.interval + self.options.timeout or (backend.in_flight > 0 and quiet < 120)

    async def _transition(self, gateway: Gateway, backend: Backend, status: str, error: str | None) -> None:
        previous = backend.status
        await gateway.registry.set_status(backend, status, error)
        log = gateway.log.info if status == HEALTHY else gateway.log.warning
        log("backend_health_changed", backend=backend.name, status=status, previous=previous, error=error)


def _probe_url(backend: Backend, path: str) -> str:
    """``path`` on the backend: /v1/... follows its api_path (Gemini's base URL already ends in its version)."""
    return backend.endpoint_url(path[4:]) if path.startswith("/v1/") else backend.url + path


def _listed_models(body: bytes) -> set[str]:
    """Model ids from an OpenAI /v1/models answer; an unreadable one lists nothing.

    Gemini lists ``models/gemini-2.0-flash`` for the model that requests name ``gemini-2.0-flash``: both count.
    """
    try:
        entries = json.loads(body).get("data") or []
    except (ValueError, AttributeError):
        return set()
    ids = {e["id"] for e in entries if isinstance(e, dict) and isinstance(e.get("id"), str)}
    return ids | {i.removeprefix("models/") for i in ids}
