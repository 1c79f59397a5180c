"""Finding, configuring and calling plugins.

A plugin is a module (or an object) with ``@hookimpl`` functions. If its module
defines an ``Options`` dataclass, the YAML options are validated into it; if it
defines a ``Plugin`` class, ``Plugin(options)`` is registered instead of the
module, so each gateway gets its own state.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import re
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, is_dataclass
from importlib.metadata import entry_points
from pathlib import Path
from types import ModuleType
from typing import Any

import pluggy

from gateway import PROJECT, hookspecs
from gateway.config import DEFAULT_PLUGINS, ConfigError, GatewayConfig
from gateway.hookspecs import Strategy
from gateway.logs import get_logger
from gateway.validate import ValidationError, build, did_you_mean

BUILTIN = {
    "round_robin": "plugins.round_robin",
    "health": "plugins.health",
    "circuit_breaker": "plugins.circuit_breaker",
    "weighted": "plugins.weighted",
    "least_latency": "plugins.least_latency",
    "least_loaded": "plugins.least_loaded",
    "task_aware": "plugins.task_aware",
}
ENTRY_POINT_GROUP = "multiverse.plugins"
HookFn = Callable[..., Any]


@dataclass(frozen=True)
class PluginInfo:
    name: str
    source: str
    enabled: bool
    hooks: tuple[str, ...]


class Plugins:
    """One PluginManager per gateway, with the hook implementations the request path calls."""

    def __init__(self, config: GatewayConfig) -> None:
        self.pm = pluggy.PluginManager(PROJECT)
        self.pm.add_hookspecs(hookspecs)
        self.sources: dict[str, str] = {}
        problems: list[str] = []
        names = list(DEFAULT_PLUGINS) + [n for n in config.plugins if n not in DEFAULT_PLUGINS]
        for name in names:
            try:
                module, source = _import(name, config.base_dir)
                self.pm.register(_instantiate(module, name, config.plugins.get(name)), name=name)
                self.sources[name] = source
            except ValidationError as exc:
                problems.extend(exc.problems)
            except pluggy.PluginValidationError as exc:
                problems.append(_hook_problem(name, exc))
        if problems:
            raise ConfigError(problems)
        try:
            self.pm.check_pending()
        except pluggy.PluginValidationError as exc:
            raise ConfigError([_hook_problem(str(exc.plugin), exc)]) from None
        self.strategies = self._collect_strategies()
        if config.routing.strategy not in self.strategies:
            hint = did_you_mean(config.routing.strategy, self.strategies)
            raise ConfigError(
                [
                    f"routing.strategy: no strategy named '{config.routing.strategy}'{hint}; "
                    f"available: {', '.join(sorted(self.strategies))} (a plugin that offers it must be "
                    "listed under plugins:)"
                ]
            )
        self.strategy: Strategy = self.strategies[config.routing.strategy]
        self.before_request = self.impls("before_request")
        self.filter_candidates = self.impls("filter_candidates")
        self.request_complete = self.impls("request_complete")
        self.log = get_logger("gateway.plugins")

    def impls(self, hook: str) -> list[tuple[str, HookFn]]:
        """(plugin name, function) for a hook, in the order pluggy would call them."""
        caller = getattr(self.pm.hook, hook)
        return [(impl.plugin_name, impl.function) for impl in reversed(caller.get_hookimpls())]

    def _collect_strategies(self) -> dict[str, Strategy]:
        strategies: dict[str, Strategy] = {}
        owners: dict[str, str] = {}
        for plugin, fn in reversed(self.impls("register_strategies")):  # built-ins first
            for name, strategy in (fn() or {}).items():
                if name in strategies:
                    raise ConfigError([f"plugins.{plugin}: strategy '{name}' is already offered by {owners[name]}"])
                strategies[name], owners[name] = strategy, plugin
        return strategies

    async def call_all(self, hook: str, **kwargs: Any) -> None:
        """Call every implementation in order, awaiting async ones; exceptions propagate."""
        for _, fn in self.impls(hook):
            result = fn(**kwargs)
            if inspect.isawaitable(result):
                await result

    async def call_all_logged(self, impls: list[tuple[str, HookFn]], event: str, **kwargs: Any) -> None:
        """Call every implementation; an exception is logged with the plugin's name and skipped."""
        for plugin, fn in impls:
            try:
                result = fn(**kwargs)
                if result is not None and inspect.isawaitable(result):  # sync observers return None: no check
                    await result
            except Exception:
                self.log.exception(event, plugin=plugin)

    @staticmethod
    async def call_first(impls: list[tuple[str, HookFn]], **kwargs: Any) -> tuple[str, Any] | None:
        """(plugin, result) of the first non-None result, awaiting async implementations."""
        for plugin, fn in impls:
            result = fn(**kwargs)
            if inspect.isawaitable(result):
                result = await result
            if result is not None:
                return plugin, result
        return None

    def describe(self, config: GatewayConfig) -> list[PluginInfo]:
        """Every plugin that could be enabled, and whether it is."""
        hooks_of: dict[str, set[str]] = {}
        for name in self.pm.hook.__dict__:
            for impl in getattr(self.pm.hook, name).get_hookimpls():
                hooks_of.setdefault(impl.plugin_name, set()).add(name)
        infos = [
            PluginInfo(name, self.sources[name], True, tuple(sorted(hooks_of.get(name, ())))) for name in self.sources
        ]
        for name, source, module in available():
            if name not in self.sources:
                infos.append(PluginInfo(name, source, False, _hooks_in(module)))
        return infos


