"""Unauthenticated denial of service (issue 10, items 1-3) against a real gateway process.

Pipelined requests a client never reads, header bytes without a line end, and half-open
sockets: each must leave memory bounded, and normal clients and `/healthz` served.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager, suppress

import pytest
from support.procs import Gateway, GatewayFactory, RedisServer, wait_for
from support.sse import request

pytestmark = pytest.mark.timeout(120)

MiB = 1024 * 1024


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


@contextmanager
def raw_sockets(port: int, n: int, *, rcvbuf: int | None = None) -> Iterator[list[socket.socket]]:
    with ExitStack() as stack:
        socks = []
        for _ in range(n):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            stack.callback(sock.close)
            if rcvbuf is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
            sock.connect(("127.0.0.1", port))
            socks.append(sock)
        yield socks


def endless(gw: Gateway, start: bytes) -> bytes:
    """Sends `start`, then 8 MiB more of the same line that never ends; the answer's start."""
    with raw_sockets(gw.port, 1) as (sock,):
        sock.sendall(start)
        sock.settimeout(5)
        sent = 0
        with suppress(BrokenPipeError, ConnectionResetError, TimeoutError):
            while sent < 8 * MiB:
                sock.sendall(b"a" * 65536)
                sent += 65536
        with suppress(ConnectionResetError, TimeoutError):
            return sock.recv(4096)
    return b""


def healthz(gw: Gateway) -> int:
    return request(gw.port, "GET", "/healthz", timeout=5).status


def test_pipelined_requests_never_read_keep_memory_bounded(
    gateway_factory: GatewayFactory, redis_server: RedisServer
) -> None:
    # Before: 12 MB of pipelined GET /metrics grew the RSS from 46 to 772 MiB.
    gw = gateway_factory(redis=redis_server)
    for _ in range(20):  # warm up what the first answers allocate
        assert request(gw.port, "GET", "/metrics").status == 200
    before = rss_bytes(gw.pid)
    flood = b"GET /metrics HTTP/1.1\r\nHost: gw\r\n\r\n" * 4096  # 140 KB
    with raw_sockets(gw.port, 3, rcvbuf=4096) as socks:
        for sock in socks:
            sock.setblocking(False)
        sent = [0] * len(socks)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and min(sent) < 12 * MiB:
            progressed = False
            for i, sock in enumerate(socks):
                try:
                    sent[i] += sock.send(flood)
                    progressed = True
                except BlockingIOError:
                    pass
            if not progressed:
                time.sleep(0.05)
        # The gateway stopped reading: the socket buffers fill and sending blocks well short
        # of 12 MB per socket.
        assert min(sent) < 12 * MiB, sent
        time.sleep(0.5)
        grown = rss_bytes(gw.pid) - before
        assert grown < 24 * MiB, f"RSS grew by {grown / MiB:.1f} MiB for {sent} bytes sent"
        assert healthz(gw) == 200


def test_a_header_value_without_a_line_end_gets_431_early(
    gateway_factory: GatewayFactory, redis_server: RedisServer
) -> None:
    # Before: 122.8 MiB buffered before the 408.
    gw = gateway_factory(redis=redis_server)
    before = rss_bytes(gw.pid)
    answer = endless(gw, b"GET /healthz HTTP/1.1\r\nHost: gw\r\nX-Long: ")
    # The answer survives what the client kept sending (the gateway lingers, reading and
    # dropping it), and none of it stayed in memory.
    assert answer.startswith(b"HTTP/1.1 431 "), answer[:100]
    assert rss_bytes(gw.pid) - before < 16 * MiB


def test_half_open_sockets_lock_out_neither_streams_nor_health_checks(
    gateway_factory: GatewayFactory, redis_server: RedisServer
) -> None:
    # Before: with SSE_CONNECTION_LIMIT=50, 200 sockets that never finish their request made
    # /healthz answer 503 connection_limit and refused every client.
    gw = gateway_factory(redis=redis_server, env={"SSE_CONNECTION_LIMIT": "50"})
    with raw_sockets(gw.port, 200) as socks:
        for sock in socks:
            sock.sendall(b"GET /v1/sse HTTP/1.1\r\nHost: gw\r\n")
        time.sleep(0.3)
        assert healthz(gw) == 200
        assert gw.readyz()[0] == 200
        streams = [gw.stream("b", f"p{i}") for i in range(5)]
        try:
            assert all(s.status == 200 for s in streams)
        finally:
            for s in streams:
                s.close()
        metrics = gw.metrics()
        assert (
            metrics.value("sse_gateway_connections_rejected_total", reason="connection_limit") == 0
        )
        assert (
            metrics.value("sse_gateway_connections_rejected_total", reason="request_timeout") >= 100
        )


def test_header_timeout_is_configurable(
    gateway_factory: GatewayFactory, redis_server: RedisServer
) -> None:
    gw = gateway_factory(redis=redis_server, env={"SSE_HEADER_TIMEOUT": "500ms"})
    with raw_sockets(gw.port, 1) as (sock,):
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: gw\r\n")
        sock.settimeout(5)
        started = time.monotonic()
        answer = sock.recv(4096)
        waited = time.monotonic() - started
    assert answer.startswith(b"HTTP/1.1 408 ")
    assert waited < 4  # the default (10 s) was not used


