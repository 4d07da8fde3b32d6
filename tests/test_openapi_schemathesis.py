"""The OpenAPI document against a live demo server: schemathesis generates requests from
/openapi.json (a few per operation; output budgets capped so generation stays short) and every
answer must be no 5xx, a documented status, a documented content type and a body that conforms
to the documented schema. The document itself states the ranges the server enforces."""

from __future__ import annotations

from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)

from pyllama4.server.openapi import openapi_document

BUDGET = 4  # output tokens per completion, at most
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]


def capped(body: Any) -> Any:
    """The body for the served model, with at most BUDGET output tokens and 2 completions."""
    if isinstance(body, dict):
        if isinstance(body.get("model"), str):
            body["model"] = "demo"  # the served model: other names are a plain 404
        if "input" in body:  # a Responses request
            cap(body, "max_output_tokens")
        else:
            cap(body, "max_tokens", "max_completion_tokens")
        if isinstance(body.get("sampling_params"), dict):
            cap(body["sampling_params"], "max_new_tokens")
    return body


def cap(fields: dict[str, Any], budget: str, *others: str) -> None:
    """Caps the integer budget fields and n; an unset `budget` becomes BUDGET."""
    for name in (budget, *others):
        if isinstance(fields.get(name), int):
            fields[name] = min(fields[name], BUDGET)
    if fields.get(budget) is None and all(fields.get(name) is None for name in others):
        fields[budget] = BUDGET
    if isinstance(fields.get("n"), int):
        fields["n"] = min(fields["n"], 2)


@pytest.fixture(scope="module")
def api(launch_server, tmp_path_factory):
    log = tmp_path_factory.mktemp("schemathesis") / "server.log"
    live = launch_server(log, "--tool-call-parser", "pythonic", context_length=128)
    schema = schemathesis.openapi.from_url(live.base + "/openapi.json")

    @schema.hook
    def map_body(context: Any, body: Any) -> Any:
        return capped(body)

    yield schema
    live.stop()


# schemathesis.pytest.from_fixture fails on this pytest ("'Function' object has no attribute
# '_nodeid'"), so each operation's strategy runs under hypothesis here.
def test_the_server_keeps_to_its_openapi_document(api):
    operations = [result.ok() for result in api.get_all_operations()]
    assert len(operations) == 15  # every route but /openapi.json itself
    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(max_examples=8, deadline=None, suppress_health_check=list(HealthCheck))
        def check(case: Any) -> None:
            case.call_and_validate(checks=CHECKS, timeout=120)

        check()


def test_the_document_states_ranges_required_fields_streams_and_errors():
    doc = openapi_document()
    schemas = doc["components"]["schemas"]
    chat = schemas["ChatCompletionRequest"]
    assert set(chat["required"]) == {"model", "messages"}
    temperature = chat["properties"]["temperature"]["anyOf"][0]
    assert (temperature["minimum"], temperature["maximum"]) == (0.0, 2.0)
    assert chat["properties"]["n"]["minimum"] == 1
    assert chat["properties"]["max_tokens"]["anyOf"][0]["minimum"] == 1
    ids = schemas["DetokenizeRequest"]["properties"]["tokens"]["items"]
    assert (ids["minimum"], ids["maximum"]) == (0, 2**31 - 1)
    for path in ("/v1/chat/completions", "/v1/completions", "/generate"):
        responses = doc["paths"][path]["post"]["responses"]
        assert "text/event-stream" in responses["200"]["content"]
        for status in ("400", "401", "404", "413", "500", "503"):
            error = responses[status]["content"]["application/json"]["schema"]
            assert error == {"$ref": "#/components/schemas/ErrorResponse"}
