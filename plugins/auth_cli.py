"""``multiverse keys``: create (one, or one per student of a roster), list, revoke and rotate API keys.

Works on the gateway's database directly, running or not: a running gateway sees the change within
a second. A secret is printed (or written to the ``--out`` file, mode 0600) once, never again.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import re
import sys
from pathlib import Path
from typing import Any

from gateway.config import ConfigError, load, parse
from gateway.private_files import write_private
from gateway.validate import ValidationError
from plugins import auth_keys

SETTINGS = ("role", "models", "rpm", "tpm", "max_concurrency", "budget", "priority", "expires")


def add_commands(subparsers: argparse._SubParsersAction[Any]) -> None:
    keys = subparsers.add_parser(
        "keys",
        help="API keys of the auth plugin: create, list, revoke, rotate",
        epilog="examples:\n  multiverse keys create --name ada --role user --rpm 30\n  multiverse keys list",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    keys.add_argument("--config", default=os.environ.get("MULTIVERSE_CONFIG"), help="config file (./gateway.yaml)")
    sub = keys.add_subparsers(dest="keys_command", required=True)
    create = sub.add_parser("create", help="issue a key (its secret is shown once), or one per line of --from")
    create.add_argument("--name", help="who holds it (required without --from)")
    create.add_argument("--role", choices=("admin", "host", "user", "readonly"))
    create.add_argument("--models", help="comma-separated models it may use (default: all)")
    create.add_argument("--rpm", type=int, help="requests per minute")
    create.add_argument("--tpm", type=int, help="tokens per minute")
    create.add_argument("--max-concurrency", type=int, help="requests in flight at once")
    create.add_argument("--budget", type=float, help="spend allowed")
    create.add_argument("--priority", choices=("low", "normal", "high"))
    create.add_argument("--expires", help="lifetime, e.g. 30d, 12h, 2w")
    create.add_argument("--from", dest="roster", help="CSV roster with a 'name' column (others as the options)")
    create.add_argument("--out", help="with --from: the CSV to write the keys to (mode 0600; must not exist)")
    create.set_defaults(func=cmd_create)
    listing = sub.add_parser("list", help="every key: id, name, role, limits, status (never a secret)")
    listing.add_argument("--json", action="store_true")
    listing.set_defaults(func=cmd_list)
    for name, func, text in (("revoke", cmd_revoke, "revoke a key"), ("rotate", cmd_rotate, "new secret, same key")):
        command = sub.add_parser(name, help=text)
        command.add_argument("id")
        command.set_defaults(func=func)


def _database(args: argparse.Namespace) -> Path:
    path = args.config or ("gateway.yaml" if Path("gateway.yaml").exists() else None)
    return (load(path) if path else parse({})).database_path


def _fail(message: str) -> int:
    print(message, file=sys.stderr)
    return 2


def _split(models: str | None) -> list[str] | None:
    names = [m for m in re.split(r"[,;\s]+", models or "") if m]
    return names or None


def _spec(values: dict[str, Any]) -> auth_keys.KeySpec:
    data = {k: v for k, v in values.items() if v not in (None, "")}
    if "models" in data and isinstance(data["models"], str):
        data["models"] = _split(data["models"])
    for number in ("rpm", "tpm", "max_concurrency"):
        if isinstance(data.get(number), str):
            data[number] = int(data[number])
    if isinstance(data.get("budget"), str):
        data["budget"] = float(data["budget"])
    return auth_keys.spec(data)


def cmd_create(args: argparse.Namespace) -> int:
    defaults = {k: getattr(args, k) for k in SETTINGS}
    try:
        path = _database(args)
        if args.roster:
            return _create_roster(args, path, defaults)
        if not args.name:
            return _fail("keys create: give --name (who holds the key), or --from roster.csv")
        [(secret, listed)] = auth_keys.create(path, [_spec({"name": args.name, **defaults})], auth_keys.cli_actor())
    except (ConfigError, ValidationError) as exc:
        return _fail("keys create: " + "; ".join(exc.problems))
    print(f"created key {listed['id']} for {listed['name']} (role {listed['role']}); shown once:", file=sys.stderr)
    print(secret)
    return 0


def _create_roster(args: argparse.Namespace, path: Path, defaults: dict[str, Any]) -> int:
    if not args.out:
        return _fail("keys create --from: give --out keys.csv, the file the keys are written to (mode 0600)")
    if Path(args.out).exists():
        return _fail(f"keys create: {args.out} exists; choose another --out (its keys would be lost)")
    try:
        with open(args.roster, newline="", encoding="utf-8-sig") as handle:
            rows = list(csv.DictReader(handle))
    except OSError as exc:
        return _fail(f"keys create: cannot read {args.roster} ({exc.strerror})")
    if not rows or "name" not in rows[0]:
        return _fail(f"keys create: {args.roster} needs a header line with a 'name' column (and one student a line)")
    specs = []
    for line, row in enumerate(rows, 2):
        own = {k: row.get(k) for k in SETTINGS if row.get(k)}
        try:
            specs.append(_spec({**defaults, **own, "name": (row.get("name") or "").strip()}))
        except (ValidationError, ValueError) as exc:
            problems = exc.problems if isinstance(exc, ValidationError) else [str(exc)]
            return _fail(f"keys create: {args.roster} line {line}: {'; '.join(problems)}")
    issued = auth_keys.create(path, specs, auth_keys.cli_actor())
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["name", "email", "id", "role", "models", "expires_at", "key"])
    for row, (secret, listed) in zip(rows, issued, strict=True):
        models = ",".join(listed["models"] or [])
        writer.writerow([listed["name"], row.get("email", ""), listed["id"], listed["role"], models,
                         listed["expires_at"] or "", secret])  # fmt: skip
    write_private(Path(args.out), out.getvalue())
    print(f"created {len(issued)} key(s); wrote them to {args.out} (mode 0600): hand each student their line")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    try:
        keys = auth_keys.listing(_database(args))
    except ConfigError as exc:
        return _fail("keys list: " + "; ".join(exc.problems))
    if args.json:
        print(json.dumps(keys, indent=2))
        return 0
    for key in keys:
        models = ",".join(key["models"]) if key["models"] else "all models"
        print(f"{key['id']}  {key['status']:<7}  {key['role']:<8}  {key['name']}  ({models})")
    return 0


def cmd_revoke(args: argparse.Namespace) -> int:
    listed = auth_keys.revoke(_database(args), args.id, auth_keys.cli_actor())
    if listed is None:
        return _fail(f"keys revoke: no key with id '{args.id}'; `multiverse keys list` shows them")
    print(f"revoked {listed['id']} ({listed['name']}); a running gateway refuses it within a second")
    return 0


def cmd_rotate(args: argparse.Namespace) -> int:
    rotated = auth_keys.rotate(_database(args), args.id, auth_keys.cli_actor())
    if rotated is None:
        return _fail(f"keys rotate: no active key with id '{args.id}'; `multiverse keys list` shows them")
    print(f"rotated {args.id} ({rotated[1]['name']}); the old secret no longer works. New secret, shown once:",
          file=sys.stderr)  # fmt: skip
    print(rotated[0])
    return 0
