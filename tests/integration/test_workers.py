"""Workers on one host (issue 11): `/metrics` and `/readyz` give the instance's view whichever
worker the kernel hands the request; a worker killed with SIGKILL loses its clients nothing;
two instances with workers each deliver every event once per connection."""

from __future__ import annotations

import os
import random
import re
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
from support.procs import Gateway, GatewayFactory, Metrics, RedisServer, wait_for
from support.sse import SSEClient, assert_quiet, is_event, read_events

from sse_gateway.instance import SNAPSHOT_PERIOD
from sse_gateway.publish import SyncPublisher
from sse_gateway.server import WORKER_MIN_LIFETIME

pytestmark = pytest.mark.timeout(180)

SCRAPES = 12
"""Requests per check: each lands on a worker the kernel picks; 12 reach both of two workers
all but once in 2,000 runs, and every one must give the instance's figures."""


def worker_of(connected: dict[str, Any]) -> int:
    """The pid of the worker serving a stream: its connection id begins with it in hex, then
    6 random and 10 counting hex digits (lifecycle.connection_id)."""
    return int(connected["connection_id"][:-16], 16)


def open_streams(gw: Gateway, brand: str, count: int) -> dict[str, tuple[SSEClient, int]]:
    """`count` streams, one per player: player -> (client, worker pid)."""
    streams = {}
    for i in range(count):
        client, connected = gw.player_stream(brand, f"p{i}")
        streams[f"p{i}"] = (client, worker_of(connected))
    return streams


def wait_past_min_lifetime(started: float) -> None:
    """A worker that dies younger than WORKER_MIN_LIFETIME makes the supervisor give up (a
    crash at start would only repeat): these tests kill grown-up workers."""
    time.sleep(max(0.0, started + WORKER_MIN_LIFETIME + 0.5 - time.monotonic()))


def test_every_scrape_reports_the_instance_and_counters_survive_a_killed_worker(
    gateway_factory: GatewayFactory, redis_server: RedisServer, ids: Callable[..., str]
) -> None:
    gw = gateway_factory("--workers", "2", redis=redis_server)
    started = time.monotonic()  # the workers were spawned before: they are older than this
    brand = ids("b")
    streams = open_streams(gw, brand, 16)
    workers = {pid for _, pid in streams.values()}
    # 16 streams all on one of two workers: once in 30,000 runs.
    assert len(workers) == 2, workers
    try:
        publisher = SyncPublisher.from_url(redis_server.url)
        for player in streams:
            publisher.publish(brand, player, "m", {"n": 1})
        publisher.close()
        for client, _ in streams.values():
            read_events(client, 1)
        # Another worker's figures are at most a snapshot period (1 s) old: once that has
        # passed, every scrape, whichever worker answers, gives the instance's totals.
        time.sleep(SNAPSHOT_PERIOD + 0.2)
        for _ in range(SCRAPES):
            m = gw.metrics()
            assert m.value("sse_gateway_connections", brand=brand) == 16
            assert m.value("sse_gateway_events_delivered_total") == 16
            assert m.value("sse_gateway_workers") == 2
            assert m.value("sse_gateway_broker_connected") == 1
        before = gw.metrics()
        victim = streams["p0"][1]
        survivors = [c for c, pid in streams.values() if pid != victim]
        wait_past_min_lifetime(started)
        os.kill(victim, signal.SIGKILL)
        seen: list[Metrics] = []

        def restarted() -> bool:
            try:
                seen.append(gw.metrics())
            except (OSError, EOFError):  # queued on the killed worker's socket: reset
                return False
            return "restarting it" in gw.logs() and seen[-1].value("sse_gateway_workers") == 2

        wait_for(restarted, what="the supervisor to restart the killed worker")
        wait_for(lambda: gw.logs().count("sse-gateway listening on") == 3, what="the new worker")
        seen += [gw.metrics() for _ in range(SCRAPES)]
        for name in (
            "sse_gateway_events_delivered_total",
            "sse_gateway_connections_opened_total",
            "sse_gateway_events_received_total",
        ):
            values = [before.value(name), *(m.value(name) for m in seen)]
            assert values == sorted(values), (name, values)  # never back
            assert values[-1] >= 16, (name, values)
        after = seen[-1]
        # Gauges are the live workers': the killed worker's streams are gone from them.
        assert after.value("sse_gateway_connections", brand=brand) == len(survivors)
        assert after.value("sse_gateway_connections_opened_total") >= 16
    finally:
        for client, _ in streams.values():
            client.close()


def test_readyz_is_not_ready_while_any_worker_is_draining(
    gateway_factory: GatewayFactory, redis_server: RedisServer
) -> None:
    """SIGTERM to one worker only: it is in its shutdown delay, so the instance is not ready,
    whichever worker answers, and the answer names it."""
    gw = gateway_factory("--workers", "2", "--shutdown-delay", "60s", redis=redis_server)
    for _ in range(SCRAPES):
        assert gw.readyz() == (200, {"status": "ready"})
    pids = {int(p) for p in re.findall(r"\[(\d+)\] sse-gateway listening", gw.logs())}
    assert len(pids) == 2, gw.logs()
    leaving = min(pids)
    os.kill(leaving, signal.SIGTERM)
    wait_for(lambda: "SSE_SHUTDOWN_DELAY" in gw.logs(), what="the worker's shutdown delay")
    expected = (503, {"status": "not_ready", "reason": "draining", "worker": leaving})
    wait_for(
        lambda: all(gw.readyz() == expected for _ in range(SCRAPES)),
        what="every worker's /readyz to name the draining one",
    )
    # Ends both delays (a second SIGTERM hurries each worker): the supervisor exits and removes
    # its directory, instead of being killed by the fixture 15 s into a 60 s delay.
    gw.terminate()
    wait_for(lambda: gw.logs().count("SSE_SHUTDOWN_DELAY") == 2, what="the other worker's delay")
    gw.terminate()
    assert gw.wait(timeout=30) == 0, gw.logs()[-2000:]


