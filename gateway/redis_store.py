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

TAKE_PAIR = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local function level(key, rate, capacity)
  local state = redis.call('HMGET', key, 'tokens', 'at')
  local tokens = tonumber(state[1]) or capacity
  local at = tonumber(state[2]) or now
  return math.min(capacity, tokens + math.max(0, now - at) * rate)
end
local function wait_for(amount, tokens, rate)
  if amount <= tokens or amount <= 0 then return 0 elseif rate > 0 then return (amount - tokens) / rate end
  return -1
end
local function keep(key, tokens, rate, capacity)
  redis.call('HSET', key, 'tokens', string.format('%.17g', tokens), 'at', string.format('%.17g', now))
  if rate > 0 then redis.call('PEXPIRE', key, math.ceil((capacity - tokens) / rate * 1000) + 1000) end
end
local amount, rate, capacity = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local other_amount, other_rate, other_capacity = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
local tokens, other_tokens = level(KEYS[1], rate, capacity), level(KEYS[2], other_rate, other_capacity)
local wait, other_wait = wait_for(amount, tokens, rate), wait_for(other_amount, other_tokens, other_rate)
if wait == 0 and other_wait == 0 then
  tokens, other_tokens = tokens - amount, other_tokens - other_amount
end
keep(KEYS[1], tokens, rate, capacity)
keep(KEYS[2], other_tokens, other_rate, other_capacity)
return {string.format('%.17g', wait), string.format('%.17g', tokens),
        string.format('%.17g', other_wait), string.format('%.17g', other_tokens)}
"""
"""Take ARGV[1] from KEYS[1] (rate ARGV[2]/s, capacity ARGV[3]) and ARGV[4] from KEYS[2] (ARGV[5], ARGV[6]), both
or neither. Returns {wait, tokens left, the other's wait, its tokens left} (a wait of -1: never)."""

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
        self._take_pair = self.client.register_script(TAKE_PAIR)
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
        return _wait(_number(reply[0])), _number(reply[1])

    async def take_pair(
        self, key: str, amount: float, rate: float, capacity: float,
        other: str, other_amount: float, other_rate: float, other_capacity: float,
    ) -> tuple[float, float, float, float]:  # fmt: skip
        args = [repr(amount), repr(rate), repr(capacity), repr(other_amount), repr(other_rate), repr(other_capacity)]
        wait, tokens, other_wait, other_tokens = map(_number, await self._take_pair(keys=[key, other], args=args))
        return _wait(wait), tokens, _wait(other_wait), other_tokens

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


def _wait(seconds: float) -> float:
    """A script's wait: -1 means never (a bucket that does not refill)."""
    return float("inf") if seconds < 0 else seconds
