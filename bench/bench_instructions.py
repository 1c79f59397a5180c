"""Instructions per request, which a shared, noisy machine cannot blur: for CPU budgets.

    .venv/bin/python bench/bench_instructions.py [--requests 400] [--rounds 2] \
        --gateway off --gateway access:PLUGINS=bench/access-count.yaml --gateway ops:PLUGINS=bench/ops-count.yaml \
        --settle '/admin/requests?limit=1' --settle '/admin/usage?since=1s' [--keep DIR]

Runs each gateway (same NAME:VAR=VALUE syntax as bench_proxy.py) under valgrind's callgrind
in front of bench/backend.py, warms it up, zeroes the counters, sends ``requests`` small chat
completions at concurrency 4, and reads the instructions executed in user space by all its
threads. Repeatable to a fraction of a percent whatever else the machine is doing, where
wall-clock CPU per request moves by tens of percent. Two caveats, both printed: valgrind runs
the gateway ~50 times slower, so work done on a timer (flushes, refreshes, probes) is spread
over ~50 times fewer requests than at full speed (it overstates such plugins); and kernel time
(system calls) is not counted, so convert a difference to microseconds with the gateway's own
user-space rate: its user CPU per request (``/proc``, from bench_proxy.py) over its count here.
Needs valgrind (Debian: ``apt-get install valgrind``).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.bench_proxy import ADMIN_KEY, ROOT, free_port, gateway_config, load, wait_ready


def zero_counters(out: Path, pid: int) -> int:
    """Zero the counters (``callgrind_control -z``); return how many dumps exist, for ``dumped``."""
    subprocess.run(["callgrind_control", "-z", str(pid)], check=True, capture_output=True)
    return len(list(out.parent.glob(out.name + "*")))


def dumped(out: Path, pid: int, before: int) -> int:
    """Dump the counters and return the instructions since they were zeroed."""
    subprocess.run(["callgrind_control", "-d", str(pid)], check=True, capture_output=True)
    for _ in range(100):
        files = sorted(out.parent.glob(out.name + "*"), key=os.path.getmtime)
        if len(files) > before:
            text = files[-1].read_text(errors="replace")
            found = re.search(r"^(?:summary|totals): (\d+)", text, re.M)
            if found:
                return int(found.group(1))
        time.sleep(0.1)
    raise RuntimeError("callgrind wrote no dump")


async def settle(url: str, paths: list[str]) -> None:
    """GET each path with the admin key, inside the count: a plugin's admin query writes its queue first, so
    a flush of exactly this round's rows is counted, however the flush timer falls."""
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {ADMIN_KEY}"}) as session:
        for path in paths:
            async with session.get(url + path) as reply:
                await reply.read()


async def run(args: argparse.Namespace) -> dict[str, list[float]]:
    tmp = Path(tempfile.mkdtemp(prefix="mv-instr-"))
    backend_port = free_port()
    backend = subprocess.Popen([sys.executable, str(ROOT / "bench/backend.py"), str(backend_port)])
    gateways: dict[str, tuple[subprocess.Popen[bytes], str, Path]] = {}
    log = (tmp / "processes.log").open("w")
    try:
        for name, env in args.gateways:
            port = free_port()
            extra, uvloop = env.pop("PLUGINS", None), env.pop("UVLOOP", "")
            config = gateway_config(tmp, port, backend_port, extra, "1", uvloop)
            out = tmp / f"callgrind-{name}.out"
            command = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", sys.executable, "-m", "gateway"]
            proc = subprocess.Popen(
                [*command, "serve", "--config", str(config)],
                stdout=log,
                stderr=log,
                cwd=env.pop("SOURCE", str(ROOT)),
                env={**os.environ, **env},
            )
            gateways[name] = (proc, f"http://127.0.0.1:{port}", out)
        await wait_ready(f"http://127.0.0.1:{backend_port}/v1/models")
        for _, url, _ in gateways.values():
            await wait_ready(url + "/health", attempts=3000)  # valgrind starts a gateway in about a minute
        results: dict[str, list[float]] = {name: [] for name in gateways}
        for _ in range(args.rounds):
            for name, (proc, url, out) in gateways.items():
                await load(url + "/v1/chat/completions", 20, 4)  # warm: caches, pools, the JIT-free paths
                before = zero_counters(out, proc.pid)
                await load(url + "/v1/chat/completions", args.requests, 4, warm=0)
                await settle(url, args.settle)
                results[name].append(dumped(out, proc.pid, before) / args.requests)
        if args.keep:  # the last round's dumps, for callgrind_annotate (which functions differ)
            args.keep.mkdir(parents=True, exist_ok=True)
            for name, (_, _, out) in gateways.items():
                newest = max(out.parent.glob(out.name + "*"), key=os.path.getmtime)
                shutil.copy(newest, args.keep / f"callgrind-{name}.out")
        return results
    finally:
        for proc, _, _ in gateways.values():
            proc.terminate()
        for proc, _, _ in gateways.values():
            proc.wait(30)
        backend.terminate()
        backend.wait(10)
        log.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=400, help="requests counted per gateway and round")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument(
        "--settle",
        action="append",
        default=[],
        metavar="PATH",
        help="GET this admin path at the end of each counted round (e.g. /admin/requests?limit=1: the request "
        "log's flush), so that timers set long in the YAML count one flush a round",
    )
    parser.add_argument("--keep", type=Path, metavar="DIR", help="copy each gateway's last dump here")
    parser.add_argument("--gateway", action="append", metavar="NAME[:VAR=VALUE,...]", help="as in bench_proxy.py")
    args = parser.parse_args()
    if not shutil.which("valgrind") or not shutil.which("callgrind_control"):
        parser.error("valgrind is not installed (Debian: apt-get install valgrind)")
    args.gateways = []
    for spec in args.gateway or ["gateway"]:
        name, _, env = spec.partition(":")
        args.gateways.append((name, dict(pair.split("=", 1) for pair in env.split(",") if pair)))
    results = asyncio.run(run(args))
    first = statistics.median(results[args.gateways[0][0]])
    print(f"| gateway | instructions per request (median of {args.rounds}) | over {args.gateways[0][0]} |")
    print("|---|---|---|")
    for name, counts in results.items():
        median = statistics.median(counts)
        print(f"| {name} | {median:,.0f} | {median - first:+,.0f} ({(median - first) / first:+.1%}) |")
    print()
    print("User space only, all threads, under valgrind (timers' work spread over ~50x fewer requests).")


if __name__ == "__main__":
    main()
