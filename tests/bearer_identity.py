"""A test authenticate plugin: ``Authorization: Bearer <name>`` becomes ``Identity(key_id="k-<name>", name)``.

Options: ``budgets`` (name -> budget) and ``admins`` (names with role admin). Stands in for the
``auth`` plugin, whose identities have the same shape.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from gateway import hookimpl
from gateway.identity import Identity


@dataclass(frozen=True)
class Options:
    budgets: dict[str, float] = field(default_factory=dict)
    admins: list[str] = field(default_factory=list)


class Plugin:
    def __init__(self, options: Options) -> None:
        self.options = options

    @hookimpl
    def authenticate(self, request: Any) -> Identity | None:
        name = request.headers.get("Authorization", "").removeprefix("Bearer ").strip()
        if not name or name == "anonymous":
            return None
        role = "admin" if name in self.options.admins else "user"
        return Identity(key_id=f"k-{name}", name=name, role=role, budget=self.options.budgets.get(name))
