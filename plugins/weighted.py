"""weighted: traffic shared in proportion to each backend's ``weight`` (smooth weighted round-robin).

Weights come from ``backends:`` entries or registrations (default 1). The sequence is
spread evenly, as nginx does: weights 3 and 1 give A A B A, not A A A B.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from gateway import hookimpl

if TYPE_CHECKING:
    from gateway.call import Call
    from gateway.registry import Backend


class Weighted:
    def __init__(self) -> None:
        self._current: dict[str, float] = {}

    def __call__(self, candidates: Sequence[Backend], call: Call) -> Sequence[Backend]:
        if len(candidates) < 2:
            return candidates
        current = dict(self._current) if call.dry_run else self._current  # explain changes nothing
        total = 0.0
        for backend in candidates:
            current[backend.id] = current.get(backend.id, 0.0) + backend.weight
            total += backend.weight
        ordered = sorted(candidates, key=lambda b: -current[b.id])
        current[ordered[0].id] -= total
        return ordered

    def scores(self, candidates: Sequence[Backend], call: Call) -> list[tuple[Backend, float]]:
        return [(b, b.weight) for b in candidates]


class Plugin:
    def __init__(self) -> None:
        self.strategy = Weighted()

    @hookimpl
    def register_strategies(self) -> dict[str, Weighted]:
        return {"weighted": self.strategy}
