"""Scored strategies: write how good one backend is for a call; ordering comes for free.

    class Plugin:
        @hookimpl
        def register_strategies(self):
            return {"fewest_failures": ScoredStrategy(lambda backend, call: -backend.failed)}

Higher scores are tried first; ties keep the registry's order. ``/v1/route/explain``
shows each candidate's score.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from gateway.call import Call
    from gateway.registry import Backend

Scorer = Callable[["Backend", "Call"], float]


class ScoredStrategy:
    """A strategy that orders candidates by ``score(backend, call)``, highest first."""

    def __init__(self, scorer: Scorer | None = None) -> None:
        if scorer is not None:
            self.score = scorer  # type: ignore[method-assign,assignment]

    def score(self, backend: Backend, call: Call) -> float:
        raise NotImplementedError("give a scorer, or override score()")

    def scores(self, candidates: Sequence[Backend], call: Call) -> list[tuple[Backend, float]]:
        return [(backend, self.score(backend, call)) for backend in candidates]

    def __call__(self, candidates: Sequence[Backend], call: Call) -> Sequence[Backend]:
        if len(candidates) < 2:
            return candidates
        scored = self.scores(candidates, call)
        return [backend for backend, _ in sorted(scored, key=lambda pair: -pair[1])]
