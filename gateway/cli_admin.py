"""``multiverse servers``: admin actions on a running gateway, through its admin API.

The gateway to talk to is ``--url`` (or ``MULTIVERSE_URL``), the key ``--key`` (or
``MULTIVERSE_KEY``; by default the admin key file beside the database of ./gateway.yaml).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.error
import urllib.request
from typing import Any

DEFAULT_URL = "http://127.0.0.1:8000"


def add_parsers(sub: argparse._SubParsersAction[Any]) -> None:
    servers = sub.add_parser("servers", help="admin actions on a running gateway's backends (through its admin API)")
    servers.add_argument("--url", default=os.environ.get("MULTIVERSE_URL", DEFAULT_URL), help="the gateway")
    servers.add_argument("--key", default=os.environ.get("MULTIVERSE_KEY"), help="admin key (MULTIVERSE_KEY)")
    actions = servers.add_subparsers(dest="servers_command", required=True)
    approve = actions.add_parser("approve", help="let a pending registration take traffic")
    approve.add_argument("id", help="its registration_id (GET /admin/servers?status=pending)")
    approve.set_defaults(func=cmd_approve)
    listing = actions.add_parser("list", help="the backends, with status and owner")
    listing.add_argument("--status", help="only those with this status, e.g. pending")
    listing.set_defaults(func=cmd_list)


def _key(args: argparse.Namespace) -> str | None:
    if args.key:
        return str(args.key)
    from gateway.cli import _load

    path = _load(os.environ.get("MULTIVERSE_CONFIG")).admin_key_path
    return path.read_text(encoding="utf-8").strip() if path.exists() else None


def _admin(args: argparse.Namespace, method: str, path: str) -> tuple[int, Any]:
    key = _key(args)
    if key is None:
        return 2, "no admin key: pass --key or set MULTIVERSE_KEY"
    request = urllib.request.Request(args.url.rstrip("/") + path, method=method, headers={"X-API-Key": key})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return 0, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return 1, f"{error.code}: {json.loads(error.read()).get('error', {}).get('message')}"
    except (urllib.error.URLError, OSError) as error:
        return 1, f"cannot reach the gateway at {args.url} ({error}); is it running? (--url, MULTIVERSE_URL)"


def cmd_approve(args: argparse.Namespace) -> int:
    status, answer = _admin(args, "POST", f"/admin/register/{args.id}/approve")
    if status:
        print(f"servers approve: {answer}", file=sys.stderr)
        return status
    print(f"approved {answer['registration_id']} ({answer['name']}, {', '.join(answer['models'])}): it takes traffic")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    query = f"?status={args.status}" if args.status else ""
    status, answer = _admin(args, "GET", f"/admin/servers{query}")
    if status:
        print(f"servers list: {answer}", file=sys.stderr)
        return status
    for s in answer["servers"]:
        print(f"{s['registration_id']}  {s['status']:<10} {s['name']}  {','.join(s['models'])}  owner {s['owner_key']}")
    return 0
