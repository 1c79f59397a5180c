"""What one attempt sends a backend: the call's body, with the model as that backend must see it."""

from __future__ import annotations

from typing import TYPE_CHECKING

from gateway.endpoints import MODEL_AT

if TYPE_CHECKING:
    from gateway.backend import Backend
    from gateway.call import Call
    from gateway.state import Gateway


def body_for(gateway: Gateway, call: Call, backend: Backend) -> bytes:
    """The body for ``backend``: the call's, or for a form (whose model a fallback or group may change) the
    client's bytes with the model's value replaced."""
    form_at: tuple[bytes, int, int] | None = call.state.get(MODEL_AT)
    if form_at is None:
        return call.body
    form, start, end = form_at
    model = call.model.encode()
    return form if form[start:end] == model else form[:start] + model + form[end:]
