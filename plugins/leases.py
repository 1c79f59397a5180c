"""leases: backends kept by a ``multiverse agent`` take traffic only while their agent's heartbeats arrive.

An agent registers its backend and renews a lease with ``POST /admin/agent/heartbeat`` every
``interval`` seconds; no heartbeat for ``lease_intervals`` intervals and the backend gets no new
requests (a filter, in memory: before any health probe notices), until the next heartbeat. A
heartbeat that changes nothing writes nothing to the database. The agent's identity is a token
only it holds (its state file's, sent beside a ``host`` key; or a backend token ``mvb-...`` an
admin handed out, used as the key); only its SHA-256 is stored. Draining stops new requests.
The HTTP handlers are in ``plugins/_lease_api.py``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from aiohttp import web

from gateway import hookimpl
from gateway.transport import dialed_in
from gateway.validate import positive
from plugins import _lease_api, _lease_link

if TYPE_CHECKING:
    from gateway.call import Call
    from gateway.registry import Backend
    from gateway.state import Gateway

PLUGIN = "leases"
MIGRATIONS = [
    """CREATE TABLE agent_leases (
        token_hash      TEXT PRIMARY KEY,
        name            TEXT NOT NULL,
        owner_key       TEXT NOT NULL,
        registration_id TEXT,
        interval        REAL NOT NULL DEFAULT 10,
        created_at      REAL NOT NULL
    )""",
]


@dataclass(frozen=True)
class Options:
    lease_intervals: float = field(
        default=3.0,
        metadata={"doc": "heartbeats an agent may miss before its backend gets no traffic", "check": positive},
    )
    min_interval: float = field(
        default=0.2, metadata={"doc": "shortest heartbeat interval accepted", "check": positive}
    )
    max_interval: float = field(
        default=300.0, metadata={"doc": "longest heartbeat interval accepted", "check": positive}
    )


@dataclass
class Lease:
    """One agent: who it is, which registration it keeps, and (in memory only) its lease."""

    token_hash: str
    name: str
    owner_key: str
    registration_id: str | None
    interval: float
    lease_intervals: float = 3.0
    expires_at: float = 0.0  # time.monotonic()
    draining: str = ""  # who asked: "agent" (it is stopping) or "admin" (held until the agent leaves)

    @property
    def seconds(self) -> float:
        return self.interval * self.lease_intervals

    def renew(self) -> None:
        self.expires_at = time.monotonic() + self.seconds


class Plugin:
    def __init__(self, options: Options | None = None) -> None:
        self.options = options or Options()
        self.by_hash: dict[str, Lease] = {}

    def by_registration(self, registration_id: str) -> Lease | None:
        return next((x for x in self.by_hash.values() if x.registration_id == registration_id), None)

    @hookimpl
    async def startup(self, gateway: Gateway) -> None:
        await gateway.registry.migrate(PLUGIN, MIGRATIONS)
        now = time.monotonic()
        async with gateway.registry.db.execute("SELECT * FROM agent_leases") as cursor:
            async for row in cursor:
                lease = Lease(row["token_hash"], row["name"], row["owner_key"], row["registration_id"], row["interval"])
                lease.lease_intervals = self.options.lease_intervals
                lease.expires_at = now + lease.seconds  # a restarted gateway gives every agent one lease to call
                self.by_hash[lease.token_hash] = lease

    async def save(self, gateway: Gateway, lease: Lease) -> None:
        """Write an agent's identity and registration (only when one of them changed)."""
        await gateway.registry.db.execute(
            "INSERT INTO agent_leases (token_hash, name, owner_key, registration_id, interval, created_at) "
            "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT(token_hash) DO UPDATE SET name = excluded.name, "
            "registration_id = excluded.registration_id, interval = excluded.interval",
            (lease.token_hash, lease.name, lease.owner_key, lease.registration_id, lease.interval, time.time()),
        )
        await gateway.registry.db.commit()
        self.by_hash[lease.token_hash] = lease

    def serves(self, backend: Backend, now: float) -> str | None:
        """Why ``backend`` may not take a new request now, or None if it may."""
        lease = self.by_registration(backend.id)
        if lease is None:
            return None
        if lease.draining:
            return "draining: " + ("its agent is stopping" if lease.draining == "agent" else "an admin drained it")
        if dialed_in(backend.url) and backend.transport is None:
            return "its agent is not connected (the connection is its lease)"
        if lease.expires_at <= now:
            return f"lease expired: no heartbeat from its agent for {lease.seconds:g} s"
        return None

    @hookimpl
    def filter_candidates(self, call: Call, candidates: list[Backend]) -> list[Backend] | None:
        now = time.monotonic()
        refused = {b.name: why for b in candidates if (why := self.serves(b, now)) is not None}
        if not refused:
            return None
        if "excluded" in call.explain:  # explain shows why
            call.explain["excluded"].update(refused)
        return [b for b in candidates if b.name not in refused]

    @hookimpl
    def backend_status_changed(self, backend: Backend, event: str) -> None:
        if event == "removed":
            lease = self.by_registration(backend.id)
            if lease is not None:
                lease.registration_id = None  # its agent registers anew on its next heartbeat

    @hookimpl
    def register_routes(self, gateway: Gateway) -> list[web.RouteDef]:
        return [*_lease_api.routes(self), _lease_link.route(self)]


def agent_note(lease: Lease, load: dict[str, Any]) -> dict[str, Any]:
    """What ``backend.notes["agent"]`` shows (``least_loaded`` reads ``load``)."""
    running, waiting = float(load.get("running") or 0), float(load.get("waiting") or 0)
    return {
        "name": lease.name,
        "load": running + waiting,
        "running": running,
        "waiting": waiting,
        "load_source": load.get("source"),
        "interval": lease.interval,
        "lease_seconds": lease.seconds,
        "last_heartbeat": time.time(),
        "draining": bool(lease.draining),
    }
