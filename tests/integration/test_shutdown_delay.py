"""SSE_SHUTDOWN_DELAY: after SIGTERM a gateway says it is not ready, on new connections too,
while it keeps listening and serving; then the listener closes and the drain begins (issue 12,
"Shutdown that a load balancer can see"). The delays here are long and ended by a second
SIGTERM, so nothing depends on how fast the machine is; only generous upper bounds and one
lower bound (the delay itself) are timed."""

from __future__ import annotations

import signal
import socket
import time
from collections.abc import Callable

import pytest
from support.asserts import assert_farewell
from support.procs import Gateway, GatewayFactory, RedisServer, port_open, publish, wait_for
from support.sse import SSEClient

LONG_DELAY = 120  # seconds: longer than any test; each ends it with a second SIGTERM
MARGIN = 15.0  # seconds of slack on a loaded machine, for upper bounds only


def _readyz_on_new_connection(gw: Gateway) -> tuple[int, object]:
    """`/readyz` on a connection opened for it (what a load balancer's probe does)."""
    response = gw.get("/readyz", timeout=5)
    return response.status, response.json()


def _draining(gw: Gateway) -> bool:
    status, body = _readyz_on_new_connection(gw)
    # Under --workers the answer also names the worker (`worker`: its pid).
    assert isinstance(body, dict)
    return (status, body.get("status"), body.get("reason")) == (503, "not_ready", "draining")


def _refused(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2):
            return False
    except ConnectionRefusedError:
        return True


def _delivered(
    redis_server: RedisServer, brand: str, streams: dict[str, SSEClient], label: str
) -> None:
    """One event to each stream's player, and each stream receives it."""
    r = redis_server.client()
    try:
        for player in streams:
            assert publish(r, brand, player, {"type": label, "data": player}) >= 1, player
    finally:
        r.close()
    for player, client in streams.items():
        assert client.wait_event(label, timeout=MARGIN).json() == player


@pytest.mark.timeout(90)
def test_during_the_delay_not_ready_but_listening_and_serving_then_the_drain(
    gateway_factory: GatewayFactory, redis_server: RedisServer, ids: Callable[..., str]
) -> None:
    drain = 8
    gw = gateway_factory(
        "--shutdown-delay", f"{LONG_DELAY}s", "--drain-seconds", str(drain), redis=redis_server
    )
    brand = ids("b")
    old = {"old": gw.stream(brand, "old")}
    # A stream whose client stops reading: the drain waits for its socket (up to its
    # deadline), so the process is still there when the port is checked for refusal.
    stalled = SSEClient.connect(
        gw.port, headers={"Authorization": f"Bearer {gw.token(brand, 'stalled')}"}, rcvbuf=4096
    )
    late: dict[str, SSEClient] = {}
    try:
        stalled.wait_connected()
        gw.terminate()
        # Not ready on a NEW connection: the listener is still open.
        wait_for(lambda: _draining(gw), timeout=MARGIN, what="/readyz 503 draining")
        assert gw.get("/healthz").status == 200
        # A new stream is served, not refused; the old one keeps getting events.
        late["late"] = gw.stream(brand, "late")
        _delivered(redis_server, brand, {**old, **late}, "during_delay")
        assert _draining(gw)
        assert gw.running()
        assert "SSE_SHUTDOWN_DELAY" in gw.logs()
        r = redis_server.client()
        for _ in range(30):
            publish(r, brand, "stalled", {"type": "big", "data": "x" * 16_000})
        r.close()
        time.sleep(0.5)  # the stalled stream's buffers are full
        # A second SIGTERM ends the delay: the listener closes, the drain begins.
        ended = time.monotonic()
        gw.terminate()
        wait_for(lambda: _refused(gw.port), timeout=MARGIN, what="the listener to close")
        assert gw.running(), "the gateway exited without draining the stalled stream"
        for client in (*old.values(), *late.values()):
            assert_farewell(client, "shutdown", 3000, timeout=MARGIN)
        assert gw.wait(timeout=drain + MARGIN) == 0, gw.logs()[-2000:]
        assert time.monotonic() - ended < drain + MARGIN
    finally:
        for client in (*old.values(), *late.values(), stalled):
            client.close()


@pytest.mark.timeout(60)
def test_the_delay_ends_by_itself_then_streams_are_closed_and_the_process_exits(
    gateway_factory: GatewayFactory, redis_server: RedisServer, ids: Callable[..., str]
) -> None:
    delay, drain = 2.0, 2.0
    gw = gateway_factory(
        "--shutdown-delay", "2s", "--drain-seconds", "2", "--keepalive-period", "500ms",
        redis=redis_server,
    )  # fmt: skip
    brand = ids("b")
    client = gw.stream(brand, "p")
    try:
        sent = time.monotonic()
        gw.terminate()
        assert_farewell(client, "shutdown", 3000, timeout=delay + MARGIN)
        # A lower bound only: the streams cannot be closed before the delay is over.
        assert time.monotonic() - sent >= delay - 0.1
        assert client.chunked and client.ended
        assert gw.wait(timeout=delay + drain + MARGIN) == 0, gw.logs()[-2000:]
        assert time.monotonic() - sent < delay + drain + MARGIN
        assert not port_open(gw.port)
    finally:
        client.close()


@pytest.mark.timeout(90)
def test_workers_pass_both_signals_on(
    gateway_factory: GatewayFactory, redis_server: RedisServer, ids: Callable[..., str]
) -> None:
    """Under --workers the supervisor passes SIGTERM on: every worker is not ready and still
    serving; a second SIGTERM to the supervisor ends every worker's delay."""
    drain = 2
    gw = gateway_factory(
        "--workers", "2", "--shutdown-delay", f"{LONG_DELAY}s", "--drain-seconds", str(drain),
        redis=redis_server,
    )  # fmt: skip
    brand = ids("b")
    # The kernel spreads connections over both workers (SO_REUSEPORT): several streams and
    # several probes reach each of them in all likelihood, and every one must agree.
    old = {f"old{i}": gw.stream(brand, f"old{i}") for i in range(6)}
    late: dict[str, SSEClient] = {}
    try:
        gw.terminate()
        wait_for(
            lambda: all(_draining(gw) for _ in range(10)),
            timeout=MARGIN,
            what="/readyz 503 draining from every worker",
        )
        late = {f"late{i}": gw.stream(brand, f"late{i}") for i in range(4)}
        _delivered(redis_server, brand, {**old, **late}, "during_delay")
        assert gw.running()
        assert gw.logs().count("SSE_SHUTDOWN_DELAY") == 2, gw.logs()[-2000:]
        ended = time.monotonic()
        gw.signal(signal.SIGTERM)
        for client in (*old.values(), *late.values()):
            assert_farewell(client, "shutdown", 3000, timeout=drain + MARGIN)
        assert gw.wait(timeout=drain + MARGIN) == 0, gw.logs()[-2000:]
        assert time.monotonic() - ended < drain + MARGIN  # far below LONG_DELAY
        assert not port_open(gw.port)
    finally:
        for client in (*old.values(), *late.values()):
            client.close()
