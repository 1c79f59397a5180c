"""round_robin: the default strategy. Each model's candidates take turns."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from gateway import hookimpl

if TYPE_CHECKING:
    from gateway.call import Call
    from gateway.registry import Backend


class RoundRobin:
    """Rotate the candidate list by one position per request, separately per model."""

    def __init__(self) -> None:
        self._turn: dict[str, int] = {}

    def __call__(self, candidates: Sequence[Backend], call: Call) -> Sequence[Backend]:
        count = len(candidates)
        if count < 2:
            return candidates
        turn = self._turn.get(call.model, 0)
        if not call.dry_run:  # explain looks, it does not take a turn
            self._turn[call.model] = (turn + 1) % count
        start = turn % count
        return [*candidates[start:], *candidates[:start]]


class Plugin:
    def __init__(self) -> None:
        self.strategy = RoundRobin()

    @hookimpl(trylast=True)
    def register_strategies(self) -> dict[str, RoundRobin]:
        return {"round_robin": self.strategy}
