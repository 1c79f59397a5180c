"""Fair sharing of scarce backend slots: per-key queues served in turn, so one busy key cannot starve the rest.

Used by the ``ratelimit`` plugin; pure (no I/O, no clock), so it is tested on its own.
Keys take turns (round robin over keys: deficit round robin with a quantum of one request);
within a key, its requests keep their order. Keys of ``priority: high`` are served
before all others. A key whose queue is empty keeps its place until its turn passes it
by, so a client that sends one request at a time is not sent to the back of the line
each time its previous answer comes back.
"""

from __future__ import annotations

import asyncio
from collections import Counter, OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass(eq=False, slots=True)
class Waiter:
    """One queued request: whose it is, which model it waits for, and the future its admission resolves."""

    key: str
    model: str
    high: bool = False
    slot: Any = None  # what ``admit`` reserved for it
    future: asyncio.Future[None] = field(default_factory=lambda: asyncio.get_running_loop().create_future())


class FairQueue:
    """Waiting requests, per key, in the order their keys take turns."""

    def __init__(self) -> None:
        self._levels: tuple[OrderedDict[str, deque[Waiter]], ...] = (OrderedDict(), OrderedDict())  # high, normal
        self.count = 0  # waiters in all queues: read on every request (an attribute, no call), kept not summed

    def __len__(self) -> int:
        return self.count

    def add(self, waiter: Waiter) -> None:
        level = self._levels[0 if waiter.high else 1]
        level.setdefault(waiter.key, deque()).append(waiter)
        self.count += 1

    def remove(self, waiter: Waiter) -> None:
        """Forget a waiter that gave up (timed out, or its client hung up); a no-op once admitted."""
        queue = self._levels[0 if waiter.high else 1].get(waiter.key)
        if queue is not None and waiter in queue:
            queue.remove(waiter)
            self.count -= 1
            if not self.count:  # nobody waits: places in the rotation no longer matter (as after a dispatch)
                for level in self._levels:
                    level.clear()

    def waiting(self, key: str) -> int:
        return sum(len(level.get(key, ())) for level in self._levels)

    def by_model(self) -> Counter[str]:
        """How many requests wait for each model (a dashboard shows it as a backend's queue)."""
        return Counter(waiter.model for level in self._levels for queue in level.values() for waiter in queue)

    def dispatch(self, admit: Callable[[Waiter], bool]) -> int:
        """Admit waiters in turn while ``admit(waiter)`` takes a slot for them; return how many were admitted.

        ``admit`` must change nothing when it answers False.
        """
        admitted = 0
        for level in self._levels:
            while self.count and self._admit_one(level, admit):
                admitted += 1
            if not self.count or not any(level.values()):
                level.clear()  # nobody waits: places in the rotation no longer matter
        return admitted

    def _admit_one(self, level: OrderedDict[str, deque[Waiter]], admit: Callable[[Waiter], bool]) -> bool:
        passed_empty: list[str] = []
        for key, queue in level.items():
            if not queue:
                passed_empty.append(key)
                continue
            for waiter in list(queue):
                if waiter.future.done():  # its request gave up (timed out, hung up): it leaves now
                    queue.remove(waiter)
                    self.count -= 1
                    continue
                if admit(waiter):
                    queue.remove(waiter)
                    self.count -= 1
                    for empty in passed_empty:  # their turn came with nothing to send: they leave the rotation
                        del level[empty]
                    level.move_to_end(key)
                    waiter.future.set_result(None)
                    return True
        return False
