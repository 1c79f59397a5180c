"""circuit_breaker: passive health. Real traffic opens a backend's circuit; a trial request closes it.

A circuit opens after ``consecutive_failures`` failures in a row, or when at least
``error_ratio`` of the last ``window`` requests failed (once ``min_requests`` were
seen). While open, the backend gets no traffic; after ``cooldown`` seconds one
trial request is let through (half-open): success closes the circuit, failure
opens it again. A 429 is not a failure: the backend is skipped for its
Retry-After (or ``cooldown``) instead. A client that hangs up proves nothing either way, nor
does a provider refusing the gateway's key (the core takes that backend out itself).

Circuits are per backend and endpoint: a chat-only server failing every embeddings
request keeps serving chat.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from gateway import hookimpl
from gateway.logs import get_logger
from gateway.refused import KEY_REFUSED
from gateway.validate import positive, share

if TYPE_CHECKING:
    from gateway.call import Attempt, Call
    from gateway.registry import Backend

CLOSED, OPEN, HALF_OPEN = "closed", "open", "half_open"
UNCOUNTED = frozenset({"client_gone", KEY_REFUSED})  # KEY_REFUSED: a configuration error (gateway.refused)
log = get_logger("multiverse.circuit_breaker")


@dataclass(frozen=True)
class Options:
    consecutive_failures: int = field(default=3, metadata={"doc": "failures in a row that open", "check": positive})
    error_ratio: float = field(
        default=0.5, metadata={"doc": "share of failures in the window that opens", "check": share}
    )
    window: int = field(default=20, metadata={"doc": "recent requests the ratio is taken over", "check": positive})
    min_requests: int = field(
        default=10, metadata={"doc": "requests in the window before the ratio counts", "check": positive}
    )
    cooldown: float = field(default=15.0, metadata={"doc": "seconds open before a trial request", "check": positive})


@dataclass
class Circuit:
    window: deque[bool]
    state: str = CLOSED
    consecutive: int = 0
    opened_at: float = 0.0
    trial: str | None = None  # request id of the half-open trial in flight
    busy_until: float = 0.0  # a 429's Retry-After


class Plugin:
    def __init__(self, options: Options | None = None) -> None:
        self.options = options or Options()
        self.circuits: dict[tuple[str, str], Circuit] = {}  # (backend id, endpoint) -> its circuit
        self.moved_at: dict[str, float] = {}  # backend id -> perf_counter() when it last moved to a new URL

    def _circuit(self, backend: Backend, endpoint: str) -> Circuit:
        circuit = self.circuits.get((backend.id, endpoint))
        if circuit is None:
            circuit = self.circuits[backend.id, endpoint] = Circuit(deque(maxlen=self.options.window))
        return circuit

    @hookimpl
    def filter_candidates(self, call: Call, candidates: list[Backend]) -> list[Backend] | None:
        if not self.circuits:
            return None
        now = time.monotonic()
        kept = []
        for backend in candidates:
            circuit = self.circuits.get((backend.id, call.endpoint))
            if circuit is None or self._admits(circuit, backend, call, now):
                kept.append(backend)
        return kept

    def _admits(self, circuit: Circuit, backend: Backend, call: Call, now: float) -> bool:
        if now < circuit.busy_until:
            return self._refuse(call, backend, f"asked to wait (Retry-After) {circuit.busy_until - now:.0f}s more")
        if circuit.state == CLOSED:
            return True
        cooled = now - circuit.opened_at >= self.options.cooldown
        if call.dry_run:  # explain: say what would happen, take no trial slot
            free = circuit.state == HALF_OPEN and circuit.trial is None
            return (circuit.state == OPEN and cooled) or free or self._refuse(call, backend, f"circuit {circuit.state}")
        if circuit.state == OPEN and cooled:
            self._move(call, circuit, backend, HALF_OPEN, "cool-down over: one trial request")
        if circuit.state == HALF_OPEN and circuit.trial is None:
            circuit.trial = call.request_id
            return True
        return False

    @staticmethod
    def _refuse(call: Call, backend: Backend, reason: str) -> bool:
        if call.dry_run:
            call.explain.setdefault("excluded", {})[backend.name] = reason
        return False

    @hookimpl
    def request_complete(self, call: Call) -> None:
        now = time.monotonic()
        for attempt in call.attempts:
            self._observe(call, attempt, now)
        for circuit in self.circuits.values():  # a trial the strategy never tried, or whose client left
            if circuit.trial == call.request_id:
                circuit.trial = None

    @hookimpl
    def backend_status_changed(self, backend: Backend, event: str, reason: str | None) -> None:
        """A backend that moved to a new URL (a restarted tunnel) starts with closed circuits."""
        if event == "updated" and "url" in (reason or "").split(", "):
            self.moved_at[backend.id] = time.perf_counter()
            for key in [k for k in self.circuits if k[0] == backend.id]:
                del self.circuits[key]
            backend.notes.pop("circuit", None)

    def _observe(self, call: Call, attempt: Attempt, now: float) -> None:
        if attempt.outcome in UNCOUNTED or attempt.started < self.moved_at.get(attempt.backend.id, 0.0):
            return  # the client left, the gateway's key was refused, or the try went to an address since left
        circuit = self._circuit(attempt.backend, call.endpoint)
        if attempt.status == 429:
            circuit.busy_until = now + (attempt.retry_after or self.options.cooldown)
        else:
            self._record(call, circuit, attempt.backend, not attempt.failed, attempt.reason, now)

    def _record(self, call: Call, circuit: Circuit, backend: Backend, ok: bool, reason: str | None, now: float) -> None:
        circuit.window.append(ok)
        circuit.consecutive = 0 if ok else circuit.consecutive + 1
        if circuit.state == HALF_OPEN:
            circuit.trial = None
            if ok:
                circuit.window.clear()
                self._move(call, circuit, backend, CLOSED, "trial request succeeded")
            else:
                circuit.opened_at = now
                self._move(call, circuit, backend, OPEN, f"trial request failed: {reason}")
            return
        if ok or circuit.state != CLOSED:
            return
        failures = circuit.window.count(False)
        if circuit.consecutive >= self.options.consecutive_failures:
            why = f"{circuit.consecutive} failures in a row, last: {reason}"
        elif (
            len(circuit.window) >= self.options.min_requests
            and failures / len(circuit.window) >= self.options.error_ratio
        ):
            why = f"{failures} of the last {len(circuit.window)} requests failed, last: {reason}"
        else:
            return
        circuit.opened_at = now
        self._move(call, circuit, backend, OPEN, why)

    def _move(self, call: Call, circuit: Circuit, backend: Backend, state: str, why: str) -> None:
        circuit.state = state
        endpoint = call.endpoint
        backend.notes.setdefault("circuit", {})[endpoint] = {"state": state, "reason": why, "since": time.time()}
        (log.warning if state == OPEN else log.info)(
            f"circuit_{state}", backend=backend.name, endpoint=endpoint, reason=why
        )
        call.gateway.backend_changed(backend, f"circuit_{state}", f"{endpoint}: {why}")
