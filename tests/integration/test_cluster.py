"""Redis Cluster (3 masters, 3 replicas, real processes): sharded Pub/Sub, failover, migration."""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis
from support.cluster import RedisClusterProcesses
from support.procs import Gateway, GatewayFactory, cli, wait_for
from support.sse import SSEClient, assert_quiet, is_event, read_through

from sse_gateway.broker.slots import key_slot
from sse_gateway.publish import PublishUnavailable, SyncPublisher
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


def spread_players(
    cluster: RedisClusterProcesses, brand: str, ids: Callable[..., str], per_master: int
) -> list[str]:
    """Player ids, `per_master` on each master (random ids cluster unevenly over 3 ranges)."""
    masters = cluster.masters()
    counts = dict.fromkeys(masters, 0)
    players: list[str] = []
    while min(counts.values()) < per_master:
        player = ids("p")
        port = owner_port(cluster, channel_name(brand, player))
        if counts[port] < per_master:
            counts[port] += 1
            players.append(player)
    return players


def shard_channels(cluster: RedisClusterProcesses, port: int) -> set[bytes]:
    with contextlib.closing(cluster.node(port).client()) as client:
        return set(client.execute_command("PUBSUB", "SHARDCHANNELS"))


def test_players_over_every_shard_get_their_events_each_shard_only_its_own(
    gateway_factory: GatewayFactory, cluster: RedisClusterProcesses, ids: Callable[..., str]
) -> None:
    gateway = gateway_factory(redis=cluster.url)
    brand = ids("b")
    players = spread_players(cluster, brand, ids, 8)
    owners = {p: owner_port(cluster, channel_name(brand, p)) for p in players}
    assert len(set(owners.values())) == 3, "players do not cover every master"
    clients: dict[str, SSEClient] = {p: gateway.player_stream(brand, p)[0] for p in players}
    publisher = SyncPublisher.from_url(cluster.url)
    try:
        published = {
            p: [str(publisher.publish(brand, p, "tick", {"n": n})) for n in range(3)]
            for p in players
        }
        for player, client in clients.items():
            got = read_through(client, published[player][-1])
            assert [e.id for e in got] == published[player], player
            assert [e.json()["n"] for e in got] == [0, 1, 2]
        for port in cluster.masters():
            mine = {channel_name(brand, p) for p in players if owners[p] == port}
            on_node = {
                c for c in shard_channels(cluster, port) if c.startswith(f"SSE::{brand}".encode())
            }
            assert on_node == mine, f"master {port} holds channels of other shards"
            with contextlib.closing(cluster.node(port).client()) as client:
                assert client.execute_command("PUBSUB", "CHANNELS", f"SSE::{brand}*") == []
        # the events went by SPUBLISH: each one reached one gateway process
        event = publisher.publish(brand, players[0], "tick", {"n": 3})
        assert event.receivers == 1
        # per-shard metrics: each master's subscriber up, its channels counted there
        metrics = gateway.metrics()
        for port in cluster.masters():
            shard = {"shard": f"127.0.0.1:{port}"}
            assert metrics.value("sse_gateway_broker_shard_connected", **shard) == 1
            mine = sum(1 for p in players if owners[p] == port)
            assert metrics.value("sse_gateway_broker_shard_subscribed_channels", **shard) >= mine
    finally:
        publisher.close()
        for client in clients.values():
            client.close()


