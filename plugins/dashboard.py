"""dashboard: a live page for the classroom projector at ``GET /dashboard``.

The page is static (HTML, JS and CSS shipped in ``dashboard_static/``, nothing from the
internet) and holds no data; it asks for the admin key (or a readonly key) once, keeps it in
the browser's sessionStorage and sends it as the ``X-API-Key`` header, never in a URL. Its
data comes from two routes that need an admin or readonly key: ``GET /dashboard/api/snapshot``
(one JSON snapshot) and ``GET /dashboard/api/events`` (server-sent events: a snapshot every
``interval`` seconds, and at once when a backend changes). A stream ends after
``stream_max_seconds`` and the page reconnects, so a revoked key stops seeing data.

What it shows is kept in memory from ``request_complete`` (``_dashboard_stats.Stats``):
traffic over ``window`` seconds, first-byte latencies per backend, the latest failed calls
with their attempts. Per process: with several gateway processes, each shows its own traffic.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aiohttp import web
from aiohttp_sse import sse_response

from gateway import hookimpl
from gateway.admin_auth import allow
from gateway.validate import positive
from plugins._dashboard_stats import Stats, level_of
from plugins.fair_share import FairQueue

if TYPE_CHECKING:
    from gateway.call import Call
    from gateway.identity import Identity
    from gateway.registry import Backend
    from gateway.state import Gateway

STATIC = Path(__file__).with_name("dashboard_static")
ASSETS = {"dashboard.js": "text/javascript", "dashboard.css": "text/css"}
PAGE_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; "
        "form-action 'none'; frame-ancestors 'none'; base-uri 'none'"
    ),
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-store",
}
DATA_HEADERS = {"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff"}


@dataclass(frozen=True)
class Options:
    interval: float = field(default=1.0, metadata={"doc": "seconds between live snapshots", "check": positive})
    window: int = field(
        default=300, metadata={"doc": "seconds of traffic shown (chart, top models and keys)", "check": positive}
    )
    failures: int = field(default=20, metadata={"doc": "latest failed requests kept and shown", "check": positive})
    latencies: int = field(default=40, metadata={"doc": "latency points per backend's sparkline", "check": positive})
    top: int = field(default=5, metadata={"doc": "rows in the top models and top keys", "check": positive})
    stream_max_seconds: float = field(
        default=300.0,
        metadata={
            "doc": "a live stream ends after this; the page reconnects and its key is checked again",
            "check": positive,
        },
    )


class Plugin:
    def __init__(self, options: Options | None = None) -> None:
        self.options = options or Options()
        self.stats = Stats(self.options.window, self.options.latencies, self.options.failures)
        self._changed: asyncio.Event | None = None

    # -- hooks -----------------------------------------------------------------------------

    @hookimpl
    def register_routes(self) -> list[web.RouteDef]:
        return [
            web.get("/dashboard", self.page),
            web.get("/dashboard/static/{name}", self.asset),
            web.get("/dashboard/api/snapshot", allow("readonly")(self.snapshot_route)),
            web.get("/dashboard/api/events", allow("readonly")(self.events)),
        ]

    @hookimpl
    def request_complete(self, call: Call) -> None:
        self.stats.record(call)

    @hookimpl
    def backend_status_changed(self, backend: Backend, event: str) -> None:
        if event == "removed":
            self.stats.forget(backend.id)
        self._wake()

    def _wake(self) -> None:
        """Tell every open stream to send a snapshot now."""
        if self._changed is not None:
            self._changed.set()
            self._changed = None

    async def _wait_for_change(self, seconds: float) -> None:
        if self._changed is None:
            self._changed = asyncio.Event()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._changed.wait(), seconds)

    # -- the page ----------------------------------------------------------------------------

    async def page(self, request: web.Request) -> web.StreamResponse:
        return web.FileResponse(STATIC / "index.html", headers={**PAGE_HEADERS, "Content-Type": "text/html"})

    async def asset(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        if name not in ASSETS:
            raise web.HTTPNotFound()
        return web.FileResponse(STATIC / name, headers={**PAGE_HEADERS, "Content-Type": ASSETS[name]})

    # -- the data ----------------------------------------------------------------------------

    async def snapshot_route(self, request: web.Request, gateway: Gateway, caller: Identity) -> web.Response:
        return web.json_response(self.snapshot(gateway, caller), headers=DATA_HEADERS)

    async def events(self, request: web.Request, gateway: Gateway, caller: Identity) -> web.StreamResponse:
        deadline = time.monotonic() + self.options.stream_max_seconds
        async with sse_response(request, headers=DATA_HEADERS) as stream:
            with contextlib.suppress(ConnectionResetError):
                while stream.is_connected() and time.monotonic() < deadline:
                    await stream.send(json.dumps(self.snapshot(gateway, caller)), event="snapshot")
                    await self._wait_for_change(self.options.interval)
                if stream.is_connected():
                    await stream.send("stream_max_seconds reached", event="reconnect")
        return stream

    def snapshot(self, gateway: Gateway, caller: Identity) -> dict[str, Any]:
        """Everything the page shows, as JSON; times are epoch seconds, the page shows them as ages."""
        now = time.time()
        queued = self._queued(gateway)
        backends = [self._backend(backend, queued) for backend in gateway.registry.backends.values()]
        levels = {"healthy": 0, "degraded": 0, "down": 0, "unknown": 0}
        for backend in backends:
            levels[backend["level"]] += 1
        return {
            "now": now,
            "caller": {"name": caller.name, "role": caller.role},
            "uptime_seconds": round(now - gateway.started_at, 1),
            "summary": {
                "backends": len(backends),
                **levels,
                "in_flight": sum(b["in_flight"] for b in backends),
                "queued": sum(queued.values()),
                "requests_total": gateway.requests_total,
                "requests_failed": gateway.requests_failed,
            },
            "backends": backends,
            "traffic": self.stats.traffic(now),
            "top": self.stats.top(now, self.options.top),
            "failures": list(self.stats.failures),
        }

    def _backend(self, backend: Backend, queued: Counter[str]) -> dict[str, Any]:
        level, why = level_of(backend)
        circuits = backend.notes.get("circuit") or {}
        return {
            "id": backend.id,
            "name": backend.name,
            "level": level,
            "status": backend.status,
            "why": why,
            "since": backend.status_since,
            "owner": backend.owner_name or ("gateway.yaml" if backend.read_only else None),
            "models": list(backend.models),
            "in_flight": backend.in_flight,
            "max_concurrency": backend.max_concurrency,
            "queued": sum(queued.get(model, 0) for model in backend.models),
            "circuits": {endpoint: note.get("state") for endpoint, note in circuits.items()},
            "served": backend.served,
            "failed": backend.failed,
            "latency_ms": list(self.stats.latencies.get(backend.id, ())),
        }

    @staticmethod
    def _queued(gateway: Gateway) -> Counter[str]:
        """Requests waiting for a backend slot, per model: the ``ratelimit`` plugin's fair queue, if it runs."""
        queue = getattr(gateway.plugins.pm.get_plugin("ratelimit"), "queue", None)
        return queue.by_model() if isinstance(queue, FairQueue) else Counter()
