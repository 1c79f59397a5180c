"""Resuming a broken stream on another backend (``routing.resume_streams``).

A chunk listener on the call keeps the text the stream has carried so far (the pump
passes on whole SSE events only, so nothing half-sent is lost); if the backend dies,
the request is sent to another backend with that text as an assistant prefix to
continue from, and its events follow on the same client stream. Off by default: it
costs a JSON parse per event.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from gateway.call import Call

RESUMABLE = frozenset({"chat/completions", "completions"})


class Continuation:
    """Listens to a relayed stream's whole events and remembers the text generated so far."""

    def __init__(self, call: Call) -> None:
        self.call = call
        self.chat = call.endpoint == "chat/completions"
        self.parts: list[str] = []
        self.finished = False
        call.on_chunk(self.feed)

    def feed(self, chunk: bytes) -> None:
        for line in chunk.splitlines():
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
