"""The server's OpenAPI document: FastAPI's routes plus the request body of each POST route
(the handlers parse bodies themselves, so FastAPI cannot see them) and OpenAI's error shape.

    GET /openapi.json                     # what `openai`-style clients and schema fuzzers read

What this module does not know: how requests are handled.
"""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic.json_schema import models_json_schema

from fastserve.server import protocol as p

_BODIES = {
    m.__name__: m
    for m in (p.CompletionRequest, p.ChatCompletionRequest, p.TokenizeRequest, p.DetokenizeRequest)
}
_REF = "#/components/schemas/{model}"


def openapi_schema(app: FastAPI) -> dict:
    if app.openapi_schema is not None:
        return app.openapi_schema
    doc = get_openapi(title=app.title, version=app.version, routes=app.routes)
    models = [(m, "validation") for m in _BODIES.values()] + [(p.ErrorResponse, "serialization")]
    refs, defs = models_json_schema(models, ref_template=_REF)
    schemas = doc.setdefault("components", {}).setdefault("schemas", {})
    schemas.update(defs.get("$defs", {}))
    error = {
        "description": "OpenAI's error object",
        "content": {"application/json": {"schema": refs[(p.ErrorResponse, "serialization")]}},
    }
    for path in doc["paths"].values():
        for op in path.values():
            name = op.pop("x-body", None)
            if name is not None:
                schema = refs[(_BODIES[name], "validation")]
                op["requestBody"] = {
                    "required": True,
                    "content": {"application/json": {"schema": schema}},
                }
                op["responses"]["400"] = error
            op["responses"]["default"] = error
    app.openapi_schema = doc
    return doc