class ClusterPublisher(threading.Thread):
    """Publishes round-robin through the cluster Publisher until stopped; keeps the ids
    Redis acknowledged, per player, and counts the publishes refused meanwhile."""

    def __init__(self, url: str, brand: str, players: list[str], pause: float) -> None:
        super().__init__(daemon=True)
        self.url, self.brand, self.players, self.pause = url, brand, players, pause
        self.acked: dict[str, list[str]] = {p: [] for p in players}
        self.refused = 0
        self.last_refusal = ""
        self.stop_flag = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        publisher = SyncPublisher.from_url(self.url, history_size=5000)
        n = 0
        try:
            while not self.stop_flag.is_set():
                for player in self.players:
                    try:
                        event_id = publisher.publish(self.brand, player, "tick", {"n": n})
                    except (PublishUnavailable, redis.RedisError) as exc:
                        self.last_refusal = repr(exc)
                        self.refused += 1  # not acknowledged: may or may not be stored
                        time.sleep(0.05)
                        continue
                    self.acked[player].append(str(event_id))
                n += 1
                time.sleep(self.pause)
        except BaseException as exc:
            self.error = exc
        finally:
            publisher.close()

    def finish(self) -> dict[str, list[str]]:
        self.stop_flag.set()
        self.join(30)
        assert not self.is_alive(), "publisher did not finish"
        if self.error is not None:
            raise self.error
        return self.acked


def collect(
    gateway: Gateway, brand: str, player: str, client: SSEClient, last: str, timeout: float = 40
) -> list[str]:
    """Event ids the player receives up to `last`; a stream that ends is opened again with
    Last-Event-ID (as a browser would)."""
    got: list[str] = []
    deadline = time.monotonic() + timeout
    while last not in got:
        remaining = deadline - time.monotonic()
        assert remaining > 0, f"{player}: {last} not received; got {len(got)} events"
        try:
            frame = client.next_frame(min(remaining, 5.0))
        except TimeoutError:
            continue
        except EOFError:
            client.close()
            resume = got[-1] if got else None
            client, _ = gateway.player_stream(brand, player, resume)
            continue
        if is_event(frame) and frame.id is not None:
            got.append(frame.id)
    client.close()
    return got


def assert_has_acked_in_order(got: list[str], acked: list[str], who: str) -> None:
    assert len(got) == len(set(got)), f"{who}: duplicate events"
    missing = [i for i in acked if i not in set(got)]
    assert not missing, f"{who}: {len(missing)} of {len(acked)} acknowledged events missing"
    position = {event_id: n for n, event_id in enumerate(got)}
    assert [position[i] for i in acked] == sorted(position[i] for i in acked), f"{who}: order"


def test_master_killed_while_publishing_every_acknowledged_event_arrives_in_order(
    gateway_factory: GatewayFactory, fresh_cluster: RedisClusterProcesses, ids: Callable[..., str]
) -> None:
    cluster = fresh_cluster
    key = "cluster-publish-key-0123456789abcdef"
    gateway = gateway_factory("--history-size", "5000", "--publish-api-key", key, redis=cluster.url)
    brand = ids("b")
    players = spread_players(cluster, brand, ids, 3)
    owners = {p: owner_port(cluster, channel_name(brand, p)) for p in players}
    assert len(set(owners.values())) == 3
    clients = {p: gateway.player_stream(brand, p)[0] for p in players}
    victim = owners[players[0]]
    publisher = ClusterPublisher(cluster.url, brand, players, pause=0.01)
    publisher.start()
    try:
        wait_for(lambda: all(len(v) >= 10 for v in publisher.acked.values()), what="publishing")
        cluster.node(victim).kill()
        wait_for(lambda: victim not in cluster.masters(), timeout=30, what="the failover")
        cluster.wait_healthy(30)
        # the gateway's own publisher (redis-py's async cluster client) follows too
        auth = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
        body = json.dumps({"brand_id": brand, "player_id": players[0], "type": "http", "data": 0})

        def http_publish() -> bool:
            answer = gateway.request("POST", "/v1/publish", headers=auth, body=body.encode())
            return answer.status == 202

        wait_for(http_publish, timeout=20, interval=0.2, what="an HTTP publish after failover")
        # publishing goes on after the failover, for every player
        marks = {p: len(v) for p, v in publisher.acked.items()}
        wait_for(
            lambda: all(len(publisher.acked[p]) >= marks[p] + 10 for p in players),
            timeout=30,
            what=f"publishing after the failover ({publisher.last_refusal})",
        )
    finally:
        acked = publisher.finish()
    for player in players:
        got = collect(gateway, brand, player, clients[player], acked[player][-1])
        assert_has_acked_in_order(got, acked[player], f"{player} (master {owners[player]})")
    # the lost shard's channels were refilled from history; the other shards' were not held
    lost = sum(owner == victim for owner in owners.values())
    refills = gateway.metrics().value("sse_gateway_refills_total", outcome="covered")
    assert lost <= refills < len(players), (lost, refills)


