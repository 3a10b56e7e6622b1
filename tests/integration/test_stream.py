"""A successful stream: response headers, `retry:` first, `connected`, heartbeats."""

from __future__ import annotations

import re
import time
from collections.abc import Callable

import pytest
from support.procs import GatewayFactory, RedisServer
from support.sse import SSEEvent

pytestmark = pytest.mark.timeout(60)


def test_success_headers_and_no_compression(
    gateway_factory: GatewayFactory, redis_server: RedisServer, ids: Callable[..., str]
) -> None:
    gw = gateway_factory(redis=redis_server)
    token = gw.token(ids("b"), ids("p"))
    with gw.open(
        headers={"Authorization": f"Bearer {token}", "Accept-Encoding": "gzip, deflate, br"}
    ) as client:
        response = client.response
        assert response.status == 200, response
        assert (response.header("Content-Type") or "").lower() == "text/event-stream; charset=utf-8"
        assert response.header("Cache-Control") == "no-cache"
        assert response.header("X-Accel-Buffering") == "no"
        assert (response.header("Connection") or "").lower() == "close"
        assert response.header("Content-Encoding") is None, response.headers
        assert response.header("Content-Length") is None, response.headers
        # The body is plain text from the first byte: not gzip (1f 8b), not a zlib header.
        client.wait_connected()
        assert not bytes(client.raw).startswith(b"\x1f\x8b")
        assert bytes(client.raw).lstrip(b"\xef\xbb\xbf")[:1] in (b"r", b":", b"e", b"d", b"i")


def test_frame_order_retry_connected_heartbeats(
    gateway_factory: GatewayFactory, redis_server: RedisServer, ids: Callable[..., str]
) -> None:
    gw = gateway_factory("--retry-ms", "1234", "--keepalive-period", "200ms", redis=redis_server)
    brand, player = ids("b"), ids("p")
    with gw.stream(brand, player, wait_connected=False) as client:
        first = client.next_frame(timeout=15)
        assert first.is_retry_only, f"first frame must be `retry:` alone, got {first!r}"
        assert first.retry == 1234
        second = client.next_frame(timeout=15)
        assert second.event == "connected", second
        connected = second.json()
        assert set(connected) >= {"connection_id", "brand_id", "player_id", "heartbeat_interval"}
        assert connected["brand_id"] == brand
        assert connected["player_id"] == player
        assert isinstance(connected["connection_id"], str)
        assert connected["heartbeat_interval"] == pytest.approx(0.2)
        heartbeats: list[SSEEvent] = []
        while len(heartbeats) < 5:
            frame = client.next_frame(timeout=15)
            assert frame.event == "heartbeat", f"unexpected frame between heartbeats: {frame!r}"
            heartbeats.append(frame)
    stamps = []
    for beat in heartbeats:
        data = beat.json()
        assert set(data) == {"ts"}, data
        assert isinstance(data["ts"], int) and not isinstance(data["ts"], bool), data
        stamps.append(data["ts"])
    now_ms = time.time() * 1000
    assert all(abs(now_ms - ts) < 120_000 for ts in stamps), (stamps, now_ms)
    assert stamps == sorted(stamps), stamps
    assert client.parser.retries == [1234]


def test_default_retry_and_heartbeat_interval(
    gateway_factory: GatewayFactory, redis_server: RedisServer, ids: Callable[..., str]
) -> None:
    gw = gateway_factory(redis=redis_server)
    with gw.stream(ids("b"), ids("p"), wait_connected=False) as client:
        assert client.next_frame().retry == 3000
        connected = client.next_frame()
        assert connected.event == "connected"
        assert connected.json()["heartbeat_interval"] == pytest.approx(15.0)


def test_settings_from_env_and_flag_wins(
    gateway_factory: GatewayFactory, redis_server: RedisServer, ids: Callable[..., str]
) -> None:
    gw = gateway_factory(
        "--retry-ms",
        "777",
        redis=redis_server,
        env={"SSE_RETRY_MS": "5555", "SSE_KEEPALIVE_PERIOD": "250ms"},
    )
    with gw.stream(ids("b"), ids("p"), wait_connected=False) as client:
        assert client.next_frame().retry == 777
        assert client.next_frame().json()["heartbeat_interval"] == pytest.approx(0.25)
        assert client.next_event().event == "heartbeat"


def test_connection_ids_are_unique_hex(
    gateway_factory: GatewayFactory, redis_server: RedisServer, ids: Callable[..., str]
) -> None:
    gw = gateway_factory(redis=redis_server)
    brand, player = ids("b"), ids("p")
    seen = set()
    clients = [gw.stream(brand, player, wait_connected=False) for _ in range(5)]
    try:
        for client in clients:
            seen.add(client.wait_connected()["connection_id"])
    finally:
        for client in clients:
            client.close()
    assert len(seen) == 5
    for connection_id in seen:
        assert re.fullmatch(r"[0-9a-f]+", connection_id), f"not <hex> (docs/api.md): {seen}"


def test_query_token_stream_carries_no_token_in_frames(
    gateway_factory: GatewayFactory, redis_server: RedisServer, ids: Callable[..., str]
) -> None:
    gw = gateway_factory("--keepalive-period", "200ms", redis=redis_server)
    token = gw.token(ids("b"), ids("p"))
    with gw.open(f"/v1/sse?token={token}") as client:
        assert client.status == 200
        client.wait_connected()
        client.wait_event("heartbeat")
        assert token.encode() not in bytes(client.raw)
