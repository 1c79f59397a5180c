"""The relay's upstream client alone: gateway.pool against the aiohttp ClientSession it replaced.

    .venv/bin/python bench/bench_upstream_client.py [--requests 3200] [--rounds 5]

Starts bench/backend.py and, in this one process, sends the same POSTs at concurrency 32
through each client in turn (interleaved rounds), reading every answer to its end. CPU is
this process's time (the client's side only), so the figure is what the gateway pays per
request to reach a backend. Prints medians as Markdown.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp
from multidict import CIMultiDict

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from bench.bench_proxy import free_port, wait_ready  # noqa: E402
from gateway.pool import Pool  # noqa: E402

BODY = b'{"model": "bench", "messages": [{"role": "user", "content": "hi"}]}'
HEADERS = CIMultiDict({"Content-Type": "application/json", "Accept-Encoding": "identity"})
CONCURRENCY = 32


async def _load(send: Callable[[], Awaitable[None]], requests: int) -> tuple[float, float]:
    """(requests/s, CPU µs per request) for ``requests`` sends at concurrency 32."""

    async def worker(count: int) -> None:
        for _ in range(count):
            await send()

    wall, cpu = time.perf_counter(), time.process_time()
    await asyncio.gather(*(worker(requests // CONCURRENCY) for _ in range(CONCURRENCY)))
    done = requests // CONCURRENCY * CONCURRENCY
    return done / (time.perf_counter() - wall), (time.process_time() - cpu) / done * 1e6


async def main(args: argparse.Namespace) -> None:
    port = free_port()
    backend = subprocess.Popen([sys.executable, str(ROOT / "bench/backend.py"), str(port)])
    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    pool = Pool(connect_timeout=5)
    session = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0, ttl_dns_cache=60),
        timeout=aiohttp.ClientTimeout(total=None, sock_connect=5),
        auto_decompress=False,
        cookie_jar=aiohttp.DummyCookieJar(),
        skip_auto_headers=("User-Agent",),
    )  # as gateway/app.py creates it

    async def through_pool() -> None:
        answer = await pool.post(url, HEADERS, BODY, None)
        try:
            await answer.content.read()
        finally:
            answer.release()

    async def through_session() -> None:
        async with session.post(url, data=BODY, headers=HEADERS, allow_redirects=False) as answer:
            await answer.content.read()

    clients = {"aiohttp ClientSession": through_session, "gateway.pool": through_pool}
    figures: dict[str, list[tuple[float, float]]] = {name: [] for name in clients}
    try:
        await wait_ready(f"http://127.0.0.1:{port}/v1/models")
        for send in clients.values():
            await _load(send, CONCURRENCY * 10)  # warm: connections open
        for _ in range(args.rounds):
            for name, send in clients.items():
                figures[name].append(await _load(send, args.requests))
    finally:
        await pool.close()
        await session.close()
        backend.terminate()
    print(f"Medians of {args.rounds} interleaved rounds of {args.requests} POSTs at concurrency {CONCURRENCY}.\n")
    print("| client | requests/s | CPU per request (µs) |\n|---|---|---|")
    for name, rows in figures.items():
        rps, cpu = statistics.median(r[0] for r in rows), statistics.median(r[1] for r in rows)
        print(f"| {name} | {rps:.0f} | {cpu:.0f} |")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=3200)
    parser.add_argument("--rounds", type=int, default=5)
    asyncio.run(main(parser.parse_args()))
