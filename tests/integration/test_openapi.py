"""docs/openapi.yaml against a running gateway: schemathesis on every operation (the stream
is read up to its first event), and a check that the router and the document list the same
routes. Every status of the stream, reached on purpose: test_openapi_sse.py."""

from __future__ import annotations

import ast
import importlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import (
    content_type_conformance,
    negative_data_rejection,
    not_a_server_error,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from support.openapi import SPEC, check_answer, document, operations, resolve
from support.procs import Gateway, RedisServer, running_gateway
from support.sse import request

from sse_gateway.edge import routes

pytestmark = pytest.mark.timeout(120)

KEY = "openapi-test-key-0123456789abcdefghijkl"
ORIGIN = "https://app.example"
BRAND, PLAYER = "openapi-brand", "openapi-player"
EXAMPLES = 30  # per operation and generation mode: the whole run stays well under a minute
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    response_headers_conformance,
]
FUZZED = [
    f"{method} {path}" for path, methods in operations().items() for method in sorted(methods)
]


def _negatable(label: str) -> bool:
    """Whether a request can break its schema: a body, or a parameter that is required or
    constrained (an optional free-text header, as `Accept`, cannot be wrong)."""
    method, path = label.split(" ", 1)
    operation = document()["paths"][path][method.lower()]
    if operation.get("requestBody"):
        return True
    for parameter in map(resolve, operation.get("parameters", [])):
        schema = resolve(parameter.get("schema", {}))
        if parameter.get("required") or set(schema) - {"type", "description", "example"}:
            return True
    return False


RUNS = [
    pytest.param(label, mode, id=f"{label} {mode.value}")
    for label in FUZZED
    for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)
    if mode is GenerationMode.POSITIVE or _negatable(label)
]


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    """A gateway with the publish API and CORS, on a Redis of its own: the fuzzed disconnects
    store blocks that no other test should meet."""
    redis = RedisServer(tmp_path_factory.mktemp("openapi-redis")).start()
    flags = ["--redis", redis.url, "--publish-api-key", KEY, "--cors-origins", ORIGIN]
    try:
        with running_gateway(flags, workdir=tmp_path_factory.mktemp("openapi-gw")) as gateway:
            yield gateway
    finally:
        redis.stop()


@pytest.fixture(scope="module")
def schema() -> schemathesis.BaseSchema:
    loaded = schemathesis.openapi.from_path(SPEC)
    loaded.validate()  # the OpenAPI 3.1 meta-schema
    # A stream never ends: read it up to its first event (`connected`), then close it.
    loaded.config.max_stream_events = 1
    return loaded


def _credentials(gw: Gateway, path: str) -> str | None:
    """The `Authorization` an operation takes: the publish key, a player's token, or none."""
    security = document()["paths"][path]
    names = {
        name
        for operation in security.values()
        if isinstance(operation, dict)
        for requirement in operation.get("security", [])
        for name in requirement
    }
    if "publishKey" in names:
        return f"Bearer {KEY}"
    if "playerToken" in names:
        return f"Bearer {gw.token(BRAND, PLAYER)}"
    return None


@pytest.mark.parametrize(("label", "mode"), RUNS)
def test_operation_conforms(
    gw: Gateway, schema: schemathesis.BaseSchema, label: str, mode: GenerationMode
) -> None:
    """Generated requests (valid, or invalid, with and without credentials): every answer
    has a documented status, media type, headers and body, and none is a 5xx; an invalid
    one is refused with a 4xx."""
    method, path = label.split(" ", 1)
    operation = schema[path][method]
    authorization = _credentials(gw, path)
    session = requests.Session()

    @settings(
        max_examples=EXAMPLES,
        derandomize=True,
        database=None,
        deadline=None,
        suppress_health_check=list(HealthCheck),
    )
    # Mostly with credentials: without them, an operation answers only its 401.
    @given(
        case=operation.as_strategy(mode),
        authorized=st.sampled_from([True, True, False]),
        cors=st.booleans(),
    )
    def run(case: Any, authorized: bool, cors: bool) -> None:
        headers = dict(case.headers or {})
        if authorized and authorization is not None:
            headers["Authorization"] = authorization
        if cors and (path in ("/v1/sse", "/v1/tickets") or method == "OPTIONS"):
            headers["Origin"] = ORIGIN  # else a generated Origin: 403 origin_not_allowed
        case.headers = headers
        response = case.call(base_url=gw.url, session=session, timeout=15)
        checks = CHECKS if mode is GenerationMode.POSITIVE else [*CHECKS, negative_data_rejection]
        case.validate_response(response, checks=checks)

    try:
        run()
    finally:
        session.close()


