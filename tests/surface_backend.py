"""A fake server for the endpoints beyond chat: Responses, audio, images, rerank, score, moderations, Messages.

A real aiohttp app on a real port (``start_surface`` in the tests), recording what it saw; its
answers name the server (``by``) so a test can tell which backend answered.
"""

from __future__ import annotations

import email.parser
import email.policy
import json
import uuid
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

SPEECH = b"ID3" + bytes(range(256)) * 64  # what /v1/audio/speech streams back, in 4 KiB pieces


def parse_form(body: bytes, content_type: str) -> dict[str, Any]:
    """A multipart form's fields (files as bytes), parsed the way a mail client would: independently of the gateway."""
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        f"Content-Type: {content_type}\r\n\r\n".encode() + body
    )
    fields: dict[str, Any] = {}
    for part in message.iter_parts():  # type: ignore[attr-defined]
        payload = part.get_payload(decode=True)
        fields[part.get_param("name", header="content-disposition")] = (
            payload if part.get_filename() else payload.decode()
        )
    return fields


@dataclass
class Surface:
    name: str
    model_name: str = ""  # the model name this server answers with ("" : the one asked for)
    fail: int = 0  # answer this many requests with HTTP 500 first
    seen: list[tuple[str, str, dict[str, str], bytes]] = field(default_factory=list)
    responses: dict[str, dict[str, Any]] = field(default_factory=dict)

    def app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/v1/{endpoint:.+}", self.post)
        app.router.add_get("/v1/responses/{id}", self.get_response)
        app.router.add_delete("/v1/responses/{id}", self.delete_response)
        return app

    async def post(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        endpoint = request.match_info["endpoint"]
        self.seen.append(("POST", endpoint, dict(request.headers), body))
        if self.fail:
            self.fail -= 1
            return web.json_response({"error": {"message": "boom", "type": "server_error"}}, status=500)
        if endpoint.startswith("audio/trans"):
            form = parse_form(body, request.headers["Content-Type"])
            size = len(form["file"])
            if form.get("response_format") == "text":
                return web.Response(text=f"heard {size} bytes", content_type="text/plain")
            return web.json_response({"text": f"heard {size} bytes as {form['model']} by {self.name}"})
        data = json.loads(body)
        model = self.model_name or data.get("model")
        if endpoint == "audio/speech":
            return await self.speech(request)
        if endpoint == "responses":
            return await self.respond(request, data, model)
        answers: dict[str, Any] = {
            "images/generations": {"created": 1, "data": [{"b64_json": "aW1n", "revised_prompt": self.name}]},
            "moderations": {
                "id": "modr-1", "model": model,
                "results": [{"flagged": False, "categories": {}, "category_scores": {}}],
            },
            "rerank": {"model": model, "results": [{"index": 1, "relevance_score": 0.9}], "by": self.name},
            "score": {"model": model, "data": [{"index": 0, "score": 0.5}], "by": self.name},
            "messages": {
                "id": "msg_1", "type": "message", "role": "assistant", "model": model,
                "content": [{"type": "text", "text": f"{self.name} speaks Messages"}],
                "stop_reason": "end_turn", "stop_sequence": None, "usage": {"input_tokens": 1, "output_tokens": 2},
            },
            "messages/count_tokens": {"input_tokens": 7},
        }  # fmt: skip
        if endpoint not in answers:
            return web.json_response({"error": {"message": f"no {endpoint} here"}}, status=404)
        return web.json_response(answers[endpoint])

    async def speech(self, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "audio/mpeg"})
        await response.prepare(request)
        for at in range(0, len(SPEECH), 4096):
            await response.write(SPEECH[at : at + 4096])
        await response.write_eof()
        return response

    async def respond(self, request: web.Request, data: dict[str, Any], model: str) -> web.StreamResponse:
        previous = data.get("previous_response_id")
        if previous is not None and previous not in self.responses:
            return web.json_response({"error": {"message": f"response {previous} not found here"}}, status=404)
        rid = f"resp_{uuid.uuid4().hex}"
        text = f"{self.name} answers after {previous}" if previous else f"{self.name} answers"
        answer = {
            "id": rid, "object": "response", "created_at": 1, "model": model, "status": "completed",
            "output": [{"type": "message", "id": "msg_1", "role": "assistant", "status": "completed",
                        "content": [{"type": "output_text", "text": text, "annotations": []}]}],
            "usage": {"input_tokens": 3, "output_tokens": 2, "total_tokens": 5,
                      "input_tokens_details": {"cached_tokens": 0}, "output_tokens_details": {"reasoning_tokens": 0}},
            "parallel_tool_calls": True, "tool_choice": "auto", "tools": [],
        }  # fmt: skip
        self.responses[rid] = answer
        if not data.get("stream"):
            return web.json_response(answer)
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        created = {**answer, "status": "in_progress", "output": []}
        events = [
            ("response.created", {"response": created}),
            ("response.output_text.delta", {"item_id": "msg_1", "output_index": 0, "content_index": 0,
                                            "delta": text, "logprobs": []}),
            ("response.completed", {"response": answer}),
        ]  # fmt: skip
        for number, (kind, payload) in enumerate(events):
            event = {"type": kind, "sequence_number": number, **payload}
            await response.write(f"event: {kind}\ndata: {json.dumps(event)}\n\n".encode())
        await response.write_eof()
        return response

    async def get_response(self, request: web.Request) -> web.Response:
        rid = request.match_info["id"]
        self.seen.append(("GET", f"responses/{rid}", dict(request.headers), b""))
        if rid not in self.responses:
            return web.json_response({"error": {"message": "not found"}}, status=404)
        return web.json_response(self.responses[rid])

    async def delete_response(self, request: web.Request) -> web.Response:
        rid = request.match_info["id"]
        self.seen.append(("DELETE", f"responses/{rid}", dict(request.headers), b""))
        if self.responses.pop(rid, None) is None:
            return web.json_response({"error": {"message": "not found"}}, status=404)
        return web.json_response({"id": rid, "object": "response.deleted", "deleted": True})
