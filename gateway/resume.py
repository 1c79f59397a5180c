"""Resuming a broken stream on another backend (``routing.resume_streams``).

While a stream is relayed, whole SSE events are passed on and the text they carry
is kept; if the backend dies, the request is sent to another backend with that text
as an assistant prefix to continue from, and its events follow on the same client
stream. Off by default: it costs a JSON parse per event.
"""

from __future__ import annotations

import json
import re
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from gateway.call import Call

RESUMABLE = frozenset({"chat/completions", "completions"})
_EVENT_END = re.compile(rb"\r?\n\r?\n")


class Continuation:
    """Splits a relayed stream into whole events and remembers the text generated so far."""

    def __init__(self, call: Call) -> None:
        self.call = call
        self.chat = call.endpoint == "chat/completions"
        self.parts: list[str] = []
        self.finished = False
        self._pending = b""

    def feed(self, chunk: bytes) -> bytes:
        """The whole events in ``chunk`` (with any held-back start), ready to pass on."""
        data = self._pending + chunk
        ends = list(_EVENT_END.finditer(data))
        if not ends:
            self._pending = data
            return b""
        cut = ends[-1].end()
        self._pending = data[cut:]
        start = 0
        for end in ends:
            self._read_event(data[start : end.start()])
            start = end.end()
        return data[:cut]

    def flush(self) -> bytes:
        """What is left at the stream's clean end (an event without its blank line)."""
        rest, self._pending = self._pending, b""
        return rest

    def drop_partial(self) -> None:
        """Forget an event the failed backend never finished."""
        self._pending = b""

    def _read_event(self, event: bytes) -> None:
        for line in event.splitlines():
            if not line.startswith(b"data:"):
                continue
            payload = line[5:].strip()
            if payload == b"[DONE]":
                self.finished = True
                continue
            try:
                choice = json.loads(payload)["choices"][0]
            except (ValueError, KeyError, IndexError, TypeError):
                continue
            piece = (choice.get("delta") or {}).get("content") if self.chat else choice.get("text")
            if isinstance(piece, str):
                self.parts.append(piece)
            if choice.get("finish_reason"):
                self.finished = True

    def body(self) -> bytes:
        """The original request, asking to continue after the text generated so far."""
        original: dict[str, Any] = dict(self.call.json)
        generated = "".join(self.parts)
        if self.chat:
            messages = list(original.get("messages") or [])
            messages.append({"role": "assistant", "content": generated})
            # vLLM and SGLang continue an assistant prefix with these; llama.cpp does so unasked.
            original.update(messages=messages, continue_final_message=True, add_generation_prompt=False)
        else:
            original["prompt"] = str(original.get("prompt", "")) + generated
        return json.dumps(original, separators=(",", ":")).encode()
