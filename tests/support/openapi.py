"""docs/openapi.yaml for the tests: load it, and check an answer against what it documents."""

from __future__ import annotations

import json
from functools import cache
from typing import Any

import yaml
from jsonschema import Draft202012Validator

from .procs import REPO
from .sse import Response, SSEEvent, parse_stream

SPEC = REPO / "docs" / "openapi.yaml"
METHODS = ("get", "put", "post", "delete", "options", "head", "patch", "trace")


@cache
def document() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(SPEC.read_text(encoding="utf-8"))
    return loaded


def resolve(node: Any) -> Any:
    """`node`, with a top-level `$ref` (into this document) followed."""
    while isinstance(node, dict) and "$ref" in node:
        target: Any = document()
        for part in node["$ref"].removeprefix("#/").split("/"):
            target = target[part]
        node = target
    return node


def operations() -> dict[str, set[str]]:
    """Every documented path and its methods (upper case)."""
    return {
        path: {method.upper() for method in item if method in METHODS}
        for path, item in document()["paths"].items()
    }


def check_answer(path: str, method: str, response: Response) -> Any:
    """Asserts that `response` is one the document gives for `method` `path`: a documented
    status, a documented media type, a body that its schema accepts (JSON bodies), and every
    header it marks required. Returns the parsed JSON body, or the raw body."""
    detail = f"{method} {path}: {response.status} {response.headers} {response.body[:300]!r}"
    operation = document()["paths"][path][method.lower()]
    documented = resolve(operation["responses"].get(str(response.status)))
    assert documented is not None, f"undocumented status: {detail}"
    for name, header in documented.get("headers", {}).items():
        if resolve(header).get("required"):
            assert response.header(name) is not None, f"no {name} header: {detail}"
    content = documented.get("content")
    if not content:
        return response.body
    media_type = (response.header("Content-Type") or "").split(";")[0].strip().lower()
    assert media_type in content, f"undocumented Content-Type: {detail}"
    schema = content[media_type].get("schema")
    if media_type == "text/event-stream":
        for frame in parse_stream(response.body):
            check_event(frame, schema)
        return response.body
    if media_type != "application/json":
        return response.body
    body = json.loads(response.body)
    _validate(body, schema, detail)
    return body


def check_event(frame: SSEEvent, schema: dict[str, Any] | None = None) -> None:
    """Asserts that one event of a stream is one the document describes (`StreamEvent`)."""
    if schema is None:
        schema = {"$ref": "#/components/schemas/StreamEvent"}
    event: dict[str, Any] = {"event": frame.event, "data": frame.data}
    if frame.id is not None:
        event["id"] = frame.id
    if frame.retry is not None:
        event["retry"] = frame.retry
    _validate(event, schema, f"event {frame!r}")


def _validate(value: Any, schema: dict[str, Any], detail: str) -> None:
    # The schema's `$ref`s point into the document: validate with it as the root resource.
    rooted = {**schema, "components": document()["components"]}
    errors = [error.message for error in Draft202012Validator(rooted).iter_errors(value)]
    assert not errors, f"does not match the schema: {errors}: {detail}"
