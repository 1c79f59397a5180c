"""The cache's entries: how an answer is kept in memory (an LRU bounded in bytes) or as bytes in a store."""

from __future__ import annotations

import json
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

_OVERHEAD = 256  # bytes an entry costs beyond its chunks (key, tuple, object), roughly


@dataclass(frozen=True, slots=True)
class Entry:
    """An answer: a stream's chunks as the client got them, or a JSON body as one chunk."""

    stream: bool
    chunks: tuple[bytes, ...]
    usage: dict[str, Any] | None
    size: int = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "size", sum(map(len, self.chunks)) + _OVERHEAD)

    def encode(self) -> bytes:
        """A JSON head line (stream, usage, chunk lengths), then the chunks; no pickle: a shared store is untrusted."""
        head = {"stream": self.stream, "usage": self.usage, "lengths": [len(c) for c in self.chunks]}
        return json.dumps(head, separators=(",", ":")).encode() + b"\n" + b"".join(self.chunks)

    @classmethod
    def decode(cls, raw: bytes) -> Entry | None:
        """The entry ``encode`` wrote, or None for anything else (another version, a damaged value)."""
        line, _, rest = raw.partition(b"\n")
        try:
            head = json.loads(line)
            lengths = [int(n) for n in head["lengths"]]
            stream, usage = bool(head["stream"]), head.get("usage")
        except (ValueError, KeyError, TypeError):
            return None
        if sum(lengths) != len(rest) or not (usage is None or isinstance(usage, dict)):
            return None
        chunks, at = [], 0
        for n in lengths:
            chunks.append(rest[at : at + n])
            at += n
        return cls(stream, tuple(chunks), usage)


class MemoryLRU:
    """Entries by key, least recently used first out once their sizes add up to more than ``max_bytes``."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.bytes = 0
        self.evictions = 0
        self._entries: OrderedDict[bytes | str, tuple[Entry, float, int]] = OrderedDict()  # entry, expiry, size

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: bytes | str) -> bool:
        return key in self._entries

    def get(self, key: bytes | str) -> Entry | None:
        found = self._entries.get(key)
        if found is None:
            return None
        entry, expires, _ = found
        if expires <= time.monotonic():
            self._remove(key)
            return None
        self._entries.move_to_end(key)
        return entry

    def put(self, key: bytes | str, entry: Entry, ttl: float) -> None:
        size = entry.size + len(key)  # a key is the request's text: it can weigh as much as the answer
        if size > self.max_bytes:
            return
        if key in self._entries:
            self._remove(key)
        self._entries[key] = (entry, time.monotonic() + ttl, size)
        self.bytes += size
        while self.bytes > self.max_bytes:
            oldest = next(iter(self._entries))
            self._remove(oldest)
            self.evictions += 1

    def _remove(self, key: bytes | str) -> None:
        self.bytes -= self._entries.pop(key)[2]
