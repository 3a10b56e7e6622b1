"""A successful stream: response headers, `connected` first (with `id:` and `retry:`),
heartbeats; an HTTP/1.1 body chunked, every write whole chunks."""

from __future__ import annotations

import re
import time
from collections.abc import Callable

import pytest
from support.procs import GatewayFactory, RedisServer
from support.sse import SSEEvent, assert_position_id, parse_stream

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
        assert response.header("Cache-Control") == "no-cache, no-transform"
        assert response.header("X-Accel-Buffering") == "no"
        assert (response.header("Connection") or "").lower() == "close"
        assert response.header("Content-Encoding") is None, response.headers
        assert response.header("Content-Length") is None, response.headers
        assert response.header_values("Transfer-Encoding") == ["chunked"], response.headers
        # The body is plain text from the first byte: not gzip (1f 8b), not a zlib header.
        client.wait_connected()
        assert not bytes(client.raw).startswith(b"\x1f\x8b")
        assert bytes(client.raw).lstrip(b"\xef\xbb\xbf")[:1] in (b"r", b":", b"e", b"d", b"i")
        # ... in chunks: the first one is exactly the `connected` frame.
        size, _, rest = bytes(client.wire).partition(b"\r\n")
        assert client.connected is not None and client.connected.id is not None
        first = f"id: {client.connected.id}\nevent: connected\n".encode()
        assert int(size, 16) > 0 and rest.startswith(first), rest[:80]


def test_frame_order_connected_then_heartbeats(
    gateway_factory: GatewayFactory, redis_server: RedisServer, ids: Callable[..., str]
) -> None:
    gw = gateway_factory("--retry-ms", "1234", "--keepalive-period", "200ms", redis=redis_server)
    brand, player = ids("b"), ids("p")
    with gw.stream(brand, player, wait_connected=False) as client:
        first = client.next_frame(timeout=15)
        # One frame: the resume id (an empty history: a position of Redis' clock),
        # `connected` and the retry, so no client sees a `retry:`-only block as an empty
        # message.
        assert first.event == "connected" and first.has_data, first
        assert first.retry == 1234, first
        assert_position_id(first.id)
        prefix = f"id: {first.id}\nevent: connected\nretry: 1234\ndata: ".encode()
        assert bytes(client.raw).startswith(prefix), bytes(client.raw[:100])
        connected = first.json()
        assert set(connected) >= {"connection_id", "brand_id", "player_id", "heartbeat_interval"}
        assert "recovered" not in connected  # no Last-Event-ID
        assert connected["brand_id"] == brand
        assert connected["player_id"] == player
        assert isinstance(connected["connection_id"], str)
        assert connected["heartbeat_interval"] == pytest.approx(0.2)
        heartbeats: list[SSEEvent] = []
        while len(heartbeats) < 5:
            frame = client.next_frame(timeout=15)
            assert frame.event == "heartbeat", f"unexpected frame between heartbeats: {frame!r}"
            assert frame.id is None and frame.retry is None, frame
            heartbeats.append(frame)
        # Each chunk holds exactly one frame, as the gateway wrote them.
        chunks = client.chunks()
        assert len(chunks) >= 1 + len(heartbeats) and not client.ended
        assert [len(parse_stream(data)) for data in chunks] == [1] * len(chunks), chunks
        assert chunks[0].startswith(prefix) and chunks[0].endswith(b"\n\n")
    stamps = []
    for beat in heartbeats:
        data = beat.json()
        assert set(data) == {"ts"}, data
        assert isinstance(data["ts"], int) and not isinstance(data["ts"], bool), data
        stamps.append(data["ts"])
    now_ms = time.time() * 1000
    assert all(abs(now_ms - ts) < 120_000 for ts in stamps), (stamps, now_ms)
    assert stamps == sorted(stamps), stamps
    assert client.retries == [1234]
    assert not [f for f in client.frames if f.is_retry_only]


def test_default_retry_and_heartbeat_interval(
    gateway_factory: GatewayFactory, redis_server: RedisServer, ids: Callable[..., str]
) -> None:
    gw = gateway_factory(redis=redis_server)
    with gw.stream(ids("b"), ids("p"), wait_connected=False) as client:
        connected = client.next_frame()
        assert connected.event == "connected"
        assert connected.retry == 3000
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
        connected = client.next_frame()
        assert (connected.event, connected.retry) == ("connected", 777)
        assert connected.json()["heartbeat_interval"] == pytest.approx(0.25)
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
