"""Probes, metrics, logs and SIGTERM draining."""

from __future__ import annotations

import json
import re
import signal
import socket
import time
from collections.abc import Callable

import pytest
from support.asserts import (
    assert_close_answer,
    assert_error,
    assert_farewell,
    assert_retry_after,
)
from support.procs import Gateway, GatewayFactory, RedisServer, publish, wait_for
from support.sse import SSEClient, build_request, parse_head, request

pytestmark = pytest.mark.timeout(90)


def test_probes(gateway: Gateway) -> None:
    health = gateway.get("/healthz")
    assert health.status == 200
    assert (health.header("Content-Type") or "").startswith("application/json")
    assert health.json() == {"status": "ok"}
    wait_for(lambda: gateway.get("/readyz").status == 200, what="readyz")
    ready = gateway.get("/readyz")
    assert ready.json() == {"status": "ready"}


def test_metrics_reflect_open_streams(
    gateway: Gateway, redis_server: RedisServer, ids: Callable[..., str]
) -> None:
    response = gateway.get("/metrics")
    assert response.status == 200
    assert (response.header("Content-Type") or "").startswith("text/plain")
    text = response.body.decode()
    assert "# TYPE sse_gateway_connections gauge" in text
    for name in (
        "sse_gateway_connections",
        "sse_gateway_connection_limit",
        "sse_gateway_connections_opened_total",
        "sse_gateway_events_received_total",
        "sse_gateway_events_delivered_total",
        "sse_gateway_broker_connected",
        "sse_gateway_broker_reconnects_total",
        "sse_gateway_broker_subscribed_channels",
    ):
        assert f"# TYPE {name} " in text, f"{name} missing from /metrics"
    for name in (
        "sse_gateway_connections_closed_total",
        "sse_gateway_connections_rejected_total",
        "sse_gateway_events_dropped_total",
    ):
        assert f"# TYPE {name} counter" in text, f"{name} missing from /metrics"
    before = gateway.metrics()
    assert before.total("sse_gateway_connections") == 0
    # The default is 50000, lowered to what the open-file limit allows (said in the start line).
    limit = before.value("sse_gateway_connection_limit")
    assert 0 < limit <= 50_000
    if limit < 50_000:
        assert str(int(limit)) in gateway.logs(), "the effective limit was not logged"
    brand = ids("b")
    clients = [gateway.stream(brand, f"p{i}") for i in range(3)]
    try:
        wait_for(
            lambda: gateway.metrics().total("sse_gateway_connections") == 3, what="3 connections"
        )
        r = redis_server.client()
        publish(r, brand, "p0", {"type": "m", "data": 1})
        r.close()
        clients[0].wait_event("m")
        clients[1].close()
        wait_for(
            lambda: gateway.metrics().total("sse_gateway_connections") == 2, what="2 connections"
        )
        after = gateway.metrics()
        assert after.value("sse_gateway_connections_opened_total") == 3
        assert after.value("sse_gateway_connections_closed_total", reason="client") == 1
        assert after.value("sse_gateway_broker_subscribed_channels") == 2
        assert after.value("sse_gateway_events_received_total") >= 1
        assert after.value("sse_gateway_events_delivered_total") >= 1
        assert after.value("sse_gateway_broker_connected") == 1
    finally:
        for client in clients:
            client.close()
    wait_for(lambda: gateway.metrics().total("sse_gateway_connections") == 0, what="0 connections")
    request(gateway.port, "GET", "/v1/sse")
    request(gateway.port, "GET", "/v1/sse", {"Authorization": "Bearer junk"})
    rejected = gateway.metrics()
    assert rejected.value("sse_gateway_connections_rejected_total", reason="missing_token") == 1
    assert rejected.value("sse_gateway_connections_rejected_total", reason="invalid_token") == 1