# ----------------------------------------------------------------------- the routes themselves


def _router_paths() -> set[str]:
    """Every path the router names: the string literals of routes.py that are paths, and the
    path constants it imports from the endpoint modules (`PATH`, `STATS_PATH`, a prefix)."""
    tree = ast.parse(Path(routes.__file__).read_text(encoding="utf-8"))
    found: set[Any] = {node.value for node in ast.walk(tree) if isinstance(node, ast.Constant)}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("sse_gateway."):
            module = importlib.import_module(node.module or "")
            found.update(getattr(module, alias.name) for alias in node.names)
    return {
        value
        for value in found
        if isinstance(value, str) and value.startswith("/") and " " not in value
    }


def _documents(path: str) -> bool:
    """A router path is documented: as it is, or as the fixed start of a templated path."""
    for documented in operations():
        fixed = documented.split("{", 1)[0]
        if path == documented or ("{" in documented and path.rstrip("/") + "/" == fixed):
            return True
    return False


def test_every_path_the_router_names_is_documented() -> None:
    paths = _router_paths()
    assert {"/v1/sse", "/v1/publish", "/healthz", "/demo"} <= paths  # the scan finds them
    missing = sorted(path for path in paths if not _documents(path))
    assert not missing, f"served but not in docs/openapi.yaml: {missing}"


def _concrete(path: str) -> str:
    return path.replace("{brand_id}", "b").replace("{player_id}", "p")


@pytest.mark.parametrize("path", sorted(set(operations()) - {"/", "/demo"}))
def test_the_methods_a_path_allows_are_the_documented_ones(gw: Gateway, path: str) -> None:
    """Another method is 405, and its `Allow` names exactly the documented methods (a route
    that gained or lost a method shows here, and a documented path the router does not serve
    is 404). The dev pages: test_the_dev_pages_are_documented."""
    target = _concrete(path)
    response = request(gw.port, "DELETE", target)
    assert response.status == 405, response
    allowed = {m.strip() for m in (response.header("Allow") or "").split(",") if m.strip()}
    assert allowed == operations()[path], (path, response.header("Allow"))


def test_the_dev_pages_are_documented(tmp_path: Path, redis_server: RedisServer) -> None:
    flags = ["--redis", redis_server.url, "--dev"]
    with running_gateway(flags, workdir=tmp_path, jwt_secret=None) as gateway:
        for path in ("/", "/demo"):
            for method in ("GET", "HEAD"):
                check_answer(path, method, request(gateway.port, method, path))
            response = request(gateway.port, "DELETE", path)
            assert response.status == 405, response
            allowed = {m.strip() for m in (response.header("Allow") or "").split(",")}
            assert allowed == operations()[path]


def test_metrics_in_both_documented_formats(gw: Gateway) -> None:
    for accept, media_type in (
        ("text/plain", "text/plain"),
        ("application/openmetrics-text", "application/openmetrics-text"),
    ):
        response = request(gw.port, "GET", "/metrics", {"Accept": accept})
        check_answer("/metrics", "GET", response)
        assert (response.header("Content-Type") or "").startswith(media_type), response.headers
