"""GET /openapi.json: the API's OpenAPI 3.1 document, its schemas generated from the protocol
structs.

Invariant: every route the app serves is listed; request and response schemas are the msgspec
structs the routes decode and encode, so the document cannot drift from them.
"""

from __future__ import annotations

from typing import Any

import msgspec

from pyllama4.server import protocol as p
from pyllama4.server.responses_protocol import DeletedResponse, Response, ResponsesRequest

_BODIES = {
    "/v1/chat/completions": (p.ChatCompletionRequest, p.ChatCompletion),
    "/v1/completions": (p.CompletionRequest, p.Completion),
    "/v1/responses": (ResponsesRequest, Response),
    "/generate": (p.GenerateRequest, None),
    "/tokenize": (p.TokenizeRequest, None),
    "/detokenize": (p.DetokenizeRequest, None),
}
# "stream": true
_STREAMS = ("/v1/chat/completions", "/v1/completions", "/v1/responses", "/generate")
_GETS = {
    "/v1/models": "application/json",
    "/health": "application/json",
    "/health_generate": "application/json",
    "/metrics": "text/plain",
    "/get_model_info": "application/json",
    "/get_server_info": "application/json",
}
# One server-sent event (OpenAPI 3.1: a stream's `schema` describes each of its events).
_SSE_EVENT = {
    "type": "object",
    "properties": {"event": {"type": "string"}, "data": {"type": "string"}},
    "required": ["data"],
}
# What each status means; every error has the ErrorResponse body.
_POST_ERRORS = {
    "400": "invalid request",
    "401": "missing or wrong API key",
    "404": "unknown model (or previous_response_id)",
    "408": "request body not received in time",
    "413": "request body too large",
    "499": "client disconnected",
    "500": "generation failed",
    "503": "queue full or engine failed",
}
_GET_ERRORS = {"401": "missing or wrong API key", "500": "internal error", "503": "engine failed"}


def openapi_document() -> dict[str, Any]:
    """OpenAPI 3.1 for the endpoints, with request and response schemas from the structs."""
    kinds = [k for pair in _BODIES.values() for k in pair if k is not None]
    kinds += [p.ModelList, p.ModelCard, p.ErrorResponse, DeletedResponse]
    (schemas, components) = msgspec.json.schema_components(
        kinds, ref_template="#/components/schemas/{name}"
    )
    by_kind = dict(zip(kinds, schemas, strict=True))
    error = by_kind[p.ErrorResponse]
    paths: dict[str, Any] = {}
    for path, (request, response) in _BODIES.items():
        content: dict[str, Any] = {"application/json": {"schema": by_kind.get(response, {})}}
        if path in _STREAMS:
            content["text/event-stream"] = {"schema": _SSE_EVENT}
        paths[path] = {
            "post": {
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": by_kind[request]}},
                },
                "responses": {"200": {"description": "ok", "content": content}}
                | _errors(_POST_ERRORS, error),
            }
        }
    for path, content_type in _GETS.items():
        schema = by_kind[p.ModelList] if path == "/v1/models" else {}
        ok = {"description": "ok", "content": {content_type: {"schema": schema}}}
        paths[path] = {"get": {"responses": {"200": ok} | _errors(_GET_ERRORS, error)}}
    paths["/v1/models/{model}"] = _retrieve_model(by_kind[p.ModelCard], error)
    paths["/v1/responses/{response_id}"] = _stored_response(
        by_kind[Response], by_kind[DeletedResponse], error
    )
    return {
        "openapi": "3.1.0",
        "info": {"title": "pyllama4", "version": "0.1.0"},
        "paths": paths,
        "components": {"schemas": components},
    }


def _retrieve_model(card: dict[str, Any], error: dict[str, Any]) -> dict[str, Any]:
    """GET /v1/models/{model}: the served model's card; another name is a 404."""
    ok = {"description": "ok", "content": {"application/json": {"schema": card}}}
    statuses = {"404": "unknown model"} | _GET_ERRORS
    parameter = {"name": "model", "in": "path", "required": True, "schema": {"type": "string"}}
    return {"get": {"parameters": [parameter], "responses": {"200": ok} | _errors(statuses, error)}}


def _stored_response(
    response: dict[str, Any], deleted: dict[str, Any], error: dict[str, Any]
) -> dict[str, Any]:
    """GET / DELETE /v1/responses/{response_id}: a stored response; an unknown id is a 404."""
    statuses = {"404": "unknown response"} | _GET_ERRORS
    parameter = {
        "name": "response_id",
        "in": "path",
        "required": True,
        "schema": {"type": "string"},
    }

    def operation(schema: dict[str, Any]) -> dict[str, Any]:
        ok = {"description": "ok", "content": {"application/json": {"schema": schema}}}
        return {"parameters": [parameter], "responses": {"200": ok} | _errors(statuses, error)}

    return {"get": operation(response), "delete": operation(deleted)}


def _errors(statuses: dict[str, str], schema: dict[str, Any]) -> dict[str, Any]:
    return {
        status: {"description": why, "content": {"application/json": {"schema": schema}}}
        for status, why in statuses.items()
    }
