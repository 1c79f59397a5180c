"""Anthropic Messages <-> OpenAI chat completions: the request, the answer, and the stream event by event.

Pure functions and one small stream translator, so that the cost of each can be measured alone
(``bench/bench_translation.py``).
"""

from __future__ import annotations

import json
from typing import Any

STOP_REASONS = {
    "stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use",
    "function_call": "tool_use", "content_filter": "refusal",
}  # fmt: skip
_COPIED = {"max_tokens": "max_tokens", "temperature": "temperature", "top_p": "top_p", "stream": "stream"}


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    return "".join(b.get("text", "") for b in content or () if isinstance(b, dict) and b.get("type") == "text")


def _messages(message: dict[str, Any]) -> list[dict[str, Any]]:
    """One Anthropic message as chat messages: tool results become ``tool`` messages of their own."""
    role, content = message.get("role"), message.get("content")
    if isinstance(content, str):
        return [{"role": role, "content": content}]
    parts: list[dict[str, Any]] = []
    calls: list[dict[str, Any]] = []
    out: list[dict[str, Any]] = []
    for block in content or ():
        kind = block.get("type")
        if kind == "text":
            parts.append({"type": "text", "text": block.get("text", "")})
        elif kind == "image" and isinstance(block.get("source"), dict):
            source = block["source"]
            url = source.get("url") or f"data:{source.get('media_type')};base64,{source.get('data')}"
            parts.append({"type": "image_url", "image_url": {"url": url}})
        elif kind == "tool_use":
            function = {"name": block.get("name"), "arguments": json.dumps(block.get("input") or {})}
            calls.append({"id": block.get("id"), "type": "function", "function": function})
        elif kind == "tool_result":
            result = _text(block.get("content"))
            out.append({"role": "tool", "tool_call_id": block.get("tool_use_id"), "content": result})
    if parts or calls:
        text_only = all(p["type"] == "text" for p in parts)
        chat: dict[str, Any] = {"role": role, "content": "".join(p["text"] for p in parts) if text_only else parts}
        if calls:
            chat["tool_calls"] = calls
        out.append(chat)
    return out


def to_chat(body: dict[str, Any]) -> dict[str, Any]:
    """A Messages request as a chat completions request."""
    chat: dict[str, Any] = {"model": body["model"], "messages": []}
    system = body.get("system")
    if system:
        chat["messages"].append({"role": "system", "content": _text(system)})
    for message in body.get("messages") or ():
        chat["messages"] += _messages(message)
    for theirs, ours in _COPIED.items():
        if theirs in body:
            chat[ours] = body[theirs]
    if body.get("stop_sequences"):
        chat["stop"] = body["stop_sequences"]
    if body.get("stream"):
        chat["stream_options"] = {"include_usage": True}
    tools = body.get("tools")
    if tools:
        chat["tools"] = [
            {"type": "function", "function": {"name": t.get("name"), "description": t.get("description", ""),
                                              "parameters": t.get("input_schema") or {"type": "object"}}}
            for t in tools
        ]  # fmt: skip
    choice = body.get("tool_choice") or {}
    kind = choice.get("type")
    if kind in ("auto", "none"):
        chat["tool_choice"] = kind
    elif kind == "any":
        chat["tool_choice"] = "required"
    elif kind == "tool":
        chat["tool_choice"] = {"type": "function", "function": {"name": choice.get("name")}}
    user = (body.get("metadata") or {}).get("user_id")
    if user:
        chat["user"] = user
    return chat


def _usage(usage: dict[str, Any] | None) -> dict[str, int]:
    usage = usage or {}
    return {"input_tokens": usage.get("prompt_tokens") or 0, "output_tokens": usage.get("completion_tokens") or 0}


