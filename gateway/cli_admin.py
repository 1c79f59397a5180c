"""``multiverse status``, ``models``, ``servers ...`` and ``health``: a running gateway, through its admin API.

The gateway is ``--url`` (or ``MULTIVERSE_URL``), the key ``--key`` (or ``MULTIVERSE_KEY``; by default
the admin key file beside the database of ./gateway.yaml). ``--json`` prints the API's answer.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

from gateway import cli_requests, cli_servers
from gateway.cli_client import (
    OK,
    UNHEALTHY,
    USAGE,
    CommandError,
    ago,
    call,
    command,
    run,
    show_json,
    table,
    url_of,
    wants_json,
)

BAD = ("unhealthy", "mismatched")


def add_parsers(sub: argparse._SubParsersAction[Any]) -> None:
    status = command(sub, "status", "the gateway at a glance: uptime, requests, every backend", "multiverse status")
    status.set_defaults(func=run(cmd_status))
    models = command(sub, "models", "every model served, by which backends, in which state", "multiverse models")
    models.set_defaults(func=run(cmd_models))
    health = command(
        sub,
        "health",
        "probe every backend now (health plugin) and print each result",
        "multiverse health            # or: multiverse health gpu-1 gpu-2",
    )
    health.add_argument("names", nargs="*", help="only these backends, by name or registration id (default: all)")
    health.set_defaults(func=run(cmd_health))
    cli_servers.add_parsers(sub)
    cli_requests.add_parsers(sub)


def _servers(args: argparse.Namespace) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = call(args, "GET", "/admin/servers")["servers"]
    return found


def cmd_status(args: argparse.Namespace) -> int:
    stats = call(args, "GET", "/admin/stats")
    servers = _servers(args)
    usable = [s for s in servers if s["status"] in ("healthy", "unknown")]
    bad = [s for s in servers if s["status"] in BAD]
    if wants_json(args):
        show_json({"url": url_of(args), **stats, "backends": servers})
    else:
        requests = stats["requests"]
        counts = ", ".join(f"{n} {state}" for state, n in stats["servers"].items() if state != "total" and n)
        started = time.time() - stats["uptime_seconds"]
        print(f"gateway   {url_of(args)}, up {ago(started).removesuffix(' ago')}")
        print(f"requests  {requests['total']} ({requests['failed']} failed)")
        print(f"backends  {stats['servers']['total']}{': ' + counts if counts else ''}\n")
        print(
            table(
                ["name", "status", "since", "models", "in flight", "served", "failed", "last error"],
                [
                    [
                        s["name"],
                        s["status"],
                        ago(s["status_since"]),
                        ",".join(s["models"]),
                        s["in_flight"],
                        s["requests_served"],
                        s["requests_failed"],
                        s["last_error"],
                    ]
                    for s in servers
                ],
            )
        )
    if not usable:
        print("no backend can take requests: register one (multiverse servers register URL)")
        return UNHEALTHY
    return UNHEALTHY if bad else OK


def cmd_models(args: argparse.Namespace) -> int:
    servers = _servers(args)
    by_model: dict[str, list[dict[str, Any]]] = {}
    for server in servers:
        for model in server["models"]:
            by_model.setdefault(model, []).append(server)
    if wants_json(args):
        show_json(
            {
                "models": [
                    {"model": m, "backends": [{"name": s["name"], "status": s["status"]} for s in found]}
                    for m, found in sorted(by_model.items())
                ]
            }
        )
        return OK
    rows = []
    for model, found in sorted(by_model.items()):
        usable = sum(s["status"] in ("healthy", "unknown") for s in found)
        rows.append([model, f"{usable} of {len(found)}", ", ".join(f"{s['name']} ({s['status']})" for s in found)])
    print(table(["model", "usable", "backends"], rows))
    return OK


def cmd_health(args: argparse.Namespace) -> int:
    try:
        results: list[dict[str, Any]] = call(args, "POST", "/admin/health/probe")["backends"]
    except CommandError as error:
        if "does not serve" in str(error):
            raise CommandError(
                error.code,
                "this gateway does not probe backends: enable the health plugin "
                "(add 'health: {}' under 'plugins:' in its gateway.yaml); "
                "'multiverse status' shows the last known state",
            ) from None
        raise
    if args.names:
        known = {r["name"] for r in results} | {r["registration_id"] for r in results}
        unknown = [n for n in args.names if n not in known]
        if unknown:
            names = ", ".join(sorted(r["name"] for r in results)) or "none"
            raise CommandError(USAGE, f"no backend named {', '.join(unknown)}; backends: {names}")
        results = [r for r in results if r["name"] in args.names or r["registration_id"] in args.names]
    if wants_json(args):
        show_json({"backends": results})
    else:
        rows = [[r["name"], r["probe"], f"{r['ms']:.0f} ms", r["status"], r["error"]] for r in results]
        print(table(["name", "probe", "took", "status", "error"], rows))
    failed = [r for r in results if r["probe"] not in ("healthy", "busy")]
    return UNHEALTHY if failed else OK
