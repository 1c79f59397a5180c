"""The metrics the ``metrics`` plugin exposes, defined once, in one registry per gateway.

Names follow the OpenTelemetry GenAI semantic conventions where they have one
(``gen_ai.server.request.duration`` becomes ``gen_ai_server_request_duration_seconds``,
attributes ``gen_ai.request.model`` become labels ``gen_ai_request_model``); the rest are
``multiverse_*``. Buckets are the ones the conventions advise.

With ``PROMETHEUS_MULTIPROC_DIR`` set (before the gateway starts: prometheus-client reads it
when it is imported), values live in that folder's files, one per process, and a scrape of
any process adds them up: gauges of per-process state (in flight, queue) are summed over live
processes, a backend's status and probe time are the most recent any process saw.

What requests add is counted in plain Python first and folded into prometheus-client's metrics by
``fold()``, which the ``metrics`` plugin calls every ``refresh_interval`` seconds, before each scrape
and at shutdown. Every request adds to one ``Slot`` (a flat list of counts and sums, see ``SLOT``),
found by one dict look-up of its label values: its count, its latency, tokens, overhead, time to first
token and time per output token each a bucket by ``bisect``. The rare ones (refusals, failovers,
queue waits) go to a ``Tally`` (a counter) or ``Spread`` (a histogram) of their own. A request then
costs one look-up and a few list updates instead of ``labels()``, a lock per value and a loop over
the buckets for each metric.
"""

from __future__ import annotations

import os
from bisect import bisect_left
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, values
from prometheus_client.multiprocess import MultiProcessCollector

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

DURATION_BUCKETS = (0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92)
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0)
TPOT_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)
TOKEN_BUCKETS = tuple(float(4**i) for i in range(14))  # 1, 4, 16 ... 67108864, as the conventions advise
TOKEN_BOUNDS = tuple(map(int, TOKEN_BUCKETS))
"""``TOKEN_BUCKETS`` as ints, for ``bisect`` with a token count: an int meets ints twice as fast as floats."""
OVERHEAD_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
QUEUE_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
GEN_AI = ("gen_ai_operation_name", "gen_ai_request_model")
COUNTED = ("rejections", "failovers", "resumed")
OBSERVED = ("queue_wait",)


def _layout(*parts: tuple[str, int]) -> tuple[dict[str, int], dict[str, int]]:
    """Where each histogram starts in a ``Slot`` (its buckets: one past the finite bounds, +Inf), and where
    its sum is, right after them."""
    starts, sums, at = {}, {}, 1  # [0] is the request count
    for name, bounds in parts:
        starts[name], sums[name], at = at, at + bounds + 1, at + bounds + 2
    starts["size"] = at
    return starts, sums


SLOT, SUM = _layout(
    ("duration", len(DURATION_BUCKETS)),
    ("input", len(TOKEN_BUCKETS)),
    ("output", len(TOKEN_BUCKETS)),
    ("overhead", len(OVERHEAD_BUCKETS)),
    ("ttft", len(TTFT_BUCKETS)),
    ("tpot", len(TPOT_BUCKETS)),
)
"""A ``Slot``'s layout: ``[0]`` requests, then per histogram its bucket counts (from ``SLOT[name]``) and its
sum (at ``SUM[name]``; the tokens' sums are also the ``multiverse_tokens`` counter)."""
Slot = list[Any]
SlotKey = tuple[str, str, int, str, str, str, Any]
"""A slot's label values: model, backend, status, route, key name, endpoint, cache result (or None)."""


def multiprocess_dir() -> str | None:
    """The folder of prometheus-client's multiprocess mode, or None; ValueError if it cannot work."""
    folder = os.environ.get(MULTIPROC_ENV)
    if not folder:
        return None
    if not os.path.isdir(folder):
        raise ValueError(f"{MULTIPROC_ENV}={folder} is not a folder; create it (empty) before starting the gateways")
    if values.ValueClass is values.MutexValue:
        raise ValueError(
            f"{MULTIPROC_ENV} was set after prometheus-client was imported; set it in the environment "
            "before starting the gateway"
        )
    return folder


Labels = tuple[str, ...]


