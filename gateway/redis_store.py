"""The ``Store`` in Redis, so that several gateway processes enforce one limit, one budget and share one cache.

Selected by ``state: {redis: redis://host:port/0}``. Each bucket operation is one Lua script,
run atomically by Redis with Redis's own clock: two gateways can never both take the last
token, and their clocks need not agree. A bucket is a hash (``tokens``, ``at``) that expires
once it would be full again; counters and values are plain strings.
"""

from __future__ import annotations

from typing import Any

import redis.asyncio as redis

_LEVEL = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local rate, capacity = tonumber(ARGV[2]), tonumber(ARGV[3])
local state = redis.call('HMGET', KEYS[1], 'tokens', 'at')
local tokens = tonumber(state[1]) or capacity
local at = tonumber(state[2]) or now
tokens = math.min(capacity, tokens + math.max(0, now - at) * rate)
"""

TAKE = (
    _LEVEL
    + """
local amount, force = tonumber(ARGV[1]), ARGV[4] == '1'
local wait = 0
if amount <= tokens or amount <= 0 or force then
  tokens = math.min(capacity, tokens - amount)
elseif rate > 0 then
  wait = (amount - tokens) / rate
else
  wait = -1
end
redis.call('HSET', KEYS[1], 'tokens', string.format('%.17g', tokens), 'at', string.format('%.17g', now))
if rate > 0 then
  redis.call('PEXPIRE', KEYS[1], math.ceil((capacity - tokens) / rate * 1000) + 1000)
end
return {string.format('%.17g', wait), string.format('%.17g', tokens)}
"""
)
"""Take ARGV[1] from bucket KEYS[1] (rate ARGV[2]/s, capacity ARGV[3], force ARGV[4]).

Returns {the wait (-1: never), the tokens left}."""

PEEK = _LEVEL + "return string.format('%.17g', tokens)"

ADD = """
local value = redis.call('INCRBYFLOAT', KEYS[1], ARGV[1])
if ARGV[2] ~= '' then redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return value
"""


class RedisStore:
    """A ``Store`` in Redis: atomic across every gateway that uses the same Redis database."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.client: redis.Redis = redis.from_url(url, decode_responses=False)
        self._take = self.client.register_script(TAKE)
        self._peek = self.client.register_script(PEEK)
        self._add = self.client.register_script(ADD)

    async def ping(self) -> None:
        """Fail now, with the reason, if Redis cannot be reached."""
        await self.client.ping()

    async def take(self, key: str, amount: float, rate: float, capacity: float, force: bool = False) -> float:
        return (await self.take_level(key, amount, rate, capacity, force))[0]

    async def take_level(
        self, key: str, amount: float, rate: float, capacity: float, force: bool = False
    ) -> tuple[float, float]:
        reply = await self._take(keys=[key], args=[repr(amount), repr(rate), repr(capacity), int(force)])
        wait, tokens = _number(reply[0]), _number(reply[1])
        return (float("inf") if wait < 0 else wait), tokens

    async def peek(self, key: str, rate: float, capacity: float) -> float:
        return _number(await self._peek(keys=[key], args=[0, repr(rate), repr(capacity)]))

    async def add(self, key: str, amount: float, ttl: float | None = None) -> float:
        expiry = "" if ttl is None else str(max(1, round(ttl * 1000)))
        return _number(await self._add(keys=[key], args=[repr(amount), expiry]))

    async def get(self, key: str) -> bytes | None:
        value = await self.client.get(key)
        return value.encode() if isinstance(value, str) else value

    async def set(self, key: str, value: bytes, ttl: float | None = None) -> None:
        await self.client.set(key, value, px=None if ttl is None else max(1, round(ttl * 1000)))

    async def delete(self, key: str) -> None:
        await self.client.delete(key)

    async def close(self) -> None:
        await self.client.aclose()


def _number(reply: Any) -> float:
    return float(reply.decode() if isinstance(reply, bytes) else reply)
