"""Rendezvous hashing: the same user (or, without one, the same prompt) goes to the same backend.

Each backend gets a score from a hash of (key, backend name); the highest is tried first,
the next highest if it fails. When a backend goes away, only the keys it had move, so
a backend's prompt cache stays warm for everyone else.
"""

import hashlib

from gateway import hookimpl
from gateway.scoring import ScoredStrategy


def score(backend, call):
    key = call.json.get("user") or call.prompt
    digest = hashlib.sha256(f"{key}\0{backend.name}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


@hookimpl
def register_strategies():
    return {"rendezvous": ScoredStrategy(score)}