class Tally:
    """A labelled ``Counter``'s increments since the last ``fold()``, by label values."""

    __slots__ = ("metric", "pending")

    def __init__(self, metric: Counter) -> None:
        self.metric = metric
        self.pending: dict[Labels, float] = {}

    def inc(self, labels: Labels, amount: float = 1) -> None:
        pending = self.pending
        pending[labels] = pending.get(labels, 0) + amount

    def fold(self) -> None:
        pending, self.pending = self.pending, {}
        for labels, amount in pending.items():
            self.metric.labels(*labels).inc(amount)


class Spread:
    """A ``Histogram``'s observations since the last ``fold()``: per label values, a count per bucket
    (the same buckets, the same ``le`` rule) and their sum."""

    __slots__ = ("bounds", "metric", "pending")

    def __init__(self, metric: Histogram) -> None:
        self.metric = metric
        self.bounds = tuple(metric._upper_bounds[:-1])  # the finite ones; past them is +Inf's bucket
        self.pending: dict[Labels, list[Any]] = {}

    def observe(self, labels: Labels, value: float) -> None:
        slot = self.pending.get(labels)
        if slot is None:
            slot = self.pending[labels] = [0] * (len(self.bounds) + 1) + [0.0]
        slot[bisect_left(self.bounds, value)] += 1  # the first bucket whose upper bound is >= value
        slot[-1] += value

    def fold(self) -> None:
        pending, self.pending = self.pending, {}
        for labels, slot in pending.items():
            series = self.metric.labels(*labels) if labels else self.metric
            # prometheus-client has no public "observe n times"; its buckets and sum are value objects
            # (in multiprocess mode, this process's file), so add to them directly
            for bucket, count in zip(series._buckets, slot, strict=False):
                if count:
                    bucket.inc(count)
            series._sum.inc(slot[-1])


def _add(series: Any, slot: Slot, start: int) -> int:
    """Add a slot's histogram (buckets from ``start``, then its sum) to a series; how many it observed."""
    buckets = series._buckets  # prometheus-client has no public "observe n times" (see Spread.fold)
    end = start + len(buckets)
    observed = sum(slot[start:end])
    if observed:
        for bucket, count in zip(buckets, slot[start:end], strict=True):
            if count:
                bucket.inc(count)
        series._sum.inc(slot[end])
    return observed


OPERATIONS = {"chat/completions": "chat", "completions": "text_completion", "embeddings": "embeddings"}
"""``gen_ai.operation.name`` of an endpoint (others: the endpoint itself)."""


