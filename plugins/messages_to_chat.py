"""messages_to_chat: Anthropic's Messages API for models whose backends speak only chat completions.

When no backend of the model declares ``messages`` in its ``endpoints``, a ``POST /v1/messages``
is translated to a chat completion, relayed (routing, failover, limits and usage as for chat),
and its answer translated back: JSON, or the stream event by event (``message_start``,
``content_block_start`` / ``_delta`` / ``_stop``, ``message_delta``, ``message_stop``). Text,
tool use, thinking (``reasoning_content``), stop reasons and usage are carried over.
``/v1/messages/count_tokens`` is answered here, as an estimate (4 characters a token).
Backends that speak Messages themselves still get the request byte for byte.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

from aiohttp import web

from gateway import hookimpl, relay
from gateway.endpoints import serves
from plugins._anthropic import StreamTranslator, to_chat, to_message

if TYPE_CHECKING:
    from gateway.call import Call

CHARS_PER_TOKEN = 4


class Plugin:
    @hookimpl
    async def answer_request(self, call: Call) -> web.StreamResponse | None:
        if call.endpoint not in ("messages", "messages/count_tokens"):
            return None
        gateway = call.gateway
        if any(serves(b, call.endpoint) for b in gateway.registry.for_model(call.model)):
            return None  # a backend speaks Messages itself: relayed as sent
        if call.endpoint == "messages/count_tokens":
            counted = {k: call.json.get(k) for k in ("system", "messages", "tools")}
            size = len(json.dumps(counted, separators=(",", ":")))
            return web.json_response({"input_tokens": -(-size // CHARS_PER_TOKEN)})
        model = call.requested_model
        call.tags["translated"] = "messages_to_chat"
        call.endpoint = "chat/completions"
        call.replace_json(to_chat(call.json))
        if call.stream:
            call.filter_chunks(StreamTranslator(model).feed)
            return await relay.relay(gateway, call)
        answer = await relay.relay(gateway, call)
        if answer.status != 200 or not isinstance(answer, web.Response) or not isinstance(answer.body, bytes):
            return answer  # an error: the handler puts it in Anthropic's shape
        message = to_message(json.loads(answer.body), model)
        headers = {k: v for k, v in answer.headers.items() if k.lower() not in ("content-length", "content-type")}
        return web.json_response(message, headers=headers)