def test_refusals_of_the_http_layer_count_under_their_code(
    gateway_factory: GatewayFactory, redis_server: RedisServer
) -> None:
    """Issue 12: 405, 408, 431, 505 and malformed requests on /v1/sse were answered, not counted."""
    gateway = gateway_factory("--header-timeout", "500ms", redis=redis_server)
    port = gateway.port
    assert_error(
        request(port, "POST", "/v1/sse", {"Content-Length": "0"}), 405, "method_not_allowed"
    )
    assert_error(
        request(port, "GET", "/v1/sse", raw=b"GET /v1/sse HTTP\x00/1.1\r\n\r\n"), 400, "bad_request"
    )
    big = {"X-Big": "a" * (20 * 1024)}
    assert_error(request(port, "GET", "/v1/sse", big), 431, "request_header_fields_too_large")
    http2 = b"GET /v1/sse HTTP/2.0\r\nHost: gw\r\n\r\n"
    assert_error(request(port, "GET", "/v1/sse", raw=http2), 505, "http_version_not_supported")
    unfinished = b"GET /v1/sse HTTP/1.1\r\nHost: gw\r\n"
    assert_error(request(port, "GET", "/v1/sse", raw=unfinished), 408, "request_timeout")
    metrics = gateway.metrics()
    for code in (
        "method_not_allowed",
        "bad_request",
        "request_header_fields_too_large",
        "http_version_not_supported",
        "request_timeout",
    ):
        assert metrics.value("sse_gateway_connections_rejected_total", reason=code) == 1, code


def test_logs_one_line_per_connection_and_never_the_token(
    gateway_factory: GatewayFactory, redis_server: RedisServer, ids: Callable[..., str]
) -> None:
    gw = gateway_factory(redis=redis_server)
    brand, player = ids("logb"), ids("logp")
    header_token = gw.token(brand, player)
    query_token = gw.token(brand, player, ttl=7200)
    with gw.stream(brand, player):
        pass
    with gw.open(f"/v1/sse?token={query_token}") as client:
        assert client.status == 200
        client.wait_connected()
    request(gw.port, "GET", f"/v1/sse?token={query_token}x")  # invalid, also never logged
    wait_for(lambda: gw.metrics().total("sse_gateway_connections") == 0, what="streams closed")
    wait_for(
        lambda: sum(1 for line in gw.logs().splitlines() if player in line) >= 4,
        timeout=10,
        what="open and close log lines of both connections",
    )
    logs = gw.logs()
    for token in (header_token, query_token):
        assert token not in logs
        assert token.split(".")[2] not in logs, "a token signature appeared in the logs"
    lines = [line for line in logs.splitlines() if player in line]
    assert len(lines) == 4, f"expected one open and one close line per stream: {lines}"
    assert all(brand in line for line in lines), lines
    closes = [line for line in lines if "client" in line]
    assert len(closes) == 2, f"close lines must give the reason (client): {lines}"
    assert all(re.search(r"\d+(\.\d+)?\s*m?s\b", line) for line in closes), (
        f"close lines must give the duration: {closes}"
    )


def test_json_logs(
    gateway_factory: GatewayFactory, redis_server: RedisServer, ids: Callable[..., str]
) -> None:
    gw = gateway_factory("--log-format", "json", redis=redis_server)
    brand, player = ids("b"), ids("p")
    with gw.stream(brand, player) as client:
        r = redis_server.client()
        r.publish(f"SSE::{brand}::{player}", b"not json")
        publish(r, brand, player, {"type": "ok", "data": 1})
        r.close()
        client.wait_event("ok")
    wait_for(lambda: "invalid published message" in gw.logs(), what="the warning")
    wait_for(lambda: gw.metrics().total("sse_gateway_connections") == 0, what="stream closed")
    lines = [line for line in gw.logs().splitlines() if line.strip()]
    assert lines
    for line in lines:
        record = json.loads(line)
        assert isinstance(record, dict), line
    assert any(player in line for line in lines)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_drains_and_exits_zero(
    gateway_factory: GatewayFactory,
    redis_server: RedisServer,
    ids: Callable[..., str],
    sig: signal.Signals,
) -> None:
    gw = gateway_factory("--drain-seconds", "2", "--keepalive-period", "1s", redis=redis_server)
    brand = ids("b")
    streams = [gw.stream(brand, f"p{i}") for i in range(3)]
    try:
        started = time.monotonic()
        gw.signal(sig)
        # Draining: /readyz stops being 200 (503 draining, or the port is closed already).
        deadline = time.monotonic() + 10
        while True:
            try:
                response = gw.get("/readyz", timeout=2)
            except (OSError, EOFError):
                break
            if response.status != 200:
                assert response.status == 503, response
                assert response.json() == {"status": "not_ready", "reason": "draining"}
                break
            assert time.monotonic() < deadline, "/readyz still 200 10 s after the signal"
            time.sleep(0.02)
        # A new stream during the drain is refused (503 draining, or the listener is closed).
        try:
            late = request(
                gw.port, "GET", "/v1/sse", {"Authorization": f"Bearer {gw.token(brand, 'late')}"}
            )
        except (OSError, EOFError):
            pass  # refused or reset: the listener is closed
        else:
            assert_error(late, 503, "draining")
            assert_retry_after(late)
        for stream in streams:
            # Closed by the drain with `event: close` (shutdown) and a spread `retry:`, the
            # chunked body ended with its last chunk.
            assert_farewell(stream, "shutdown", 3000, timeout=15)
        rc = gw.wait(timeout=2 + 15)
        elapsed = time.monotonic() - started
        assert rc == 0, f"exit status {rc}\n{gw.logs()}"
        assert elapsed < 2 + 15
        assert "shutdown" in gw.logs(), "stream close lines must give the reason (shutdown)"
    finally:
        for stream in streams:
            stream.close()


