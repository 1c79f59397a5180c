"""The ratelimit plugin's own CPU cost per request, for issue 8's budget (auth+ratelimit+usage+cache <= 60 us).

    .venv/bin/python bench/bench_ratelimit_cost.py [--requests 20000]

Times ``before_request`` + ``filter_candidates`` + ``request_complete`` on real ``Call``
objects of a gateway with one backend (``max_concurrency: 4``), a key with rpm and tpm
(both buckets, the headers, the token correction) on the default in-process store.
Printed: CPU microseconds per request (``time.process_time``), median of 5 runs.
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
from gateway.call import Call
from gateway.config import parse
from gateway.identity import Identity
from gateway.logs import configure
from gateway.state import GATEWAY

BODY = {"model": "bench", "messages": [{"role": "user", "content": "hello there " * 20}], "max_tokens": 64}
USAGE = {"prompt_tokens": 60, "completion_tokens": 40, "total_tokens": 100}


async def per_request_us(requests: int, folder: str) -> float:
    config = parse(
        {
            "storage": {"sqlite": f"{folder}/gateway.db"},
            "admin": {"api_key": "bench-admin-key-0123456789", "allow_private_backends": True},
            "backends": [{"name": "b", "url": "http://127.0.0.1:9", "models": ["bench"], "max_concurrency": 4}],
            "plugins": {"ratelimit": {}},
        },
        base_dir=Path(folder),
    )
    gateway = create_app(config)[GATEWAY]
    await gateway.registry.open()
    plugin = gateway.plugins.pm.get_plugin("ratelimit")
    identity = Identity("id-a", "alice", rpm=10**9, tpm=10**12)
    request = make_mocked_request("POST", "/v1/chat/completions")
    body = json.dumps(BODY).encode()
    candidates = list(gateway.registry.for_model("bench"))
    try:
        started = time.process_time()
        for _ in range(requests):
            call = Call(gateway, request, "r", "chat/completions", body, BODY)
            call.identity = identity
            waiting = plugin.before_request(call)  # awaitable only with a shared store, or a full backend
            if waiting is not None:
                await waiting
            plugin.filter_candidates(call, candidates)
            call.usage = USAGE
            pending = plugin.request_complete(call)  # awaitable only with a shared store
            if pending is not None:
                await pending
        return (time.process_time() - started) / requests * 1e6
    finally:
        await gateway.registry.close()


async def call_only_us(requests: int, folder: str) -> float:
    """The loop without the plugin: building the Call, for subtraction."""
    config = parse({"storage": {"sqlite": f"{folder}/base.db"}}, base_dir=Path(folder))
    gateway = create_app(config)[GATEWAY]
    request = make_mocked_request("POST", "/v1/chat/completions")
    body = json.dumps(BODY).encode()
    started = time.process_time()
    for _ in range(requests):
        call = Call(gateway, request, "r", "chat/completions", body, BODY)
        call.usage = USAGE
    return (time.process_time() - started) / requests * 1e6


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=20000)
    args = parser.parse_args()
    configure(level="warning")
    with tempfile.TemporaryDirectory() as folder:
        runs = [await per_request_us(args.requests, folder) for _ in range(5)]
        base = statistics.median([await call_only_us(args.requests, folder) for _ in range(5)])
    cost = statistics.median(runs) - base
    print(f"ratelimit (rpm + tpm + slot, in-process store): {cost:.1f} us CPU per request (Call itself: {base:.1f} us)")


if __name__ == "__main__":
    asyncio.run(main())
