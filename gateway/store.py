"""Shared state for plugins that several gateway processes must agree on: rate buckets, counters, a cache.

``Store`` is the interface; ``MemoryStore`` keeps everything in this process (the default,
nothing to install). A Redis implementation lets several gateways enforce one limit, one
budget and share one cache. Plugins get the gateway's store as ``gateway.store``.
"""

from __future__ import annotations

import time
from typing import Protocol


class Store(Protocol):
    """Atomic operations on named values; every key a plugin uses starts with the plugin's name."""

    async def take(self, key: str, amount: float, rate: float, capacity: float, force: bool = False) -> float:
        """Take ``amount`` from a token bucket refilled at ``rate`` per second up to ``capacity``.

        Returns 0.0 if taken, else the seconds until ``amount`` will be there (nothing is taken then).
        A negative ``amount`` gives tokens back (a correction once the real cost is known); with
        ``force`` it is taken even if the bucket goes below zero (a debt the refill pays back).
        """

    async def peek(self, key: str, rate: float, capacity: float) -> float:
        """The tokens in a bucket now."""

    async def add(self, key: str, amount: float, ttl: float | None = None) -> float:
        """Add ``amount`` to a counter (created at 0) and return its new value; ``ttl`` restarts its expiry."""

    async def get(self, key: str) -> bytes | None:
        """A value set with ``set``, or None if absent or expired."""

    async def set(self, key: str, value: bytes, ttl: float | None = None) -> None:
        """Keep ``value`` under ``key`` for ``ttl`` seconds (None: until removed)."""

    async def delete(self, key: str) -> None:
        """Forget ``key`` (a value or a counter)."""

    async def close(self) -> None:
        """Release connections."""


class MemoryStore:
    """The default store: this process's memory. Fast, and lost when the process ends."""

    def __init__(self) -> None:
        self._buckets: dict[str, tuple[float, float]] = {}
        self._counters: dict[str, tuple[float, float | None]] = {}
        self._values: dict[str, tuple[bytes, float | None]] = {}

    async def take(self, key: str, amount: float, rate: float, capacity: float, force: bool = False) -> float:
        return self.take_now(key, amount, rate, capacity, force)

    def take_now(self, key: str, amount: float, rate: float, capacity: float, force: bool = False) -> float:
        """``take`` without a coroutine: for a plugin's synchronous path when the store is this one."""
        tokens, now = self._level(key, rate, capacity)
        if amount <= tokens or amount <= 0 or force:
            self._buckets[key] = (min(capacity, tokens - amount), now)
            return 0.0
        self._buckets[key] = (tokens, now)
        return (amount - tokens) / rate if rate > 0 else float("inf")

    async def peek(self, key: str, rate: float, capacity: float) -> float:
        return self._level(key, rate, capacity)[0]

    def _level(self, key: str, rate: float, capacity: float) -> tuple[float, float]:
        now = time.monotonic()
        tokens, last = self._buckets.get(key, (capacity, now))
        return min(capacity, tokens + (now - last) * rate), now

    async def add(self, key: str, amount: float, ttl: float | None = None) -> float:
        now = time.monotonic()
        value, expires = self._counters.get(key, (0.0, None))
        if expires is not None and expires <= now:
            value = 0.0
        value += amount
        self._counters[key] = (value, now + ttl if ttl is not None else expires)
        return value

    async def get(self, key: str) -> bytes | None:
        found = self._values.get(key)
        if found is None:
            return None
        value, expires = found
        if expires is not None and expires <= time.monotonic():
            del self._values[key]
            return None
        return value

    async def set(self, key: str, value: bytes, ttl: float | None = None) -> None:
        self._values[key] = (value, time.monotonic() + ttl if ttl is not None else None)

    async def delete(self, key: str) -> None:
        self._buckets.pop(key, None)
        self._counters.pop(key, None)
        self._values.pop(key, None)

    async def close(self) -> None:
        return None
