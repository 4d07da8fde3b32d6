"""GET /openapi.json: the API's OpenAPI 3.1 document, its schemas generated from the protocol
structs.

Invariant: every route the app serves is listed; request and response schemas are the msgspec
structs the routes decode and encode, so the document cannot drift from them.
"""

from __future__ import annotations

from typing import Any

import msgspec

from pyllama4.server import protocol as p

_BODIES = {
    "/v1/chat/completions": (p.ChatCompletionRequest, p.ChatCompletion),
    "/v1/completions": (p.CompletionRequest, p.Completion),
    "/generate": (p.GenerateRequest, None),
    "/tokenize": (p.TokenizeRequest, None),
    "/detokenize": (p.DetokenizeRequest, None),
}
_GETS = (
    "/v1/models",
    "/health",
    "/health_generate",
    "/metrics",
    "/get_model_info",
    "/get_server_info",
)


def openapi_document() -> dict[str, Any]:
    """OpenAPI 3.1 for the endpoints, with request and response schemas from the structs."""
    kinds = [k for pair in _BODIES.values() for k in pair if k is not None]
    kinds += [p.ModelList, p.ErrorResponse]
    (schemas, components) = msgspec.json.schema_components(
        kinds, ref_template="#/components/schemas/{name}"
    )
    by_kind = dict(zip(kinds, schemas, strict=True))
    error = {
        "description": "error",
        "content": {"application/json": {"schema": by_kind[p.ErrorResponse]}},
    }
    paths: dict[str, Any] = {}
    for path, (request, response) in _BODIES.items():
        ok = {"description": "ok"}
        if response is not None:
            ok["content"] = {"application/json": {"schema": by_kind[response]}}
        paths[path] = {
            "post": {
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": by_kind[request]}},
                },
                "responses": {"200": ok, "400": error, "404": error, "413": error, "503": error},
            }
        }
    for path in _GETS:
        ok = {"description": "ok"}
        if path == "/v1/models":
            ok["content"] = {"application/json": {"schema": by_kind[p.ModelList]}}
        paths[path] = {"get": {"responses": {"200": ok}}}
    return {
        "openapi": "3.1.0",
        "info": {"title": "pyllama4", "version": "0.1.0"},
        "paths": paths,
        "components": {"schemas": components},
    }
