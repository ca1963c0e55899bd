"""The server's OpenAPI document: FastAPI's routes plus the request body of each POST route
(the handlers parse bodies themselves, so FastAPI cannot see them) with every field's bounds,
those of the served model included (vocabulary, context, model name), and OpenAI's error shape.

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
    server = app.state.server
    bounds = {
        "vocab": server.llm.model.config.vocab_size,
        "context": server.llm.max_model_len,
        "model": server.model_name,
    }
    schemas.update(_fill_bounds(defs.get("$defs", {}), bounds))
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


def _fill_bounds(node, bounds: dict):
    """Replace each `x-bound` marker (protocol._doc) by the served model's value."""
    if isinstance(node, list):
        return [_fill_bounds(v, bounds) for v in node]
    if not isinstance(node, dict):
        return node
    out = {k: _fill_bounds(v, bounds) for k, v in node.items() if k != "x-bound"}
    kind = node.get("x-bound")
    if kind == "vocab":
        out["maximum"] = bounds["vocab"]
    elif kind == "token":
        out["maximum"] = bounds["vocab"] - 1
    elif kind == "context":
        out["maxItems" if node.get("type") == "array" else "maximum"] = bounds["context"]
    elif kind == "model":
        out["enum"] = [bounds["model"], None]
    return out
