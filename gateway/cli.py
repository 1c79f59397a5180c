"""The ``multiverse`` command."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import sqlite3
import sys
from pathlib import Path
from typing import Any

from gateway import __version__, cli_admin, cli_agent
from gateway.config import ConfigError, GatewayConfig, load, parse

DEFAULT_CONFIG = "gateway.yaml"


def _load(path: str | None) -> GatewayConfig:
    if path is not None:
        return load(path)
    if Path(DEFAULT_CONFIG).exists():
        return load(DEFAULT_CONFIG)
    return parse({})


def _fail(exc: ConfigError, path: str | None) -> int:
    print(f"{path or 'configuration'}: {len(exc.problems)} problem(s):", file=sys.stderr)
    for problem in exc.problems:
        print(f"  - {problem}", file=sys.stderr)
    return 2


def cmd_serve(args: argparse.Namespace) -> int:
    from gateway import logs
    from gateway.server import serve

    try:
        config = _load(args.config)
        server = dataclasses.replace(
            config.server,
            host=args.host or config.server.host,
            port=args.port if args.port is not None else config.server.port,
        )
        base_dir = config.base_dir
        config = dataclasses.replace(config, server=server)
        object.__setattr__(config, "base_dir", base_dir)
        logs.configure(config.logging.level, config.logging.format)
        return serve(config)
    except ConfigError as exc:
        return _fail(exc, args.config)


def cmd_check_config(args: argparse.Namespace) -> int:
    from gateway.plugins import Plugins

    try:
        config = load(args.path)
        Plugins(config)  # imports the named plugins and validates their options
    except ConfigError as exc:
        return _fail(exc, args.path)
    print(f"{args.path}: OK")
    return 0


def cmd_plugins(args: argparse.Namespace) -> int:
    from gateway.plugins import Plugins

    try:
        config = _load(args.config)
        infos = Plugins(config).describe(config)
    except ConfigError as exc:
        return _fail(exc, args.config)
    if args.json:
        print(json.dumps([dataclasses.asdict(i) for i in infos], indent=2))
        return 0
    width = max(len(i.name) for i in infos)
    for info in infos:
        state = "enabled " if info.enabled else "disabled"
        details = [f"hooks: {', '.join(info.hooks) or '-'}"]
        if info.strategies:
            details.append(f"strategies: {', '.join(info.strategies)}")
        if info.options:
            shown = ", ".join(f"{key}={json.dumps(value, default=str)}" for key, value in info.options.items())
            details.append(f"{'options' if info.enabled else 'defaults'}: {shown}")
        print(f"{info.name:<{width}}  {state}  {info.source}")
        for line in details:
            print(f"{'':<{width}}  {line}")
    return 0


def cmd_demo_backend(args: argparse.Namespace) -> int:
    from gateway import demo

    demo.run(args.host, args.port, args.model, args.delay)
    return 0


def cmd_backup(args: argparse.Namespace) -> int:
    from gateway.backup import backup

    try:
        count = backup(_load(args.config), Path(args.path))
    except ConfigError as exc:
        return _fail(exc, args.config)
    except (OSError, sqlite3.Error) as exc:
        print(f"backup failed: {exc}", file=sys.stderr)
        return 1
    print(f"backed up {count} registration(s) to {args.path}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from gateway.backup import export_registrations
    from gateway.private_files import write_private

    try:
        data = asyncio.run(export_registrations(_load(args.config), args.include_secrets))
    except ConfigError as exc:
        return _fail(exc, args.config)
    text = json.dumps(data, indent=2)
    if args.output:
        write_private(Path(args.output), text + "\n")  # with --include-secrets it holds backends' keys
        print(f"exported {len(data['registrations'])} registration(s) to {args.output}", file=sys.stderr)
    else:
        print(text)
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    from gateway.backup import import_registrations

    try:
        data = json.loads(Path(args.path).read_text())
        added, updated = asyncio.run(import_registrations(_load(args.config), data))
    except ConfigError as exc:
        return _fail(exc, args.config)
    except (OSError, ValueError) as exc:
        print(f"import failed: {exc}", file=sys.stderr)
        return 1
    print(f"imported: {added} added, {updated} updated (a running gateway picks them up within a second)")
    return 0


def cmd_route(args: argparse.Namespace) -> int:
    import urllib.error
    import urllib.request

    body = {"model": args.model, "messages": [{"role": "user", "content": args.prompt}]}
    path = "/v1/route/explain" if args.explain else "/v1/chat/completions"
    request = urllib.request.Request(
        args.url.rstrip("/") + path, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=args.timeout) as response:
            answer, headers = json.loads(response.read()), response.headers
    except urllib.error.HTTPError as error:
        print(f"{error.code}: {json.loads(error.read()).get('error', {}).get('message')}", file=sys.stderr)
        return 1
    except (urllib.error.URLError, OSError) as error:
        print(f"cannot reach the gateway at {args.url} ({error}); is it running? (make run)", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(answer, indent=2))
    elif args.explain:
        print(_explain_text(answer))
    else:
        print(answer["choices"][0]["message"]["content"])
        served = f"model {headers['X-Multiverse-Model']}, backend {headers['X-Multiverse-Backend']}"
        print(f"-- {served}, route {headers['X-Multiverse-Route']}, {headers['X-Multiverse-Attempts']} attempt(s)")
    return 0


def _explain_text(e: dict[str, Any]) -> str:
    """The explain answer, for a person."""
    lines = [f"requested model: {e['requested_model']}  ->  {e['model']}"]
    if "task_type" in e:
        lines.append(f"task: {e['task_type']} ({e.get('complexity')}); signals: {', '.join(e['signals']) or '-'}")
    ranking = e.get("plugins", {}).get("model_ranking")
    if ranking:
        lines.append("model ranking: " + ", ".join(f"{r['model']} {r['score']:+.2f}" for r in ranking))
    if e.get("answered_by_plugin"):
        lines.append(f"answered by plugin {e['answered_by_plugin']} without a backend")
    lines.append(f"strategy: {e['strategy']}")
    for step in e["models"]:
        lines.append(f"model {step['model']}: candidates {', '.join(step['candidates']) or 'none'}")
        for removed in step["removed"]:
            lines.append(f"  removed {removed['backend']} by {removed['by']}: {removed['reason']}")
        if step["scores"]:
            lines.append("  scores: " + ", ".join(f"{s['backend']} {s['score']:g}" for s in step["scores"]))
        lines.append(f"  order: {' > '.join(step['order']) or 'nothing can serve'}")
    return "\n".join(lines)


def cmd_schema(_: argparse.Namespace) -> int:
    from gateway.plugins import config_schema

    print(json.dumps(config_schema(), indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="multiverse", description="Multiverse Gateway: one OpenAI-compatible URL for many backends."
    )
    parser.add_argument("--version", action="version", version=f"multiverse {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the gateway")
    serve.add_argument("--config", help=f"config file (default: ./{DEFAULT_CONFIG} if present)")
    serve.add_argument("--host", help="address to bind (overrides server.host)")
    serve.add_argument("--port", type=int, help="port to bind (overrides server.port)")
    serve.set_defaults(func=cmd_serve)

    check = sub.add_parser("check-config", help="validate a config file and its plugins' options")
    check.add_argument("path")
    check.set_defaults(func=cmd_check_config)

    plugins = sub.add_parser("plugins", help="list plugins: where each comes from, enabled or not, its hooks")
    plugins.add_argument("--config", help=f"config file (default: ./{DEFAULT_CONFIG} if present)")
    plugins.add_argument("--json", action="store_true", help="machine-readable output")
    plugins.set_defaults(func=cmd_plugins)

    demo = sub.add_parser("demo-backend", help="start a tiny OpenAI-compatible echo server to try the gateway")
    demo.add_argument("--host", default="127.0.0.1")
    demo.add_argument("--port", type=int, default=9000)
    demo.add_argument("--model", default="echo")
    demo.add_argument("--delay", type=float, default=0.05, help="seconds between streamed words")
    demo.set_defaults(func=cmd_demo_backend)

    backup_cmd = sub.add_parser("backup", help="copy the registry database (safe while the gateway runs)")
    backup_cmd.add_argument("path", help="where to write the copy")
    backup_cmd.add_argument("--config", help=f"config file (default: ./{DEFAULT_CONFIG} if present)")
    backup_cmd.set_defaults(func=cmd_backup)

    export = sub.add_parser("export", help="print the registrations as JSON")
    export.add_argument("--config", help=f"config file (default: ./{DEFAULT_CONFIG} if present)")
    export.add_argument("--output", "-o", help="write to this file instead of standard output")
    export.add_argument("--include-secrets", action="store_true", help="include backends' api_key values")
    export.set_defaults(func=cmd_export)

    import_cmd = sub.add_parser("import", help="add registrations from a `multiverse export` file")
    import_cmd.add_argument("path")
    import_cmd.add_argument("--config", help=f"config file (default: ./{DEFAULT_CONFIG} if present)")
    import_cmd.set_defaults(func=cmd_import)

    route = sub.add_parser("route", help="send a prompt through a running gateway, or --explain how it would route it")
    route.add_argument("prompt")
    route.add_argument("--model", default="auto", help="model name, 'auto' or 'auto:MODEL' (default: auto)")
    route.add_argument("--explain", action="store_true", help="show the routing decision; call no backend")
    route.add_argument("--url", default="http://127.0.0.1:8000", help="the gateway (default: %(default)s)")
    route.add_argument("--json", action="store_true", help="print the raw answer")
    route.add_argument("--timeout", type=float, default=120)
    route.set_defaults(func=cmd_route)

    schema_cmd = sub.add_parser("schema", help="print the JSON Schema of gateway.yaml")
    schema_cmd.set_defaults(func=cmd_schema)
    cli_admin.add_parsers(sub)
    cli_agent.add_parsers(sub)
    return parser


def _add_plugin_commands(parser: argparse.ArgumentParser) -> None:
    """Subcommands of the plugins enabled in ./gateway.yaml (or $MULTIVERSE_CONFIG); none if it has problems."""
    from gateway.plugins import Plugins

    path = os.environ.get("MULTIVERSE_CONFIG")
    try:
        config = _load(path)
        plugins = Plugins(config)
    except ConfigError:
        return  # check-config says what is wrong; the built-in commands still work
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    plugins.add_commands(subparsers)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    _add_plugin_commands(parser)
    args = parser.parse_args(argv)
    return int(args.func(args))
