"""The OpenAPI document: every schema resolvable, every problem answer typed, every status documented.

FastAPI's own document is the base; this adds what it cannot know: the problem-details schema of every
error (FastAPI documents its 422 as ``application/json`` ``HTTPValidationError``, which the service
never sends), the answers any route can give (431 for an oversized head, 500), and the JSON mask schema
with its ``RleMask`` in ``components`` (a plain ``model_json_schema()`` leaves ``#/$defs/...`` refs that
resolve nowhere in an OpenAPI document).
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel

from service.problems import PROBLEM_MEDIA_TYPE

PROBLEM_SCHEMA: dict[str, Any] = {
    "title": "Problem",
    "description": "RFC 9457 problem details; branch on `type` (GET it for a description).",
    "type": "object",
    "required": ["type", "title", "status", "detail"],
    "properties": {
        "type": {"type": "string", "description": "e.g. /problems/payload-too-large"},
        "title": {"type": "string"},
        "status": {"type": "integer"},
        "detail": {"type": "string", "description": "for people: what was expected and what came"},
        "request_id": {"type": "string"},
        "errors": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {"field": {"type": "string"}, "message": {"type": "string"}, "got": {}},
            },
        },
    },
    "additionalProperties": True,
}
_PROBLEM_REF = {"$ref": "#/components/schemas/Problem"}

# Answers every operation may give, whatever its route.
_EVERYWHERE: dict[str, str] = {
    "431": "Request line and headers over the byte limit",
    "500": "Unexpected server error (the request id is logged)",
}


def problem_content() -> dict[str, Any]:
    return {PROBLEM_MEDIA_TYPE: {"schema": _PROBLEM_REF}}


def component_schemas(model: type[BaseModel]) -> dict[str, Any]:
    """``model``'s JSON schema and its nested models, with refs into ``#/components/schemas``."""
    schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
    nested = schema.pop("$defs", {})
    return {model.__name__: schema, **nested}


def build_openapi(app: FastAPI, extra_schemas: dict[str, Any]) -> dict[str, Any]:
    spec = get_openapi(
        title=app.title,
        version=app.version,
        summary=app.summary,
        description=app.description,
        routes=app.routes,
    )
    schemas = spec.setdefault("components", {}).setdefault("schemas", {})
    schemas.update(extra_schemas)
    schemas["Problem"] = PROBLEM_SCHEMA
    for operations in spec["paths"].values():
        for operation in operations.values():
            responses = operation.setdefault("responses", {})
            for status, description in _EVERYWHERE.items():
                responses.setdefault(status, {"description": description})
            for status, response in responses.items():
                if status.startswith(("4", "5")):
                    # Every error is a problem document, FastAPI's validation 422 included.
                    response["content"] = problem_content()
    # FastAPI's validation-error schemas are no longer referenced.
    for unused in ("HTTPValidationError", "ValidationError"):
        schemas.pop(unused, None)
    return spec


def install_openapi(app: FastAPI, extra_schemas: dict[str, Any]) -> None:
    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = build_openapi(app, extra_schemas)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
