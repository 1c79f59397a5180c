"""least_loaded: power of two choices over each backend's load.

Load is the gateway's own count of requests in flight on the backend (or, if larger, the
load its ``multiverse agent`` reported in its last heartbeat: other clients' requests too), plus, with
``metrics: true``, what the backend reports itself: vLLM's ``vllm:num_requests_waiting``
(and ``running``) from its ``/metrics``, read every ``metrics_interval`` seconds. Two
candidates are drawn at random and the less loaded goes first (then the rest, least
loaded first): nearly as good as always picking the least loaded, without every
request piling onto the same momentarily idle backend.
"""

from __future__ import annotations

import asyncio
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import aiohttp

from gateway import hookimpl
from gateway.scoring import ScoredStrategy
from gateway.validate import positive

if TYPE_CHECKING:
    from gateway.call import Call
    from gateway.registry import Backend
    from gateway.state import Gateway

_METRIC = re.compile(rb"^vllm:num_requests_(waiting|running)(?:\{[^}]*\})?\s+([0-9.eE+-]+)", re.MULTILINE)


@dataclass(frozen=True)
class Options:
    metrics: bool = field(default=False, metadata={"doc": "also read vLLM's queue from each backend's /metrics"})
    metrics_interval: float = field(default=2.0, metadata={"doc": "seconds between /metrics reads", "check": positive})
    waiting_weight: float = field(
        default=1.0, metadata={"doc": "how much one queued request counts", "check": positive}
    )


class LeastLoaded(ScoredStrategy):
    """Scores are minus the load: in-flight requests plus the backend's reported queue."""

    def __init__(self, options: Options) -> None:
        super().__init__()
        self.options = options
        self.reported: dict[str, float] = {}  # backend id -> load the backend reports
        self.random = random.Random()

    def score(self, backend: Backend, call: Call) -> float:
        agent = backend.notes.get("agent") or {}  # what its ``multiverse agent`` last reported (leases plugin)
        seen = max(float(backend.in_flight), float(agent.get("load") or 0.0))
        return -(seen + self.reported.get(backend.id, 0.0))

    def __call__(self, candidates: Sequence[Backend], call: Call) -> Sequence[Backend]:
        if len(candidates) < 2:
            return candidates
        first, second = self.random.sample(range(len(candidates)), 2)
        a, b = candidates[first], candidates[second]
        pick = a if self.score(a, call) >= self.score(b, call) else b
        rest = sorted((c for c in candidates if c is not pick), key=lambda c: -self.score(c, call))
        return [pick, *rest]

    async def poll(self, gateway: Gateway) -> None:
        backends = list(gateway.registry.backends.values())
        await asyncio.gather(*(self._read_metrics(gateway, b) for b in backends))

    async def _read_metrics(self, gateway: Gateway, backend: Backend) -> None:
        headers = backend.auth_headers()
        try:
            timeout = aiohttp.ClientTimeout(total=min(self.options.metrics_interval, 5))
            async with gateway.http.get(backend.url + "/metrics", timeout=timeout, headers=headers) as response:
                text = await response.read() if response.status == 200 else b""
        except (aiohttp.ClientError, TimeoutError):
            text = b""
        values = {kind: float(value) for kind, value in _METRIC.findall(text)}
        if values:
            waiting = values.get(b"waiting", 0.0) * self.options.waiting_weight
            self.reported[backend.id] = waiting + values.get(b"running", 0.0)
        else:
            self.reported.pop(backend.id, None)


class Plugin:
    def __init__(self, options: Options | None = None) -> None:
        self.strategy = LeastLoaded(options or Options())

    @hookimpl
    def register_strategies(self) -> dict[str, LeastLoaded]:
        return {"least_loaded": self.strategy}

    @hookimpl
    def startup(self, gateway: Gateway) -> None:
        if self.strategy.options.metrics:
            gateway.every(self.strategy.options.metrics_interval, lambda: self.strategy.poll(gateway), "least_loaded")
