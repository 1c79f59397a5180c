"""Issue 9: the gateway in front of a real model server nobody here wrote (llama-cpp-python, Gemma 3 270M).

The model is a base model: the tests assert on protocol and flow, never on what it says, and
always send ``max_tokens``. Building the server's venv is not optional: if it fails, so do these.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import openai
import pytest

from tests.agent_process import start_agent
from tests.conftest import ADMIN_KEY, StartGateway
from tests.real_backend import MODEL, LlamaServer, ensure_venv
from tests.test_check_backend import check_backend

pytestmark = pytest.mark.real_backend


@pytest.fixture(scope="module")
def llama_python() -> Path:
    try:
        return ensure_venv()
    except RuntimeError as exc:
        pytest.fail(f"the real backend could not be set up: {exc}", pytrace=False)


@pytest.fixture(scope="module")
def llama(llama_python: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LlamaServer]:
    server = LlamaServer(llama_python, tmp_path_factory.mktemp("llama")).wait_ready()
    yield server
    server.kill()


@pytest.fixture
def spare(llama_python: Path, tmp_path: Path) -> Iterator[LlamaServer]:
    """A second instance, to be killed by the test."""
    server = LlamaServer(llama_python, tmp_path).wait_ready()
    yield server
    server.kill()


def static(*servers: LlamaServer) -> list[dict[str, object]]:
    return [{"name": f"llama{i}", "url": s.url, "models": [MODEL]} for i, s in enumerate(servers)]


async def test_the_sdk_chats_and_completes_through_the_gateway_streaming_and_not(
    llama: LlamaServer, start_gateway: StartGateway
) -> None:
    gateway = await start_gateway(backends=static(llama))
    client = openai.AsyncOpenAI(base_url=gateway.base_url, api_key="unused", max_retries=0)
    messages = [{"role": "user", "content": "Name a colour."}]
    chat = await client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8)  # type: ignore[arg-type]
    assert chat.object == "chat.completion" and isinstance(chat.choices[0].message.content, str)
    assert chat.usage is not None and 0 < chat.usage.completion_tokens <= 8
    chunks = [c async for c in await client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=8, stream=True)]  # type: ignore[arg-type]  # fmt: skip
    assert chunks and {c.object for c in chunks} == {"chat.completion.chunk"}
    assert chunks[-1].choices[0].finish_reason in ("length", "stop")
    text = await client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=8)
    assert text.object == "text_completion" and isinstance(text.choices[0].text, str)
    pieces = [c async for c in await client.completions.create(
        model=MODEL, prompt="Once upon a time", max_tokens=8, stream=True)]  # fmt: skip
    assert pieces and {c.object for c in pieces} == {"text_completion"}


async def test_the_checker_passes_the_real_server(llama: LlamaServer) -> None:
    code, text = await check_backend(llama.url, "--model", MODEL, "--json")
    report = json.loads(text)
    assert code == 0 and report["ok"], text
    assert report["tokens_per_second"] and report["ttft_ms"] is not None


async def test_the_agent_registers_the_real_server(
    llama: LlamaServer, start_gateway: StartGateway, tmp_path: Path
) -> None:
    gateway = await start_gateway(plugins={"leases": {}})
    agent = await start_agent(gateway.url, ADMIN_KEY, llama.url, tmp_path / "a.json", "--name", "gemma-box", interval=1)
    assert "serving gemma-3-270m" in await agent.wait_for("registered as gemma-box", timeout=30)
    answer = await gateway.chat("Hello", model=MODEL, max_tokens=8)
    assert answer.status == 200 and answer.backend == "gemma-box"
    assert await agent.stop() == 0
    await agent.wait_for("removed from the gateway")


async def test_the_real_server_answers_the_openai_sdk_through_an_agent_that_dialed_out(
    llama: LlamaServer, start_gateway: StartGateway, tmp_path: Path
) -> None:
    admin = {"api_key": ADMIN_KEY, "allow_private_backends": False}  # 127.0.0.1 cannot be registered by URL
    gateway = await start_gateway(plugins={"leases": {}}, admin=admin)
    state = tmp_path / "a.json"
    agent = await start_agent(gateway.url, ADMIN_KEY, llama.url, state, "--name", "gemma-out", dial_out=True)
    assert "serving gemma-3-270m" in await agent.wait_for("over an outbound connection", timeout=30)
    client = openai.AsyncOpenAI(base_url=gateway.base_url, api_key="unused", max_retries=0)
    chat = await client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Hello"}], max_tokens=8
    )
    assert chat.choices[0].message.content is not None
    pieces = [
        c.choices[0].text
        async for c in await client.completions.create(model=MODEL, prompt="One, two,", max_tokens=8, stream=True)
    ]
    assert len(pieces) > 1  # streamed token by token, through the one connection
    assert await agent.stop() == 0
    await agent.wait_for("removed from the gateway")


async def _complete(session: aiohttp.ClientSession, url: str) -> tuple[int, str]:
    body = {"model": MODEL, "prompt": "Count: one, two,", "max_tokens": 32}
    async with session.post(url + "/v1/completions", json=body) as answer:
        await answer.read()
        return answer.status, answer.headers.get("X-Multiverse-Attempts", "")


async def test_failover_when_one_instance_is_killed_mid_load(
    llama: LlamaServer, spare: LlamaServer, start_gateway: StartGateway
) -> None:
    gateway = await start_gateway(backends=static(spare, llama))
    async with aiohttp.ClientSession() as session:
        load = [asyncio.create_task(_complete(session, gateway.url)) for _ in range(4)]
        await asyncio.sleep(0.5)  # both instances are working (one request each, the rest queued)
        spare.kill()
        results = await asyncio.gather(*load)
    assert [status for status, _ in results] == [200] * 4, results
    assert any(attempts != "1" for _, attempts in results)  # some were moved off the killed instance


async def test_a_stream_resumes_on_the_second_instance_when_the_first_dies(
    llama: LlamaServer, spare: LlamaServer, start_gateway: StartGateway
) -> None:
    gateway = await start_gateway(backends=static(spare, llama), routing={"resume_streams": True})
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Tell a story."}],
        "max_tokens": 96,
        "stream": True,
    }
    async with aiohttp.ClientSession() as session:
        for _ in range(2):  # round robin: the first or the second call starts on the instance to be killed
            async with session.post(gateway.base_url + "/chat/completions", json=body) as answer:
                if answer.headers["X-Multiverse-Backend"] != "llama0":
                    await answer.read()
                    continue
                lines: list[bytes] = []
                after_kill = 0
                async for line in answer.content:
                    if line.startswith(b"data: {"):
                        lines.append(line.strip())
                        after_kill += spare.process.poll() is not None
                        if len(lines) == 3:
                            spare.kill()
                    elif line.strip():
                        lines.append(line.strip())
                break
        else:
            pytest.fail("no call started on the first instance")
    assert after_kill > 0 and lines[-1] == b"data: [DONE]"  # it went on after the kill, and ended well
    assert not any(b'"error"' in line for line in lines)
