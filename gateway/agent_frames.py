"""The agent connection's frames, shared by the gateway and ``multiverse agent``.

One WebSocket carries many requests. Control messages are JSON text frames with a type ``t``
and, for a request, its ``id``; bodies travel in binary frames: a 5-byte head (the request id,
big-endian, and a flags byte whose bit 0 ends the body) then the bytes.

gateway -> agent: ``welcome``, ``req`` (path, headers) + body frames, ``cancel``, ``pause``,
``resume`` (per-request flow control), ``left``.
agent -> gateway: ``hello`` (name, models, interval, load), ``beat`` (models, load), ``res``
(status, headers) + body frames, ``err`` (its backend could not answer), ``drain``, ``leave``.
"""

from __future__ import annotations

import json
import struct
from typing import Any

PATH = "/agent/connect"
MAX_FRAME = 1 << 20
"""The largest WebSocket message either side accepts; a bigger one ends the connection."""
PIECE = 64 << 10
"""Body bytes per binary frame (a big request or chunk is cut into pieces)."""
END = 1
_HEAD = struct.Struct(">IB")
TOKEN_HEADER = "X-Agent-Token"


class FrameError(ValueError):
    """A frame that breaks the protocol: the connection that sent it is closed."""


def data_frame(stream_id: int, payload: bytes, end: bool = False) -> bytes:
    return _HEAD.pack(stream_id, END if end else 0) + payload


def pieces(stream_id: int, payload: bytes, end: bool) -> list[bytes]:
    """``payload`` as binary frames of at most ``PIECE`` bytes; the last one carries ``end``."""
    cuts = [payload[i : i + PIECE] for i in range(0, len(payload), PIECE)] or [b""]
    return [data_frame(stream_id, cut, end and i == len(cuts) - 1) for i, cut in enumerate(cuts)]


def read_data(frame: bytes) -> tuple[int, bool, bytes]:
    """(request id, whether the body ends, the bytes) of a binary frame."""
    if len(frame) < _HEAD.size:
        raise FrameError(f"a binary frame of {len(frame)} bytes, shorter than its {_HEAD.size}-byte head")
    stream_id, flags = _HEAD.unpack_from(frame)
    return stream_id, bool(flags & END), frame[_HEAD.size :]


def control(kind: str, **fields: Any) -> str:
    return json.dumps({"t": kind, **fields}, separators=(",", ":"))


def read_control(text: str) -> dict[str, Any]:
    """A text frame's message: a JSON object with a string ``t`` (and an int ``id`` when it has one)."""
    try:
        message = json.loads(text)
    except ValueError:
        raise FrameError("a text frame that is not JSON") from None
    if not isinstance(message, dict) or not isinstance(message.get("t"), str):
        raise FrameError("a text frame without a message type 't'")
    if "id" in message and (type(message["id"]) is not int or not 0 < message["id"] < 1 << 32):
        raise FrameError("a message whose 'id' is not a request id")
    return message


def header_pairs(value: Any) -> list[tuple[str, str]]:
    """Headers sent as ``[[name, value], ...]``, checked."""
    if not isinstance(value, list) or len(value) > 200:
        raise FrameError("headers must be a list of at most 200 [name, value] pairs")
    pairs = []
    for pair in value:
        if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(x, str) for x in pair)):
            raise FrameError("a header that is not a [name, value] pair of strings")
        if any(c in pair[0] + pair[1] for c in "\r\n\0"):
            raise FrameError("a header with a line break or NUL in it")
        pairs.append((pair[0], pair[1]))
    return pairs
