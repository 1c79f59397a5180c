"""Finding, configuring and calling plugins.

A plugin is a module (or an object) with ``@hookimpl`` functions. If its module
defines an ``Options`` dataclass, the YAML options are validated into it; if it
defines a ``Plugin`` class, ``Plugin(options)`` is registered instead of the
module, so each gateway gets its own state. Built-in plugins are the modules of the
``plugins`` package that implement a hook: adding a file there is all it takes.

Implementations are called in the order ``gateway.yaml`` lists their plugins
(``tryfirst`` before, ``trylast`` after), each with only the arguments it declares.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import importlib
import inspect
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, is_dataclass
from pathlib import Path
from types import CoroutineType, GeneratorType
from typing import Any

import pluggy

from gateway import PROJECT, hookspecs
from gateway.config import DEFAULT_PLUGINS, ConfigError, GatewayConfig
from gateway.errors import GatewayError
from gateway.hookspecs import Strategy
from gateway.logs import get_logger
from gateway.plugin_loading import (
    ENTRY_POINT_GROUP,
    available,
    builtin,
    config_schema,
    hook_problem,
    hooks_in,
    import_plugin,
    instantiate,
)
from gateway.validate import ValidationError, did_you_mean

__all__ = ["ENTRY_POINT_GROUP", "PluginInfo", "Plugins", "available", "builtin", "config_schema"]

HookFn = Callable[..., Any]

_PLAIN: set[type] = set()
"""Types a hook returned that are not awaitable: most hooks return one or two kinds of value."""


def awaitable(result: object) -> bool:
    """``inspect.isawaitable``, quick for a coroutine and for a type seen before: the check behind it
    (``collections.abc.Awaitable``) costs ~1 µs a call, and an ``authenticate`` hook's identity meets it
    on every request."""
    kind = type(result)
    if kind is CoroutineType:
        return True
    if kind in _PLAIN:
        return False
    if inspect.isawaitable(result):
        return True
    if kind is not GeneratorType and len(_PLAIN) < 1024:  # a generator's answer depends on its code
        _PLAIN.add(kind)
    return False


Impls = list[tuple[str, HookFn]]
"""(plugin name, function taking the hook's arguments positionally, in the spec's order)."""


@dataclass(frozen=True)
class PluginInfo:
    name: str
    source: str
    enabled: bool
    hooks: tuple[str, ...]
    strategies: tuple[str, ...] = ()
    options: dict[str, Any] | None = None


class Plugins:
    """One PluginManager per gateway, with the hook implementations the request path calls."""

    def __init__(self, config: GatewayConfig) -> None:
        self.pm = pluggy.PluginManager(PROJECT)
        self.pm.add_hookspecs(hookspecs)
        self.sources: dict[str, str] = {}
        self.options: dict[str, Any] = {}
        self.log = get_logger("gateway.plugins")
        order = list(DEFAULT_PLUGINS) + [n for n in config.plugins if n not in DEFAULT_PLUGINS]
        problems: list[str] = []
        for name in order:
            problems += self._add(name, config.plugins.get(name), config.base_dir)
        if problems:
            raise ConfigError(problems)
        try:
            self.pm.check_pending()
        except pluggy.PluginValidationError as exc:
            raise ConfigError([hook_problem(str(exc.plugin), exc)]) from None
        self.order = {name: i for i, name in enumerate(self.sources)}
        self.strategies, self.owners = self._collect_strategies()
        wanted = config.routing.strategy
        if wanted not in self.strategies and self._enable_offering(wanted, config.base_dir):
            self.strategies, self.owners = self._collect_strategies()
        if wanted not in self.strategies:
            hint = did_you_mean(wanted, self.strategies)
            raise ConfigError(
                [
                    f"routing.strategy: no strategy named '{wanted}'{hint}; available: "
                    f"{', '.join(sorted(self.strategies))} (a plugin that offers it must be listed under plugins:)"
                ]
            )
        self.strategy: Strategy = self.strategies[wanted]
        self.strategy_owner = self.owners[wanted]
        self.authenticate = self.impls("authenticate")
        self.before_request = self.impls("before_request")
        self.answer_request = self.impls("answer_request")
        self.filters = self.impls("filter_candidates")
        self.request_complete = self.impls("request_complete")
        self._ready: dict[str, Impls] = {}  # from here on the plugins are fixed: each hook's list is worked out once

    def _add(self, name: str, options: dict[str, Any] | None, base_dir: Path) -> list[str]:
        try:
            module, source = import_plugin(name, base_dir)
            plugin, parsed = instantiate(module, name, options)
            self.pm.register(plugin, name=name)
        except ValidationError as exc:
            return exc.problems
        except pluggy.PluginValidationError as exc:
            return [hook_problem(name, exc)]
        wrappers = [hook for hook, impl in self._impls_of(name) if impl.hookwrapper or impl.wrapper]
        if wrappers:
            self.pm.unregister(name=name)
            return [
                f"plugins.{name}: {', '.join(wrappers)} is a wrapper (wrapper=True or hookwrapper=True), "
                "which the gateway cannot call; make it a plain @hookimpl"
            ]
        self.sources[name] = source
        self.options[name] = parsed
        return []

    def _impls_of(self, name: str) -> Iterator[tuple[str, pluggy.HookImpl]]:
        for hook_name in dir(self.pm.hook):
            caller = getattr(self.pm.hook, hook_name)
            if isinstance(caller, pluggy.HookCaller):
                for impl in caller.get_hookimpls():
                    if impl.plugin_name == name:
                        yield hook_name, impl

    def _enable_offering(self, strategy: str, base_dir: Path) -> bool:
        """Enable the built-in plugin that offers ``strategy``, with its default options, if one does."""
        for name in builtin():
            if name in self.sources:
                continue
            module = importlib.import_module(builtin()[name])
            try:
                plugin, _ = instantiate(module, name, None)
            except ValidationError:
                continue  # it needs options: it must be listed
            offers = getattr(plugin, "register_strategies", None)
            if offers is not None and strategy in (offers() or {}) and not self._add(name, None, base_dir):
                self.order[name] = len(self.order)
                self.log.info("plugin_enabled_for_strategy", plugin=name, strategy=strategy)
                return True
        return False

    def impls(self, hook: str) -> Impls:
        """(plugin name, function) for a hook in calling order; each function takes the spec's arguments."""
        ready: dict[str, Impls] | None = getattr(self, "_ready", None)
        if ready is not None and hook in ready:
            return ready[hook]
        caller = getattr(self.pm.hook, hook)
        spec = tuple(caller.spec.argnames) if caller.spec else ()
        found = sorted(
            caller.get_hookimpls(),
            key=lambda i: (0 if i.tryfirst else 2 if i.trylast else 1, self.order.get(i.plugin_name, 0)),
        )
        impls = [(impl.plugin_name, _adapt(impl.function, tuple(impl.argnames), spec)) for impl in found]
        if ready is not None:
            ready[hook] = impls
        return impls

    def _collect_strategies(self) -> tuple[dict[str, Strategy], dict[str, str]]:
        strategies: dict[str, Strategy] = {}
        owners: dict[str, str] = {}
        offering = sorted(self.impls("register_strategies"), key=lambda impl: self.order.get(impl[0], 0))
        for plugin, fn in offering:  # in gateway.yaml's order, so the later plugin is the one refused
            for name, strategy in (fn() or {}).items():
                if name in strategies:
                    raise ConfigError([f"plugins.{plugin}: strategy '{name}' is already offered by {owners[name]}"])
                strategies[name], owners[name] = strategy, plugin
        return strategies, owners

    async def call_all(self, hook: str, *args: Any) -> None:
        """Call every implementation in order, awaiting async ones; exceptions propagate."""
        for _, fn in self.impls(hook):
            result = fn(*args)
            if awaitable(result):
                await result

    async def call_logged(self, impls: Impls, event: str, *args: Any, timeout: float | None = None) -> None:
        """Call every implementation; an exception is logged with the plugin's name and skipped, and so is an async
        one that takes longer than ``timeout`` seconds (then cancelled)."""
        for plugin, fn in impls:
            try:
                result = fn(*args)
                if result is not None and awaitable(result):  # sync observers return None: no check
                    async with asyncio.timeout(timeout):
                        await result
            except TimeoutError:
                self.log.error(event, plugin=plugin, reason=f"gave up after {timeout:g} s")
            except Exception:
                self.log.exception(event, plugin=plugin)

    async def call_refusable(self, impls: Impls, event: str, *args: Any) -> None:
        """Call every implementation; a ``GatewayError`` (a refusal) propagates, other exceptions are logged."""
        for plugin, fn in impls:
            try:
                result = fn(*args)
                if result is not None and awaitable(result):
                    await result
            except GatewayError:
                raise
            except Exception:
                self.log.exception(event, plugin=plugin)

    def call_sync_logged(self, hook: str, event: str, *args: Any) -> None:
        for plugin, fn in self.impls(hook):
            try:
                fn(*args)
            except Exception:
                self.log.exception(event, plugin=plugin)

    @staticmethod
    async def call_first(impls: Impls, *args: Any) -> tuple[str, Any] | None:
        """(plugin, result) of the first non-None result, awaiting async implementations."""
        answered = Plugins.first(impls, *args)
        if answered is not None and not isinstance(answered, tuple):
            answered = await answered
        return answered

    @staticmethod
    def first(impls: Impls, *args: Any) -> tuple[str, Any] | Awaitable[tuple[str, Any] | None] | None:
        """``call_first`` without a coroutine while the implementations answer synchronously (a request's
        usual case): (plugin, result) or None; once one answers with an awaitable, an awaitable of those.
        Callers tell the two apart with ``isinstance(answered, tuple)``."""
        for index, (plugin, fn) in enumerate(impls):
            result = fn(*args)
            if result is not None and awaitable(result):
                return _first_after(impls, index, result, args)
            if result is not None:
                return plugin, result
        return None

    def pipe(self, hook: str, value: Any, *args: Any) -> Any:
        """Pass ``value`` through every implementation in turn (the last argument); None keeps it."""
        for plugin, fn in self.impls(hook):
            try:
                changed = fn(*args, value)
            except Exception:
                self.log.exception(f"{hook}_failed", plugin=plugin)
                continue
            value = value if changed is None else changed
        return value

    def add_commands(self, subparsers: argparse._SubParsersAction[Any]) -> None:
        for _, fn in self.impls("register_commands"):
            fn(subparsers)

    def describe(self, config: GatewayConfig) -> list[PluginInfo]:
        """Every plugin that could be enabled, whether it is, its strategies and effective options."""
        offered: dict[str, list[str]] = {}
        for strategy, owner in self.owners.items():
            offered.setdefault(owner, []).append(strategy)
        infos = [
            PluginInfo(
                name,
                self.sources[name],
                True,
                tuple(sorted(h for h, _ in self._impls_of(name))),
                tuple(sorted(offered.get(name, ()))),
                _as_dict(self.options.get(name)),
            )
            for name in self.sources
        ]
        for name, source, module in available():
            if name in self.sources:
                continue
            try:
                plugin, parsed = instantiate(module, name, None)
                offers = getattr(plugin, "register_strategies", None)
                strategies = tuple(sorted((offers() if offers else None) or {}))
            except Exception:  # needs options, or fails: listed, not described
                parsed, strategies = None, ()
            infos.append(PluginInfo(name, source, False, hooks_in(module), strategies, _as_dict(parsed)))
        return infos


async def _first_after(
    impls: Impls, index: int, pending: Awaitable[Any], args: tuple[Any, ...]
) -> tuple[str, Any] | None:
    """The rest of ``Plugins.first`` once ``impls[index]`` answered with ``pending``: await it, go on if None."""
    result = await pending
    if result is not None:
        return impls[index][0], result
    return await Plugins.call_first(impls[index + 1 :], *args)


def _adapt(fn: HookFn, argnames: tuple[str, ...], spec: tuple[str, ...]) -> HookFn:
    """``fn`` called with the spec's arguments positionally, though it declares only some of them."""
    if argnames == spec:
        return fn
    picks = tuple(spec.index(name) for name in argnames)
    if not picks:
        return lambda *_: fn()
    if len(picks) == 1:
        (only,) = picks
        return lambda *args: fn(args[only])
    return lambda *args: fn(*[args[i] for i in picks])


def _as_dict(options: Any) -> dict[str, Any] | None:
    if options is None or not is_dataclass(options) or isinstance(options, type):
        return None
    return dataclasses.asdict(options)
