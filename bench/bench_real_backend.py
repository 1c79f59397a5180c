"""Time to first token and tokens per second of a real model server, direct against through the gateway.

    .venv/bin/python bench/bench_real_backend.py [--rounds 10] [--max-tokens 64]

Starts llama-cpp-python's server with Gemma 3 270M (the cached venv of tests/real_backend.py,
built by `make real-backend`) and `multiverse serve` in front of it, then sends the same
streamed chat request alternately to each (direct, gateway, direct, ...: one interleaved run, so
both see the same machine load). Tokens per second counts content chunks after the first.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.real_backend import MODEL, LlamaServer, ensure_venv, free_port  # noqa: E402


async def one(session: aiohttp.ClientSession, url: str, max_tokens: int) -> tuple[float, float]:
    """(seconds to the first content chunk, content chunks per second after it) of one streamed chat."""
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Tell me a story."}], "max_tokens": max_tokens,
            "stream": True, "temperature": 0}  # fmt: skip
    started = time.perf_counter()
    first, last, count = 0.0, 0.0, 0
    async with session.post(url + "/v1/chat/completions", json=body) as answer:
        assert answer.status == 200, await answer.text()
        async for line in answer.content:
            if line.startswith(b"data: {") and b'"content"' in line:
                last = time.perf_counter() - started
                first = first or last
                count += 1
    return first, (count - 1) / (last - first) if count > 1 and last > first else 0.0


async def run(rounds: int, max_tokens: int) -> dict[str, dict[str, float]]:
    with tempfile.TemporaryDirectory() as tmp:
        server = LlamaServer(ensure_venv(), Path(tmp)).wait_ready()
        port = free_port()
        config = Path(tmp) / "gateway.yaml"
        config.write_text(json.dumps({
            "server": {"port": port}, "storage": {"sqlite": str(Path(tmp) / "gw.db")},
            "admin": {"api_key": "bench-admin-key-0123456789", "allow_private_backends": True},
            "backends": [{"name": "llama", "url": server.url, "models": [MODEL], "max_concurrency": 1}],
            "logging": {"level": "warning"},
        }))  # fmt: skip
        gateway = subprocess.Popen([sys.executable, "-m", "gateway", "serve", "--config", str(config)], cwd=ROOT)
        try:
            targets = {"direct": server.url, "gateway": f"http://127.0.0.1:{port}"}
            async with aiohttp.ClientSession() as session:
                for _ in range(100):
                    try:
                        async with session.get(targets["gateway"] + "/health") as ready:
                            if ready.status == 200:
                                break
                    except aiohttp.ClientError:
                        await asyncio.sleep(0.1)
                for url in targets.values():  # warm up both paths
                    await one(session, url, 8)
                seen: dict[str, list[tuple[float, float]]] = {name: [] for name in targets}
                for _ in range(rounds):
                    for name, url in targets.items():
                        seen[name].append(await one(session, url, max_tokens))
        finally:
            gateway.terminate()
            gateway.wait(10)
            server.kill()
    return {
        name: {
            "ttft_ms_median": round(statistics.median(t for t, _ in runs) * 1000, 1),
            "ttft_ms_max": round(max(t for t, _ in runs) * 1000, 1),
            "tokens_per_s_median": round(statistics.median(r for _, r in runs), 1),
        }
        for name, runs in seen.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--max-tokens", type=int, default=64)
    args = parser.parse_args()
    result = asyncio.run(run(args.rounds, args.max_tokens))
    print("| path | TTFT median (ms) | TTFT max (ms) | tokens/s median |")
    print("| --- | --- | --- | --- |")
    for name, row in result.items():
        print(f"| {name} | {row['ttft_ms_median']} | {row['ttft_ms_max']} | {row['tokens_per_s_median']} |")


if __name__ == "__main__":
    main()
