"""least_latency: send each request to the backend that has been fastest lately.

The gateway measures every answer itself: for streams, the time to the first byte;
otherwise, the time per kilobyte of answer (a stand-in for time per output token).
Each is an exponentially weighted moving average per backend, so a backend that slows
down loses traffic within a few requests. A backend not yet measured is tried first,
and a small share of requests (``explore``) goes to another candidate so that a
backend that got faster is noticed. A failed try counts as ``failure_penalty`` seconds.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from gateway import hookimpl
from gateway.scoring import ScoredStrategy
from gateway.validate import positive

if TYPE_CHECKING:
    from gateway.call import Call
    from gateway.registry import Backend


def _share(value: float) -> str | None:
    return None if 0 <= value < 1 else f"must be at least 0 and below 1, got {value}"


@dataclass(frozen=True)
class Options:
    alpha: float = field(
        default=0.3, metadata={"doc": "weight of the newest measurement in the average", "check": _share}
    )
    explore: float = field(
        default=0.05, metadata={"doc": "share of requests sent to a random other candidate", "check": _share}
    )
    failure_penalty: float = field(default=10.0, metadata={"doc": "seconds a failed try counts as", "check": positive})


class LeastLatency(ScoredStrategy):
    """Scores are minus the expected latency in seconds; unmeasured backends score 0 (best)."""

    def __init__(self, options: Options) -> None:
        super().__init__()
        self.options = options
        self.first_byte: dict[str, float] = {}  # backend id -> EWMA seconds to first byte (streams)
        self.per_kb: dict[str, float] = {}  # backend id -> EWMA seconds per KB of answer (non-streams)
        self.random = random.Random()

    def _table(self, call: Call) -> dict[str, float]:
        return self.first_byte if call.stream else self.per_kb

    def score(self, backend: Backend, call: Call) -> float:
        return -self._table(call).get(backend.id, 0.0)

    def __call__(self, candidates: Sequence[Backend], call: Call) -> Sequence[Backend]:
        ordered = list(super().__call__(candidates, call))
        if len(ordered) > 1 and self.random.random() < self.options.explore:
            ordered.insert(0, ordered.pop(self.random.randrange(1, len(ordered))))
        return ordered

    def observe(self, call: Call) -> None:
        """Learn from each attempt on its own: a backend is timed from when it was tried, not from the call's start."""
        table = self._table(call)
        for attempt in call.attempts:
            backend = attempt.backend
            if attempt.failed:
                table[backend.id] = max(table.get(backend.id, 0.0), self.options.failure_penalty)
                continue
            if attempt.outcome != "ok" or attempt.status is None or attempt.status >= 400 or attempt.ended is None:
                continue
            if call.stream:
                sample = attempt.time_to_first_byte
            else:
                sample = (attempt.ended - attempt.started) / max(call.bytes_out / 1024, 0.1)
            if sample is None:
                continue
            previous = table.get(backend.id)
            alpha = self.options.alpha
            table[backend.id] = sample if previous is None else alpha * sample + (1 - alpha) * previous


class Plugin:
    def __init__(self, options: Options | None = None) -> None:
        self.strategy = LeastLatency(options or Options())

    @hookimpl
    def register_strategies(self) -> dict[str, LeastLatency]:
        return {"least_latency": self.strategy}

    @hookimpl
    def request_complete(self, call: Call) -> None:
        self.strategy.observe(call)
