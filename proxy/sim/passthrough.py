"""Endpoints the proxy only forwards: models, embeddings, stored responses, files, an echo for the rest."""

from __future__ import annotations

import base64
import email.parser
import email.policy
import hashlib
import struct
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from . import errors
from .http import admit, close, json_response
from .options import Canned, matches
from .payloads import new_id
from .simulator import RecordedRequest, Simulator

# Concrete ids for GET /v1/models; the list shows those the options' known_models patterns accept.
CATALOG = (
    "o3", "o3-2025-04-16", "o4-mini", "o4-mini-2025-04-16", "gpt-5", "gpt-5-mini", "gpt-5-nano",
    "gpt-5.4", "gpt-5.4-mini", "gpt-4o", "gpt-4o-mini", "gpt-4.1", "text-embedding-3-small",
    "text-embedding-3-large",
)  # fmt: skip
_EMBEDDING_DIMENSIONS = 16

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class PassThroughEndpoints:
    """Handlers of the /v1 endpoints that have no flex behaviour."""

    def __init__(self, sim: Simulator) -> None:
        self.sim = sim

    def routes(self) -> list[web.RouteDef]:
        # The catch-all comes last: aiohttp tries routes in the order they were added.
        return [
            web.get("/v1/models", self.list_models),
            web.get("/v1/models/{model}", self.get_model),
            web.post("/v1/embeddings", self.embeddings),
            web.get("/v1/responses/{response_id}", self.get_response),
            web.post("/v1/files", self.upload_file),
            web.get("/v1/files/{file_id}/content", self.file_content),
            web.route("*", "/v1/{tail:.*}", self.echo),
            web.route("*", "/{tail:.*}", self.outside),
        ]

    @web.middleware
    async def canned(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Middleware: a path given a `Canned` answer gets it, whatever the method; HEAD without the body."""
        canned = self.sim.canned(request.rel_url.raw_path)
        if canned is None:
            return await handler(request)
        admitted = await self._admit(request, "canned")
        if isinstance(admitted, web.Response):
            return admitted
        return await self._send_canned(request, admitted, canned)

    async def _send_canned(self, request: web.Request, recorded: RecordedRequest, canned: Canned) -> web.StreamResponse:
        response = web.StreamResponse(status=canned.status, headers=list(canned.headers))
        response.content_length = len(canned.body)
        await response.prepare(request)
        if request.method == "HEAD":
            return response
        if canned.cut_at is not None:
            await response.write(canned.body[: canned.cut_at])
            return close(request, self.sim, recorded)
        await response.write(canned.body)
        return response

    async def outside(self, request: web.Request) -> web.Response:
        """Anything outside /v1 is recorded (outcome `outside_v1`, counted) and refused, as OpenAI would."""
        admitted = await self._admit(request, "outside_v1")
        if isinstance(admitted, web.Response):
            return admitted
        self.sim.count("outside_v1")
        return json_response(
            404, errors.envelope(f"Invalid URL ({request.method} {admitted.path})", "invalid_request_error")
        )

    async def _admit(self, request: web.Request, outcome: str) -> RecordedRequest | web.Response:
        admitted = await admit(self.sim, request)
        if isinstance(admitted, RecordedRequest):
            admitted.outcome = outcome
        return admitted

    async def list_models(self, request: web.Request) -> web.Response:
        admitted = await self._admit(request, "models")
        if isinstance(admitted, web.Response):
            return admitted
        known = self.sim.options.known_models
        data = [_model(model) for model in CATALOG if matches(model, known)]
        return json_response(200, {"object": "list", "data": data})

    async def get_model(self, request: web.Request) -> web.Response:
        admitted = await self._admit(request, "models")
        if isinstance(admitted, web.Response):
            return admitted
        model = request.match_info["model"]
        if not matches(model, self.sim.options.known_models):
            return json_response(404, errors.model_not_found(model))
        return json_response(200, _model(model))

    async def embeddings(self, request: web.Request) -> web.Response:
        admitted = await self._admit(request, "embeddings")
        if isinstance(admitted, web.Response):
            return admitted
        body = admitted.json
        if not isinstance(body, dict) or "input" not in body:
            return json_response(400, errors.invalid_json())
        model = admitted.model or ""
        if not matches(model, self.sim.options.known_models):
            return json_response(404, errors.model_not_found(model))
        inputs = body["input"] if isinstance(body["input"], list) else [body["input"]]
        # A list of ints is one tokenised input, not many inputs.
        if inputs and all(isinstance(item, int) for item in inputs):
            inputs = [inputs]
        dimensions = body.get("dimensions")
        size = dimensions if isinstance(dimensions, int) and 0 < dimensions <= 4096 else _EMBEDDING_DIMENSIONS
        as_base64 = body.get("encoding_format") == "base64"
        data = [
            {"object": "embedding", "index": index, "embedding": _vector(str(item), size, as_base64)}
            for index, item in enumerate(inputs)
        ]
        tokens = sum(max(1, len(str(item)) // 4) for item in inputs)
        usage = {"prompt_tokens": tokens, "total_tokens": tokens}
        return json_response(200, {"object": "list", "data": data, "model": model, "usage": usage})

    async def get_response(self, request: web.Request) -> web.Response:
        admitted = await self._admit(request, "retrieve_response")
        if isinstance(admitted, web.Response):
            return admitted
        response_id = request.match_info["response_id"]
        stored = self.sim.stored_response(response_id)
        if stored is None:
            return json_response(404, errors.not_found(f"Response with id '{response_id}'"))
        return json_response(200, stored)

    async def upload_file(self, request: web.Request) -> web.Response:
        admitted = await self._admit(request, "upload_file")
        if isinstance(admitted, web.Response):
            return admitted
        fields = _multipart(admitted.headers.get("content-type", ""), admitted.body)
        if fields is None or "file" not in fields:
            return json_response(
                400,
                errors.envelope("Expected a multipart body with a 'file' part.", "invalid_request_error", param="file"),
            )
        filename, content = fields["file"]
        meta = {
            "id": new_id("file-"),
            "object": "file",
            "bytes": len(content),
            "created_at": int(time.time()),
            "filename": filename or "upload",
            "purpose": fields.get("purpose", (None, b"user_data"))[1].decode(errors="replace"),
            "status": "processed",
            "expires_at": None,
            "status_details": None,
        }
        self.sim.store_file(meta, content)
        return json_response(200, meta)

    async def file_content(self, request: web.Request) -> web.Response:
        admitted = await self._admit(request, "file_content")
        if isinstance(admitted, web.Response):
            return admitted
        file_id = request.match_info["file_id"]
        stored = self.sim.stored_file(file_id)
        if stored is None:
            return json_response(404, errors.not_found(f"File with id '{file_id}'"))
        return web.Response(body=stored[1], content_type="application/octet-stream")

    async def echo(self, request: web.Request) -> web.Response:
        """Answer any other /v1 request with what arrived, so forwarding can be checked end to end."""
        admitted = await self._admit(request, "echo")
        if isinstance(admitted, web.Response):
            return admitted
        summary = admitted.summary()
        if "authorization" not in summary["headers"]:
            summary["headers"]["authorization"] = "absent"
        keys = ("method", "path", "query", "body_bytes", "headers")
        return json_response(200, {"echo": {key: summary[key] for key in keys}})


def _model(model: str) -> dict[str, Any]:
    return {"id": model, "object": "model", "created": 1_700_000_000, "owned_by": "system"}


def _vector(text: str, size: int, as_base64: bool) -> list[float] | str:
    """A deterministic unit vector for `text`; base64 is little-endian float32, as the SDK decodes it."""
    raw = hashlib.shake_128(text.encode()).digest(size * 2)
    values = [int.from_bytes(raw[i : i + 2], "big") / 32768.0 - 1.0 for i in range(0, size * 2, 2)]
    norm = sum(v * v for v in values) ** 0.5 or 1.0
    values = [v / norm for v in values]
    if as_base64:
        return base64.b64encode(struct.pack(f"<{size}f", *values)).decode()
    return values


def _multipart(content_type: str, body: bytes) -> dict[str, tuple[str | None, bytes]] | None:
    """The parts of a multipart/form-data body as name → (filename, content); None if it is not one.

    The stdlib parser reads the already recorded bytes, which aiohttp's reader cannot.
    """
    if not content_type.startswith("multipart/form-data"):
        return None
    head = f"Content-Type: {content_type}\r\nMIME-Version: 1.0\r\n\r\n".encode()
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(head + body)
    if not message.is_multipart():
        return None
    fields: dict[str, tuple[str | None, bytes]] = {}
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        payload = part.get_payload(decode=True)
        if isinstance(name, str) and isinstance(payload, bytes):
            fields[name] = (part.get_filename(), payload)
    return fields
