"""Multiverse Gateway: one OpenAI-compatible URL in front of many student-hosted backends."""

from __future__ import annotations

import pluggy

__version__ = "0.1.0"

PROJECT = "multiverse"
hookimpl = pluggy.HookimplMarker(PROJECT)
"""Decorator that marks a plugin function as a hook implementation."""

__all__ = ["PROJECT", "__version__", "hookimpl"]
