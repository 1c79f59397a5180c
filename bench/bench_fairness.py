"""Fair sharing under contention: does one student's script starve the class?

    .venv/bin/python bench/bench_fairness.py [--service-ms 50] [--requests 10] [--flood 20]

A backend that works on one request at a time (``max_concurrency: 1``, like a llama.cpp
server) takes ``service-ms`` per answer. Key A keeps ``flood`` requests in flight; key B
sends ``requests`` one at a time. Printed: B's median wait (latency minus the service
time) with plain FIFO (ratelimit plugin off: requests queue inside the backend) and with
the ratelimit plugin's fair queues. docs/benchmarks.md records a run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
from pathlib import Path
from time import perf_counter
from typing import Any

import aiohttp
from aiohttp import web

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gateway.app import create_app
from gateway.config import parse
from gateway.logs import configure

MODEL = "bench"
KEYS_PLUGIN = "tests.keys_plugin"  # the bearer token names the key: "student-a"
BODY = json.dumps({
    "id": "chatcmpl-fair", "object": "chat.completion", "created": 0, "model": MODEL,
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
}).encode()  # fmt: skip


def serial_backend(service: float) -> web.Application:
    """A backend that answers one request at a time, in arrival order, each taking ``service`` seconds."""
    one_at_a_time = asyncio.Lock()

    async def chat(request: web.Request) -> web.Response:
        await request.read()
        async with one_at_a_time:
            await asyncio.sleep(service)
        return web.Response(body=BODY, content_type="application/json")

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    return app


async def _post(session: aiohttp.ClientSession, url: str, key: str) -> int:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}
    async with session.post(f"{url}/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"}) as r:
        await r.read()
        return r.status


async def waits_of_the_quiet_key(url: str, service: float, requests: int, flood: int = 20) -> list[float]:
    """Key B's waits (latency minus service time) while key A keeps ``flood`` requests in flight."""
    stop = asyncio.Event()
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:

        async def flooding() -> None:
            while not stop.is_set():
                await _post(session, url, "student-a")

        workers = [asyncio.create_task(flooding()) for _ in range(flood)]
        await asyncio.sleep(service * 3)  # A's backlog builds up
        waits = []
        for _ in range(requests):
            started = perf_counter()
            status = await _post(session, url, "student-b")
            if status != 200:
                raise RuntimeError(f"key B got HTTP {status}")
            waits.append(perf_counter() - started - service)
        stop.set()
        for worker in workers:
            worker.cancel()
        await asyncio.gather(*workers, return_exceptions=True)
    return waits


def gateway_config(backend_url: str, folder: str, fair: bool) -> dict[str, Any]:
    plugins: dict[str, Any] = {KEYS_PLUGIN: None}
    if fair:
        plugins["ratelimit"] = {}
    return {
        "storage": {"sqlite": f"{folder}/gateway.db"},
        "admin": {"api_key": "bench-admin-key-0123456789", "allow_private_backends": True},
        "logging": {"level": "warning"},
        "backends": [{"name": "one-slot", "url": backend_url, "models": [MODEL], "max_concurrency": 1}],
        "plugins": plugins,
    }


async def _serve(app: web.Application) -> tuple[web.AppRunner, str]:
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    return runner, f"http://127.0.0.1:{port}"


async def run(fair: bool, service: float, requests: int, flood: int) -> float:
    """Key B's median wait, in seconds, through a fresh backend and gateway."""
    with tempfile.TemporaryDirectory() as folder:
        backend, backend_url = await _serve(serial_backend(service))
        config = parse(gateway_config(backend_url, folder, fair), base_dir=Path(folder))
        gateway, url = await _serve(create_app(config))
        try:
            return statistics.median(await waits_of_the_quiet_key(url, service, requests, flood))
        finally:
            await gateway.cleanup()
            await backend.cleanup()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--service-ms", type=float, default=50)
    parser.add_argument("--requests", type=int, default=10, help="requests key B sends, one at a time")
    parser.add_argument("--flood", type=int, default=20, help="requests key A keeps in flight")
    args = parser.parse_args()
    configure(level="warning")
    service = args.service_ms / 1000
    print(f"backend: max_concurrency 1, {args.service_ms:g} ms a request; key A: {args.flood} in flight")
    for fair in (False, True):
        median = await run(fair, service, args.requests, args.flood)
        label = "fair queues (ratelimit on) " if fair else "plain FIFO (ratelimit off)"
        print(f"{label}: key B median wait {median * 1000:7.1f} ms = {median / service:5.2f} service times")


if __name__ == "__main__":
    asyncio.run(main())
