"""Direct-to-backend versus through the gateway, in one run.

    .venv/bin/python bench/bench_proxy.py [--requests 3000] [--streams 200] [--wrk SECONDS] [--json out.json]

Starts bench/backend.py, the bare aiohttp relay, nginx where it is installed (the native
floor: Debian's nginx-light as a reverse proxy, upstream keep-alive, buffering off) and
`multiverse serve` (gateway.yaml's default plugins) as separate processes, drives each in
turn with an aiohttp client (or wrk, with --wrk), and reads each one's CPU time and peak
memory from /proc (its whole process tree). Prints a Markdown report.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import shutil
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
NGINX = """
daemon off; worker_processes 1; pid {tmp}/nginx.pid; error_log {tmp}/nginx-error.log warn;
events {{ worker_connections 1024; }}
http {{
  access_log off;
  upstream backend {{ server 127.0.0.1:{backend}; keepalive 64; }}
  server {{
    listen 127.0.0.1:{port};
    location / {{
      proxy_pass http://backend; proxy_http_version 1.1; proxy_set_header Connection "";
      proxy_buffering off; proxy_request_buffering off;
      client_body_temp_path {tmp}/nginx-body; proxy_temp_path {tmp}/nginx-proxy;
    }}
  }}
}}
"""
CHAT = json.dumps({"model": "bench", "messages": [{"role": "user", "content": "hi"}], "temperature": 0}).encode()
ADMIN_KEY = "bench-admin-key-0123456789"
HEADERS = {"Content-Type": "application/json", "Authorization": f"Bearer {ADMIN_KEY}"}  # a key auth accepts
TICKS = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _stat(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def process_tree(pid: int) -> list[int]:
    """``pid`` and every process under it (nginx's workers, the gateway's with WORKERS=N)."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parents[int(entry.name)] = int(_stat(int(entry.name))[1])
            except OSError:  # ended meanwhile
                continue
    tree, grew = [pid], True
    while grew:  # to a fixed point: pids wrap around, so a child's may be lower than its parent's
        found = [child for child, parent in parents.items() if parent in tree and child not in tree]
        tree += found
        grew = bool(found)
    return tree


def cpu_seconds(pid: int) -> float:
    """User + system time of the process tree."""
    total = 0.0
    for member in process_tree(pid):
        try:
            fields = _stat(member)
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / TICKS  # utime + stime
    return total


def peak_rss_mb(pid: int) -> float:
    """The tree's peak resident memory (each process's peak, summed)."""
    total = 0.0
    for member in process_tree(pid):
        for line in Path(f"/proc/{member}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                total += int(line.split()[1]) / 1024
    return total


async def wait_ready(url: str, attempts: int = 200) -> None:
    async with aiohttp.ClientSession() as session:
        for _ in range(attempts):
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


async def load(url: str, total: int, concurrency: int, warm: int = 50) -> dict[str, float]:
    """Send ``total`` small chat completions with ``concurrency`` in flight, after ``warm`` not timed."""
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

        for _ in range(min(warm, total)):  # warm the connection pools
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


_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1000.0}


