"""Compact JSON text from one C encoder made once, for values written on every request.

``json.dumps(value, **options)`` builds a ``JSONEncoder`` per call, and ``JSONEncoder.encode`` builds
a C encoder per call and then joins its output; made once, the C encoder does the same work for a
fraction of the cost (json's own fast path, with these settings). Values here are parsed JSON or
tuples of plain values: no cycles to check for.
"""

from __future__ import annotations

import json
import json.encoder
from collections.abc import Callable
from typing import Any


def encoder(sort_keys: bool = False) -> Callable[[Any], str]:
    """A function from a value to its JSON text: no spaces, non-ASCII kept, keys sorted if asked."""
    options = json.JSONEncoder(sort_keys=sort_keys, separators=(",", ":"), ensure_ascii=False, check_circular=False)
    make = json.encoder.c_make_encoder
    if make is None:  # a Python without json's C speedups
        return options.encode
    c_encoder = make(None, options.default, json.encoder.encode_basestring, None, ":", ",", sort_keys, False, True)

    def encode(value: Any) -> str:
        return "".join(c_encoder(value, 0))

    return encode
