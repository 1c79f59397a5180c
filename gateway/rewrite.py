"""What one attempt sends a backend, and what comes back: the model as that backend names it.

A backend may call a model something else than the class does (``aliases`` on the backend, or
per backend in the ``models:`` section). Only that backend's request is rewritten, and its
answer is given the class's name again: a JSON answer's ``model`` field, or a stream's, event by
event, through a chunk filter that exists only for aliased calls.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import TYPE_CHECKING

from gateway.endpoints import MODEL_AT, PASSED_THROUGH

if TYPE_CHECKING:
    from gateway.backend import Backend
    from gateway.call import Call
    from gateway.state import Gateway


def backend_model(gateway: Gateway, backend: Backend, model: str) -> str | None:
    """``backend``'s own name for ``model``, if it has one: its registration's, else the models: section's."""
    own = backend.aliases.get(model) if backend.aliases else None
    if own is None:
        profile = gateway.config.models.get(model)
        own = profile.aliases.get(backend.name) if profile is not None and profile.aliases else None
    return own if own != model else None


def body_for(gateway: Gateway, call: Call, backend: Backend) -> bytes:
    """The body for ``backend``: the call's, with the model renamed if the backend calls it otherwise.

    A form's model (which a fallback or group may change too) is put in the client's bytes as sent.
    """
    own = backend_model(gateway, backend, call.model)
    form_at: tuple[bytes, int, int] | None = call.state.get(MODEL_AT)
    if form_at is not None:
        form, start, end = form_at
        model = (own or call.model).encode()
        return form if form[start:end] == model else form[:start] + model + form[end:]
    if own is None:
        return call.body
    return json.dumps({**call.json, "model": own}, separators=(",", ":")).encode()


def _renamer(own: str, model: str) -> Callable[[bytes], bytes]:
    pattern = re.compile(rb'("model"\s*:\s*)' + re.escape(json.dumps(own).encode()))
    mark = json.dumps(own).encode()
    replacement = rb"\g<1>" + json.dumps(model).encode().replace(b"\\", b"\\\\")

    def rename(chunk: bytes) -> bytes:
        return pattern.sub(replacement, chunk) if mark in chunk else chunk

    return rename


def answer_for(gateway: Gateway, call: Call, backend: Backend, body: bytes) -> bytes:
    """A JSON answer of ``backend``, with the class's model name where the backend put its own."""
    own = backend_model(gateway, backend, call.model)
    return body if own is None else _renamer(own, call.model)(body)


def rename_stream(gateway: Gateway, call: Call, backend: Backend) -> None:
    """Give ``backend``'s streamed answer the class's model name (a chunk filter, for aliased calls only)."""
    own = backend_model(gateway, backend, call.model)
    if own is not None and call.endpoint not in PASSED_THROUGH:  # audio is not JSON: nothing to rename
        call.filter_chunks(_renamer(own, call.model))
