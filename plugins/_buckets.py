"""Token buckets as the ratelimit plugin uses them: names, and OpenAI's x-ratelimit-* headers from a take."""

from __future__ import annotations

import functools
import math

from gateway.errors import GatewayError

_HEADERS = {
    kind: (f"x-ratelimit-limit-{kind}", f"x-ratelimit-remaining-{kind}", f"x-ratelimit-reset-{kind}")
    for kind in ("requests", "tokens")
}


def bucket(kind: str, key: str) -> str:
    return f"ratelimit:{kind}:{key}"


def settle(kind: str, limit: int, amount: float, wait: float, left: float, headers: dict[str, str], who: str) -> None:
    """Set a bucket's x-ratelimit-* headers from a take's answer (``wait``, tokens ``left``); a 429 if it refused."""
    names = _HEADERS[kind]
    headers[names[0]] = _text(limit)
    headers[names[1]] = str(int(left)) if left >= 1 else "0"  # int() of a positive number: its floor
    reset = (limit - left) * 60 / limit if wait == 0 else wait
    headers[names[2]] = f"{round(reset * 1000)}ms" if 0 <= reset < 1 else duration(reset)  # duration's usual case
    if wait:
        seconds = max(1, math.ceil(wait))
        what = f"{limit} {kind} a minute for {who}"
        if kind == "tokens":
            what += f" (this request: about {amount:.0f})"
        refusal = GatewayError(
            429,
            f"rate limit: {what}; retry in {seconds} s",
            code="rate_limit_exceeded",
            headers={**headers, "Retry-After": str(seconds)},
        )
        raise refusal


@functools.lru_cache(maxsize=256)
def _text(limit: int) -> str:
    """A limit as its header shows it: the same few limits every request, formatted once."""
    return str(limit)


def duration(seconds: float) -> str:
    """A reset time as OpenAI writes it: ``20ms``, ``1.5s``, ``6m0s``."""
    if seconds < 1:
        return f"{max(0, round(seconds * 1000))}ms"
    if seconds < 60:
        return f"{seconds:.3g}s"
    minutes, rest = divmod(int(seconds), 60)
    return f"{minutes}m{rest}s"
