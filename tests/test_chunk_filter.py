"""``call.filter_chunks``: a per-call filter that may change or drop a streamed answer's events before the client."""

from __future__ import annotations

from pathlib import Path

import openai

from tests.conftest import StartBackend, StartGateway
from tests.test_plugins import write_plugin

FILTERING = """
from gateway import hookimpl

class Plugin:
    def __init__(self):
        self.heard, self.seen_by_filter = [], []

    def drop_w1(self, chunk):
        self.seen_by_filter.append(chunk)
        return b"\\n\\n".join(e for e in chunk.split(b"\\n\\n") if b'"w1"' not in e and b'" w1"' not in e)

    @hookimpl
    def before_request(self, call):
        if call.json.get("user") == "broken":
            call.filter_chunks(lambda chunk: 1 / 0)
        call.filter_chunks(self.drop_w1)
        call.on_chunk(self.heard.append)
"""


async def test_a_filter_sees_whole_events_and_what_it_drops_never_reaches_the_client_or_the_listeners(
    tmp_path: Path, start_backend: StartBackend, start_gateway: StartGateway
) -> None:
    path = write_plugin(tmp_path, FILTERING)
    gateway = await start_gateway(await start_backend(chunks=3), plugins={path: None})
    client = openai.AsyncOpenAI(base_url=gateway.base_url, api_key="x", max_retries=0)
    stream = await client.chat.completions.create(
        model="echo", messages=[{"role": "user", "content": "hi"}], stream=True
    )
    text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    assert text == "w0 w2"
    plugin = gateway.state.plugins.pm.get_plugin(path)
    assert plugin.seen_by_filter and all(c.endswith(b"\n\n") for c in plugin.seen_by_filter)
    assert b"w1" in b"".join(plugin.seen_by_filter) and b"w1" not in b"".join(plugin.heard)
    assert b"".join(plugin.heard).endswith(b"data: [DONE]\n\n")

    broken = await client.chat.completions.create(
        model="echo",
        messages=[{"role": "user", "content": "hi"}],
        stream=True,
        user="broken",
    )
    assert "".join([c.choices[0].delta.content or "" async for c in broken if c.choices]) == "w0 w2"
    await client.close()