@pytest.mark.timeout(60)
def test_sigterm_with_no_clients_exits_zero_quickly(
    gateway_factory: GatewayFactory, redis_server: RedisServer
) -> None:
    gw = gateway_factory("--drain-seconds", "2", redis=redis_server)
    gw.terminate()
    assert gw.wait(timeout=15) == 0, gw.logs()


def read_response(sock: socket.socket, timeout: float = 15.0) -> tuple[bytes, bytes]:
    """One whole response with a Content-Length body: (head, body)."""
    sock.settimeout(timeout)
    data = b""
    while b"\r\n\r\n" not in data:
        got = sock.recv(65536)
        assert got, f"closed before a response: {data!r}"
        data += got
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(parse_head(head).header("Content-Length") or 0)
    while len(body) < length:
        got = sock.recv(65536)
        assert got, f"body cut short: {body!r}"
        body += got
    return head, body


@pytest.mark.timeout(60)
@pytest.mark.parametrize("accept", [True, False], ids=["event-stream", "no-accept"])
def test_a_stream_request_during_the_drain_is_refused_draining(
    gateway_factory: GatewayFactory,
    redis_server: RedisServer,
    ids: Callable[..., str],
    accept: bool,
) -> None:
    """An EventSource (`Accept: text/event-stream`) gets the 200 `event: close` it survives
    and comes back from; any other client 503 JSON. Both with `Retry-After`."""
    gw = gateway_factory("--drain-seconds", "6", redis=redis_server)
    brand = ids("b")
    # A stream whose client stops reading: its socket cannot flush, so the drain waits for it
    # (up to its deadline) and the gateway is still there to read a late request.
    stalled = SSEClient.connect(
        gw.port, headers={"Authorization": f"Bearer {gw.token(brand, 'stalled')}"}, rcvbuf=4096
    )
    idle = socket.create_connection(("127.0.0.1", gw.port), timeout=15)
    try:
        stalled.wait_connected()
        r = redis_server.client()
        for _ in range(30):
            publish(r, brand, "stalled", {"type": "big", "data": "x" * 16_000})
        r.close()
        # A keep-alive socket, idle when the drain begins (it is not closed by it).
        idle.sendall(build_request("GET", "/healthz"))
        head, _ = read_response(idle)
        assert b"keep-alive" in head.lower(), head
        time.sleep(0.5)  # the stalled stream's buffers are full
        gw.terminate()
        wait_for(lambda: not gw.running() or _not_ready(gw), timeout=10, what="the drain")
        assert gw.running(), "the gateway exited without waiting for the stalled stream"
        headers = {"Authorization": f"Bearer {gw.token(brand, 'late')}"}
        if accept:
            headers["Accept"] = "text/event-stream"
        idle.sendall(build_request("GET", "/v1/sse", headers))
        head, body = read_response(idle)
        response = parse_head(head)
        response.body = body
        if accept:
            assert_close_answer(response, "draining", 3000)
        else:
            assert_error(response, 503, "draining")
            assert_retry_after(response)
        assert (response.header("Connection") or "").lower() == "close"
        assert gw.wait(timeout=20) == 0, gw.logs()[-2000:]
    finally:
        idle.close()
        stalled.close()


def _not_ready(gw: Gateway) -> bool:
    try:
        return gw.get("/readyz", timeout=2).status == 503
    except (OSError, EOFError):
        return True  # the listener is closed: draining