def to_message(chat: dict[str, Any], model: str) -> dict[str, Any]:
    """A chat completion as a Messages answer, named ``model`` (the name the client asked for)."""
    choice = (chat.get("choices") or [{}])[0]
    message = choice.get("message") or {}
    content: list[dict[str, Any]] = []
    if message.get("reasoning_content"):
        content.append({"type": "thinking", "thinking": message["reasoning_content"], "signature": ""})
    if message.get("content"):
        content.append({"type": "text", "text": message["content"]})
    for call in message.get("tool_calls") or ():
        function = call.get("function") or {}
        try:
            arguments = json.loads(function.get("arguments") or "{}")
        except ValueError:
            arguments = {"_unparsed": function.get("arguments")}
        content.append({"type": "tool_use", "id": call.get("id"), "name": function.get("name"), "input": arguments})
    return {
        "id": f"msg_{chat.get('id', '')}", "type": "message", "role": "assistant", "model": model,
        "content": content, "stop_reason": STOP_REASONS.get(choice.get("finish_reason") or "stop", "end_turn"),
        "stop_sequence": None, "usage": _usage(chat.get("usage")),
    }  # fmt: skip


def _event(kind: str, data: dict[str, Any]) -> bytes:
    return b"event: " + kind.encode() + b"\ndata: " + json.dumps({"type": kind, **data}).encode() + b"\n\n"


class StreamTranslator:
    """Chat completion chunks in, Messages events out: a chunk filter (``call.filter_chunks(t.feed)``)."""

    def __init__(self, model: str) -> None:
        self.model = model
        self.started = False
        self.block: tuple[str, int] | None = None  # (kind, chat tool index or -1) of the open content block
        self.index = -1
        self.stop_reason = "end_turn"
        self.usage: dict[str, Any] | None = None

    def feed(self, chunk: bytes) -> bytes:
        out: list[bytes] = []
        for line in chunk.split(b"\n"):
            if not line.startswith(b"data:"):
                continue
            data = line[5:].strip()
            if data == b"[DONE]":
                out.append(self.finish())
                continue
            try:
                event = json.loads(data)
            except ValueError:
                continue
            self._translate(event, out)
        return b"".join(out)

    def _open(self, kind: str, tool: int, block: dict[str, Any], out: list[bytes]) -> None:
        self._close(out)
        self.index += 1
        self.block = (kind, tool)
        out.append(_event("content_block_start", {"index": self.index, "content_block": block}))

    def _close(self, out: list[bytes]) -> None:
        if self.block is not None:
            out.append(_event("content_block_stop", {"index": self.index}))
            self.block = None

    def _delta(self, delta: dict[str, Any], out: list[bytes]) -> None:
        out.append(_event("content_block_delta", {"index": self.index, "delta": delta}))

    def _translate(self, event: dict[str, Any], out: list[bytes]) -> None:
        if not self.started:
            self.started = True
            message = {
                "id": f"msg_{event.get('id', '')}", "type": "message", "role": "assistant", "model": self.model,
                "content": [], "stop_reason": None, "stop_sequence": None, "usage": _usage(None),
            }  # fmt: skip
            out.append(_event("message_start", {"message": message}))
        if event.get("usage"):
            self.usage = event["usage"]
        for choice in event.get("choices") or ():
            delta = choice.get("delta") or {}
            if delta.get("reasoning_content"):
                if self.block is None or self.block[0] != "thinking":
                    self._open("thinking", -1, {"type": "thinking", "thinking": "", "signature": ""}, out)
                self._delta({"type": "thinking_delta", "thinking": delta["reasoning_content"]}, out)
            if delta.get("content"):
                if self.block is None or self.block[0] != "text":
                    self._open("text", -1, {"type": "text", "text": ""}, out)
                self._delta({"type": "text_delta", "text": delta["content"]}, out)
            for call in delta.get("tool_calls") or ():
                function = call.get("function") or {}
                tool = call.get("index", 0)
                if self.block != ("tool_use", tool):
                    block = {"type": "tool_use", "id": call.get("id"), "name": function.get("name"), "input": {}}
                    self._open("tool_use", tool, block, out)
                if function.get("arguments"):
                    self._delta({"type": "input_json_delta", "partial_json": function["arguments"]}, out)
            if choice.get("finish_reason"):
                self.stop_reason = STOP_REASONS.get(choice["finish_reason"], "end_turn")

    def finish(self) -> bytes:
        out: list[bytes] = []
        if not self.started:
            self._translate({}, out)
        self._close(out)
        usage = _usage(self.usage)
        delta = {"delta": {"stop_reason": self.stop_reason, "stop_sequence": None}, "usage": usage}
        out.append(_event("message_delta", delta))
        out.append(_event("message_stop", {}))
        return b"".join(out)
