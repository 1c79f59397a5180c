"""Routing strategies compared: decision time, and latency with backends of unequal speed.

    .venv/bin/python bench/bench_routing.py [--requests 600] [--concurrency 12]

Three bench/backend.py processes answer in 20, 60 and 200 ms, each working on at most
4 requests at once (the rest queue, as on a GPU). For each strategy a gateway is
started and sent the same load; the report gives mean and p99 latency and the share of
traffic each backend got. Decision time is measured in-process: the strategy called on
three candidates, many times.
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
from typing import Any

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.bench_proxy import free_port, pct, wait_ready

ROOT = Path(__file__).resolve().parent.parent
SPEEDS_MS = (20, 60, 200)
CAPACITY = 4
STRATEGIES = ("round_robin", "weighted", "least_latency", "least_loaded", "task_aware")
CHAT = json.dumps({"model": "bench", "messages": [{"role": "user", "content": "hi"}]}).encode()


def decision_times(iterations: int) -> dict[str, dict[str, float]]:
    """Per strategy: p50 and p99 of one call deciding among three candidates, in microseconds."""
    from gateway.call import Call
    from gateway.config import parse
    from gateway.plugins import Plugins
    from gateway.registry import Backend

    backends = [Backend(f"id{i}", f"b{i}", f"http://h{i}", ("bench",), "config") for i in range(3)]
    out = {}
    for name in STRATEGIES:
        plugins = Plugins(
            parse({"routing": {"strategy": name}, "plugins": {name: None} if name != "round_robin" else {}})
        )
        strategy = plugins.strategy
        call = Call(None, "r", "chat/completions", CHAT, json.loads(CHAT))  # type: ignore[arg-type]
        samples = []
        for _ in range(iterations):
            started = time.perf_counter_ns()
            strategy(backends, call)
            samples.append((time.perf_counter_ns() - started) / 1000)
        out[name] = {"p50_us": statistics.median(samples), "p99_us": pct(samples, 0.99)}
    return out


def analysis_times() -> dict[str, float]:
    """Prompt analysis (task_aware) per prompt of tests/data/prompts.jsonl, and for a 20,000-character one."""
    from plugins.prompt_analysis import analyse

    prompts = [json.loads(line)["prompt"] for line in (ROOT / "tests/data/prompts.jsonl").read_text().splitlines()]
    samples = []
    for _ in range(20):
        for prompt in prompts:
            started = time.perf_counter_ns()
            analyse(prompt)
            samples.append((time.perf_counter_ns() - started) / 1000)
    long_prompt = " ".join(prompts) * 2
    started = time.perf_counter_ns()
    for _ in range(100):
        analyse(long_prompt[:20000])
    return {
        "p50_us": statistics.median(samples),
        "p99_us": pct(samples, 0.99),
        "long_us": (time.perf_counter_ns() - started) / 100_000,
    }


async def run_strategy(strategy: str, backend_urls: list[str], args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    port = free_port()
    config = tmp / f"{strategy}.yaml"
    backends = ", ".join(
        f"{{name: b{ms}ms, url: '{url}', models: [bench], weight: {1000 / ms:.1f}}}"
        for ms, url in zip(SPEEDS_MS, backend_urls, strict=True)
    )
    plugins = "{}" if strategy == "round_robin" else f"{{{strategy}: {{}}}}"
    config.write_text(
        f"server: {{port: {port}}}\nstorage: {{sqlite: ./{strategy}.db}}\n"
        "admin: {api_key: bench-admin-key-0123456789}\n"
        f"backends: [{backends}]\nrouting: {{strategy: {strategy}}}\nlogging: {{level: warning}}\nplugins: {plugins}\n"
    )
    gateway = subprocess.Popen([sys.executable, "-m", "gateway", "serve", "--config", str(config)], cwd=ROOT,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        await wait_ready(f"http://127.0.0.1:{port}/health")
        latencies: list[float] = []
        shares: dict[str, int] = {}
        left = iter(range(args.requests))
        async with aiohttp.ClientSession() as session:

            async def worker() -> None:
                for _ in left:
                    started = time.perf_counter()
                    async with session.post(f"http://127.0.0.1:{port}/v1/chat/completions", data=CHAT,
                                            headers={"Content-Type": "application/json"}) as response:  # fmt: skip
                        await response.read()
                        name = response.headers.get("X-Multiverse-Backend", "?")
                    latencies.append(time.perf_counter() - started)
                    shares[name] = shares.get(name, 0) + 1

            await asyncio.gather(*(worker() for _ in range(args.concurrency)))
    finally:
        gateway.terminate()
        gateway.wait(10)
    return {
        "mean_ms": statistics.mean(latencies) * 1000,
        "p99_ms": pct(latencies, 0.99) * 1000,
        "share": {k: v / args.requests for k, v in sorted(shares.items())},
    }


async def run(args: argparse.Namespace) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix="mv-routing-"))
    ports = [free_port() for _ in SPEEDS_MS]
    procs = [
        subprocess.Popen([sys.executable, str(ROOT / "bench/backend.py"), str(port), str(ms), str(CAPACITY)])
        for port, ms in zip(ports, SPEEDS_MS, strict=True)
    ]
    urls = [f"http://127.0.0.1:{port}" for port in ports]
    try:
        for url in urls:
            await wait_ready(url + "/v1/models")
        load = {name: await run_strategy(name, urls, args, tmp) for name in STRATEGIES}
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(10)
    return {"decision": decision_times(args.iterations), "analysis": analysis_times(), "load": load}


def report(results: dict[str, Any], args: argparse.Namespace) -> str:
    base = results["load"]["round_robin"]["mean_ms"]
    lines = [
        f"{args.requests} requests at concurrency {args.concurrency}; backends answer in "
        f"{', '.join(f'{ms} ms' for ms in SPEEDS_MS)}, {CAPACITY} at a time each "
        "(weighted: weights 50, 16.7, 5).",
        "",
        "| strategy | decision p50 (µs) | decision p99 (µs) | mean latency (ms) | vs round_robin "
        "| p99 latency (ms) | share 20 / 60 / 200 ms |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in STRATEGIES:
        d, load = results["decision"][name], results["load"][name]
        shares = " / ".join(f"{load['share'].get(f'b{ms}ms', 0):.0%}" for ms in SPEEDS_MS)
        lines.append(
            f"| {name} | {d['p50_us']:.1f} | {d['p99_us']:.1f} | {load['mean_ms']:.1f} | "
            f"{(load['mean_ms'] / base - 1):+.0%} | {load['p99_ms']:.1f} | {shares} |"
        )
    a = results["analysis"]
    lines += [
        "",
        f"Prompt analysis (task_aware): p50 {a['p50_us']:.0f} µs, p99 {a['p99_us']:.0f} µs per prompt of "
        f"tests/data/prompts.jsonl; {a['long_us']:.0f} µs for a 20,000-character prompt (only its first and last "
        "1,000 characters are read).",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=600)
    parser.add_argument("--concurrency", type=int, default=12)
    parser.add_argument("--iterations", type=int, default=20000, help="decisions timed per strategy")
    parser.add_argument("--json", help="also write the raw figures here")
    args = parser.parse_args()
    results = asyncio.run(run(args))
    print(report(results, args))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