class Reconnecting(threading.Thread):
    """An EventSource-like client of one player: reconnects with Last-Event-ID (the last
    `id:` it saw) whenever its stream ends, until `stop` is set."""

    def __init__(self, gw: Gateway, brand: str, player: str, stop: threading.Event) -> None:
        super().__init__(daemon=True)
        self.gw, self.brand, self.player, self.stop_flag = gw, brand, player, stop
        self.received: list[str] = []
        self.workers: list[int] = []
        self.errors: list[str] = []
        self.connected = threading.Event()
        self.last_id: str | None = None

    def run(self) -> None:
        while not self.stop_flag.is_set():
            try:
                client, connected = self.gw.player_stream(self.brand, self.player, self.last_id)
            except (OSError, EOFError, AssertionError, TimeoutError) as exc:
                self.errors.append(repr(exc)[:200])
                time.sleep(0.05)  # refused or reset while the worker was going
                continue
            self.workers.append(worker_of(connected))
            if client.connected is not None and client.connected.id:
                self.last_id = client.connected.id
            self.connected.set()
            try:
                while not self.stop_flag.is_set():
                    try:
                        frame = client.next_frame(0.2)
                    except TimeoutError:
                        continue
                    if frame.id:
                        self.last_id = frame.id
                    if is_event(frame):
                        self.received.append(frame.id or "")
            except (OSError, EOFError, ValueError):
                pass  # its worker is gone: come back, as EventSource does
            finally:
                client.close()


def test_a_worker_killed_with_sigkill_loses_its_clients_nothing(
    gateway_factory: GatewayFactory, redis_server: RedisServer, ids: Callable[..., str]
) -> None:
    gw = gateway_factory("--workers", "2", redis=redis_server)
    started = time.monotonic()  # the workers were spawned before: they are older than this
    brand = ids("b")
    stop = threading.Event()
    clients = [Reconnecting(gw, brand, f"p{i}", stop) for i in range(10)]
    for client in clients:
        client.start()
    acked: dict[str, list[str]] = {c.player: [] for c in clients}
    publisher = SyncPublisher.from_url(redis_server.url)
    rng = random.Random(11)
    try:
        for client in clients:
            assert client.connected.wait(15), client.player
        victim = clients[0].workers[0]
        on_victim = [c for c in clients if c.workers[0] == victim]

        def publish_some(n: int) -> None:
            for _ in range(n):
                player = rng.choice(clients).player
                acked[player].append(publisher.publish(brand, player, "m", {"t": time.time()}))
                time.sleep(0.002)

        publish_some(100)
        wait_past_min_lifetime(started)
        os.kill(victim, signal.SIGKILL)
        # Events keep coming while the victim's clients find a worker again.
        publish_some(150)
        wait_for(
            lambda: all(len(c.workers) >= 2 for c in on_victim),
            what="the killed worker's clients to reconnect: "
            + repr([(c.workers, c.errors) for c in on_victim]),
        )
        publish_some(100)
        wait_for(
            lambda: all(len(c.received) >= len(acked[c.player]) for c in clients),
            what="every acknowledged event to arrive: "
            + repr([(len(c.received), len(acked[c.player]), c.workers) for c in clients]),
        )
        time.sleep(0.3)  # a duplicate would arrive now
        for client in clients:
            assert client.received == acked[client.player], client.player
        assert all(victim not in c.workers[1:] for c in on_victim)
    finally:
        stop.set()
        publisher.close()
        for client in clients:
            client.join(5)


def test_two_instances_with_workers_deliver_each_event_once_per_connection(
    gateway_factory: GatewayFactory, redis_server: RedisServer, ids: Callable[..., str]
) -> None:
    gateways = [gateway_factory("--workers", "2", redis=redis_server) for _ in range(2)]
    brand = ids("b")
    # Three streams of the one player on each instance: spread over their workers.
    streams = [gw.player_stream(brand, "p1")[0] for gw in gateways for _ in range(3)]
    publisher = SyncPublisher.from_url(redis_server.url)
    try:
        published = [publisher.publish(brand, "p1", "m", {"n": n}) for n in range(30)]
        for client in streams:
            assert [f.id for f in read_events(client, 30)] == published
            assert_quiet(client)
    finally:
        publisher.close()
        for client in streams:
            client.close()


def test_readyz_and_broker_connected_follow_redis_for_every_worker(
    gateway_factory: GatewayFactory, fresh_redis: RedisServer
) -> None:
    gw = gateway_factory("--workers", "2", redis=fresh_redis)
    fresh_redis.kill()

    def all_down() -> bool:
        answers = [gw.readyz() for _ in range(SCRAPES)]
        return all(
            status == 503 and body["reason"] == "broker_disconnected" and body["worker"] > 0
            for status, body in answers
        )

    wait_for(all_down, what="every worker's /readyz to say broker_disconnected")
    time.sleep(SNAPSHOT_PERIOD + 0.2)
    assert all(gw.metrics().value("sse_gateway_broker_connected") == 0 for _ in range(SCRAPES))
    fresh_redis.start()
    wait_for(
        lambda: all(gw.readyz()[0] == 200 for _ in range(SCRAPES)),
        timeout=30,
        what="every worker ready again",
    )
