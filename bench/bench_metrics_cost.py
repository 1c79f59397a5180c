"""The metrics plugin's own CPU cost per request, for issue 10's budget (metrics + requestlog <= 40 us).

    .venv/bin/python bench/bench_metrics_cost.py [--requests 20000]

Times the plugin's ``request_complete`` on real ``Call`` objects of a gateway with one
backend: a streamed chat answered by one attempt, with usage, a key's identity and a cache
tag, so every per-request metric is recorded (counter, duration, time to first token, time
per output token, tokens in and out, overhead, cache), and folds them into prometheus-client's
metrics every ``--fold-every`` requests as the plugin's refresh does (every 2 s: 4,000 requests at
2,000 a second). Printed: CPU microseconds per request (``time.process_time``), median of 5 runs,
less the cost of building the Call itself.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from aiohttp.test_utils import make_mocked_request

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gateway.app import create_app
from gateway.call import Attempt, Call
from gateway.config import parse
from gateway.identity import Identity
from gateway.logs import configure
from gateway.state import GATEWAY

BODY = {"model": "bench", "messages": [{"role": "user", "content": "hello there " * 20}], "stream": True}
USAGE = {"prompt_tokens": 60, "completion_tokens": 40, "total_tokens": 100}


def _gateway(folder: str, plugins: dict[str, object]) -> object:
    config = parse(
        {
            "storage": {"sqlite": f"{folder}/gateway.db"},
            "admin": {"api_key": "bench-admin-key-0123456789", "allow_private_backends": True},
            "backends": [{"name": "b", "url": "http://127.0.0.1:9", "models": ["bench"]}],
            "plugins": plugins,
        },
        base_dir=Path(folder),
    )
    return create_app(config)[GATEWAY]


def _call(gateway: object, request: object, body: bytes, backend: object, identity: Identity) -> Call:
    call = Call(gateway, request, "r", "chat/completions", body, BODY)  # type: ignore[arg-type]
    call.identity, call.status, call.route, call.usage = identity, 200, "round_robin", USAGE
    now = time.perf_counter()
    call.attempts.append(Attempt(backend, "bench", now - 0.5, now - 0.4, now, 200))  # type: ignore[arg-type]
    call.backend, call.first_byte_at = backend, now - 0.4  # type: ignore[assignment]
    call.tags["cache"] = "miss"
    return call


async def per_request_us(requests: int, folder: str, with_plugin: bool, fold_every: int) -> float:
    gateway = _gateway(folder, {"metrics": {}})
    await gateway.registry.open()  # type: ignore[attr-defined]
    plugin = gateway.plugins.pm.get_plugin("metrics")  # type: ignore[attr-defined]
    plugin.startup(gateway)
    backend = gateway.registry.backends["config:b"]  # type: ignore[attr-defined]
    identity = Identity("id-a", "alice")
    request = make_mocked_request("POST", "/v1/chat/completions")
    body = json.dumps(BODY).encode()
    try:
        started = time.process_time()
        for i in range(requests):
            call = _call(gateway, request, body, backend, identity)
            if with_plugin:
                plugin.request_complete(call)
                if i % fold_every == fold_every - 1:
                    plugin.metrics.fold()
        if with_plugin:
            plugin.metrics.fold()
        return (time.process_time() - started) / requests * 1e6
    finally:
        await gateway.stop_tasks()  # type: ignore[attr-defined]
        await gateway.registry.close()  # type: ignore[attr-defined]


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=20000)
    parser.add_argument("--fold-every", type=int, default=4000, help="requests per fold (default: %(default)s)")
    args = parser.parse_args()
    configure(level="warning")
    with tempfile.TemporaryDirectory() as folder:
        runs = [await per_request_us(args.requests, folder, True, args.fold_every) for _ in range(5)]
        base = statistics.median(
            [await per_request_us(args.requests, folder, False, args.fold_every) for _ in range(5)]
        )
    cost = statistics.median(runs) - base
    print(f"metrics (every per-request metric): {cost:.1f} us CPU per request (Call itself: {base:.1f} us)")


if __name__ == "__main__":
    asyncio.run(main())
