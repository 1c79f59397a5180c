"""What every ``multiverse`` command that talks to a running gateway shares: where it is, the key,
``--json``, the exit codes, tables for people and times as "3 min ago".
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Sequence
from typing import Any

DEFAULT_URL = "http://127.0.0.1:8000"
OK, UNREACHABLE, USAGE, UNHEALTHY = 0, 1, 2, 3
"""Exit codes: done; the gateway cannot be reached or failed the request (or what was named does not
exist); the command was wrong (arguments, a missing or refused key); a backend it names is unhealthy."""

EXIT_CODES = (
    "exit status: 0 done, 1 the gateway cannot be reached or answered an error, 2 a usage error "
    "(bad arguments, a missing or refused key), 3 a backend it names is unhealthy"
)


class CommandError(Exception):
    """Why a command stops, with its exit code; printed as one line on standard error."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


class Formatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the examples' line breaks; shows every option's default."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or action.default in (None, False, argparse.SUPPRESS) or not action.option_strings:
            return text
        return f"{text} (default: %(default)s)"


def command(
    sub: argparse._SubParsersAction[Any], name: str, text: str, example: str, connect: bool = True
) -> argparse.ArgumentParser:
    """A subcommand whose ``--help`` ends with an example; with ``connect``, ``--url``, ``--key`` and ``--json``."""
    parser: argparse.ArgumentParser = sub.add_parser(
        name,
        help=text,
        description=text[0].upper() + text[1:] + ".",
        epilog=f"example:\n  {example}\n\n{EXIT_CODES}",
        formatter_class=Formatter,
    )
    if connect:
        parser.add_argument(
            "--url", help=f"the gateway (default: $MULTIVERSE_URL, else {DEFAULT_URL})", default=argparse.SUPPRESS
        )
        parser.add_argument(
            "--key",
            default=argparse.SUPPRESS,
            help="admin or readonly key (default: $MULTIVERSE_KEY, else the admin key file of ./gateway.yaml)",
        )
        parser.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="print the answer as JSON")
    return parser


def url_of(args: argparse.Namespace) -> str:
    return str(getattr(args, "url", None) or os.environ.get("MULTIVERSE_URL") or DEFAULT_URL).rstrip("/")


def key_of(args: argparse.Namespace) -> str | None:
    given = getattr(args, "key", None) or os.environ.get("MULTIVERSE_KEY")
    if given:
        return str(given)
    from gateway.cli import _load
    from gateway.config import ConfigError

    try:
        path = _load(os.environ.get("MULTIVERSE_CONFIG")).admin_key_path
    except ConfigError:
        return None
    return path.read_text(encoding="utf-8").strip() if path.exists() else None


def wants_json(args: argparse.Namespace) -> bool:
    return bool(getattr(args, "json", False))


def call(
    args: argparse.Namespace, method: str, path: str, body: Any = None, query: dict[str, Any] | None = None
) -> Any:
    """The gateway's JSON answer to ``method path``; a ``CommandError`` naming the problem otherwise."""
    key = key_of(args)
    if key is None:
        raise CommandError(USAGE, "no key: pass --key or set MULTIVERSE_KEY (the admin key, or a readonly key)")
    url = url_of(args)
    given = {k: v for k, v in (query or {}).items() if v not in (None, "")}
    target = url + path + (f"?{urllib.parse.urlencode(given)}" if given else "")
    headers = {"X-API-Key": key, "Accept": "application/json"}
    data = None if body is None else json.dumps(body).encode()
    if data is not None:
        headers["Content-Type"] = "application/json"
    request = urllib.request.Request(target, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=float(getattr(args, "timeout", 30))) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as error:
        raise CommandError(*_http_error(error, path)) from None
    except (urllib.error.URLError, OSError) as error:
        reason = getattr(error, "reason", error)
        raise CommandError(
            UNREACHABLE,
            f"cannot reach the gateway at {url} ({reason}); start it with 'multiverse serve' (or 'make run'), "
            "or point --url / MULTIVERSE_URL at it",
        ) from None


def _http_error(error: urllib.error.HTTPError, path: str) -> tuple[int, str]:
    try:
        message = json.loads(error.read()).get("error", {}).get("message") or error.reason
    except (ValueError, AttributeError):
        message = error.reason
    if error.code == 404 and str(message).startswith("no such endpoint"):
        message = f"this gateway does not serve {path}; is the plugin that offers it enabled in its gateway.yaml?"
    code = USAGE if error.code in (400, 401, 403, 405, 422) else UNREACHABLE
    return code, f"HTTP {error.code}: {message}"


def run(fn: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """A command that prints a ``CommandError`` as one line, prefixed with the command's name."""

    def wrapped(args: argparse.Namespace) -> int:
        try:
            return fn(args)
        except CommandError as error:
            name = " ".join(p for p in (args.command, getattr(args, "action", None)) if p)
            print(f"multiverse {name}: {error}", file=sys.stderr)
            return error.code

    return wrapped


def show_json(data: Any) -> None:
    print(json.dumps(data, indent=2))


def ago(epoch: float | None, now: float | None = None) -> str:
    """A past moment for people: "just now", "42 s ago", "3 min ago", "5 h ago", "2 d ago"."""
    if epoch is None:
        return "-"
    seconds = (time.time() if now is None else now) - epoch
    if seconds < 0:
        return "in the future"
    if seconds < 2:
        return "just now"
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{int(seconds // size)} {unit} ago"
    return f"{int(seconds)} s ago"


def duration(ms: float | None) -> str:
    """A duration for people: "850 ms", "1.2 s", "3 min"."""
    if ms is None:
        return "-"
    if ms < 1000:
        return f"{ms:.0f} ms"
    if ms < 60_000:
        return f"{ms / 1000:.1f} s"
    return f"{ms / 60_000:.0f} min"


def table(columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """Columns aligned for a terminal; an empty table says so."""
    if not rows:
        return "(none)"
    cells = [[str(c).upper() for c in columns], *[["-" if v is None else str(v) for v in row] for row in rows]]
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    return "\n".join("  ".join(v.ljust(w) for v, w in zip(line, widths, strict=True)).rstrip() for line in cells)