def test_slowloris_with_a_thousand_half_open_sockets(
    gateway_factory: GatewayFactory, redis_server: RedisServer
) -> None:
    gw = gateway_factory(redis=redis_server, env={"SSE_CONNECTION_LIMIT": "500"})
    for _ in range(20):
        assert healthz(gw) == 200
    baseline = rss_bytes(gw.pid)
    with raw_sockets(gw.port, 1000) as socks:
        for round_ in range(3):  # a header line now and then, never the end of the head
            for sock in socks:
                with suppress(OSError):  # evicted
                    sock.sendall(b"GET /v1/sse HTTP/1.1\r\n" if round_ == 0 else b"X-a: b\r\n")
            assert healthz(gw) == 200
            stream = gw.stream("b", f"slowloris-{round_}")
            assert stream.status == 200
            stream.close()
        during = rss_bytes(gw.pid)
    wait_for(lambda: gw.metrics().total("sse_gateway_connections") == 0, timeout=10)
    time.sleep(0.5)
    after = rss_bytes(gw.pid)
    assert healthz(gw) == 200
    # Memory goes back to where it was (allocator slack aside).
    assert after - baseline < 8 * MiB, (baseline, during, after)


def sse_status(gw: Gateway, player: str, **headers: str) -> tuple[int, dict[str, str], bytes]:
    """A stream request's status, headers (lower-case names) and body (an error's)."""
    client = gw.open(headers={"Authorization": f"Bearer {gw.token('b', player)}", **headers})
    try:
        body = client.read_body() if client.status != 200 else b""
        return client.status, {k.lower(): v for k, v in client.response.headers}, body
    finally:
        client.close()


def test_connect_rate_per_ip_answers_429_with_retry_after(
    gateway_factory: GatewayFactory, redis_server: RedisServer
) -> None:
    gw = gateway_factory(
        redis=redis_server,
        env={"SSE_CONNECT_RATE_PER_IP": "3", "SSE_TRUSTED_PROXIES": "127.0.0.1/32"},
    )
    # Behind the trusted proxy (127.0.0.1 here), each X-Forwarded-For client has its own
    # bucket of 3; a fourth request within the second is refused.
    statuses = [sse_status(gw, f"p{i}", **{"X-Forwarded-For": "198.51.100.7"}) for i in range(4)]
    assert [s for s, _, _ in statuses] == [200, 200, 200, 429]
    _, headers, body = statuses[3]
    assert int(headers["retry-after"]) >= 1
    assert json.loads(body)["error"] == "rate_limited"
    assert sse_status(gw, "p9", **{"X-Forwarded-For": "198.51.100.8"})[0] == 200
    # Health checks and other paths are not counted.
    assert all(healthz(gw) == 200 for _ in range(10))
    assert gw.metrics().value("sse_gateway_connections_rejected_total", reason="rate_limited") == 1


def test_x_forwarded_for_from_an_untrusted_peer_is_ignored(
    gateway_factory: GatewayFactory, redis_server: RedisServer
) -> None:
    gw = gateway_factory(redis=redis_server, env={"SSE_CONNECT_RATE_PER_IP": "2"})
    statuses = [
        sse_status(gw, f"p{i}", **{"X-Forwarded-For": f"198.51.100.{i}"})[0] for i in range(3)
    ]
    assert statuses == [200, 200, 429]  # all counted against 127.0.0.1


def test_sockets_that_never_read_their_answers_do_not_lock_out_health_checks(
    gateway_factory: GatewayFactory, redis_server: RedisServer
) -> None:
    # Hostile pass: 70 sockets pipelining /metrics that never read held every reader slot
    # (limit 50: 64 readers); /healthz got resets and 503 connection_limit.
    gw = gateway_factory(redis=redis_server, env={"SSE_CONNECTION_LIMIT": "50"})
    flood = b"GET /metrics HTTP/1.1\r\nHost: gw\r\n\r\n" * 4000
    with raw_sockets(gw.port, 70, rcvbuf=4096) as socks:
        for sock in socks:
            sock.setblocking(False)
            with suppress(BlockingIOError, OSError):
                sock.send(flood)
        time.sleep(0.5)
        assert [healthz(gw) for _ in range(10)] == [200] * 10
        stream = gw.stream("b", "after-the-hogs")
        assert stream.status == 200
        stream.close()


def test_an_endless_trailer_gets_431_and_memory_stays_flat(
    gateway_factory: GatewayFactory, redis_server: RedisServer
) -> None:
    # Hostile pass: a chunked body's trailer value that never ends was buffered without limit
    # (httptools joins it quadratically), stalled the loop and dropped the Redis connection.
    gw = gateway_factory(redis=redis_server, env={"SSE_PUBLISH_API_KEY": "k"})
    before = rss_bytes(gw.pid)
    answer = endless(
        gw,
        b"POST /v1/publish HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"1\r\na\r\n0\r\nX-Trailer: ",
    )
    assert answer.startswith(b"HTTP/1.1 431 "), answer[:100]
    assert rss_bytes(gw.pid) - before < 16 * MiB
    assert healthz(gw) == 200
