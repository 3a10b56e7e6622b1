"""Every refusal of docs/api.md: status, JSON body {"error","message"} and required headers."""

from __future__ import annotations

import base64
import json
import socket
import time
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import quote

import pytest
from support.asserts import (
    assert_close_answer,
    assert_error,
    assert_retry_after,
    assert_www_authenticate,
)
from support.procs import (
    DEFAULT_SECRET,
    Gateway,
    GatewayFactory,
    RedisServer,
    claims_for,
    make_token,
    publish,
    running_gateway,
)
from support.sse import Response, SSEClient, parse_head, request

pytestmark = pytest.mark.timeout(90)


@pytest.fixture(scope="module")
def gw(redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    """One gateway for the read-only refusal tests of this module."""
    with running_gateway(
        ["--redis", redis_server.url, "--keepalive-period", "1s"],
        workdir=tmp_path_factory.mktemp("gw-errors"),
    ) as gateway:
        yield gateway


def b64(data: dict[str, Any] | bytes) -> str:
    raw = data if isinstance(data, bytes) else json.dumps(data).encode()
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def sse_get(gw: Gateway, token: str | None, via: str = "header", **headers: str) -> Response:
    """GET /v1/sse with the token in the Authorization header or the query."""
    target = "/v1/sse"
    all_headers = dict(headers)
    if token is not None:
        if via == "header":
            all_headers["Authorization"] = f"Bearer {token}"
        else:
            target += f"?token={quote(token, safe='')}"
    return request(gw.port, "GET", target, all_headers)


def expect_stream(gw: Gateway, target: str, headers: dict[str, str]) -> dict[str, Any]:
    with SSEClient.connect(gw.port, target, headers) as client:
        assert client.status == 200, (client.status, client.response.headers)
        return client.wait_connected()


# ----------------------------------------------------------------------------- 401


def test_missing_token(gw: Gateway) -> None:
    response = request(gw.port, "GET", "/v1/sse")
    assert_error(response, 401, "missing_token")
    assert_www_authenticate(response, error=None)


def test_refusals_that_are_not_transient_stay_errors_for_event_stream_clients(
    gw: Gateway,
) -> None:
    """Only a transient refusal (draining, connection_limit, broker_unavailable) is the 200
    close an EventSource survives: one that retrying cannot fix stays an error, which ends
    an EventSource for good."""
    accept = {"Accept": "text/event-stream"}
    response = request(gw.port, "GET", "/v1/sse", accept)
    assert_error(response, 401, "missing_token")
    response = request(gw.port, "GET", "/v1/sse", {**accept, "Authorization": "Bearer junk"})
    assert_error(response, 401, "invalid_token")
    token = gw.token("eb", "ep")
    bad_id = {**accept, "Authorization": f"Bearer {token}", "Last-Event-ID": "a b"}
    assert_error(request(gw.port, "GET", "/v1/sse", bad_id), 400, "invalid_last_event_id")


def test_token_in_query_string_is_accepted(gw: Gateway) -> None:
    connected = expect_stream(gw, f"/v1/sse?token={gw.token('qb', 'qp')}", {})
    assert (connected["brand_id"], connected["player_id"]) == ("qb", "qp")


def test_token_in_authorization_header_is_accepted(gw: Gateway) -> None:
    connected = expect_stream(gw, "/v1/sse", {"Authorization": f"Bearer {gw.token('hb', 'hp')}"})
    assert (connected["brand_id"], connected["player_id"]) == ("hb", "hp")


def test_header_token_wins_over_query_token(gw: Gateway) -> None:
    good = gw.token("wb", "wp")
    connected = expect_stream(gw, "/v1/sse?token=garbage", {"Authorization": f"Bearer {good}"})
    assert connected["player_id"] == "wp"
    response = request(gw.port, "GET", f"/v1/sse?token={good}", {"Authorization": "Bearer junk"})
    assert_error(response, 401, "invalid_token")


def _unsigned(claims: dict[str, Any], alg: str = "none", signature: str = "") -> str:
    return f"{b64({'alg': alg, 'typ': 'JWT'})}.{b64(claims)}.{signature}"


def _tampered_payload() -> str:
    header, _, signature = make_token(DEFAULT_SECRET, claims_for("b1", "p1")).split(".")
    other_payload = b64(claims_for("b1", "someone-else"))
    return f"{header}.{other_payload}.{signature}"


def _invalid_tokens() -> dict[str, str]:
    claims = claims_for("b1", "p1")
    hs256_sig = make_token(DEFAULT_SECRET, claims).split(".")[2]
    return {
        "garbage": "garbage",
        "three-garbage-parts": "a.b.c",
        "not-base64-json": f"{b64(b'not json')}.{b64(b'not json')}.c2ln",
        "tampered-payload": _tampered_payload(),
        "wrong-secret": make_token("another-secret-of-someone-else-12345", claims),
        "alg-none-unsigned": _unsigned(claims),
        "alg-none-with-signature": _unsigned(claims, "none", hs256_sig),
        "alg-None-capitalised": _unsigned(claims, "None"),
        "hs512-same-secret": make_token(DEFAULT_SECRET, claims, algorithm="HS512"),
        "hs384-same-secret": make_token(DEFAULT_SECRET, claims, algorithm="HS384"),
        "rs256-header-hmac-signature": _unsigned(
            claims,
            "RS256",
            make_token(DEFAULT_SECRET, claims).split(".")[2],
        ),
        "missing-exp": make_token(DEFAULT_SECRET, claims_for("b1", "p1", exp=None)),
        "exp-not-a-number": make_token(DEFAULT_SECRET, claims_for("b1", "p1", exp="tomorrow")),
        "empty-signature": make_token(DEFAULT_SECRET, claims).rsplit(".", 1)[0] + ".",
        "two-parts": ".".join(make_token(DEFAULT_SECRET, claims).split(".")[:2]),
    }


INVALID_TOKENS = _invalid_tokens()


@pytest.mark.parametrize("via", ["header", "query"])
@pytest.mark.parametrize("name", sorted(INVALID_TOKENS))
def test_invalid_token(gw: Gateway, name: str, via: str) -> None:
    response = sse_get(gw, INVALID_TOKENS[name], via)
    assert_error(response, 401, "invalid_token")
    assert_www_authenticate(response, error="invalid_token")


@pytest.mark.parametrize("via", ["header", "query"])
def test_expired_token(gw: Gateway, via: str) -> None:
    token = gw.token("b1", "p1", ttl=-3600)
    response = sse_get(gw, token, via)
    assert_error(response, 401, "token_expired")
    assert_www_authenticate(response, error="invalid_token")


def test_signature_checked_before_expiry(gw: Gateway) -> None:
    """An expired token with a bad signature is invalid, not merely expired."""
    token = make_token("wrong-secret-wrong-secret-wrong!!", claims_for("b1", "p1", ttl=-3600))
    assert_error(sse_get(gw, token), 401, "invalid_token")


@pytest.fixture(scope="module")
def gw_aud(
    redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Gateway]:
    with running_gateway(
        ["--redis", redis_server.url, "--jwt-audience", "sse-aud", "--jwt-issuer", "the-issuer"],
        workdir=tmp_path_factory.mktemp("gw-aud"),
    ) as gateway:
        yield gateway


@pytest.mark.parametrize(
    "claims",
    [
        {"aud": "other-aud", "iss": "the-issuer"},
        {"iss": "the-issuer"},
        {"aud": "sse-aud", "iss": "other-issuer"},
        {"aud": "sse-aud"},
    ],
    ids=["wrong-aud", "missing-aud", "wrong-iss", "missing-iss"],
)
def test_audience_and_issuer_are_enforced(gw_aud: Gateway, claims: dict[str, Any]) -> None:
    response = sse_get(gw_aud, gw_aud.token("b1", "p1", **claims))
    assert_error(response, 401, "invalid_token")
    assert_www_authenticate(response, error="invalid_token")


def test_audience_and_issuer_accepted_when_right(gw_aud: Gateway) -> None:
    token = gw_aud.token("b1", "p1", aud="sse-aud", iss="the-issuer")
    connected = expect_stream(gw_aud, "/v1/sse", {"Authorization": f"Bearer {token}"})
    assert connected["player_id"] == "p1"


# ----------------------------------------------------------------------------- 403


def test_brand_mismatch_header(gw: Gateway) -> None:
    response = sse_get(gw, gw.token("b1", "p1"), **{"X-Brand-ID": "b2"})
    assert_error(response, 403, "brand_mismatch")


def test_brand_mismatch_is_case_sensitive(gw: Gateway) -> None:
    response = sse_get(gw, gw.token("b1", "p1"), **{"X-Brand-ID": "B1"})
    assert_error(response, 403, "brand_mismatch")


def test_brand_mismatch_query(gw: Gateway) -> None:
    token = gw.token("b1", "p1")
    response = request(gw.port, "GET", f"/v1/sse?brand_id=b2&token={token}")
    assert_error(response, 403, "brand_mismatch")
    response = request(gw.port, "GET", "/v1/sse?brand_id=b2", {"Authorization": f"Bearer {token}"})
    assert_error(response, 403, "brand_mismatch")


def test_matching_brand_header_and_query_are_accepted(gw: Gateway) -> None:
    token = gw.token("b1", "p1")
    expect_stream(gw, "/v1/sse", {"Authorization": f"Bearer {token}", "X-Brand-ID": "b1"})
    expect_stream(gw, f"/v1/sse?brand_id=b1&token={token}", {})


# ----------------------------------------------------------------------------- 400


BAD_IDS: list[Any] = [
    "a::b",
    "a*",
    "a?",
    "[ab]",
    "a" * 65,
    "",
    "a b",
    "é",
    "a/b",
    "SSE::x",
    5,
    ["a"],
    {"a": 1},
    None,
]


def _id_case(value: Any) -> str:
    return repr(value)[:20]


@pytest.mark.parametrize("bad", BAD_IDS, ids=_id_case)
def test_invalid_player_id(gw: Gateway, bad: Any) -> None:
    extra = {"sub": bad} if bad is not None else {}
    claims = claims_for("b1", "placeholder", **extra)
    if bad is None:
        del claims["sub"]
    response = sse_get(gw, make_token(DEFAULT_SECRET, claims))
    assert_error(response, 400, "invalid_player_id")


@pytest.mark.parametrize("bad", BAD_IDS, ids=_id_case)
def test_invalid_brand_id(gw: Gateway, bad: Any) -> None:
    claims = claims_for(bad, "p1")
    if bad is None:
        del claims["brand_id"]
    response = sse_get(gw, make_token(DEFAULT_SECRET, claims))
    assert_error(response, 400, "invalid_brand_id")


def test_longest_and_widest_valid_ids_are_accepted(gw: Gateway) -> None:
    brand, player = "B" * 64, "aZ09_.-" * 9
    connected = expect_stream(gw, "/v1/sse", {"Authorization": f"Bearer {gw.token(brand, player)}"})
    assert (connected["brand_id"], connected["player_id"]) == (brand, player)


@pytest.mark.parametrize(
    "raw",
    [b"HELLO\r\n\r\n", b"GET /v1/sse HTTP/1.1\r\nHost: x\r\nthis is not a header\r\n\r\n"],
    ids=["garbage-request-line", "bad-header-line"],
)
def test_malformed_request_is_bad_request(gw: Gateway, raw: bytes) -> None:
    assert_error(request(gw.port, "GET", "", raw=raw), 400, "bad_request")


# ----------------------------------------------------------------------------- 404 / 405


@pytest.mark.parametrize("path", ["/nope", "/v1/sse/extra", "/v1", "/", "/demo", "/v2/sse"])
def test_unknown_path_is_404(gw: Gateway, path: str) -> None:
    assert_error(request(gw.port, "GET", path), 404, "not_found")


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "PATCH"])
def test_other_method_on_sse_is_405(gw: Gateway, method: str) -> None:
    token = gw.token("b1", "p1")
    response = request(
        gw.port,
        method,
        "/v1/sse",
        {"Authorization": f"Bearer {token}", "Content-Length": "0"},
    )
    assert_error(response, 405, "method_not_allowed")
    allow = response.header("Allow")
    assert allow is not None, response.headers
    assert "GET" in [m.strip() for m in allow.split(",")], allow
    assert method not in [m.strip() for m in allow.split(",")], allow


