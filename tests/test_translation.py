"""messages_to_chat's translation, event by event: thinking, text, stop reasons, usage; and the request."""

from __future__ import annotations

import json

from plugins._anthropic import StreamTranslator, to_chat


def chunk(delta: dict[str, object], finish: str | None = None) -> bytes:
    event = {"id": "c9", "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
    return b"data: " + json.dumps(event).encode() + b"\n\n"


def events(raw: bytes) -> list[dict[str, object]]:
    return [json.loads(line[5:]) for line in raw.split(b"\n") if line.startswith(b"data:")]


def test_thinking_then_text_then_max_tokens() -> None:
    translator = StreamTranslator("gemma")
    out = translator.feed(chunk({"reasoning_content": "hmm"}) + chunk({"content": "Hi"}))
    out += translator.feed(chunk({}, "length"))
    out += translator.feed(b'data: {"id":"c9","choices":[],"usage":{"prompt_tokens":4,"completion_tokens":2}}\n\n')
    out += translator.feed(b"data: [DONE]\n\n")
    got = events(out)
    assert [e["type"] for e in got] == [
        "message_start", "content_block_start", "content_block_delta", "content_block_stop",
        "content_block_start", "content_block_delta", "content_block_stop", "message_delta", "message_stop",
    ]  # fmt: skip
    assert got[0]["message"]["model"] == "gemma"  # type: ignore[index]
    assert got[2]["delta"] == {"type": "thinking_delta", "thinking": "hmm"}
    assert got[5] == {"type": "content_block_delta", "index": 1, "delta": {"type": "text_delta", "text": "Hi"}}
    assert got[7]["delta"] == {"stop_reason": "max_tokens", "stop_sequence": None}
    assert got[7]["usage"] == {"input_tokens": 4, "output_tokens": 2}


def test_request_with_tool_history_and_images() -> None:
    chat = to_chat(
        {
            "model": "m", "max_tokens": 9, "stop_sequences": ["END"], "tool_choice": {"type": "any"},
            "system": [{"type": "text", "text": "sys"}],
            "messages": [
                {"role": "user", "content": [
                    {"type": "text", "text": "look"},
                    {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AA=="}},
                ]},
                {"role": "assistant", "content": [{"type": "tool_use", "id": "t1", "name": "f", "input": {"x": 1}}]},
                {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "content": "42"}]},
            ],
        }
    )  # fmt: skip
    assert chat["messages"][0] == {"role": "system", "content": "sys"}
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AA=="}}
    assert chat["messages"][1]["content"][1] == image
    assert chat["messages"][2]["tool_calls"][0]["function"] == {"name": "f", "arguments": '{"x": 1}'}
    assert chat["messages"][3] == {"role": "tool", "tool_call_id": "t1", "content": "42"}
    assert chat["stop"] == ["END"] and chat["tool_choice"] == "required" and chat["max_tokens"] == 9
