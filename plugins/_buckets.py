"""Token buckets as the ratelimit plugin uses them: one caller's bucket of one kind, and OpenAI's x-ratelimit-*
headers from a take."""

from __future__ import annotations

import math
from dataclasses import dataclass

from gateway.errors import GatewayError


@dataclass(frozen=True, slots=True)
class Bucket:
    """A caller's requests or tokens bucket, worked out once per key: its name in the store, its limit a
    minute, its refill a second, and its headers' names and limit text, so that a take formats only numbers."""

    kind: str  # "requests" or "tokens"
    name: str  # in gateway.store
    limit: int  # a minute
    rate: float  # refilled a second
    who: str  # the caller, as a refusal names it
    limit_text: str
    headers: tuple[str, str, str]  # x-ratelimit-limit-, -remaining-, -reset-<kind>

    @classmethod
    def of(cls, kind: str, key: str, limit: int, who: str) -> Bucket:
        headers = (f"x-ratelimit-limit-{kind}", f"x-ratelimit-remaining-{kind}", f"x-ratelimit-reset-{kind}")
        return cls(kind, bucket(kind, key), limit, limit / 60, who, str(limit), headers)


Pair = tuple[float, float, float, float]  # a take_pair's answer: each bucket's wait and tokens left


def bucket(kind: str, key: str) -> str:
    return f"ratelimit:{kind}:{key}"


def show(bucket: Bucket, left: float, headers: dict[str, str], reset: float = 0.0) -> None:
    """Set a bucket's x-ratelimit-* headers: ``left`` tokens, full again in ``reset`` seconds (0: worked out)."""
    limit_name, remaining_name, reset_name = bucket.headers
    headers[limit_name] = bucket.limit_text
    headers[remaining_name] = str(int(left)) if left >= 1 else "0"  # int() of a positive number: its floor
    reset = reset or (bucket.limit - left) * 60 / bucket.limit  # never negative: a level is never above its limit
    headers[reset_name] = f"{round(reset * 1000)}ms" if reset < 1 else duration(reset)  # duration's usual case


def settle_pair(requests: Bucket, tokens: Bucket, estimate: float, answer: Pair, headers: dict[str, str]) -> None:
    """``settle`` both of a caller's buckets from one ``take_pair`` (requests, then tokens): a 429 if either refused
    (the requests bucket's first), with the headers of both."""
    wait, left, tokens_wait, tokens_left = answer
    if wait or tokens_wait:
        show(tokens, tokens_left, headers, tokens_wait)  # in the 429 too, whichever bucket refused
        settle(requests, 1.0, wait, left, headers)
        settle(tokens, estimate, tokens_wait, tokens_left, headers)
    # Both took (every request but a refusal): show() for each, inline (a call each is what this saves).
    limit_name, remaining_name, reset_name = requests.headers
    headers[limit_name] = requests.limit_text
    headers[remaining_name] = str(int(left)) if left >= 1 else "0"
    reset = (requests.limit - left) * 60 / requests.limit
    headers[reset_name] = f"{round(reset * 1000)}ms" if reset < 1 else duration(reset)
    limit_name, remaining_name, reset_name = tokens.headers
    headers[limit_name] = tokens.limit_text
    headers[remaining_name] = str(int(tokens_left)) if tokens_left >= 1 else "0"
    reset = (tokens.limit - tokens_left) * 60 / tokens.limit
    headers[reset_name] = f"{round(reset * 1000)}ms" if reset < 1 else duration(reset)


def settle(bucket: Bucket, amount: float, wait: float, left: float, headers: dict[str, str]) -> None:
    """Set a bucket's x-ratelimit-* headers from a take's answer (``wait``, tokens ``left``); a 429 if it refused
    (its reset is then when this request's amount is there)."""
    show(bucket, left, headers, wait)
    if wait:
        seconds = max(1, math.ceil(wait))
        what = f"{bucket.limit} {bucket.kind} a minute for {bucket.who}"
        if bucket.kind == "tokens":
            what += f" (this request: about {amount:.0f})"
        refusal = GatewayError(
            429,
            f"rate limit: {what}; retry in {seconds} s",
            code="rate_limit_exceeded",
            headers={**headers, "Retry-After": str(seconds)},
        )
        raise refusal


def duration(seconds: float) -> str:
    """A reset time as OpenAI writes it: ``20ms``, ``1.5s``, ``6m0s``."""
    if seconds < 1:
        return f"{max(0, round(seconds * 1000))}ms"
    if seconds < 60:
        return f"{seconds:.3g}s"
    minutes, rest = divmod(int(seconds), 60)
    return f"{minutes}m{rest}s"
