"""Model aliases: a backend's own name for the class's model, in its request only; answers carry the class's name."""

from __future__ import annotations

import json

import openai

from tests.conftest import ADMIN, StartBackend, StartGateway

MESSAGES = [{"role": "user", "content": "one two three"}]


async def test_aliased_backends_get_their_names_and_answers_carry_the_class_name(
    start_backend: StartBackend, start_gateway: StartGateway
) -> None:
    own = await start_backend(models=["gemma-3-270m-it-Q4_K_M.gguf"])
    listed = await start_backend(models=["gemma3-270m"])
    plain = await start_backend(models=["gemma"])
    gateway = await start_gateway(
        backends=[
            {"name": "own", "url": own.url, "models": ["gemma"], "aliases": {"gemma": "gemma-3-270m-it-Q4_K_M.gguf"}},
            {"name": "listed", "url": listed.url, "models": ["gemma"]},
            {"name": "plain", "url": plain.url, "models": ["gemma"]},
        ],
        models={"gemma": {"aliases": {"listed": "gemma3-270m"}}},
    )
    client = openai.AsyncOpenAI(base_url=gateway.base_url, api_key="unused", max_retries=0)
    for _ in range(3):  # round robin: each backend once
        chat = await client.chat.completions.create(model="gemma", messages=MESSAGES)
        assert chat.model == "gemma" and chat.choices[0].message.content == "one two three"
    for _ in range(3):
        stream = await client.chat.completions.create(model="gemma", messages=MESSAGES, stream=True)
        chunks = [c async for c in stream]
        assert {c.model for c in chunks} == {"gemma"}
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "one two three"
    await client.close()
    assert {s.json()["model"] for s in own.seen} == {"gemma-3-270m-it-Q4_K_M.gguf"}
    assert {s.json()["model"] for s in listed.seen} == {"gemma3-270m"}
    assert {s.json()["model"] for s in plain.seen} == {"gemma"}
    assert len(own.seen) == len(listed.seen) == len(plain.seen) == 2
    sent = json.dumps({"model": "gemma", "messages": MESSAGES}).encode()
    assert plain.seen[0].body.replace(b" ", b"") == sent.replace(b" ", b"")  # the unaliased body is as sent


async def test_a_registration_carries_aliases(start_backend: StartBackend, start_gateway: StartGateway) -> None:
    laptop = await start_backend(models=["qwen2.5-0.5b-instruct-q4_k_m.gguf"])
    gateway = await start_gateway()
    body = {"endpoint_url": laptop.url, "models": ["qwen"], "aliases": {"qwen": "qwen2.5-0.5b-instruct-q4_k_m.gguf"}}
    assert (await gateway.post("/admin/register", body, ADMIN)).status == 201
    reply = await gateway.chat("hello there", model="qwen")
    assert reply.status == 200 and reply.json()["model"] == "qwen"
    assert laptop.seen[0].json()["model"] == "qwen2.5-0.5b-instruct-q4_k_m.gguf"