def _hook_problem(name: str, exc: pluggy.PluginValidationError) -> str:
    match = re.search(r"unknown hook '(\w+)'", str(exc))
    if match:
        hint = did_you_mean(
            match.group(1), [n for n in dir(hookspecs) if hasattr(getattr(hookspecs, n), f"{PROJECT}_spec")]
        )
        return f"plugins.{name}: unknown hook '{match.group(1)}'{hint}; the hooks are in gateway/hookspecs.py"
    return f"plugins.{name}: {exc}"


def available() -> Iterator[tuple[str, str, ModuleType | Any]]:
    """Built-in plugins and installed entry points (imported, not registered)."""
    for name, module in BUILTIN.items():
        yield name, "built-in", importlib.import_module(module)
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            yield ep.name, f"entry point of {ep.dist.name if ep.dist else '?'}", ep.load()
        except Exception as exc:  # an installed plugin that fails to import is listed, not fatal
            yield ep.name, f"entry point ({type(exc).__name__}: {exc})", None


def _hooks_in(obj: Any) -> tuple[str, ...]:
    target = getattr(obj, "Plugin", obj)
    names = {n for n in dir(target) if hasattr(getattr(target, n, None), f"{PROJECT}_impl")}
    return tuple(sorted(names))


def _import(name: str, base_dir: Path) -> tuple[ModuleType | Any, str]:
    where = f"plugins.{name}"
    if name in BUILTIN:
        return importlib.import_module(BUILTIN[name]), "built-in"
    for ep in entry_points(group=ENTRY_POINT_GROUP, name=name):
        return ep.load(), f"entry point of {ep.dist.name if ep.dist else '?'}"
    if name.endswith(".py") or "/" in name:
        path = Path(name).expanduser()
        path = path if path.is_absolute() else base_dir / path
        if not path.is_file():
            raise ValidationError([f"{where}: no plugin file at {path}"])
        module_name = f"multiverse_plugin_{path.stem}_{abs(hash(str(path.resolve())))}"
        spec = importlib.util.spec_from_file_location(module_name, path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module
        try:
            spec.loader.exec_module(module)
        except Exception as exc:
            sys.modules.pop(module_name, None)
            raise ValidationError([f"{where}: the file {path} failed to import: {type(exc).__name__}: {exc}"]) from None
        return module, f"file {path}"
    try:
        return importlib.import_module(name), "module"
    except ModuleNotFoundError as exc:
        if exc.name is not None and name.startswith(exc.name):
            known = list(BUILTIN) + [ep.name for ep in entry_points(group=ENTRY_POINT_GROUP)]
            hint = did_you_mean(name, known)
            raise ValidationError(
                [
                    f"{where}: no plugin named '{name}'{hint}; built-in: {', '.join(BUILTIN)}; "
                    "or give a file path (./my_plugin.py), a module path, or install a package "
                    f"with a '{ENTRY_POINT_GROUP}' entry point"
                ]
            ) from None
        raise ValidationError([f"{where}: importing '{name}' failed: {exc}"]) from None


def _instantiate(module: ModuleType | Any, name: str, options: dict[str, Any] | None) -> Any:
    where = f"plugins.{name}"
    options_cls: Any = getattr(module, "Options", None)
    if isinstance(options_cls, type) and is_dataclass(options_cls):
        parsed: Any = build(options_cls, options or {}, where)
    elif options:
        raise ValidationError([f"{where}: this plugin takes no options; remove {', '.join(options)}"])
    else:
        parsed = None
    plugin_cls = getattr(module, "Plugin", None)
    if inspect.isclass(plugin_cls):
        factory: Callable[..., Any] = plugin_cls
        return factory(parsed) if parsed is not None else factory()
    return module


def config_schema() -> dict[str, Any]:
    """The JSON Schema of gateway.yaml, with the options of every built-in plugin."""
    from gateway.config import schema
    from gateway.validate import json_schema

    out = schema()
    plugins = out["properties"]["plugins"]
    plugins["properties"] = {}
    for name, module_name in BUILTIN.items():
        options = getattr(importlib.import_module(module_name), "Options", None)
        plugins["properties"][name] = json_schema(options) if options else {"type": "null"}
        plugins["properties"][name] = {"anyOf": [plugins["properties"][name], {"type": "null"}]}
    return out
