"""Who is calling: what an ``authenticate`` plugin answers, in a shape every other plugin can read.

Plugins that limit, meter or cache per caller read ``call.identity`` without knowing which
plugin authenticated it. An anonymous call has ``call.identity is None``.
"""

from __future__ import annotations

from dataclasses import dataclass

ROLES = ("admin", "host", "user", "readonly")
"""admin: everything; host: its own backends and inference; user: inference; readonly: models, status, stats."""


@dataclass(frozen=True, slots=True)
class Identity:
    """A caller: a key's id and name, its role, and what it may use (None: no limit of that kind)."""

    key_id: str
    name: str
    role: str = "user"
    models: tuple[str, ...] | None = None  # models it may use; None: all
    rpm: int | None = None  # requests per minute
    tpm: int | None = None  # tokens per minute
    max_concurrency: int | None = None  # requests in flight at once
    budget: float | None = None  # spend allowed, in the models' price unit
    priority: str = "normal"  # "high" is served first when capacity is short

    def may_use(self, model: str) -> bool:
        return self.models is None or model in self.models

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"
