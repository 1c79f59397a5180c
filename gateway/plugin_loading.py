"""Finding and loading plugins: built-ins, entry points, files and modules, and their options.

Built-in plugins are the modules of the ``plugins`` package that implement a hook:
adding a file there is all it takes (and the docs' test lists them from here).
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import pkgutil
import re
import sys
from collections.abc import Callable, Iterator
from dataclasses import is_dataclass
from functools import cache
from importlib.metadata import entry_points
from pathlib import Path
from types import ModuleType
from typing import Any

import pluggy

from gateway import PROJECT, hookspecs
from gateway.validate import ValidationError, build, did_you_mean

ENTRY_POINT_GROUP = "multiverse.plugins"


@cache
def builtin() -> dict[str, str]:
    """Built-in plugins by name: every module of the ``plugins`` package that implements a hook."""
    import plugins

    found = {}
    for info in pkgutil.iter_modules(plugins.__path__):
        if not info.ispkg and not info.name.startswith("_"):
            module = importlib.import_module(f"plugins.{info.name}")
            if hooks_in(module):
                found[info.name] = module.__name__
    return found


def hook_problem(name: str, exc: pluggy.PluginValidationError) -> str:
    match = re.search(r"unknown hook '(\w+)'", str(exc))
    if match:
        hint = did_you_mean(
            match.group(1), [n for n in dir(hookspecs) if hasattr(getattr(hookspecs, n), f"{PROJECT}_spec")]
        )
        return f"plugins.{name}: unknown hook '{match.group(1)}'{hint}; the hooks are in gateway/hookspecs.py"
    return f"plugins.{name}: {exc}"


def available() -> Iterator[tuple[str, str, ModuleType | Any]]:
    """Built-in plugins and installed entry points (imported, not registered)."""
    for name, module in builtin().items():
        yield name, "built-in", importlib.import_module(module)
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            yield ep.name, f"entry point of {ep.dist.name if ep.dist else '?'}", ep.load()
        except Exception as exc:  # an installed plugin that fails to import is listed, not fatal
            yield ep.name, f"entry point ({type(exc).__name__}: {exc})", None


def hooks_in(obj: Any) -> tuple[str, ...]:
    target = getattr(obj, "Plugin", obj)
    names = {n for n in dir(target) if hasattr(getattr(target, n, None), f"{PROJECT}_impl")}
    return tuple(sorted(names))


def import_plugin(name: str, base_dir: Path) -> tuple[ModuleType | Any, str]:
    where = f"plugins.{name}"
    if name in builtin():
        return importlib.import_module(builtin()[name]), "built-in"
    for ep in entry_points(group=ENTRY_POINT_GROUP, name=name):
        return ep.load(), f"entry point of {ep.dist.name if ep.dist else '?'}"
    if name.endswith(".py") or "/" in name:
        return _import_file(name, base_dir), f"file {_plugin_path(name, base_dir)}"
    try:
        return importlib.import_module(name), "module"
    except ModuleNotFoundError as exc:
        if exc.name is not None and name.startswith(exc.name):
            known = list(builtin()) + [ep.name for ep in entry_points(group=ENTRY_POINT_GROUP)]
            hint = did_you_mean(name, known)
            raise ValidationError(
                [
                    f"{where}: no plugin named '{name}'{hint}; built-in: {', '.join(builtin())}; "
                    "or give a file path (./my_plugin.py), a module path, or install a package "
                    f"with a '{ENTRY_POINT_GROUP}' entry point"
                ]
            ) from None
        raise ValidationError([f"{where}: importing '{name}' failed: {exc}"]) from None


def _plugin_path(name: str, base_dir: Path) -> Path:
    path = Path(name).expanduser()
    return path if path.is_absolute() else base_dir / path


def _import_file(name: str, base_dir: Path) -> ModuleType:
    path = _plugin_path(name, base_dir)
    if not path.is_file():
        raise ValidationError([f"plugins.{name}: no plugin file at {path}"])
    module_name = f"multiverse_plugin_{path.stem}_{abs(hash(str(path.resolve())))}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        sys.modules.pop(module_name, None)
        raise ValidationError(
            [f"plugins.{name}: the file {path} failed to import: {type(exc).__name__}: {exc}"]
        ) from None
    return module


def instantiate(module: ModuleType | Any, name: str, options: dict[str, Any] | None) -> tuple[Any, Any]:
    """(what to register, its parsed options)."""
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
        return (factory(parsed) if parsed is not None else factory()), parsed
    return module, parsed


def config_schema() -> dict[str, Any]:
    """The JSON Schema of gateway.yaml, with the options of every built-in plugin."""
    from gateway.config import schema
    from gateway.validate import json_schema

    out = schema()
    plugins = out["properties"]["plugins"]
    plugins["properties"] = {}
    for name, module_name in builtin().items():
        options = getattr(importlib.import_module(module_name), "Options", None)
        plugins["properties"][name] = json_schema(options) if options else {"type": "null"}
        plugins["properties"][name] = {"anyOf": [plugins["properties"][name], {"type": "null"}]}
    return out
