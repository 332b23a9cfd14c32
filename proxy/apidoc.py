"""The API's documentation: `/docs` as Swagger UI served from the assets the swagger-ui-bundle-v2 package ships (so it
works offline), and the OpenAPI schema's entries for the mirrored `/v1` endpoints, which the proxy's own pipeline
serves (they are described here, never routed through FastAPI)."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

from fastapi.openapi.docs import get_swagger_ui_html
from starlette.responses import Response
from swagger_ui_bundle import swagger_ui_path

from .config import STRATEGIES

ASSETS = {
    "swagger-ui-bundle.js": "text/javascript; charset=utf-8",
    "swagger-ui.css": "text/css; charset=utf-8",
    "favicon-32x32.png": "image/png",
}
ASSET_PATH = "/docs/assets/"


def docs_page(title: str) -> Response:
    return get_swagger_ui_html(
        openapi_url="/openapi.json",
        title=title,
        swagger_js_url=ASSET_PATH + "swagger-ui-bundle.js",
        swagger_css_url=ASSET_PATH + "swagger-ui.css",
        swagger_favicon_url=ASSET_PATH + "favicon-32x32.png",
    )


@functools.cache
def _asset(name: str) -> bytes:
    path: Path = swagger_ui_path
    return path.joinpath(name).read_bytes()


def asset(name: str) -> Response | None:
    """One of Swagger UI's packaged files; None for any other name (the caller answers 404)."""
    media_type = ASSETS.get(name)
    if media_type is None:
        return None
    return Response(_asset(name), media_type=media_type, headers={"cache-control": "max-age=86400"})


def _header(name: str, schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"name": name, "in": "header", "required": False, "schema": schema, "description": description}


REQUEST_HEADERS = [
    _header("X-Flex-Tier", {"type": "string", "enum": ["off", "flex"]},
            "off: send this request exactly as it is; flex: force flex whatever the model or client tier"),
    _header("X-Flex-On-Unavailable", {"type": "string", "enum": list(STRATEGIES)},
            "the strategy for this request when flex has no capacity"),
    _header("X-Flex-Deadline-S", {"type": "number", "exclusiveMinimum": 0},
            "how long this client waits for its answer to start (the OpenAI SDKs send x-stainless-read-timeout)"),
    _header("X-Flex-Policy", {"type": "string"}, "a named policy, for clients the policy file allows to choose"),
]  # fmt: skip

ANSWER_HEADERS = {
    "X-Flex-Attempts": ({"type": "integer"}, "upstream attempts made"),
    "X-Flex-Requested-Tier": ({"type": "string"}, "the tier the proxy asked for (none: no tier)"),
    "X-Flex-Served-Tier": ({"type": "string"}, "the tier upstream says served it (streams: from the first event)"),
    "X-Flex-Cost-USD": ({"type": "string"}, "non-streamed answers with a price: what this answer cost"),
    "X-Flex-Saved-USD": (
        {"type": "string"}, "non-streamed answers with a price: what flex saved (negative after a fallback)"
    ),
}  # fmt: skip

STREAM_NOTE = (
    "A priced stream ends with the SSE comment `: x-flex-cost-usd=<USD> x-flex-saved-usd=<USD>` after its last "
    "event (headers leave before the usage is known; SSE clients, the OpenAI SDKs among them, ignore comments)."
)


BODY = {
    "type": "object",
    "required": ["model"],
    "additionalProperties": True,
    "description": "the OpenAI request body; it reaches upstream byte for byte but for service_tier (and, on a "
    "streamed chat request, stream_options.include_usage, whose extra chunk is taken out again on the way back)",
}
ERRORS = {
    "400": "malformed JSON, a bad header value or path",
    "401": "a client key is required",
    "413": "body larger than FLEX_PROXY_MAX_BODY_MB",
    "429": "flex stayed busy for as long as the request could wait, a rate limit, or a spend cap",
    "502": "upstream unreachable, disconnected or cut",
    "504": "no answer in time",
}


def _operation(summary: str, upstream: str) -> dict[str, Any]:
    error = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorEnvelope"}}}
    headers = {name: {"schema": schema, "description": text} for name, (schema, text) in ANSWER_HEADERS.items()}
    ok = {
        "description": "upstream's answer, as it came; a stream is relayed event by event",
        "headers": headers,
        "content": {"application/json": {"schema": {"type": "object"}}, "text/event-stream": {}},
    }
    return {
        "tags": ["OpenAI API (mirrored)"],
        "summary": summary,
        "description": f"Forwarded to `{upstream}` on the upstream API (FLEX_PROXY_UPSTREAM_BASE_URL), with "
        "`service_tier: flex` added where the model supports it, 429s handled by the flex gate, retries and the "
        "standard fallback. Authorization: the client's OpenAI key, or one of FLEX_PROXY_CLIENT_KEYS. "
        + STREAM_NOTE,
        "operationId": "openai_" + upstream.strip("/").replace("/", "_"),
        "parameters": REQUEST_HEADERS,
        "requestBody": {"required": True, "content": {"application/json": {"schema": BODY}}},
        "responses": {"200": ok, **{code: {"description": why, "content": error} for code, why in ERRORS.items()}},
    }


def with_mirrored(schema: dict[str, Any]) -> dict[str, Any]:
    """The control plane's schema plus `POST /v1/chat/completions` and `POST /v1/responses` (documentation only)."""
    paths = schema.setdefault("paths", {})
    paths.setdefault("/v1/chat/completions", {"post": _operation("Create a chat completion", "/chat/completions")})
    paths.setdefault("/v1/responses", {"post": _operation("Create a response", "/responses")})
    return schema
