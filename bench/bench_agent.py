"""Through an agent's connection versus direct HTTP registration, one interleaved run (issue 11).

    .venv/bin/python bench/bench_agent.py [--rounds 5] [--requests 300] [--streams 40] [--chunks 50]

Starts two bench/backend.py processes, `multiverse serve` with the leases plugin (one backend
registered by URL as model ``bench``) and `multiverse agent` dialing out for the other (model
``bench-agent``). Each round sends the same requests to both, one after the other. CPU is read
from /proc for the gateway and for the agent. Prints a Markdown report.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.bench_proxy import ADMIN_KEY, HEADERS, ROOT, cpu_seconds, free_port, pct, wait_ready

TARGETS = {"direct HTTP": "bench", "agent connection": "bench-agent"}


async def requests(session: aiohttp.ClientSession, url: str, model: str, n: int) -> list[float]:
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": "hi"}]}).encode()
    took = []
    for _ in range(n):
        started = time.perf_counter()
        async with session.post(url, data=body, headers=HEADERS) as response:
            await response.read()
            assert response.status == 200, response.status
        took.append(time.perf_counter() - started)
    return took


async def streams(session: aiohttp.ClientSession, url: str, model: str, n: int, chunks: int) -> dict[str, Any]:
    body = json.dumps({"model": model, "stream": True, "n_chunks": chunks, "gap_ms": 2,
                       "messages": [{"role": "user", "content": "hi"}]}).encode()  # fmt: skip
    ttft, gaps, merged = [], [], 0
    for _ in range(n):
        started = time.perf_counter()
        arrivals = []
        async with session.post(url, data=body, headers=HEADERS) as response:
            async for piece in response.content.iter_any():
                arrivals.append(time.perf_counter())
                merged += max(0, piece.count(b"data: ") - 1)
        ttft.append(arrivals[0] - started)
        gaps.extend(b - a for a, b in itertools.pairwise(arrivals))
    return {"ttft": ttft, "gaps": gaps, "merged": merged}


async def run(args: argparse.Namespace) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix="mv-bench-agent-"))
    log = (tmp / "processes.log").open("w")
    ports = [free_port(), free_port()]
    procs = [subprocess.Popen([sys.executable, str(ROOT / "bench/backend.py"), str(p)]) for p in ports]
    port = free_port()
    config = tmp / "gateway.yaml"
    config.write_text(
        f"server: {{port: {port}}}\nstorage: {{sqlite: ./gw.db}}\nadmin: {{api_key: {ADMIN_KEY}}}\n"
        f"backends: [{{name: direct, url: 'http://127.0.0.1:{ports[0]}', models: [bench]}}]\n"
        "logging: {level: warning, format: json}\n"
        "plugins: {health: {interval: 10, timeout: 5}, circuit_breaker: {}, leases: {}}\n"
    )
    gateway = subprocess.Popen(
        [sys.executable, "-m", "gateway", "serve", "--config", str(config)], stdout=log, stderr=log, cwd=tmp
    )
    url = f"http://127.0.0.1:{port}"
    agent_args = ["--gateway", url, "--key", ADMIN_KEY, "--backend", f"http://127.0.0.1:{ports[1]}"]
    agent = subprocess.Popen(
        [sys.executable, "-m", "gateway", "agent", *agent_args, "--models", "bench-agent", "--state",
         str(tmp / "agent.json"), "--name", "bench-agent"],
        stdout=log, stderr=log, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    out: dict[str, Any] = {t: {"latency": [], "ttft": [], "gaps": [], "merged": 0, "cpu": {}} for t in TARGETS}
    try:
        await wait_ready(url + "/health")
        async with aiohttp.ClientSession() as session:
            for _ in range(100):
                async with session.get(url + "/v1/models", headers=HEADERS) as response:
                    if "bench-agent" in await response.text():
                        break
                await asyncio.sleep(0.1)
            endpoint = url + "/v1/chat/completions"
            for model in TARGETS.values():  # warm up both
                await requests(session, endpoint, model, 20)
            for _ in range(args.rounds):
                for target, model in TARGETS.items():
                    before = cpu_seconds(gateway.pid), cpu_seconds(agent.pid)
                    out[target]["latency"] += await requests(session, endpoint, model, args.requests)
                    after = cpu_seconds(gateway.pid), cpu_seconds(agent.pid)
                    cpu = out[target]["cpu"]
                    cpu["request_gw"] = cpu.get("request_gw", 0.0) + after[0] - before[0]
                    cpu["request_agent"] = cpu.get("request_agent", 0.0) + after[1] - before[1]
                    figures = await streams(session, endpoint, model, args.streams, args.chunks)
                    done = cpu_seconds(gateway.pid), cpu_seconds(agent.pid)
                    cpu["chunk_gw"] = cpu.get("chunk_gw", 0.0) + done[0] - after[0]
                    cpu["chunk_agent"] = cpu.get("chunk_agent", 0.0) + done[1] - after[1]
                    out[target]["ttft"] += figures["ttft"]
                    out[target]["gaps"] += figures["gaps"]
                    out[target]["merged"] += figures["merged"]
    finally:
        for proc in (agent, gateway, *procs):
            proc.terminate()
            proc.wait(10)
        log.close()
    return out


def report(out: dict[str, Any], args: argparse.Namespace) -> str:
    n_requests, n_chunks = args.rounds * args.requests, args.rounds * args.streams * (args.chunks + 1)
    lines = [
        "| | request p50 | request p99 | TTFT p50 | chunk gap p50 | chunk gap p99 | merged | gateway CPU/request "
        "| agent CPU/request | gateway CPU/chunk | agent CPU/chunk |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for target, r in out.items():
        cpu = r["cpu"]
        lines.append(
            f"| {target} | {pct(r['latency'], 0.5) * 1e3:.2f} ms | {pct(r['latency'], 0.99) * 1e3:.2f} ms "
            f"| {pct(r['ttft'], 0.5) * 1e3:.2f} ms | {statistics.median(r['gaps']) * 1e3:.3f} ms "
            f"| {pct(r['gaps'], 0.99) * 1e3:.3f} ms | {r['merged']} "
            f"| {cpu['request_gw'] / n_requests * 1e6:.0f} µs | {cpu['request_agent'] / n_requests * 1e6:.0f} µs "
            f"| {cpu['chunk_gw'] / n_chunks * 1e6:.0f} µs | {cpu['chunk_agent'] / n_chunks * 1e6:.0f} µs |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--streams", type=int, default=40)
    parser.add_argument("--chunks", type=int, default=50)
    args = parser.parse_args()
    print(report(asyncio.run(run(args)), args))


if __name__ == "__main__":
    main()