def move_slot(cluster: RedisClusterProcesses, slot: int, source: int, target: int) -> None:
    """CLUSTER SETSLOT IMPORTING/MIGRATING, MIGRATE of the slot's keys, SETSLOT NODE."""
    src, dst = cluster.node(source).client(), cluster.node(target).client()
    with contextlib.closing(src), contextlib.closing(dst):
        src_id = src.execute_command("CLUSTER", "MYID").decode()
        dst_id = dst.execute_command("CLUSTER", "MYID").decode()
        dst.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", src_id)
        src.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", dst_id)
        while True:
            keys = src.execute_command("CLUSTER", "GETKEYSINSLOT", slot, 100)
            if not keys:
                break
            src.execute_command("MIGRATE", "127.0.0.1", target, "", 0, 5000, "KEYS", *keys)
        dst.execute_command("CLUSTER", "SETSLOT", slot, "NODE", dst_id)
        src.execute_command("CLUSTER", "SETSLOT", slot, "NODE", dst_id)
        for port in cluster.masters():
            if port not in (source, target):
                with contextlib.closing(cluster.node(port).client()) as other:
                    other.execute_command("CLUSTER", "SETSLOT", slot, "NODE", dst_id)


def test_slot_moved_while_publishing_nothing_lost_each_once_in_order(
    gateway_factory: GatewayFactory, fresh_cluster: RedisClusterProcesses, ids: Callable[..., str]
) -> None:
    cluster = fresh_cluster
    gateway = gateway_factory("--history-size", "5000", redis=cluster.url)
    brand, player = ids("b"), ids("p")
    channel = channel_name(brand, player)
    source = owner_port(cluster, channel)
    target = next(port for port in cluster.masters() if port != source)
    client, _ = gateway.player_stream(brand, player)
    publisher = ClusterPublisher(cluster.url, brand, [player], pause=0.005)
    publisher.start()
    try:
        wait_for(lambda: len(publisher.acked[player]) >= 20, what="publishing")
        move_slot(cluster, key_slot(channel), source, target)
        assert owner_port(cluster, channel) == target
        wait_for(
            lambda: channel in shard_channels(cluster, target),
            timeout=20,
            what="the gateway to subscribe on the new owner",
        )
        mark = len(publisher.acked[player])
        wait_for(lambda: len(publisher.acked[player]) >= mark + 20, what="publishing after")
    finally:
        acked = publisher.finish()
    assert channel not in shard_channels(cluster, source)
    got: list[str] = []
    with client:
        got = [e.id or "" for e in read_through(client, acked[player][-1])]
        assert_quiet(client)
    # nothing lost, each once, in order: exactly what was acknowledged (none was refused)
    assert publisher.refused == 0
    assert got == acked[player]
    # the path taken: Redis pushed `sunsubscribe` for the moved slot, the gateway followed
    assert "channels moved away" in gateway.logs()


