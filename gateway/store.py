"""Shared state for plugins that several gateway processes must agree on: rate buckets, counters, a cache.

``Store`` is the interface; ``MemoryStore`` keeps everything in this process (the default,
nothing to install). A Redis implementation lets several gateways enforce one limit, one
budget and share one cache. Plugins get the gateway's store as ``gateway.store``.
"""

from __future__ import annotations

from time import monotonic
from typing import Protocol

PRUNE_EVERY = 4096  # writes between two prunes of a MemoryStore: a power of two, so that a mask tells when
PRUNE_MASK = PRUNE_EVERY - 1
INFINITY = float("inf")


class Store(Protocol):
    """Atomic operations on named values; every key a plugin uses starts with the plugin's name."""

    async def take(self, key: str, amount: float, rate: float, capacity: float, force: bool = False) -> float:
        """Take ``amount`` from a token bucket refilled at ``rate`` per second up to ``capacity``.

        Returns 0.0 if taken, else the seconds until ``amount`` will be there (nothing is taken then).
        A negative ``amount`` gives tokens back (a correction once the real cost is known); with
        ``force`` it is taken even if the bucket goes below zero (a debt the refill pays back).
        """

    async def take_level(
        self, key: str, amount: float, rate: float, capacity: float, force: bool = False
    ) -> tuple[float, float]:
        """``take``, and the tokens left in the bucket after it, in one step (one round trip to Redis)."""

    async def take_pair(
        self, key: str, amount: float, rate: float, capacity: float,
        other: str, other_amount: float, other_rate: float, other_capacity: float,
    ) -> tuple[float, float, float, float]:  # fmt: skip
        """``take_level`` from two buckets at one moment, both or neither (a caller's requests and tokens, say):
        ``(wait, tokens left, the other's wait, its tokens left)``. A wait above 0 means that bucket refused, and
        neither was taken. Amounts are 0 or more (takes, not corrections). One round trip to Redis."""

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
    """The default store: this process's memory. Fast, and lost when the process ends.

    A bucket that has refilled, and a counter or value that has expired, is dropped every
    ``PRUNE_EVERY`` new buckets and writes of counters and values, so callers that come and go
    (anonymous clients) do not add up.
    """

    def __init__(self) -> None:
        self._buckets: dict[str, tuple[float, float, float, float]] = {}  # key -> (tokens, when, rate, capacity)
        self._counters: dict[str, tuple[float, float | None]] = {}
        self._values: dict[str, tuple[bytes, float | None]] = {}
        self._writes = 0

    async def take(self, key: str, amount: float, rate: float, capacity: float, force: bool = False) -> float:
        return self.take_now(key, amount, rate, capacity, force)[0]

    async def take_level(
        self, key: str, amount: float, rate: float, capacity: float, force: bool = False
    ) -> tuple[float, float]:
        return self.take_now(key, amount, rate, capacity, force)

    async def take_pair(
        self, key: str, amount: float, rate: float, capacity: float,
        other: str, other_amount: float, other_rate: float, other_capacity: float,
    ) -> tuple[float, float, float, float]:  # fmt: skip
        return self.take_pair_now(key, amount, rate, capacity, other, other_amount, other_rate, other_capacity)

    def take_now(
        self, key: str, amount: float, rate: float, capacity: float, force: bool = False
    ) -> tuple[float, float]:
        """``take_level`` without a coroutine: for a plugin's synchronous path when the store is this one."""
        now = monotonic()  # _level and _wrote inlined: this runs for every bucket of every request
        found = self._buckets.get(key)
        if found is None:  # conditionals, not min(): a call to a builtin costs more than the comparison
            tokens = capacity
            self._wrote(now)  # a new bucket, what makes the store grow: counted for prune
        else:
            tokens = found[0] + (now - found[1]) * rate
            if tokens > capacity:
                tokens = capacity
        if amount <= tokens or force or amount <= 0:
            tokens -= amount
            if tokens > capacity:  # a negative amount (tokens given back) never fills past the capacity
                tokens = capacity
            wait = 0.0
        else:
            wait = (amount - tokens) / rate if rate > 0 else INFINITY
        self._buckets[key] = (tokens, now, rate, capacity)  # when it is full again: worked out by prune, not here
        return wait, tokens

    def take_pair_now(
        self, key: str, amount: float, rate: float, capacity: float,
        other: str, other_amount: float, other_rate: float, other_capacity: float,
    ) -> tuple[float, float, float, float]:  # fmt: skip
        """``take_pair`` without a coroutine."""
        now = monotonic()  # take_now's level twice over, inlined (a call per bucket is what this saves): every
        # request with both limits comes here
        buckets = self._buckets
        found = buckets.get(key)
        if found is None:
            tokens = capacity
            self._wrote(now)
        else:
            tokens = found[0] + (now - found[1]) * rate
            if tokens > capacity:
                tokens = capacity
        found = buckets.get(other)
        if found is None:
            other_tokens = other_capacity
            self._wrote(now)
        else:
            other_tokens = found[0] + (now - found[1]) * other_rate
            if other_tokens > other_capacity:
                other_tokens = other_capacity
        if (amount <= tokens or amount <= 0) and (other_amount <= other_tokens or other_amount <= 0):
            tokens -= amount
            other_tokens -= other_amount
            wait = other_wait = 0.0
        else:
            wait = 0.0 if amount <= tokens or amount <= 0 else (amount - tokens) / rate if rate > 0 else INFINITY
            other_wait = (
                0.0
                if other_amount <= other_tokens or other_amount <= 0
                else (other_amount - other_tokens) / other_rate
                if other_rate > 0
                else INFINITY
            )
        buckets = self._buckets  # again: a new bucket's _wrote may have pruned, which makes a new dict
        buckets[key] = (tokens, now, rate, capacity)
        buckets[other] = (other_tokens, now, other_rate, other_capacity)
        return wait, tokens, other_wait, other_tokens

    def give_now(self, key: str, amount: float) -> None:
        """Put ``amount`` (>= 0) tokens back in a bucket: ``take_now(key, -amount, ...)`` without reading the clock.

        The same level at every later moment: a bucket's level is its last take's, plus the refill, capped at its
        capacity, and adding to that before the refill, capped, is adding after it, capped. A bucket the store no
        longer holds is full: nothing goes back.
        """
        found = self._buckets.get(key)
        if found is not None:
            tokens, when, rate, capacity = found
            tokens += amount
            self._buckets[key] = (tokens if tokens < capacity else capacity, when, rate, capacity)

    async def peek(self, key: str, rate: float, capacity: float) -> float:
        return self._level(key, rate, capacity)[0]

    def _level(self, key: str, rate: float, capacity: float) -> tuple[float, float]:
        now = monotonic()
        tokens, last, _, _ = self._buckets.get(key, (capacity, now, rate, capacity))
        return min(capacity, tokens + (now - last) * rate), now

    def _wrote(self, now: float) -> None:
        writes = self._writes = self._writes + 1
        if not writes & PRUNE_MASK:
            self.prune(now)

    def prune(self, now: float | None = None) -> None:
        """Forget buckets that are full again and counters and values that have expired."""
        now = monotonic() if now is None else now
        self._buckets = {k: b for k, b in self._buckets.items() if b[0] + (now - b[1]) * b[2] < b[3]}  # not yet full
        self._counters = {k: c for k, c in self._counters.items() if c[1] is None or c[1] > now}
        self._values = {k: v for k, v in self._values.items() if v[1] is None or v[1] > now}

    async def add(self, key: str, amount: float, ttl: float | None = None) -> float:
        now = monotonic()
        value, expires = self._counters.get(key, (0.0, None))
        if expires is not None and expires <= now:
            value = 0.0
        value += amount
        self._counters[key] = (value, now + ttl if ttl is not None else expires)
        self._wrote(now)
        return value

    async def get(self, key: str) -> bytes | None:
        found = self._values.get(key)
        if found is None:
            return None
        value, expires = found
        if expires is not None and expires <= monotonic():
            del self._values[key]
            return None
        return value

    async def set(self, key: str, value: bytes, ttl: float | None = None) -> None:
        now = monotonic()
        self._values[key] = (value, now + ttl if ttl is not None else None)
        self._wrote(now)

    async def delete(self, key: str) -> None:
        self._buckets.pop(key, None)
        self._counters.pop(key, None)
        self._values.pop(key, None)

    async def close(self) -> None:
        return None
