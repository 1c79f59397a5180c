"""A backend that refuses the gateway's own key: a configuration error, not a failing backend.

The client's credentials never reach a backend (``upstream._NOT_FORWARDED``), so a backend's
401 or 403 is about the key the gateway sends, its ``api_key``. The attempt fails over without
counting against the backend, the admin is told once, and the client never sees the provider's
body (OpenAI's 401 quotes part of the key it was sent).

A 401 says the key itself is wrong: the backend leaves routing (``mismatched``) until the
health plugin's probe, which carries the same key, is answered again, or the gateway restarts
with a fixed key. A 403 can be about one request or one model (a provider's moderation, a model
the account may not use), so that backend stays in routing.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from gateway.backend import MISMATCHED
from gateway.upstream import BackendFailed

if TYPE_CHECKING:
    from gateway.call import Attempt
    from gateway.state import Gateway

KEY_REFUSED = "key_refused"
"""The attempt's outcome when the backend refused the gateway's key."""
REFUSING_STATUSES = frozenset({401, 403})
FIX = "check api_key in gateway.yaml and the environment variable it names (e.g. OPENAI_API_KEY)"


def refusal(status: int) -> BackendFailed:
    """The failure of an attempt answered 401 or 403: its body is dropped, never passed on."""
    return BackendFailed(KEY_REFUSED, f"the provider refused the gateway's API key (HTTP {status})")


async def take_out(gateway: Gateway, attempt: Attempt) -> None:
    """Tell the admin once per backend and status; on a 401, take the backend out of routing."""
    backend, status = attempt.backend, attempt.status
    seen = backend.notes.get(KEY_REFUSED)
    first = seen is None or seen["status"] != status or (status == 401 and backend.routable)
    if first:
        backend.notes[KEY_REFUSED] = {"status": status, "since": time.time()}
        gateway.log.error(
            "backend_key_refused",
            backend=backend.name,
            status=status,
            detail=f"backend {backend.name}: the provider refused the gateway's key (HTTP {status}); {FIX}",
        )
    if status == 401 and backend.routable:
        await gateway.registry.set_status(backend, MISMATCHED, f"the provider refused its api_key (HTTP 401); {FIX}")
