"""``multiverse requests`` (search the request log) and ``multiverse requests show ID`` (one request's story)."""

from __future__ import annotations

import argparse
from datetime import datetime
from typing import Any

from gateway.cli_client import OK, ago, call, command, duration, run, show_json, table, wants_json

STATUS_HELP = "a class (2xx, 4xx, 5xx), a code (503), 'error' (any failure, also a broken stream) or 'ok'"


def add_parsers(sub: argparse._SubParsersAction[Any]) -> None:
    requests = command(
        sub,
        "requests",
        "search the request log (requestlog plugin), newest first; 'requests show ID' tells one request's story",
        "multiverse requests --since 1h --status 5xx\n  multiverse requests show 3f2a9c1e-...",
    )
    requests.add_argument("--since", help="a duration back from now (30m, 1h, 7d) or an ISO date (default: all kept)")
    requests.add_argument("--status", help=f"{STATUS_HELP} (default: any)")
    requests.add_argument("--model", help="the model asked for or served (default: any)")
    requests.add_argument("--backend", help="the backend that answered (default: any)")
    requests.add_argument(
        "--key-name", metavar="NAME", help="only this API key's requests, by its name (--key is your own key)"
    )
    requests.add_argument("--limit", type=int, default=20, help="how many to show")
    requests.add_argument("--cursor", help="the next page: the cursor the previous page printed (default: newest)")
    requests.set_defaults(func=run(cmd_requests))
    show_sub = requests.add_subparsers(dest="action", metavar="show")
    show = command(
        show_sub,
        "show",
        "one request's story: each attempt, why it failed, who answered",
        "multiverse requests show ID",
    )
    show.add_argument("request_id", help="its X-Request-ID (every answer carries it; 'multiverse requests' lists them)")
    show.set_defaults(func=run(cmd_show))


def cmd_requests(args: argparse.Namespace) -> int:
    query = {
        "since": args.since, "status": args.status, "model": args.model, "backend": args.backend,
        "key": args.key_name, "limit": args.limit, "cursor": args.cursor,
    }  # fmt: skip
    answer = call(args, "GET", "/admin/requests", query=query)
    if wants_json(args):
        show_json(answer)
        return OK
    rows = [
        [ago(r["at"]), r["request_id"], r["key"], r["model"], r["backend"], _status(r), duration(r["latency_ms"]),
         _tokens(r), " > ".join(f"{a['backend']} {a['outcome']}" for a in r["attempts"]), _short(r["error"])]
        for r in answer["requests"]
    ]  # fmt: skip
    print(
        table(["when", "request id", "key", "model", "backend", "status", "took", "tokens", "attempts", "error"], rows)
    )
    if answer["next_cursor"]:
        print(f"\nmore: add --cursor {answer['next_cursor']}")
    return OK


def cmd_show(args: argparse.Namespace) -> int:
    entry = call(args, "GET", f"/admin/requests/{args.request_id}")
    if wants_json(args):
        show_json(entry)
    else:
        print(story(entry))
    return OK


def story(r: dict[str, Any]) -> str:
    """One request for people: who asked for what, each attempt and why it failed, who answered."""
    when = datetime.fromtimestamp(r["at"]).isoformat(sep=" ", timespec="seconds")
    kind = f"{r['endpoint']}{', streamed' if r['stream'] else ''}"
    lines = [
        f"request {r['request_id']}: {ago(r['at'])} ({when})",
        f"  {r['key'] or 'anonymous'} from {r['client'] or '?'} asked for {r['model'] or '(no model)'} ({kind})",
    ]
    if r["strategy"]:
        lines.append(f"  routed by {r['strategy']}")
    if r["cache"]:
        lines.append(f"  cache: {r['cache']}")
    attempts = r["attempts"]
    for n, a in enumerate(attempts, 1):
        head = f"  attempt {n}: {a['backend']} ({a['model']}) at +{duration(a['start_ms'])}: "
        if a["outcome"] == "ok":
            first = f", first byte after {duration(a['ttfb_ms'])}" if a["ttfb_ms"] is not None else ""
            lines.append(f"{head}answered {a['status']}{first}, done in {duration(a['ms'])}")
            continue
        where = "mid-stream, after the answer had begun" if a["mid_stream"] else "before any byte reached the client"
        after = " -> tried the next" if n < len(attempts) else ""
        retry = f" (asked to retry after {a['retry_after']:g} s)" if a["retry_after"] else ""
        lines.append(
            f"{head}{a['outcome']}: {a['reason'] or a['status']}{retry}, {where}, after {duration(a['ms'])}{after}"
        )
    if not attempts:
        lines.append("  no backend was tried" + (" (answered by a plugin)" if r["status"] < 400 else ""))
    outcome = "ok" if r["ok"] else "FAILED"
    answered = f"answered by {r['backend']} ({r['served_model']})" if r["backend"] and r["ok"] else "no answer"
    lines.append(f"  {outcome}: {answered}, status {r['status']} in {duration(r['latency_ms'])}")
    details = []
    if r["ttft_ms"] is not None:
        details.append(f"first token after {duration(r['ttft_ms'])}")
    if r["prompt_tokens"] is not None:
        details.append(f"tokens {r['prompt_tokens']} in, {r['completion_tokens']} out")
    if details:
        lines.append(f"  {', '.join(details)}")
    if r["error"]:
        lines.append(f"  error: {r['error']}")
    if "prompt" in r:
        lines.append(f"  prompt: {_short(str(r['prompt']), 300)}")
    if r.get("completion") is not None:
        lines.append(f"  answer: {_short(r['completion'], 300)}")
    return "\n".join(lines)


def _status(r: dict[str, Any]) -> str:
    return str(r["status"]) if r["ok"] or r["status"] >= 400 else f"{r['status']} broken"


def _tokens(r: dict[str, Any]) -> str:
    return "-" if r["prompt_tokens"] is None else f"{r['prompt_tokens']}+{r['completion_tokens']}"


def _short(text: str | None, limit: int = 60) -> str | None:
    return text if text is None or len(text) <= limit else text[: limit - 3] + "..."
