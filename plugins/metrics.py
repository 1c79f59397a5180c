"""metrics: ``GET /metrics`` in the Prometheus text format, with prometheus-client.

Per request (``request_complete``, synchronous and cheap: counted in dicts and folded into the
metrics every ``refresh_interval`` seconds, before each scrape and at shutdown): requests by model,
backend, status, strategy and key name; latency, time to first token and time per output token;
tokens in and out; cache results; refusals; queue waits; failovers and resumed streams;
the gateway's own added time. Per backend (refreshed every ``refresh_interval`` seconds
and at each scrape): in flight, queue, status, circuit state and the last probe's time.

Label values are bounded: a model is its own label only if a backend serves it (or it is a
routing group), else ``other`` (a model registered through another process sharing the database
is learned at the next refresh); a key's name comes only from an ``Identity``. Each gateway
has its own registry; see ``plugins/_metric_set.py`` for multiprocess mode. ``/metrics``
is open (Prometheus scrapes without a key) unless ``require_key: true``, or unset with an
``authenticate`` plugin (auth) enabled: its labels name keys and backends.
"""

from __future__ import annotations

import os
from bisect import bisect_left
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from aiohttp import web
from prometheus_client import multiprocess

from gateway import hookimpl
from gateway.admin_auth import allow
from gateway.backend import STATUSES
from gateway.config import ConfigError
from gateway.identity import Identity
from gateway.validate import positive
from plugins._events import error_code
from plugins._metric_set import (
    DURATION_BUCKETS,
    OVERHEAD_BUCKETS,
    SLOT,
    SUM,
    TOKEN_BOUNDS,
    TPOT_BUCKETS,
    TTFT_BUCKETS,
    MetricSet,
    multiprocess_dir,
)

if TYPE_CHECKING:
    from gateway.call import Call
    from gateway.registry import Backend
    from gateway.state import Gateway

HISTOGRAMS = ("duration", "input", "output", "overhead", "ttft", "tpot")
DURATION, INPUT, OUTPUT, OVERHEAD, TTFT, TPOT = (SLOT[name] for name in HISTOGRAMS)
DURATION_SUM, INPUT_SUM, OUTPUT_SUM, OVERHEAD_SUM, TTFT_SUM, TPOT_SUM = (SUM[name] for name in HISTOGRAMS)
CIRCUIT_STATES = {"closed": 0.0, "half_open": 1.0, "open": 2.0}
OTHER = "other"


@dataclass(frozen=True)
class Options:
    require_key: bool | None = field(
        default=None,
        metadata={
            "doc": "demand the admin key (or a readonly/admin key) on GET /metrics; unset: only when an "
            "authenticate plugin (auth) is enabled, since the labels name keys and backends"
        },
    )
    refresh_interval: float = field(
        default=2.0, metadata={"doc": "seconds between updates of the per-backend gauges", "check": positive}
    )


