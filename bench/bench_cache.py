"""Cache hit latency over loopback, and what the usage and cache plugins cost in CPU per request.

    .venv/bin/python bench/bench_cache.py [--requests 2000] [--rounds 5]

1. Starts bench/backend.py and two `multiverse serve` processes: "off" (no plugins) and "on"
   (usage + cache). Sends requests one at a time over keep-alive connections and reports the
   p50/p90 latency of a cache hit, of a miss (a new seed each time) and of the same request
   through "off". Batches alternate between the two gateways (interleaved), and each gateway's
   CPU time per request is read from /proc: on minus off is what the two plugins cost end to end.
2. A micro-benchmark of the plugins' own hooks on one real Call (no sockets), per request.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.bench_proxy import ROOT, cpu_seconds, free_port, pct, wait_ready

ASK = {"model": "bench", "messages": [{"role": "user", "content": "what is a cache?"}], "temperature": 0}


def _config(tmp: Path, port: int, backend_port: int, plugins: str) -> Path:
    path = tmp / f"gw-{port}.yaml"
    path.write_text(
        f"server: {{port: {port}}}\nstorage: {{sqlite: ./gw-{port}.db}}\nlogging: {{level: warning}}\n"
        f"admin: {{api_key: bench-admin-key-0123456789, allow_private_backends: true}}\n"
        f"backends: [{{name: b, url: 'http://127.0.0.1:{backend_port}', models: [bench]}}]\n"
        f"models: {{bench: {{cost_per_1k_prompt_tokens: 0.1, cost_per_1k_completion_tokens: 0.2}}}}\n"
        f"plugins: {plugins}\n"
    )
    return path


async def timed(session: aiohttp.ClientSession, url: str, body: dict[str, Any], n: int) -> list[float]:
    out = []
    for i in range(n):
        sent = {**body, "seed": i + int(time.time() * 1000)} if body.get("seed") == "new" else body
        start = time.perf_counter()
        async with session.post(url, json=sent) as response:
            await response.read()
            assert response.status == 200, response.status
        out.append((time.perf_counter() - start) * 1000)
    return out


async def end_to_end(args: argparse.Namespace) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix="bench-cache-"))
    backend_port = free_port()
    procs = [subprocess.Popen([sys.executable, str(ROOT / "bench/backend.py"), str(backend_port)])]
    gateways = {}
    for name, plugins in (("off", "{}"), ("on", "{usage: {}, cache: {}}")):
        port = free_port()
        config = _config(tmp, port, backend_port, plugins)
        log = open(tmp / f"{name}.log", "wb")  # noqa: SIM115
        command = [sys.executable, "-m", "gateway", "serve", "--config", str(config)]
        procs.append(
            subprocess.Popen(command, stdout=log, stderr=log, cwd=tmp, env={**os.environ, "PYTHONPATH": str(ROOT)})
        )
        gateways[name] = (f"http://127.0.0.1:{port}/v1/chat/completions", procs[-1].pid)
    try:
        for url, _ in gateways.values():
            await wait_ready(url.replace("/v1/chat/completions", "/health"))
        lat: dict[str, list[float]] = {"hit": [], "miss": [], "off": [], "direct": []}
        direct = f"http://127.0.0.1:{backend_port}/v1/chat/completions"
        cpu = {"on": 0.0, "off": 0.0}
        async with aiohttp.ClientSession() as session:
            await timed(session, gateways["on"][0], ASK, 50)  # warm up; the first one fills the cache
            await timed(session, gateways["off"][0], ASK, 50)
            per = args.requests // args.rounds
            for _ in range(args.rounds):
                lat["hit"] += await timed(session, gateways["on"][0], ASK, per)
                lat["direct"] += await timed(session, direct, ASK, per)  # the client's and aiohttp's floor
                for name, body, key in (("on", {**ASK, "seed": "new"}, "miss"), ("off", {**ASK, "seed": "new"}, "off")):
                    url, pid = gateways[name]
                    before = cpu_seconds(pid)
                    lat[key] += await timed(session, url, body, per)
                    cpu[name] += cpu_seconds(pid) - before
        n = per * args.rounds
        return {
            "latency_ms": {k: {"p50": round(pct(v, 0.5), 3), "p90": round(pct(v, 0.9), 3)} for k, v in lat.items()},
            "cpu_us_per_request": {k: round(v / n * 1e6, 1) for k, v in cpu.items()},
            "requests": n,
        }
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(10)


async def micro(n: int) -> dict[str, float]:
    """The plugins' hooks on a real Call, a miss each time, CPU µs per request (no sockets, no dispatch)."""
    from aiohttp import web
    from aiohttp.test_utils import make_mocked_request

    from gateway.call import Attempt, Call
    from gateway.config import parse
    from gateway.plugins import Plugins
    from gateway.registry import Backend, Registry
    from gateway.state import Gateway
    from plugins import cache, usage

    config = parse({"models": {"bench": {"cost_per_1k_prompt_tokens": 0.1}}})
    gateway = Gateway(config, Plugins(config), Registry(Path(tempfile.mkdtemp()) / "g.db", []))
    backend = Backend(id="b", name="b", url="http://127.0.0.1:1", models=("bench",), source="config")
    request = make_mocked_request("POST", "/v1/chat/completions", headers={"Authorization": "Bearer x"})
    answer = web.Response(
        body=json.dumps({"choices": [], "usage": {"prompt_tokens": 9, "completion_tokens": 3}}).encode()
    )
    results = {}
    for name, plugin in (("usage", usage.Plugin()), ("cache", cache.Plugin())):
        start = time.process_time()
        for i in range(n):
            data = {**ASK, "seed": i}
            call = Call(gateway, request, "r", "chat/completions", json.dumps(data).encode(), data)
            plugin.before_request(call)
            if name == "cache":
                await plugin.answer_request(call)
            call.backend, call.status, call.response = backend, 200, answer
            call.attempts.append(Attempt(backend, "bench", 0.0, 0.001, 0.002, 200))
            call.usage = {"prompt_tokens": 9, "completion_tokens": 3}
            result = plugin.request_complete(call)
            if result is not None:
                await result
        results[name] = (time.process_time() - start) / n * 1e6
        start = time.process_time()
        for i in range(n):  # the Call itself, to subtract
            data = {**ASK, "seed": i}
            Call(gateway, request, "r", "chat/completions", json.dumps(data).encode(), data)
        results[name] -= (time.process_time() - start) / n * 1e6
    return {k: round(v, 1) for k, v in results.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    result = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
        "micro_cpu_us": asyncio.run(micro(20000)),
        **asyncio.run(end_to_end(args)),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
