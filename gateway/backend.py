"""A backend: one server that serves one or more models, as routing and plugins see it."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from gateway.transport import Transport

UNKNOWN, HEALTHY, UNHEALTHY, MISMATCHED = "unknown", "healthy", "unhealthy", "mismatched"
PENDING = "pending"
"""Waiting for an admin's approval (admin.approve_registrations): no traffic, no probes."""
STATUSES = (HEALTHY, UNHEALTHY, UNKNOWN, MISMATCHED, PENDING)
ROUTABLE = frozenset({UNKNOWN, HEALTHY})
"""Statuses a request may be routed to; an unprobed backend is given the benefit of the doubt."""

TIMEOUTS = ("connect_timeout", "ttft_timeout", "stall_timeout")


@dataclass(eq=False, slots=True)
class Backend:
    """A server that serves one or more models. Counters are runtime-only."""

    id: str
    name: str
    url: str
    models: tuple[str, ...]
    source: str
    owner_name: str | None = None
    owner_email: str | None = None
    description: str | None = None
    api_key: str | None = None
    connect_timeout: float | None = None
    ttft_timeout: float | None = None
    stall_timeout: float | None = None
    weight: float = 1.0
    max_concurrency: int | None = None  # requests it works on at once (a llama.cpp server: 1); None: no limit
    profile: dict[str, Any] | None = None  # capabilities, tier, costs of its models (see ModelProfile)
    endpoints: list[str] | None = None  # the /v1/ endpoints it serves; None: every OpenAI one (gateway.endpoints)
    aliases: dict[str, str] | None = None  # the class's model name -> this backend's own name for it
    api_path: str = "/v1"  # between url and the endpoint; "" when url already ends in its version (config only)
    owner_key: str | None = None  # id of the key that registered it ("admin": the config's admin key)
    status: str = UNKNOWN
    last_error: str | None = None
    status_since: float = field(default_factory=time.time)
    created_at: float = field(default_factory=time.time)
    in_flight: int = 0
    served: int = 0
    failed: int = 0
    active_at: float = 0.0
    """``time.monotonic()`` when a request of ours last got bytes from it: a busy backend is not a dead one."""
    notes: dict[str, Any] = field(default_factory=dict)
    """Plugins' per-backend state worth showing (e.g. a circuit breaker's), keyed by plugin."""
    transport: Transport | None = None
    """How the relay reaches it: None for the HTTP pool, else e.g. its agent's connection (runtime only)."""

    def auth_headers(self) -> dict[str, str]:
        """What proves the gateway to this backend: its own key as a bearer token, if it has one."""
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def endpoint_url(self, endpoint: str) -> str:
        """Where ``endpoint`` (``chat/completions``, ``models``) is served: ``{url}{api_path}/{endpoint}``."""
        return f"{self.url}{self.api_path}/{endpoint}"

    @property
    def routable(self) -> bool:
        return self.status in ROUTABLE

    @property
    def read_only(self) -> bool:
        return self.source == "config"

    def summary(self) -> dict[str, Any]:
        """What a caller who is neither an admin nor its owner may see: never its address or contacts."""
        shown = self.public()
        for private in _PRIVATE:
            shown.pop(private, None)
        return shown

    def public(self) -> dict[str, Any]:
        """What the admin API shows an admin, and a host its own backends."""
        return {
            "registration_id": self.id,
            "name": self.name,
            "endpoint_url": self.url,
            "models": list(self.models),
            "source": self.source,
            "read_only": self.read_only,
            "owner_name": self.owner_name,
            "owner_email": self.owner_email,
            "owner_key": self.owner_key,
            "description": self.description,
            "has_api_key": self.api_key is not None,
            **{name: getattr(self, name) for name in TIMEOUTS},
            "weight": self.weight,
            "max_concurrency": self.max_concurrency,
            "profile": self.profile,
            "endpoints": self.endpoints,
            "aliases": self.aliases,
            "status": self.status,
            "last_error": self.last_error,
            "status_since": self.status_since,
            "in_flight": self.in_flight,
            "requests_served": self.served,
            "requests_failed": self.failed,
            "notes": self.notes,
        }


_PRIVATE = ("endpoint_url", "owner_email", "owner_key", "has_api_key", "profile")