@pytest.mark.parametrize("path", ["/healthz", "/readyz", "/metrics"])
def test_post_to_probe_is_405(gw: Gateway, path: str) -> None:
    response = request(gw.port, "POST", path, {"Content-Length": "0"})
    assert_error(response, 405, "method_not_allowed")
    assert "GET" in (response.header("Allow") or ""), response.headers


# ----------------------------------------------------------------------------- 431 / 408


def test_huge_header_is_431(gw: Gateway) -> None:
    response = request(
        gw.port,
        "GET",
        "/v1/sse",
        {"Authorization": f"Bearer {gw.token('b1', 'p1')}", "X-Big": "a" * 20_000},
    )
    assert_error(response, 431, "request_header_fields_too_large")


def test_many_headers_over_16k_is_431(gw: Gateway) -> None:
    headers = [(f"X-Filler-{i}", "v" * 100) for i in range(200)]
    response = request(gw.port, "GET", "/healthz", headers)
    assert_error(response, 431, "request_header_fields_too_large")


def test_headers_under_16k_are_fine(gw: Gateway) -> None:
    response = request(gw.port, "GET", "/healthz", {"X-Big": "a" * 12_000})
    assert response.status == 200, response


@pytest.mark.timeout(60)
def test_slow_headers_get_408(gw: Gateway) -> None:
    with socket.create_connection(("127.0.0.1", gw.port), timeout=40) as sock:
        sock.sendall(b"GET /v1/sse HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # never finished
        started = time.monotonic()
        data = b""
        while time.monotonic() - started < 35:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    assert data, "connection closed (or timed out) without any response"
    head, _, body = data.partition(b"\r\n\r\n")
    response = parse_head(head)
    response.body = body
    assert_error(response, 408, "request_timeout")


# ----------------------------------------------------------------------------- 503


@pytest.mark.timeout(60)
def test_connection_limit(
    gateway_factory: GatewayFactory, redis_server: RedisServer, ids: Callable[..., str]
) -> None:
    gateway = gateway_factory(
        "--connection-limit", "2", "--keepalive-period", "500ms", redis=redis_server
    )
    brand = ids("lim")
    first = gateway.stream(brand, "p1")
    second = gateway.stream(brand, "p2")
    third_auth = {"Authorization": f"Bearer {gateway.token(brand, 'p3')}"}
    try:
        third = request(gateway.port, "GET", "/v1/sse", third_auth)
        assert_error(third, 503, "connection_limit")
        assert_retry_after(third)
        # An EventSource gets a 200 it survives: one `event: close`, then it comes back.
        answer = request(
            gateway.port, "GET", "/v1/sse", {**third_auth, "Accept": "text/event-stream"}
        )
        assert_close_answer(answer, "connection_limit", 3000)
        metrics = gateway.metrics()
        assert metrics.value("sse_gateway_connection_limit") == 2
        assert (
            metrics.value("sse_gateway_connections_rejected_total", reason="connection_limit") == 2
        )
        assert metrics.total("sse_gateway_connections") == 2
        first.close()
        # The slot comes back once the gateway has seen the close: poll for it.
        deadline = time.monotonic() + 20
        while True:
            client = gateway.open(headers=third_auth)
            if client.status == 200:
                assert client.wait_connected()["player_id"] == "p3"
                break
            client.close()
            assert time.monotonic() < deadline, "slot not freed 20 s after a client closed"
            time.sleep(0.2)
        try:
            # Full again: the limit still holds after the slot was reused.
            assert_error(
                request(gateway.port, "GET", "/v1/sse", third_auth), 503, "connection_limit"
            )
        finally:
            client.close()
        # The still-open second stream was never disturbed.
        publish(redis_server.client(), brand, "p2", {"type": "still-here", "data": 1})
        assert second.wait_event("still-here").json() == 1
    finally:
        first.close()
        second.close()


def _raw_answer(port: int, head: bytes) -> bytes:
    """Everything the gateway sends back to `head` until it closes the connection."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(head)
        chunks = []
        while data := sock.recv(65536):
            chunks.append(data)
    return b"".join(chunks)


@pytest.mark.parametrize("path", ["/v1/sse", "/v1/publish", "/nowhere", "/healthz"])
def test_an_answer_to_head_has_no_content_whatever_its_status(gw: Gateway, path: str) -> None:
    """RFC 9110 §9.3.2 (issue 10 item 15): `HEAD /v1/sse` was a 405 with 79 bytes of JSON."""
    raw = _raw_answer(
        gw.port, b"HEAD %s HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n" % path.encode()
    )
    head, sep, body = raw.partition(b"\r\n\r\n")
    assert sep and body == b"", raw
    status = int(head.split(b" ", 2)[1])
    assert status in (200, 404, 405), raw
    assert b"content-length:" in head.lower()  # what a GET would carry, as RFC 9110 allows
