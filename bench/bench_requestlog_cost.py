"""The requestlog plugin's own CPU cost per request, for issue 10's budget (metrics + requestlog <= 40 us).

    .venv/bin/python bench/bench_requestlog_cost.py [--requests 20000] [--batch 250] [--ids gateway|random]

Runs ``request_complete`` on real ``Call`` objects of a gateway with one backend (one attempt,
usage reported, an identity), and writes the queue to SQLite every ``--batch`` requests as the
background flush does (500 requests a second with the default 0.5 s interval), formatting and
the multi-row inserts included. Each call has its own request id: the gateway's own (``new_id``,
time-ordered) or, with ``--ids random``, random ones (as from clients that send their own
X-Request-ID), whose index entries land all over the index. Printed: CPU microseconds per request
(``time.process_time``, all threads: aiosqlite writes on its own), median of 5 runs, the Call's own cost subtracted.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

from aiohttp.test_utils import make_mocked_request

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gateway.app import create_app
from gateway.call import Attempt, Call, new_id
from gateway.config import parse
from gateway.identity import Identity
from gateway.logs import configure
from gateway.state import GATEWAY
from plugins import _requestlog_query

BODY = {"model": "bench", "messages": [{"role": "user", "content": "hello there " * 20}], "max_tokens": 64}
USAGE = {"prompt_tokens": 60, "completion_tokens": 40, "total_tokens": 100}


async def per_request_us(
    requests: int, batch: int, folder: str, run: int, store_content: bool, ids: str
) -> tuple[float, float]:
    """(hot path only, hot path + flush) CPU microseconds per request."""
    config = parse(
        {
            "storage": {"sqlite": f"{folder}/gateway-{run}-{store_content}.db"},
            "admin": {"api_key": "bench-admin-key-0123456789", "allow_private_backends": True},
            "backends": [{"name": "b", "url": "http://127.0.0.1:9", "models": ["bench"]}],
            "plugins": {"requestlog": {"store_content": store_content}},
        },
        base_dir=Path(folder),
    )
    gateway = create_app(config)[GATEWAY]
    await gateway.registry.open()
    await gateway.registry.migrate("requestlog", _requestlog_query.SCHEMA)
    plugin = gateway.plugins.pm.get_plugin("requestlog")
    plugin.gateway = gateway
    identity = Identity("id-a", "alice")
    request = make_mocked_request("POST", "/v1/chat/completions")
    body = json.dumps(BODY).encode()
    [backend] = gateway.registry.for_model("bench")
    hot = 0.0
    made = [new_id() if ids == "gateway" else str(uuid.uuid4()) for _ in range(requests)]
    try:
        started = time.process_time()
        for i in range(requests):
            call = Call(gateway, request, made[i], "chat/completions", body, BODY)
            call.identity, call.backend, call.route, call.status, call.usage = (
                identity,
                backend,
                "round_robin",
                200,
                USAGE,
            )
            now = time.perf_counter()
            call.attempts.append(Attempt(backend, "bench", now, now, now, 200))
            call.first_byte_at = now
            before = time.process_time()
            plugin.before_request(call)
            plugin.request_complete(call)
            hot += time.process_time() - before
            if i % batch == batch - 1:
                await plugin.flush()
        await plugin.flush()
        total = time.process_time() - started
        return hot / requests * 1e6, total / requests * 1e6
    finally:
        await gateway.registry.close()


async def call_only_us(requests: int, folder: str) -> float:
    """The loop without the plugin: building the Call and its attempt, for subtraction."""
    config = parse({"storage": {"sqlite": f"{folder}/base.db"}, "backends": [
        {"name": "b", "url": "http://127.0.0.1:9", "models": ["bench"]}]}, base_dir=Path(folder))  # fmt: skip
    gateway = create_app(config)[GATEWAY]
    await gateway.registry.open()
    request = make_mocked_request("POST", "/v1/chat/completions")
    body = json.dumps(BODY).encode()
    [backend] = gateway.registry.for_model("bench")
    await gateway.registry.close()
    started = time.process_time()
    for _ in range(requests):
        call = Call(gateway, request, "r", "chat/completions", body, BODY)
        call.backend, call.route, call.status, call.usage = backend, "round_robin", 200, USAGE
        now = time.perf_counter()
        call.attempts.append(Attempt(backend, "bench", now, now, now, 200))
        call.first_byte_at = now
        time.process_time(), time.process_time()  # the hot path's own timing calls
    return (time.process_time() - started) / requests * 1e6


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=20000)
    parser.add_argument("--batch", type=int, default=250, help="requests per flush (default: %(default)s)")
    parser.add_argument("--ids", choices=("gateway", "random"), default="gateway", help="request ids (see above)")
    args = parser.parse_args()
    configure(level="warning")
    with tempfile.TemporaryDirectory() as folder:
        base = statistics.median([await call_only_us(args.requests, folder) for _ in range(5)])
        for store_content in (False, True):
            runs = [
                await per_request_us(args.requests, args.batch, folder, r, store_content, args.ids) for r in range(5)
            ]
            hot = statistics.median(r[0] for r in runs)
            total = statistics.median(r[1] for r in runs) - base
            print(
                f"requestlog (store_content={str(store_content).lower()}, {args.ids} ids): {total:.1f} us CPU per "
                f"request with its SQLite writes, {hot:.1f} us on the request's path (Call itself: {base:.1f} us)"
            )


if __name__ == "__main__":
    asyncio.run(main())