class MetricSet:
    """Every metric of one gateway; ``exposition()`` is the text ``GET /metrics`` answers."""

    def __init__(self, multiproc_dir: str | None = None) -> None:
        self.multiproc_dir = multiproc_dir
        # in multiprocess mode the values are in files: the scrape reads them, nothing is registered
        reg = None if multiproc_dir else CollectorRegistry(auto_describe=True)
        self.registry = reg

        self.requests = Counter(
            "multiverse_requests",
            "Requests answered, by model served, backend, HTTP status, routing strategy and API key name",
            ("model", "backend", "status", "route", "key"),
            registry=reg,
        )
        self.duration = Histogram(
            "gen_ai_server_request_duration_seconds",
            "Time from the request's arrival to the end of its answer (gen_ai.server.request.duration)",
            GEN_AI,
            buckets=DURATION_BUCKETS,
            registry=reg,
        )
        self.ttft = Histogram(
            "gen_ai_server_time_to_first_token_seconds",
            "Time to the first byte of a successful streamed answer (gen_ai.server.time_to_first_token)",
            GEN_AI,
            buckets=TTFT_BUCKETS,
            registry=reg,
        )
        self.tpot = Histogram(
            "gen_ai_server_time_per_output_token_seconds",
            "Time per output token after the first, from usage and the backend's timing "
            "(gen_ai.server.time_per_output_token)",
            GEN_AI,
            buckets=TPOT_BUCKETS,
            registry=reg,
        )
        self.token_usage = Histogram(
            "gen_ai_client_token_usage",
            "Tokens per request, input and output (gen_ai.client.token.usage)",
            (*GEN_AI, "gen_ai_token_type"),
            buckets=TOKEN_BUCKETS,
            registry=reg,
        )
        self.tokens = Counter(
            "multiverse_tokens",
            "Tokens in (input) and out (output) by model served and API key name",
            ("model", "key", "type"),
            registry=reg,
        )
        self.overhead = Histogram(
            "multiverse_gateway_overhead_seconds",
            "Time a relayed request spent in the gateway itself: its latency less the time its attempts "
            "spent waiting on backends",
            buckets=OVERHEAD_BUCKETS,
            registry=reg,
        )
        self.cache = Counter(
            "multiverse_cache_requests", "Cache lookups by result: hit, miss, bypass", ("result",), registry=reg
        )
        self.rejections = Counter(
            "multiverse_rejections",
            "Requests the gateway refused with 429 before any backend, by reason (the error code) and key name",
            ("reason", "key"),
            registry=reg,
        )
        self.queue_wait = Histogram(
            "multiverse_queue_wait_seconds",
            "Time a request waited in the ratelimit plugin's fair queue for a backend slot",
            ("model",),
            buckets=QUEUE_BUCKETS,
            registry=reg,
        )
        self.failovers = Counter(
            "multiverse_failovers",
            "Attempts beyond the first, after a failure before any byte was sent",
            ("model",),
            registry=reg,
        )
        self.resumed = Counter(
            "multiverse_resumed_streams",
            "Attempts that continued a stream after its backend failed mid-stream",
            ("model",),
            registry=reg,
        )
        self.in_flight = Gauge(
            "multiverse_backend_in_flight",
            "Requests in progress on a backend",
            ("backend",),
            registry=reg,
            multiprocess_mode="livesum",
        )
        self.queue = Gauge(
            "multiverse_backend_queue_length",
            "Requests waiting in the fair queue for a slot on a model this backend serves",
            ("backend",),
            registry=reg,
            multiprocess_mode="livesum",
        )
        self.up = Gauge(
            "multiverse_backend_up",
            "1 if the backend may take traffic (healthy, or not probed yet), else 0",
            ("backend",),
            registry=reg,
            multiprocess_mode="livemostrecent",
        )
        self.status = Gauge(
            "multiverse_backend_status",
            "1 for the backend's current status (healthy, unhealthy, unknown, mismatched, pending)",
            ("backend", "status"),
            registry=reg,
            multiprocess_mode="livemostrecent",
        )
        self.circuit = Gauge(
            "multiverse_backend_circuit_state",
            "The circuit breaker's state per backend and endpoint: 0 closed, 1 half-open, 2 open",
            ("backend", "endpoint"),
            registry=reg,
            multiprocess_mode="livemostrecent",
        )
        self.probe = Gauge(
            "multiverse_health_probe_duration_seconds",
            "How long the backend's last health probe took",
            ("backend",),
            registry=reg,
            multiprocess_mode="livemostrecent",
        )

        self.tallies = {name: Tally(getattr(self, name)) for name in COUNTED}
        self.spreads = {name: Spread(getattr(self, name)) for name in OBSERVED}
        self.slots: dict[SlotKey, Slot] = {}

    def slot(self, key: SlotKey) -> Slot:
        """The counts of requests with these label values since the last fold (made on the first)."""
        slot = self.slots.get(key)
        if slot is None:
            slot = self.slots[key] = [0] * SLOT["size"]
        return slot

    def fold(self) -> None:
        """Add what requests counted since the last fold to the metrics (and so to the exposition)."""
        slots, self.slots = self.slots, {}
        for (model, backend, status, route, key, endpoint, cache), slot in slots.items():
            self.requests.labels(model, backend, str(status), route, key).inc(slot[0])
            gen_ai = (OPERATIONS.get(endpoint, endpoint), model)
            _add(self.duration.labels(*gen_ai), slot, SLOT["duration"])
            for kind, name in (("input", "input"), ("output", "output")):
                if _add(self.token_usage.labels(*gen_ai, kind), slot, SLOT[name]):
                    self.tokens.labels(model, key, kind).inc(slot[SUM[name]])
            _add(self.overhead, slot, SLOT["overhead"])
            _add(self.ttft.labels(*gen_ai), slot, SLOT["ttft"])
            _add(self.tpot.labels(*gen_ai), slot, SLOT["tpot"])
            if cache is not None:
                self.cache.labels(str(cache)).inc(slot[0])
        for tally in self.tallies.values():
            tally.fold()
        for spread in self.spreads.values():
            spread.fold()

    def exposition(self) -> bytes:
        """The Prometheus text format: this gateway's registry, or every process's files in multiprocess mode."""
        if self.multiproc_dir is None:
            assert self.registry is not None
            return generate_latest(self.registry)
        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=self.multiproc_dir)
        return generate_latest(registry)