def test_http_publish_cli_publish_disconnect_and_presence_on_the_cluster(
    gateway_factory: GatewayFactory, cluster: RedisClusterProcesses, ids: Callable[..., str]
) -> None:
    key = "cluster-publish-key-0123456789abcdef"
    gateway = gateway_factory("--publish-api-key", key, redis=cluster.url)
    auth = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    brand, player = ids("b"), ids("p")
    client, _ = gateway.player_stream(brand, player)
    with client:
        body = json.dumps({"brand_id": brand, "player_id": player, "type": "n", "data": 1})
        response = gateway.request("POST", "/v1/publish", headers=auth, body=body.encode())
        assert response.status == 202, response
        done = cli(
            "publish",
            "--redis",
            cluster.url,
            "--brand",
            brand,
            "--player",
            player,
            "--type",
            "n",
            "--data",
            "2",
        )
        assert done.returncode == 0, done.stderr
        cli_id = done.stdout.strip().split()[0]
        got = read_through(client, cli_id)
        assert [e.json() for e in got] == [1, 2]
        # presence counts the gateway's SSUBSCRIBE on the player's shard
        online = gateway.request("GET", f"/v1/players/{brand}/{player}", headers=auth)
        assert online.status == 200, online
        assert online.json()["online"] is True, online.json()
        # a disconnect with a block: the stream closes, a new one is refused
        body = json.dumps(
            {"brand_id": brand, "player_id": player, "block_seconds": 60, "reason": "test"}
        )
        response = gateway.request("POST", "/v1/disconnect", headers=auth, body=body.encode())
        assert response.status == 200, response
        assert response.json()["receivers"] >= 1, response.json()
        assert client.wait_closed(15)
        assert client.frames[-1].event == "disconnected"
    refused = gateway.open(headers={"Authorization": f"Bearer {gateway.token(brand, player)}"})
    with refused:
        assert refused.status != 200 or refused.wait_event("close").json()["reason"] == "blocked"
    r = cluster.client()
    try:
        assert 55 <= r.ttl(f"SSE:block:{brand}:{player}") <= 60
        assert r.zscore("SSE:blocks", f"SSE:block:{brand}:{player}") is not None
    finally:
        r.close()


def test_manual_failover_moves_the_subscriptions_and_loses_nothing(
    gateway_factory: GatewayFactory, fresh_cluster: RedisClusterProcesses, ids: Callable[..., str]
) -> None:
    """CLUSTER FAILOVER: the old master stays up as a replica; the gateway leaves it."""
    cluster = fresh_cluster
    gateway = gateway_factory("--history-size", "5000", redis=cluster.url)
    brand, player = ids("b"), ids("p")
    channel = channel_name(brand, player)
    old = owner_port(cluster, channel)
    with contextlib.closing(cluster.node(old).client()) as master:
        replica = int(master.info("replication")["slave0"]["port"])
    client, _ = gateway.player_stream(brand, player)
    publisher = ClusterPublisher(cluster.url, brand, [player], pause=0.005)
    publisher.start()
    try:
        wait_for(lambda: len(publisher.acked[player]) >= 20, what="publishing")
        with contextlib.closing(cluster.node(replica).client()) as promoted:
            promoted.execute_command("CLUSTER", "FAILOVER")
        wait_for(lambda: owner_port(cluster, channel) == replica, timeout=30, what="failover")
        wait_for(
            lambda: channel in shard_channels(cluster, replica),
            timeout=20,
            what="the gateway to subscribe on the promoted replica",
        )
        mark = len(publisher.acked[player])
        wait_for(lambda: len(publisher.acked[player]) >= mark + 20, what="publishing after")
    finally:
        acked = publisher.finish()
    got = collect(gateway, brand, player, client, acked[player][-1])
    assert_has_acked_in_order(got, acked[player], player)

    assert channel not in shard_channels(cluster, old)
    # the channel was lost on the old master and refilled from the new one's history
    assert gateway.metrics().value("sse_gateway_refills_total", outcome="covered") >= 1


def test_workers_on_a_cluster_each_stream_gets_its_events(
    gateway_factory: GatewayFactory, cluster: RedisClusterProcesses, ids: Callable[..., str]
) -> None:
    """`--workers 2`: each worker has its own cluster broker; a player with a stream on each
    (the kernel spreads the connections) gets every event once per stream."""
    gateway = gateway_factory("--workers", "2", redis=cluster.url)
    brand, player = ids("b"), ids("p")
    clients = [gateway.player_stream(brand, player)[0] for _ in range(4)]
    publisher = SyncPublisher.from_url(cluster.url)
    try:
        published = [str(publisher.publish(brand, player, "n", n)) for n in range(5)]
        for client in clients:
            with client:
                assert [e.id for e in read_through(client, published[-1])] == published
    finally:
        publisher.close()
    status, body = gateway.readyz()
    assert status == 200, body
