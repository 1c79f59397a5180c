"""``multiverse servers list | register | update | remove | approve``: the backends of a running gateway."""

from __future__ import annotations

import argparse
import os
from typing import Any

from gateway.cli_client import OK, USAGE, CommandError, Formatter, ago, call, command, run, show_json, table, wants_json


def add_parsers(sub: argparse._SubParsersAction[Any]) -> None:
    servers = sub.add_parser(
        "servers",
        help="the backends of a running gateway: list, register, update, remove, approve",
        description="The backends of a running gateway, through its admin API.",
        epilog="example:\n  multiverse servers list --status unhealthy",
        formatter_class=Formatter,
    )
    for flag, text in (("--url", "the gateway (default: $MULTIVERSE_URL)"), ("--key", "admin key ($MULTIVERSE_KEY)")):
        servers.add_argument(flag, default=argparse.SUPPRESS, help=text)  # also accepted before the action
    actions = servers.add_subparsers(dest="action", required=True, metavar="ACTION")

    listing = command(actions, "list", "the backends, with status, owner and last error", "multiverse servers list")
    listing.add_argument("--status", help="only those with this status: healthy, unhealthy, unknown, pending, ...")
    listing.add_argument("--model", help="only those serving this model")
    listing.set_defaults(func=run(cmd_list))

    register = command(
        actions,
        "register",
        "add a backend: its base URL and the models it serves (asked of it when not given)",
        "multiverse servers register http://10.0.0.7:8080 --model qwen2.5-0.5b --name lab-7",
    )
    register.add_argument("endpoint_url", help="the server's base URL, without /v1")
    _fields(register)
    register.set_defaults(func=run(cmd_register))

    update = command(
        actions,
        "update",
        "change a registered backend",
        "multiverse servers update lab-7 --weight 2 --model qwen2.5-1.5b",
    )
    update.add_argument("backend", help="its name or registration id")
    update.add_argument("--endpoint-url", help="a new base URL")
    _fields(update)
    update.set_defaults(func=run(cmd_update))

    remove = command(actions, "remove", "remove a registered backend", "multiverse servers remove lab-7")
    remove.add_argument("backend", help="its name or registration id")
    remove.set_defaults(func=run(cmd_remove))

    approve = command(actions, "approve", "let a pending registration take traffic", "multiverse servers approve lab-7")
    approve.add_argument("backend", help="its name or registration id (multiverse servers list --status pending)")
    approve.set_defaults(func=run(cmd_approve))


def _fields(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", action="append", dest="models", help="a model it serves; repeat for more")
    parser.add_argument("--name", help="a name for it (default: chosen by the gateway)")
    parser.add_argument("--description", help="a line about it")
    parser.add_argument("--owner-name", help="who runs it")
    parser.add_argument("--owner-email", help="how to reach them")
    parser.add_argument("--weight", type=float, help="its share of traffic with the weighted strategy")
    parser.add_argument("--max-concurrency", type=int, help="requests it works on at once (llama.cpp's server: 1)")
    parser.add_argument(
        "--api-key-env", metavar="VAR", help="environment variable holding the backend's own key (never on the line)"
    )


def _body(args: argparse.Namespace) -> dict[str, Any]:
    body = {
        name: getattr(args, name)
        for name in ("models", "name", "description", "owner_name", "owner_email", "weight", "max_concurrency")
        if getattr(args, name) is not None
    }
    if getattr(args, "endpoint_url", None):
        body["endpoint_url"] = args.endpoint_url
    if args.api_key_env:
        secret = os.environ.get(args.api_key_env)
        if not secret:
            raise CommandError(USAGE, f"--api-key-env {args.api_key_env}: that environment variable is not set")
        body["api_key"] = secret
    return body


def _resolve(args: argparse.Namespace, given: str) -> dict[str, Any]:
    """The registration a name or id names; a usage error listing them when none does."""
    servers: list[dict[str, Any]] = call(args, "GET", "/admin/servers")["servers"]
    for server in servers:
        if given in (server["registration_id"], server["name"]):
            return server
    names = ", ".join(sorted(s["name"] for s in servers)) or "none yet"
    raise CommandError(USAGE, f"no backend named or with id '{given}'; backends: {names}")


def _done(args: argparse.Namespace, answer: dict[str, Any], text: str) -> int:
    if wants_json(args):
        show_json(answer)
    else:
        print(text)
        for warning in answer.get("warnings", []):
            print(f"note: {warning}")
    return OK


def cmd_list(args: argparse.Namespace) -> int:
    answer = call(args, "GET", "/admin/servers", query={"status": args.status, "model": args.model})
    if wants_json(args):
        show_json(answer)
        return OK
    rows = [
        [s["registration_id"], s["name"], s["status"], ago(s["status_since"]), ",".join(s["models"]),
         s["owner_name"] or s["owner_key"], s["in_flight"], s["last_error"]]
        for s in answer["servers"]
    ]  # fmt: skip
    print(table(["id", "name", "status", "since", "models", "owner", "in flight", "last error"], rows))
    return OK


def cmd_register(args: argparse.Namespace) -> int:
    body = _body(args)
    answer = call(args, "POST", "/admin/register", body=body)
    models = ", ".join(answer["models"])
    return _done(
        args, answer, f"registered {answer['registration_id']} ({answer['name']}, {models}): {answer['status']}"
    )


def cmd_update(args: argparse.Namespace) -> int:
    server = _resolve(args, args.backend)
    body = _body(args)
    if not body:
        raise CommandError(
            USAGE, "nothing to update: give at least one of --endpoint-url, --model, --name, --weight, ..."
        )
    answer = call(args, "PUT", f"/admin/register/{server['registration_id']}", body=body)
    return _done(args, answer, f"updated {answer['registration_id']} ({answer['name']}): {', '.join(sorted(body))}")


def cmd_remove(args: argparse.Namespace) -> int:
    server = _resolve(args, args.backend)
    answer = call(args, "DELETE", f"/admin/register/{server['registration_id']}")
    return _done(args, answer, f"removed {server['registration_id']} ({server['name']})")


def cmd_approve(args: argparse.Namespace) -> int:
    server = _resolve(args, args.backend)
    answer = call(args, "POST", f"/admin/register/{server['registration_id']}/approve")
    models = ", ".join(answer["models"])
    return _done(args, answer, f"approved {answer['registration_id']} ({answer['name']}, {models}): it takes traffic")
