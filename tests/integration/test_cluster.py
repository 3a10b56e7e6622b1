"""Redis Cluster (3 masters, 3 replicas, real processes): sharded Pub/Sub, failover, migration."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis
from support.cluster import RedisClusterProcesses
from support.procs import GatewayFactory, wait_for
from support.sse import SSEClient, assert_quiet, read_through

from sse_gateway.broker.slots import key_slot
from sse_gateway.publish import SyncPublisher
from sse_gateway.wire.naming import channel_name

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisClusterProcesses]:
    """One cluster for the tests that do not break it."""
    processes = RedisClusterProcesses(tmp_path_factory.mktemp("cluster")).start()
    try:
        yield processes
    finally:
        processes.stop()


@pytest.fixture
def fresh_cluster(tmp_path: Path) -> Iterator[RedisClusterProcesses]:
    """A cluster of this test alone (a master may be killed, slots moved)."""
    processes = RedisClusterProcesses(tmp_path / "cluster").start()
    try:
        yield processes
    finally:
        processes.stop()


def owner_port(cluster: RedisClusterProcesses, channel: bytes) -> int:
    slot = key_slot(channel)
    for port, ranges in cluster.masters().items():
        if any(start <= slot <= end for start, end in ranges):
            return port
    raise AssertionError(f"slot {slot} has no master")


def shard_channels(cluster: RedisClusterProcesses, port: int) -> set[bytes]:
    with contextlib.closing(cluster.node(port).client()) as client:
        return set(client.execute_command("PUBSUB", "SHARDCHANNELS"))


def test_players_over_every_shard_get_their_events_each_shard_only_its_own(
    gateway_factory: GatewayFactory, cluster: RedisClusterProcesses, ids: Callable[..., str]
) -> None:
    gateway = gateway_factory(redis=cluster.url)
    brand = ids("b")
    players = [ids("p") for _ in range(24)]
    owners = {p: owner_port(cluster, channel_name(brand, p)) for p in players}
    assert len(set(owners.values())) == 3, "players do not cover every master"
    clients: dict[str, SSEClient] = {p: gateway.player_stream(brand, p)[0] for p in players}
    publisher = SyncPublisher.from_url(cluster.url)
    try:
        published = {p: [str(publisher.publish(brand, p, "tick", {"n": n})) for n in range(3)]
                     for p in players}
        for player, client in clients.items():
            got = read_through(client, published[player][-1])
            assert [e.id for e in got] == published[player], player
            assert [e.json()["n"] for e in got] == [0, 1, 2]
        for port in cluster.masters():
            mine = {channel_name(brand, p) for p in players if owners[p] == port}
            on_node = {c for c in shard_channels(cluster, port) if c.startswith(f"SSE::{brand}".encode())}
            assert on_node == mine, f"master {port} holds channels of other shards"
            with contextlib.closing(cluster.node(port).client()) as client:
                assert client.execute_command("PUBSUB", "CHANNELS", f"SSE::{brand}*") == []
        # the events went by SPUBLISH: each one reached one gateway process
        event = publisher.publish(brand, players[0], "tick", {"n": 3})
        assert event.receivers == 1
    finally:
        publisher.close()
        for client in clients.values():
            client.close()
