"""What the dashboard shows, kept in memory from ``request_complete``: traffic per second, latencies, failures.

Pure bookkeeping with bounded memory (rings and per-second buckets over a fixed window), so the
dashboard never grows with traffic and is tested without a browser. The clock is passed in.
"""

from __future__ import annotations

import time
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from gateway.identity import Identity
from gateway.registry import HEALTHY, MISMATCHED, PENDING, UNHEALTHY, UNKNOWN

if TYPE_CHECKING:
    from gateway.call import Call
    from gateway.registry import Backend

OTHER_MODEL = "(model not served)"
ANONYMOUS = "(anonymous)"
MAX_ERROR = 300  # characters of an error kept for the failed-requests panel


def level_of(backend: Backend) -> tuple[str, str]:
    """The backend's level for the projector (healthy, degraded, down, unknown) and the words that explain it."""
    circuits = backend.notes.get("circuit") or {}
    tripped = {endpoint: note.get("state") for endpoint, note in circuits.items() if note.get("state") != "closed"}
    if backend.status in (UNHEALTHY, MISMATCHED):
        return "down", backend.status + (f": {backend.last_error}" if backend.last_error else "")
    if tripped:
        return "degraded", "circuit " + ", ".join(f"{state} for {endpoint}" for endpoint, state in tripped.items())
    if backend.status == HEALTHY:
        return "healthy", "answering probes"
    if backend.status == PENDING:
        return "unknown", "waiting for an admin's approval"
    if backend.status == UNKNOWN:
        return "unknown", "not probed yet"
    return "unknown", backend.status


def key_name(identity: Any) -> str:
    """Whom a call came from, by the key's name; never the key itself (another plugin's identity is not shown)."""
    if identity is None:
        return ANONYMOUS
    if isinstance(identity, Identity):
        return identity.name
    return "(other caller)"


@dataclass(slots=True)
class Second:
    """What completed during one second."""

    at: int
    requests: int = 0
    failed: int = 0
    models: Counter[str] = field(default_factory=Counter)
    keys: Counter[str] = field(default_factory=Counter)
    tokens: Counter[str] = field(default_factory=Counter)


class Stats:
    """Recent traffic over ``window`` seconds, ``latencies`` first-byte times per backend, ``failures`` failed calls."""

    def __init__(self, window: int = 300, latencies: int = 40, failures: int = 20) -> None:
        self.window = window
        self.seconds: deque[Second] = deque()
        self.latencies: dict[str, deque[float]] = {}
        self.latency_points = latencies
        self.failures: deque[dict[str, Any]] = deque(maxlen=failures)
        self.version = 0  # goes up with every change worth a new snapshot

    def _second(self, now: float) -> Second:
        at = int(now)
        if not self.seconds or self.seconds[-1].at != at:
            self.seconds.append(Second(at))
            self._expire(now)
        return self.seconds[-1]

    def _expire(self, now: float) -> None:
        while self.seconds and self.seconds[0].at <= now - self.window:
            self.seconds.popleft()

    def record(self, call: Call, now: float | None = None) -> None:
        """Count one finished call; keep its story if it failed (the core's rule: status >= 500 or an error)."""
        now = time.time() if now is None else now
        second = self._second(now)
        failed = call.status >= 500 or call.error is not None
        second.requests += 1
        second.failed += failed
        model = call.requested_model
        if not any(model in backend.models for backend in call.gateway.registry.backends.values()):
            model = OTHER_MODEL  # a typo or a probe: one bucket, so clients cannot grow the table
        who = key_name(call.identity)
        second.models[model] += 1
        second.keys[who] += 1
        total = (call.usage or {}).get("total_tokens")
        if isinstance(total, int) and total > 0:
            second.tokens[who] += total
        for attempt in call.attempts:
            ttfb = attempt.time_to_first_byte
            if attempt.outcome == "ok" and ttfb is not None:
                ring = self.latencies.get(attempt.backend.id)
                if ring is None:
                    ring = self.latencies[attempt.backend.id] = deque(maxlen=self.latency_points)
                ring.append(round(ttfb * 1000, 1))
        if failed:
            self.failures.appendleft(_story(call, model, who, now))
        self.version += 1

    def forget(self, backend_id: str) -> None:
        self.latencies.pop(backend_id, None)

    def traffic(self, now: float, bins: int = 60) -> dict[str, Any]:
        """Requests and failures per second, averaged into ``bins`` bins over the window, and the latest rates."""
        self._expire(now)
        width = self.window / bins
        start = int(now) - self.window + 1
        requests = [0.0] * bins
        failed = [0.0] * bins
        for second in self.seconds:
            slot = min(bins - 1, max(0, int((second.at - start) / width)))
            requests[slot] += second.requests / width
            failed[slot] += second.failed / width
        recent = [s for s in self.seconds if s.at > now - 60]
        total = sum(s.requests for s in recent)
        errors = sum(s.failed for s in recent)
        last10 = sum(s.requests for s in recent if s.at > now - 10)
        return {
            "window_seconds": self.window,
            "bin_seconds": width,
            "requests_per_second": [round(v, 3) for v in requests],
            "failed_per_second": [round(v, 3) for v in failed],
            "rps_10s": round(last10 / 10, 2),
            "requests_1m": total,
            "failed_1m": errors,
            "error_rate_1m": round(errors / total, 4) if total else 0.0,
            "requests_window": sum(s.requests for s in self.seconds),
        }

    def top(self, now: float, count: int) -> dict[str, list[dict[str, Any]]]:
        """The busiest models and keys over the window."""
        self._expire(now)
        models: Counter[str] = Counter()
        keys: Counter[str] = Counter()
        tokens: Counter[str] = Counter()
        for second in self.seconds:
            models.update(second.models)
            keys.update(second.keys)
            tokens.update(second.tokens)
        return {
            "models": [{"name": n, "requests": c} for n, c in models.most_common(count)],
            "keys": [{"name": n, "requests": c, "tokens": tokens[n]} for n, c in keys.most_common(count)],
        }


def _story(call: Call, model: str, who: str, now: float) -> dict[str, Any]:
    """One failed call as the panel tells it: who asked what, what the client got, and every attempt."""
    error = call.error or f"HTTP {call.status}"
    return {
        "at": now,
        "request_id": call.request_id,
        "model": model,
        "key": who,
        "status": call.status,
        "error": error if len(error) <= MAX_ERROR else error[:MAX_ERROR] + "…",
        "latency_ms": round(call.latency * 1000, 1),
        "attempts": [a.public() for a in call.attempts],
    }