def wrk_load(url: str, seconds: float, concurrency: int, script: Path) -> dict[str, float]:
    """The same small chat completion for ``seconds`` with ``concurrency`` connections, sent by wrk."""
    command = ["wrk", "-t1", f"-c{concurrency}", f"-d{seconds:g}s", "--latency", "-s", str(script), url]
    out = subprocess.run(command, capture_output=True, text=True, check=True).stdout

    def latency(label: str) -> float:
        value, unit = re.search(rf"^\s*{label}%\s+([\d.]+)(us|ms|s)$", out, re.M).groups()  # type: ignore[union-attr]
        return float(value) * _UNITS[unit]

    refused = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    broken = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    return {
        "rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),  # type: ignore[union-attr]
        "p50_ms": latency("50"),
        "p99_ms": latency("99"),
        "errors": (int(refused.group(1)) if refused else 0) + (sum(map(int, broken.groups())) if broken else 0),
        "count": int(re.search(r"(\d+) requests in", out).group(1)),  # type: ignore[union-attr]
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


def gateway_config(
    tmp: Path, port: int, backend_port: int, extra: str | None = None, workers: str = "1", uvloop: str = ""
) -> Path:
    """The default plugins of gateway.yaml; ``extra`` names a YAML file whose ``plugins`` are added (and whose
    ``state``, if any, is the gateway's: e.g. ``{redis: ${REDIS_URL}}``)."""
    plugins = "health: {interval: 10, timeout: 5}, circuit_breaker: {}, task_aware: {}"
    state = ""
    if extra:
        loaded = yaml.safe_load(Path(extra).read_text())
        added = loaded["plugins"]
        plugins += ", " + ", ".join(f"{name}: {json.dumps(options or {})}" for name, options in added.items())
        state = f"state: {json.dumps(loaded['state'])}\n" if loaded.get("state") else ""
    config = tmp / f"gateway-{port}.yaml"
    more = "" if workers == "1" else f", workers: {workers}"  # an older checkout knows no server.workers
    more += f", uvloop: {uvloop}" if uvloop else ""  # nor server.uvloop
    config.write_text(
        f"server: {{port: {port}{more}}}\nstorage: {{sqlite: ./gw-{port}.db}}\n"
        f"admin: {{api_key: {ADMIN_KEY}}}\n"
        f"backends: [{{name: bench, url: 'http://127.0.0.1:{backend_port}', models: [bench]}}]\n"
        "logging: {level: info, format: json}\n"
        f"plugins: {{{plugins}}}\n{state}"
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
    nginx = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)
    if nginx and not args.no_nginx:  # the native floor: a C reverse proxy, upstream keep-alive, no buffering
        port = free_port()
        conf = tmp / "nginx.conf"
        conf.write_text(NGINX.format(tmp=tmp, port=port, backend=backend_port))
        procs["nginx"] = subprocess.Popen([nginx, "-c", str(conf), "-p", str(tmp)], stdout=log, stderr=log)
        urls["nginx"] = f"http://127.0.0.1:{port}"
    for name, env in args.gateways:
        port = free_port()
        extra, workers, uvloop = env.pop("PLUGINS", None), env.pop("WORKERS", "1"), env.pop("UVLOOP", "")
        config = gateway_config(tmp, port, backend_port, extra, workers, uvloop)
        command = [sys.executable, "-m", "gateway", "serve", "--config", str(config)]
        source = env.pop("SOURCE", str(ROOT))  # another checkout's code, e.g. the previous commit's
        procs[name] = subprocess.Popen(command, stdout=log, stderr=log, cwd=source, env={**os.environ, **env})
        urls[name] = f"http://127.0.0.1:{port}"
    targets = list(urls)
    high = f"c{args.high}"
    results: dict[str, Any] = {
        t: {"cpu_s": 0.0, "c1": [], high: [], "requests": 0, "stream_runs": [], "stream_cpu_s": 0.0, "by_c": {}}
        for t in targets
    }
    (tmp / "post.lua").write_text(
        f'wrk.method = "POST"\nwrk.body = [[{CHAT.decode()}]]\n'
        + "".join(f'wrk.headers["{k}"] = "{v}"\n' for k, v in HEADERS.items())
    )
    try:
        await wait_ready(urls["direct"] + "/v1/models")
        for target in targets[1:]:
            await wait_ready(urls[target] + ("/v1/models" if target == "nginx" else "/health"))
        if args.idle:  # all at once, before any load: what each spends a second on its timers alone
            await asyncio.sleep(1.0)
            pids = {t: (procs.get(t) or procs["backend"]).pid for t in targets}
            before_idle = {t: cpu_seconds(pid) for t, pid in pids.items()}
            await asyncio.sleep(args.idle)
            for t, pid in pids.items():
                results[t]["idle_ms_per_s"] = (cpu_seconds(pid) - before_idle[t]) / args.idle * 1000
        for _ in range(args.rounds):
            for target in targets:
                pid = (procs.get(target) or procs["backend"]).pid
                before = cpu_seconds(pid)
                for concurrency, total in ((1, args.requests // 3), (args.high, args.requests)):
                    url = urls[target] + "/v1/chat/completions"
                    phase = cpu_seconds(pid)
                    if args.wrk:
                        figures = wrk_load(url, args.wrk, concurrency, tmp / "post.lua")
                        count = figures.pop("count")
                    else:
                        figures = await load(url, total, concurrency)
                        count = total + 50
                    results[target]["requests"] += count
                    cpu_s, requests = results[target]["by_c"].get(concurrency, (0.0, 0))
                    results[target]["by_c"][concurrency] = (cpu_s + cpu_seconds(pid) - phase, requests + count)
                    results[target][f"c{concurrency}"].append(figures)
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
        for c in ("c1", high):
            runs = r[c]
            r[c] = {k: statistics.median(run[k] for run in runs) for k in runs[0]}
        for concurrency, (cpu_s, requests) in r.pop("by_c").items():
            r[f"c{concurrency}"]["cpu_us_per_request"] = cpu_s / requests * 1e6  # of that concurrency's rounds
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

    for c in ("c1", f"c{args.high}"):
        n = c[1:]
        row(f"requests/s, concurrency {n}", lambda x, c=c: f"{x[c]['rps']:.0f}")
        row(f"p50 latency, concurrency {n} (ms)", lambda x, c=c: f"{x[c]['p50_ms']:.3f}")
        row(f"p99 latency, concurrency {n} (ms)", lambda x, c=c: f"{x[c]['p99_ms']:.3f}")
        row(f"errors, concurrency {n}", lambda x, c=c: f"{x[c]['errors']:.0f}")
    row("added p50 latency, concurrency 1 (ms)", lambda x: f"{x['c1']['p50_ms'] - direct['c1']['p50_ms']:+.3f}")
    row("CPU per request (µs)", lambda x: f"{x['cpu_us_per_request']:.0f}")
    for c in ("c1", f"c{args.high}"):
        row(f"CPU per request, concurrency {c[1:]} only (µs)", lambda x, c=c: f"{x[c]['cpu_us_per_request']:.0f}")
    row("stream: time to first chunk, p50 (ms)", lambda x: f"{x['stream']['ttft_p50_ms']:.3f}")
    row(
        "stream: added per chunk (ms)",
        lambda x: f"{(x['stream']['span_p50_ms'] - direct['stream']['span_p50_ms']) / (args.chunks - 1):+.4f}",
    )
    row("stream: chunks merged with the next", lambda x: f"{x['stream']['merged_chunks']}")
    row("stream: CPU per chunk (µs)", lambda x: f"{x['stream']['cpu_us_per_chunk']:.0f}")
    row("peak RSS (MB)", lambda x: f"{x['peak_rss_mb']:.1f}")
    if args.idle:
        row(f"idle: CPU a second, over {args.idle:g} s (ms)", lambda x: f"{x['idle_ms_per_s']:.2f}")
    lines.append("")
    lines.append("CPU is the process tree's user+system time from /proc (for direct: the backend's own).")
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
        "the plugins of that YAML file, UVLOOP=false sets server.uvloop, WORKERS=N sets server.workers: CPU and "
        "memory are then all workers' together); repeatable (default: one, 'gateway')",
    )
    parser.add_argument("--no-nginx", action="store_true", help="leave nginx out even where it is installed")
    parser.add_argument(
        "--wrk",
        type=float,
        metavar="SECONDS",
        help="drive the request rows with wrk (a C client: the Python one costs CPU the proxies then lack) for "
        "this long per round and concurrency, where wrk is installed",
    )
    parser.add_argument(
        "--idle",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="first measure each target's CPU while nothing is sent, for this long (all at once): its timers' cost",
    )
    parser.add_argument("--json", help="also write the raw figures here")
    args = parser.parse_args()
    args.gateways = []
    if args.wrk and not shutil.which("wrk"):
        parser.error("--wrk: wrk is not installed (Debian: apt-get install wrk)")
    args.high = 16 if args.wrk else 32  # wrk: the figures; the Python client needs more in flight
    for spec in args.gateway or ["gateway"]:
        name, _, env = spec.partition(":")
        args.gateways.append((name, dict(pair.split("=", 1) for pair in env.split(",") if pair)))
    results = asyncio.run(run(args))
    print(report(results, args))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
