"""What translating Anthropic Messages <-> chat completions costs, and renaming an aliased model, per call.

    .venv/bin/python bench/bench_translation.py [--rounds 20000]

Times the pure functions of plugins/_anthropic.py and gateway/rewrite.py in this process
(best of 5 runs, microseconds per call): a request translated (to_chat), a JSON answer
translated (to_message), one streamed chat event translated (StreamTranslator.feed), and one
streamed event renamed for an aliased backend. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable

from plugins._anthropic import StreamTranslator, to_chat, to_message

REQUEST = {
    "model": "m", "max_tokens": 256, "system": "You are terse.", "stream": False,
    "messages": [
        {"role": "user", "content": "What is the weather in Oslo?"},
        {"role": "assistant", "content": [
            {"type": "text", "text": "Let me check."},
            {"type": "tool_use", "id": "t1", "name": "weather", "input": {"city": "Oslo"}},
        ]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "content": "4 degrees, rain"}]},
    ],
    "tools": [{"name": "weather", "description": "the weather", "input_schema": {"type": "object"}}],
}  # fmt: skip
ANSWER = {
    "id": "c1", "object": "chat.completion", "model": "m",
    "choices": [{"index": 0, "finish_reason": "stop",
                 "message": {"role": "assistant", "content": "It is 4 degrees and raining in Oslo. " * 8}}],
    "usage": {"prompt_tokens": 80, "completion_tokens": 72, "total_tokens": 152},
}  # fmt: skip
EVENT = (
    b'data: {"id":"c1","object":"chat.completion.chunk","created":1,"model":"gemma-3-270m-it-Q4_K_M.gguf",'
    b'"choices":[{"index":0,"delta":{"content":" raining"},"finish_reason":null}]}\n\n'
)


def best(fn: Callable[[], object], rounds: int) -> float:
    """Microseconds per call, best of 5 runs of ``rounds`` calls."""
    times = []
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(rounds):
            fn()
        times.append((time.perf_counter() - start) / rounds * 1e6)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=20000)
    rounds = parser.parse_args().rounds
    from gateway.rewrite import _renamer

    answer_bytes = json.dumps(ANSWER).encode()
    translator = StreamTranslator("m")
    translator.feed(EVENT)  # past message_start and the first content_block_start: the steady state
    rename = _renamer("gemma-3-270m-it-Q4_K_M.gguf", "gemma")
    rows = [
        ("request: to_chat (3 messages, a tool)", best(lambda: to_chat(REQUEST), rounds)),
        ("answer: json.loads + to_message + json.dumps", best(
            lambda: json.dumps(to_message(json.loads(answer_bytes), "m")), rounds)),
        ("stream: one chat event -> content_block_delta", best(lambda: translator.feed(EVENT), rounds)),
        ("stream: one event renamed (aliased backend)", best(lambda: rename(EVENT), rounds)),
    ]  # fmt: skip
    print("| step | µs per call |\n|---|---|")
    for name, micros in rows:
        print(f"| {name} | {micros:.2f} |")


if __name__ == "__main__":
    main()
