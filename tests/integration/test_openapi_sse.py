"""`GET /v1/sse` against docs/openapi.yaml: every status and error code the document gives
is reached on a running gateway, and each answer (status, media type, required headers, body)
is one the document describes. Schemathesis cannot fuzz a stream that never ends; these are
targeted requests instead (test_openapi.py fuzzes the other operations)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from itertools import count
from typing import Any

import pytest
from support.openapi import check_answer, check_event, document, resolve
from support.procs import Gateway, RedisServer, running_gateway, wait_for
from support.sse import Response, SSEClient, parse_stream, request

pytestmark = pytest.mark.timeout(90)

KEY = "openapi-sse-test-key-0123456789abcdefgh"
ORIGIN = "https://app.example"
PATH = "/v1/sse"
# Reached elsewhere, at a cost this module does not pay: a request that finds the gateway
# draining needs a stream that holds the drain open (test_lifecycle.py).
NOT_REACHED = {"draining"}


@dataclass(frozen=True)
class Case:
    status: int
    code: str | None  # the error code, or None for a stream
    target: str = PATH
    headers: dict[str, str] = field(default_factory=dict)
    token: dict[str, Any] | None = None  # claims over the player's defaults: a header token


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    redis = RedisServer(tmp_path_factory.mktemp("openapi-sse-redis")).start()
    flags = [
        "--redis", redis.url, "--publish-api-key", KEY, "--cors-origins", ORIGIN,
        "--max-connections-per-player", "1",
    ]  # fmt: skip
    try:
        with running_gateway(flags, workdir=tmp_path_factory.mktemp("openapi-sse")) as gateway:
            yield gateway
    finally:
        redis.stop()


def answer(gw: Gateway, case: Case, player: str) -> Response:
    headers = dict(case.headers)
    if case.token is not None:
        claims = {"sub": player, **case.token}
        brand = claims.pop("brand_id", "brand")
        sub = claims.pop("sub")
        ttl = claims.pop("ttl", 3600)
        headers["Authorization"] = f"Bearer {gw.token(brand, sub, ttl=ttl, **claims)}"
    return request(gw.port, "GET", case.target, headers)


CASES = {
    "invalid_brand_id": Case(400, "invalid_brand_id", token={"brand_id": "not a brand"}),
    "invalid_player_id": Case(400, "invalid_player_id", token={"sub": "p" * 65}),
    "invalid_last_event_id": Case(
        400, "invalid_last_event_id", headers={"Last-Event-ID": "a b"}, token={}
    ),
    "bad_request": Case(400, "bad_request", target=f"{PATH}?token=a&token=b"),
    "missing_token": Case(401, "missing_token"),
    "invalid_token": Case(401, "invalid_token", headers={"Authorization": "Bearer not-a-jwt"}),
    "token_expired": Case(401, "token_expired", token={"ttl": -60}),
    "invalid_ticket": Case(401, "invalid_ticket", target=f"{PATH}?ticket={'t' * 43}"),
    "brand_mismatch": Case(403, "brand_mismatch", headers={"X-Brand-ID": "other"}, token={}),
    "origin_not_allowed": Case(
        403, "origin_not_allowed", headers={"Origin": "https://evil.example"}, token={}
    ),
    "cors_error": Case(401, "missing_token", headers={"Origin": ORIGIN}),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_refusal_is_documented(gw: Gateway, name: str) -> None:
    case = CASES[name]
    response = answer(gw, case, f"refused-{name}")
    body = check_answer(PATH, "GET", response)
    assert (response.status, body["error"]) == (case.status, case.code), response
    if "Origin" in case.headers and case.headers["Origin"] == ORIGIN:
        assert response.header("Access-Control-Allow-Origin") == ORIGIN, response.headers


def _stream(gw: Gateway, player: str, **headers: str) -> SSEClient:
    token = gw.token("brand", player)
    return SSEClient.connect(gw.port, PATH, {"Authorization": f"Bearer {token}", **headers})


def test_a_stream_is_documented_and_its_first_frame_is_connected(gw: Gateway) -> None:
    with _stream(gw, "streamed", Origin=ORIGIN) as client:
        check_answer(PATH, "GET", client.response)
        assert client.response.header("Access-Control-Allow-Origin") == ORIGIN
        first = client.next_frame()
        check_event(first)
        assert first.event == "connected"


def test_a_second_stream_of_the_player_is_documented(gw: Gateway) -> None:
    """Over `SSE_MAX_CONNECTIONS_PER_PLAYER`: 429 JSON, or the 200 `close` frame."""
    with _stream(gw, "capped") as first:
        first.wait_connected()
        refused = answer(gw, Case(429, "too_many_connections", token={}), "capped")
        body = check_answer(PATH, "GET", refused)
        assert (refused.status, body["error"]) == (429, "too_many_connections")
        case = Case(200, None, headers={"Accept": "text/event-stream"}, token={})
        frame = _close_frame(answer(gw, case, "capped"))
        assert json.loads(frame)["reason"] == "too_many_connections"


def _close_frame(response: Response) -> str:
    check_answer(PATH, "GET", response)
    assert response.status == 200, response
    frames = parse_stream(response.body)
    assert [f.event for f in frames] == ["close"], frames
    return frames[0].data


def test_a_blocked_player_is_documented(gw: Gateway) -> None:
    body = json.dumps(
        {"brand_id": "brand", "player_id": "blocked", "reason": "test", "block_seconds": 60}
    )
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    done = request(gw.port, "POST", "/v1/disconnect", headers, body.encode())
    assert check_answer("/v1/disconnect", "POST", done)["blocked"] is True
    response = answer(gw, Case(403, "blocked", token={}), "blocked")
    assert check_answer(PATH, "GET", response)["error"] == "blocked"


@pytest.mark.parametrize(
    ("raw", "status", "code"),
    [
        (b"GET /v1/sse HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 17_000 + b"\r\n\r\n", 431,
         "request_header_fields_too_large"),
        (b"GET /v1/sse HTTP/2.0\r\nHost: x\r\n\r\n", 505, "http_version_not_supported"),
    ],
    ids=["431", "505"],
)  # fmt: skip
def test_http_layer_refusals_are_documented(
    gw: Gateway, raw: bytes, status: int, code: str
) -> None:
    response = request(gw.port, "GET", PATH, raw=raw)
    assert (response.status, check_answer(PATH, "GET", response)["error"]) == (status, code)


# --------------------------------------------------- limits, timeouts and a broker that is gone


def test_limits_timeouts_and_outages_are_documented(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """408, 429 `rate_limited`, 503 `connection_limit` and `broker_unavailable` (JSON, and as
    the 200 `close` frame), on a gateway of their own: one stream slot, one stream request
    per address per 10 s (addresses from `X-Forwarded-For`, so each step has its own), a short
    header timeout, and a Redis that is stopped."""
    redis = RedisServer(tmp_path_factory.mktemp("openapi-limits-redis")).start()
    flags = [
        "--redis", redis.url, "--connection-limit", "1", "--header-timeout", "500ms",
        "--connect-rate-per-ip", "0.1", "--trusted-proxies", "127.0.0.0/8",
    ]  # fmt: skip
    addresses = (f"192.0.2.{n}" for n in count(1))

    def get(player: str, **headers: str) -> Response:
        token = gw.token("brand", player)
        all_headers = {"Authorization": f"Bearer {token}", "X-Forwarded-For": next(addresses)}
        return request(gw.port, "GET", PATH, {**all_headers, **headers})

    def refused(response: Response, status: int, code: str) -> bool:
        body = check_answer(PATH, "GET", response)
        return response.status == status and isinstance(body, dict) and body["error"] == code

    try:
        with running_gateway(flags, workdir=tmp_path_factory.mktemp("openapi-limits")) as gw:
            timed_out = request(gw.port, "GET", PATH, raw=b"GET /v1/sse HTTP/1.1\r\nHost: x\r\n")
            assert refused(timed_out, 408, "request_timeout"), timed_out
            # No token: the rate is checked before it, and no stream takes the one slot.
            same_address = {"X-Forwarded-For": "198.51.100.1"}
            first = request(gw.port, "GET", PATH, same_address)
            assert refused(first, 401, "missing_token"), first
            limited = request(gw.port, "GET", PATH, same_address)
            assert refused(limited, 429, "rate_limited"), limited
            with SSEClient.connect(
                gw.port, PATH, {"Authorization": f"Bearer {gw.token('brand', 'p2')}"}
            ) as held:
                held.wait_connected()
                assert refused(get("p3"), 503, "connection_limit")
                frame = _close_frame(get("p3", Accept="text/event-stream"))
                assert json.loads(frame)["reason"] == "connection_limit"
            redis.stop()
            # Once the held stream's slot is free and the broker is seen gone.
            wait_for(lambda: refused(get("p4"), 503, "broker_unavailable"), timeout=30)
            frame = _close_frame(get("p4", Accept="text/event-stream"))
            assert json.loads(frame)["reason"] == "broker_unavailable"
    finally:
        redis.stop()


# --------------------------------------------------------------------------------- coverage

LIMITS = {
    408: {"request_timeout"},
    429: {"rate_limited"},
    503: {"connection_limit", "broker_unavailable"},
}
OTHERS = {
    200: {None},
    429: {"too_many_connections"},
    403: {"blocked"},
    431: {"request_header_fields_too_large"},
    505: {"http_version_not_supported"},
}


def _documented_codes() -> dict[int, set[str | None]]:
    """Every status of `GET /v1/sse` but 500 (a bug), with its error codes (None: a stream)."""
    found: dict[int, set[str | None]] = {}
    for status, response in document()["paths"][PATH]["get"]["responses"].items():
        if status == "500":
            continue
        media = resolve(response).get("content", {})
        schema = media.get("application/json", {}).get("schema")
        codes: set[str | None] = {None} if schema is None else set()
        for part in (schema or {}).get("allOf", []):
            error = resolve(part).get("properties", {}).get("error", {})
            codes |= set(error.get("enum", [error["const"]] if "const" in error else []))
        found[int(status)] = codes - NOT_REACHED
    return found


def test_every_documented_status_and_code_of_the_stream_is_reached_here() -> None:
    reached: dict[int, set[str | None]] = {}
    for source in (LIMITS, OTHERS):
        for status, codes in source.items():
            reached.setdefault(status, set()).update(codes)
    for case in CASES.values():
        reached.setdefault(case.status, set()).add(case.code)
    assert reached == _documented_codes()
