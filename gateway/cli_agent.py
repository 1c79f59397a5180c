"""``multiverse agent`` and ``multiverse check-backend``: the commands a student hosting a model runs."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from pathlib import Path
from typing import Any


def add_parsers(sub: argparse._SubParsersAction[Any]) -> None:
    agent = sub.add_parser("agent", help="keep a model server registered with a gateway (heartbeats, drain on exit)")
    agent.add_argument("--gateway", required=True, help="the gateway's URL, e.g. https://gateway.example.edu")
    agent.add_argument(
        "--key",
        default=os.environ.get("MULTIVERSE_KEY"),
        help="a host key, or a backend token mvb-... (or MULTIVERSE_KEY)",
    )
    agent.add_argument("--backend", required=True, help="the model server as the agent reaches it (no /v1)")
    agent.add_argument("--public-url", help="the URL the gateway reaches it at (a tunnel's); default: --backend")
    agent.add_argument("--public-url-file", type=Path, help="a file holding the public URL, re-read every interval")
    agent.add_argument("--name", help="the backend's name (default: host name and port)")
    agent.add_argument("--models", help="comma-separated model names (default: what /v1/models lists)")
    agent.add_argument("--interval", type=float, default=10.0, help="seconds between heartbeats (default: 10)")
    agent.add_argument("--state", type=Path, help="state file (default: ~/.local/state/multiverse/agent-NAME.json)")
    agent.add_argument("--keep", action="store_true", help="on exit keep the registration as offline, not remove it")
    agent.add_argument("--drain-timeout", type=float, default=120.0, help="seconds to let running requests finish")
    agent.set_defaults(func=cmd_agent)

    check = sub.add_parser("check-backend", help="check that a model server speaks the OpenAI protocol")
    check.add_argument("url", help="the server's base URL, e.g. http://127.0.0.1:8080")
    check.add_argument("--model", help="the model name to check (default: the first /v1/models lists)")
    check.add_argument("--key", help="the server's own API key, if it wants one")
    check.add_argument("--json", action="store_true", help="machine-readable report")
    check.add_argument("--timeout", type=float, default=60.0, help="seconds each request may take")
    check.set_defaults(func=cmd_check_backend)


def cmd_agent(args: argparse.Namespace) -> int:
    from gateway.agent import AgentOptions, run

    if not args.key:
        print("refused: no key; pass --key (a host key, or the backend token the admin gave you)", file=sys.stderr)
        return 2
    models = tuple(m.strip() for m in (args.models or "").split(",") if m.strip())
    options = AgentOptions(
        args.gateway,
        args.key,
        args.backend,
        args.public_url,
        args.public_url_file,
        args.name,
        models,
        args.interval,
        args.state,
        args.keep,
        args.drain_timeout,
    )
    return run(options)


def cmd_check_backend(args: argparse.Namespace) -> int:
    from gateway.checker import check

    report = asyncio.run(check(args.url, args.model, args.key, timeout=args.timeout))
    print(json.dumps(report.as_dict(), indent=2) if args.json else report.table())
    return 0 if report.ok else 1
