"""Example: a strategy with options. Send long prompts to one backend, short ones anywhere else.

routing: {strategy: long_prompts}
plugins:
  plugins/examples/long_prompts.py: {backend: lab-gpu-big, min_chars: 2000}
"""

from __future__ import annotations

from dataclasses import dataclass

from gateway import hookimpl


@dataclass(frozen=True)
class Options:
    backend: str  # the name of the backend for long prompts (required)
    min_chars: int = 2000  # a prompt at least this long counts as long


class Plugin:
    def __init__(self, options: Options) -> None:
        self.options = options

    def order(self, candidates, call):  # type: ignore[no-untyped-def]
        is_long = len(call.prompt) >= self.options.min_chars  # the last user message
        big = [b for b in candidates if b.name == self.options.backend]
        rest = [b for b in candidates if b.name != self.options.backend]
        return big + rest if is_long else rest + big  # the big one stays a fallback either way

    @hookimpl
    def register_strategies(self):  # type: ignore[no-untyped-def]
        return {"long_prompts": self.order}
