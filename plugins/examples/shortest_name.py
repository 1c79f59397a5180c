"""Example: a whole routing strategy in one file.

Enable it in gateway.yaml, then select it:

    routing: {strategy: shortest_name}
    plugins: {plugins/examples/shortest_name.py: {}}
"""

from __future__ import annotations

from gateway import hookimpl


def shortest_name(candidates, call):  # type: ignore[no-untyped-def]
    """Try the backend with the shortest name first, then the next shortest, and so on."""
    return sorted(candidates, key=lambda backend: len(backend.name))


@hookimpl
def register_strategies():  # type: ignore[no-untyped-def]
    return {"shortest_name": shortest_name}
