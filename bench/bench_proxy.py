"""Direct-to-backend versus through the gateway, in one run.

    .venv/bin/python bench/bench_proxy.py [--requests 3000] [--streams 200] [--json out.json]

Starts bench/backend.py and `multiverse serve` (default plugins: round_robin and
health) as separate processes, drives both with an aiohttp client, and reads the
gateway's CPU time and peak memory from /proc. Prints a Markdown report.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import yaml

ROOT = Path(__file__).resolve().parent.parent
CHAT = json.dumps({"model": "bench", "messages": [{"role": "user", "content": "hi"}], "temperature": 0}).encode()
ADMIN_KEY = "bench-admin-key-0123456789"
HEADERS = {"Content-Type": "application/json", "Authorization": f"Bearer {ADMIN_KEY}"}  # a key auth accepts
TICKS = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime + stime


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def wait_ready(url: str) -> None:
    async with aiohttp.ClientSession() as session:
        for _ in range(200):
            try:
                async with session.get(url) as response:
                    if response.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.05)
    raise RuntimeError(f"{url} never became ready")


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def load(url: str, total: int, concurrency: int) -> dict[str, float]:
    """Send ``total`` small chat completions with ``concurrency`` in flight."""
    latencies: list[float] = []
    errors = 0
    remaining = iter(range(total))
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def worker() -> None:
            nonlocal errors
            for _ in remaining:
                started = time.perf_counter()
                async with session.post(url, data=CHAT, headers=HEADERS) as response:
                    await response.read()
                    if response.status != 200:
                        errors += 1
                latencies.append(time.perf_counter() - started)

        for _ in range(min(50, total)):  # warm the connection pools
            async with session.post(url, data=CHAT, headers=HEADERS) as response:
                await response.read()
        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    return {
        "rps": total / elapsed,
        "p50_ms": pct(latencies, 0.5) * 1000,
        "p99_ms": pct(latencies, 0.99) * 1000,
        "errors": errors,
    }


async def streams(url: str, count: int, chunks: int, gap_ms: float) -> dict[str, float]:
    """Time to first chunk and the spacing of chunks, one stream at a time."""
    body = json.dumps({"model": "bench", "stream": True, "n_chunks": chunks, "gap_ms": gap_ms,
                       "messages": [{"role": "user", "content": "hi"}]}).encode()  # fmt: skip
    ttft, spans, merged = [], [], 0
    async with aiohttp.ClientSession() as session:
        for _ in range(count):
            started = time.perf_counter()
            arrivals = []
            async with session.post(url, data=body, headers=HEADERS) as response:
                async for piece in response.content.iter_any():
                    arrivals.append(time.perf_counter())
                    merged += max(0, piece.count(b"data: ") - 1)
            ttft.append(arrivals[0] - started)
            spans.append(arrivals[-1] - arrivals[0])
    return {
        "ttft_p50_ms": pct(ttft, 0.5) * 1000,
        "span_p50_ms": pct(spans, 0.5) * 1000,
        "merged_chunks": merged,
    }


def _gateway_config(tmp: Path, port: int, backend_port: int, extra: str | None = None, workers: str = "1") -> Path:
    """The default plugins of gateway.yaml; ``extra`` names a YAML file whose ``plugins`` are added."""
    plugins = "health: {interval: 10, timeout: 5}, circuit_breaker: {}, task_aware: {}"
    if extra:
        added = yaml.safe_load(Path(extra).read_text())["plugins"]
        plugins += ", " + ", ".join(f"{name}: {json.dumps(options or {})}" for name, options in added.items())
    config = tmp / f"gateway-{port}.yaml"
    more = "" if workers == "1" else f", workers: {workers}"  # an older checkout knows no server.workers
    config.write_text(
        f"server: {{port: {port}{more}}}\nstorage: {{sqlite: ./gw-{port}.db}}\n"
        f"admin: {{api_key: {ADMIN_KEY}}}\n"
        f"backends: [{{name: bench, url: 'http://127.0.0.1:{backend_port}', models: [bench]}}]\n"
        "logging: {level: info, format: json}\n"
        f"plugins: {{{plugins}}}\n"
    )
    return config


async def run(args: argparse.Namespace) -> dict[str, Any]:
    """Each round sends the same load to every target in turn, so machine noise hits them alike."""
    tmp = Path(tempfile.mkdtemp(prefix="mv-bench-"))
    backend_port = free_port()
    procs: dict[str, subprocess.Popen[bytes]] = {}
    urls = {"direct": f"http://127.0.0.1:{backend_port}"}
    log = (tmp / "processes.log").open("w")
    procs["backend"] = subprocess.Popen([sys.executable, str(ROOT / "bench/backend.py"), str(backend_port)])
    port = free_port()
    procs["bare aiohttp relay"] = subprocess.Popen(
        [sys.executable, str(ROOT / "bench/bare_relay.py"), str(port), urls["direct"]], stdout=log, stderr=log
    )
    urls["bare aiohttp relay"] = f"http://127.0.0.1:{port}"
    for name, env in args.gateways:
        port = free_port()
        config = _gateway_config(tmp, port, backend_port, env.pop("PLUGINS", None), env.pop("WORKERS", "1"))
        command = [sys.executable, "-m", "gateway", "serve", "--config", str(config)]
        source = env.pop("SOURCE", str(ROOT))  # another checkout's code, e.g. the previous commit's
        procs[name] = subprocess.Popen(command, stdout=log, stderr=log, cwd=source, env={**os.environ, **env})
        urls[name] = f"http://127.0.0.1:{port}"
    targets = list(urls)
    results: dict[str, Any] = {
        t: {"cpu_s": 0.0, "c1": [], "c32": [], "requests": 0, "stream_runs": [], "stream_cpu_s": 0.0} for t in targets
    }
    try:
        await wait_ready(urls["direct"] + "/v1/models")
        for target in targets[1:]:
            await wait_ready(urls[target] + "/health")
        for _ in range(args.rounds):
            for target in targets:
                pid = (procs.get(target) or procs["backend"]).pid
                before = cpu_seconds(pid)
                for concurrency, total in ((1, args.requests // 3), (32, args.requests)):
                    figures = await load(urls[target] + "/v1/chat/completions", total, concurrency)
                    results[target][f"c{concurrency}"].append(figures)
                    results[target]["requests"] += total + 50
                results[target]["cpu_s"] += cpu_seconds(pid) - before
            for target in targets:  # streams interleave too: measured one after the other they drift apart
                pid = (procs.get(target) or procs["backend"]).pid
                before = cpu_seconds(pid)
                run = await streams(urls[target] + "/v1/chat/completions", args.streams, args.chunks, args.gap_ms)
                results[target]["stream_cpu_s"] += cpu_seconds(pid) - before
                results[target]["stream_runs"].append(run)
        for target in targets:
            pid = (procs.get(target) or procs["backend"]).pid
            r = results[target]
            runs = r.pop("stream_runs")
            r["stream"] = {k: statistics.median(run[k] for run in runs) for k in runs[0]}
            r["stream"]["merged_chunks"] = sum(run["merged_chunks"] for run in runs)
            r["stream"]["cpu_us_per_chunk"] = (
                r.pop("stream_cpu_s") / (len(runs) * args.streams * (args.chunks + 1)) * 1e6
            )
            r["peak_rss_mb"] = peak_rss_mb(pid)
    finally:
        for proc in procs.values():
            proc.terminate()
            proc.wait(10)
        log.close()
    for target in targets:
        r = results[target]
        r["cpu_us_per_request"] = r.pop("cpu_s") / r.pop("requests") * 1e6
        for c in ("c1", "c32"):
            runs = r[c]
            r[c] = {k: statistics.median(run[k] for run in runs) for k in runs[0]}
    results["machine"] = f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"
    return results


def report(r: dict[str, Any], args: argparse.Namespace) -> str:
    targets = [t for t in r if t != "machine"]
    direct = r["direct"]
    head = "| measure | " + " | ".join(targets) + " |"
    lines = [f"Machine: {r['machine']}. Medians of {args.rounds} interleaved rounds.", "", head,
             "|---" * (len(targets) + 1) + "|"]  # fmt: skip

    def row(label: str, fn: Any) -> None:
        lines.append(f"| {label} | " + " | ".join(fn(r[t]) for t in targets) + " |")

    for c in ("c1", "c32"):
        n = c[1:]
        row(f"requests/s, concurrency {n}", lambda x, c=c: f"{x[c]['rps']:.0f}")
        row(f"p50 latency, concurrency {n} (ms)", lambda x, c=c: f"{x[c]['p50_ms']:.3f}")
        row(f"p99 latency, concurrency {n} (ms)", lambda x, c=c: f"{x[c]['p99_ms']:.3f}")
        row(f"errors, concurrency {n}", lambda x, c=c: f"{x[c]['errors']:.0f}")
    row("added p50 latency, concurrency 1 (ms)", lambda x: f"{x['c1']['p50_ms'] - direct['c1']['p50_ms']:+.3f}")
    row("CPU per request (µs)", lambda x: f"{x['cpu_us_per_request']:.0f}")
    row("stream: time to first chunk, p50 (ms)", lambda x: f"{x['stream']['ttft_p50_ms']:.3f}")
    row(
        "stream: added per chunk (ms)",
        lambda x: f"{(x['stream']['span_p50_ms'] - direct['stream']['span_p50_ms']) / (args.chunks - 1):+.4f}",
    )
    row("stream: chunks merged with the next", lambda x: f"{x['stream']['merged_chunks']}")
    row("stream: CPU per chunk (µs)", lambda x: f"{x['stream']['cpu_us_per_chunk']:.0f}")
    row("peak RSS (MB)", lambda x: f"{x['peak_rss_mb']:.1f}")
    lines.append("")
    lines.append("CPU is the process's user+system time from /proc (for direct: the backend's own).")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--requests", type=int, default=3000, help="requests per round at concurrency 32 (a third at 1)"
    )
    parser.add_argument("--streams", type=int, default=20, help="streams per round")
    parser.add_argument("--chunks", type=int, default=20)
    parser.add_argument("--gap-ms", type=float, default=10.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--gateway",
        action="append",
        metavar="NAME[:VAR=VALUE,...]",
        help="a gateway to measure, with extra environment (SOURCE=DIR runs that checkout's code, PLUGINS=FILE adds "
        "the plugins of that YAML file, WORKERS=N sets server.workers: CPU is then the parent's only); "
        "repeatable (default: one, 'gateway')",
    )
    parser.add_argument("--json", help="also write the raw figures here")
    args = parser.parse_args()
    args.gateways = []
    for spec in args.gateway or ["gateway"]:
        name, _, env = spec.partition(":")
        args.gateways.append((name, dict(pair.split("=", 1) for pair in env.split(",") if pair)))
    results = asyncio.run(run(args))
    print(report(results, args))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