class Plugin:
    def __init__(self, options: Options | None = None) -> None:
        self.options = options or Options()
        try:
            self.metrics = MetricSet(multiprocess_dir())
        except ValueError as exc:
            raise ConfigError([f"plugins.metrics: {exc}"]) from None
        self.models: frozenset[str] = frozenset()
        self.gateway: Gateway | None = None

    # -- start-up and routes ------------------------------------------------------------------

    @hookimpl
    def register_routes(self, gateway: Gateway) -> list[web.RouteDef]:
        handler: Callable[..., Any] = self.scrape
        require = self.options.require_key
        if require or (require is None and gateway.plugins.authenticate):
            handler = allow("readonly")(self._scrape_as)
        return [web.get("/metrics", handler)]

    @hookimpl
    def startup(self, gateway: Gateway) -> None:
        self.gateway = gateway
        self._known_models(gateway)
        gateway.every(self.options.refresh_interval, self.refresh, name="metrics")

    @hookimpl
    def shutdown(self) -> None:
        """What requests counted since the last refresh is kept; in multiprocess mode, this process's live
        gauges (in flight, queue) stop counting."""
        self.metrics.fold()
        if self.metrics.multiproc_dir is not None:
            multiprocess.mark_process_dead(os.getpid(), self.metrics.multiproc_dir)

    async def _scrape_as(self, request: web.Request, gateway: Gateway, caller: Any) -> web.Response:
        return await self.scrape(request)

    async def scrape(self, request: web.Request) -> web.Response:
        """``GET /metrics``: every metric, the per-backend gauges brought up to date first."""
        await self.refresh()
        body = self.metrics.exposition()
        return web.Response(body=body, headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})

    def _known_models(self, gateway: Gateway) -> None:
        self.models = frozenset({*gateway.registry.models(), *gateway.config.routing.groups})

    @hookimpl
    def backend_status_changed(self, gateway: Gateway, event: str) -> None:
        if event in ("registered", "updated", "removed"):
            self._known_models(gateway)

    # -- per request -------------------------------------------------------------------------------

    @hookimpl
    def request_complete(self, call: Call) -> None:
        """Record one finished call in its label values' slot (see ``_metric_set``); synchronous, so its
        latency is taken as the client's answer ends."""
        if call.dry_run:
            return
        latency = call.latency
        model = call.model if call.model in self.models else (OTHER if call.model else "none")
        identity = call.identity
        key = identity.name if isinstance(identity, Identity) else ("anonymous" if identity is None else OTHER)
        backend = call.backend
        tags = call.tags
        cache = tags.get("cache") if tags else None
        labels = (
            model, "none" if backend is None else backend.name, call.status, call.route or "none", key,
            call.endpoint, cache,
        )  # fmt: skip
        slot = self.metrics.slots.get(labels) or self.metrics.slot(labels)  # made on the label set's first request
        slot[0] += 1
        slot[DURATION + bisect_left(DURATION_BUCKETS, latency)] += 1
        slot[DURATION_SUM] += latency
        usage = call.usage
        completion = None
        if usage:
            prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens")
            if prompt.__class__ is int and prompt >= 0:
                slot[INPUT + bisect_left(TOKEN_BOUNDS, prompt)] += 1
                slot[INPUT_SUM] += prompt
            if completion.__class__ is int and completion >= 0:
                slot[OUTPUT + bisect_left(TOKEN_BOUNDS, completion)] += 1
                slot[OUTPUT_SUM] += completion
            else:
                completion = None
        if call.attempts:
            self._attempts(call, slot, model, latency, completion)
        if tags:
            wait = tags.get("queue_wait")
            if wait is not None:
                self.metrics.spreads["queue_wait"].observe((model,), wait)
        if call.status == 429 and not call.attempts:
            self.metrics.tallies["rejections"].inc((error_code(call) or OTHER, key))

    def _attempts(self, call: Call, slot: list[Any], model: str, latency: float, completion: int | None) -> None:
        """The gateway's own time, failovers and resumed streams; for a success, time to first token and per
        output token."""
        attempts = call.attempts
        last = attempts[-1]
        if len(attempts) == 1:  # the usual case, without a loop
            waited = 0.0 if last.ended is None else last.ended - last.started
        else:
            waited = 0.0
            for attempt in attempts:
                if attempt.ended is not None:
                    waited += attempt.ended - attempt.started
            counts = self.metrics.tallies
            for previous in attempts[:-1]:
                counts["resumed" if previous.mid_stream else "failovers"].inc((model,))
        overhead = latency - waited if latency > waited else 0.0
        slot[OVERHEAD + bisect_left(OVERHEAD_BUCKETS, overhead)] += 1
        slot[OVERHEAD_SUM] += overhead
        if call.status != 200 or call.error is not None or last.first_byte is None or last.ended is None:
            return
        first_byte = call.first_byte_at if call.stream else None
        if first_byte is not None:
            ttft = first_byte - call.started
            slot[TTFT + bisect_left(TTFT_BUCKETS, ttft)] += 1
            slot[TTFT_SUM] += ttft
        if completion is None or completion < 1:
            return
        if first_byte is not None:
            if completion == 1:
                return
            tpot = (last.ended - first_byte) / (completion - 1)
        else:
            tpot = (last.ended - last.started) / completion
        slot[TPOT + bisect_left(TPOT_BUCKETS, tpot)] += 1
        slot[TPOT_SUM] += tpot

    # -- per backend -------------------------------------------------------------------------------

    async def refresh(self) -> None:
        """Fold in what requests counted; bring the per-backend gauges up to date (a removed backend's series go)."""
        self.metrics.fold()
        gateway = self.gateway
        if gateway is None:
            return
        self._known_models(gateway)  # another process's registrations reach this one's registry by reload, unannounced
        m = self.metrics
        for gauge in (m.in_flight, m.queue, m.up, m.status, m.circuit, m.probe):
            gauge.clear()
        queued = _queued(gateway)
        for backend in list(gateway.registry.backends.values()):
            name = backend.name
            m.in_flight.labels(name).set(backend.in_flight)
            m.queue.labels(name).set(sum(queued.get(model, 0) for model in backend.models))
            m.up.labels(name).set(1.0 if backend.routable else 0.0)
            for status in STATUSES:
                m.status.labels(name, status).set(1.0 if backend.status == status else 0.0)
            _backend_notes(m, backend)


def _backend_notes(m: MetricSet, backend: Backend) -> None:
    """Circuit state (``notes["circuit"]`` of circuit_breaker) and probe time (``notes["health"]`` of health)."""
    circuits = backend.notes.get("circuit")
    if isinstance(circuits, dict):
        for endpoint, circuit in circuits.items():
            state = CIRCUIT_STATES.get(circuit.get("state", "")) if isinstance(circuit, dict) else None
            if state is not None:
                m.circuit.labels(backend.name, str(endpoint)).set(state)
    health = backend.notes.get("health")
    seconds = health.get("probe_seconds") if isinstance(health, dict) else None
    if isinstance(seconds, int | float):
        m.probe.labels(backend.name).set(seconds)


def _queued(gateway: Gateway) -> dict[str, int]:
    """Requests waiting per model, from the ratelimit plugin's public ``queued()`` if it runs."""
    ratelimit = gateway.plugins.pm.get_plugin("ratelimit")
    queued = getattr(ratelimit, "queued", None)
    return queued() if callable(queued) else {}
