"""Sentinel (`redis+sentinel://`): a real primary, replica and three sentinels; the primary
SIGKILLed while the Publisher publishes. Every event Redis acknowledged reaches every client,
in order, once; the gateway, the publisher library, the CLI and HTTP publish follow the new
primary.

Acknowledged here means kept: Redis replicates asynchronously, and a primary killed between
its reply and the replica's copy would lose an acknowledged event. On loopback the copy goes
out in the same event-loop turn as the reply, so this test does not meet that window.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from support.procs import Gateway, GatewayFactory, cli, free_port, wait_for
from support.sentinel import DATA_PASSWORD, SENTINEL_PASSWORD, SentinelSet
from support.sse import SSEClient, SSEEvent, is_event

from sse_gateway.publish import Publisher, PublishUnavailable, SyncPublisher

pytestmark = pytest.mark.timeout(120)
KEY = "sentinel-publish-key-0123456789abcdef"
Player = tuple[str, str]


@pytest.fixture
def sentinel_set(tmp_path: Path) -> Iterator[SentinelSet]:
    cluster = SentinelSet(tmp_path / "sentinel")
    try:
        yield cluster.start()
    finally:
        cluster.stop()


class FailoverPublisher(threading.Thread):
    """Publishes round-robin through the async Publisher until stopped; a publish that fails
    is tried again (its attempt's token noted: Redis may have run it before the reply was
    lost). `acked[player]` holds the acknowledged ids, in order."""

    def __init__(self, url: str, players: list[Player]) -> None:
        super().__init__(daemon=True)
        self.url = url
        self.players = players
        self.acked: dict[Player, list[str]] = {p: [] for p in players}
        self.failed_tokens: set[str] = set()
        self.stop_flag = threading.Event()
        self.error: BaseException | None = None

    @property
    def count(self) -> int:
        return sum(len(ids) for ids in self.acked.values())

    def run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as exc:
            self.error = exc

    async def _main(self) -> None:
        publisher = Publisher.from_url(self.url, history_size=5000)
        try:
            n = 0
            while not self.stop_flag.is_set():
                for brand, player in self.players:
                    attempt = 0
                    while True:
                        token = f"{player}/{n}/{attempt}"
                        try:
                            event = await publisher.publish(
                                brand, player, "tick", {"n": n, "token": token}
                            )
                        except PublishUnavailable:
                            self.failed_tokens.add(token)
                            attempt += 1
                            await asyncio.sleep(0.05)
                            continue
                        self.acked[(brand, player)].append(str(event))
                        break
                n += 1
                await asyncio.sleep(0.01)
        finally:
            await publisher.aclose()


def collect(
    gateway: Gateway, player: Player, client: SSEClient, last: str, through: str
) -> list[SSEEvent]:
    """Events up to `through`; a stream that ends is opened again with Last-Event-ID."""
    got: list[SSEEvent] = []
    for _ in range(200):  # each round either ends, or reads or reconnects
        try:
            frame = client.next_frame(30)
        except EOFError:
            client.close()
            client, _ = gateway.player_stream(*player, last_id=last)
            continue
        if is_event(frame):
            got.append(frame)
            assert frame.id is not None
            last = frame.id
            if frame.id == through:
                client.close()
                return got
    raise AssertionError(f"{player}: never reached {through}; got {len(got)} events")


def test_primary_killed_while_publishing_loses_no_acknowledged_event(
    gateway_factory: GatewayFactory, sentinel_set: SentinelSet, ids: Callable[..., str]
) -> None:
    url = sentinel_set.url
    gateway = gateway_factory("--history-size", "5000", "--publish-api-key", KEY, redis=url)
    brand = ids("b")
    players = [(brand, ids("p")), (brand, ids("q"))]
    streams = [(p, gateway.player_stream(*p)[0]) for p in (players[0], players[0], players[1])]
    # The sync library through the sentinels: each stream starts at a known event.
    with_sync = SyncPublisher.from_url(url, history_size=5000)
    first = {p: str(with_sync.publish(*p, "first", 0)) for p in players}
    with_sync.close()
    for player, client in streams:
        assert [f.id for f in client.read_until(is_event)[-1:]] == [first[player]]

    publisher = FailoverPublisher(url, players)
    publisher.start()
    try:
        wait_for(lambda: publisher.count >= 40, timeout=20, what="publishing to start")
        sentinel_set.kill(sentinel_set.primary)
        wait_for(
            lambda: sentinel_set.primary_named() == sentinel_set.replica,
            timeout=40,
            interval=0.2,
            what="the sentinels to promote the replica",
        )
        promoted_at = publisher.count
        wait_for(lambda: publisher.count >= promoted_at + 60, timeout=30, what="publishing")
    finally:
        publisher.stop_flag.set()
        publisher.join(30)
    assert publisher.error is None, publisher.error
    assert publisher.failed_tokens, "no publish failed: the primary was not killed mid-publish"

    for player, client in streams:
        acked = publisher.acked[player]
        got = collect(gateway, player, client, first[player], acked[-1])
        got_ids = [f.id for f in got]
        assert len(got_ids) == len(set(got_ids)), f"{player}: an event came twice"
        wanted = set(acked)
        assert [i for i in got_ids if i in wanted] == acked, f"{player}: lost or reordered"
        # Anything else is a publish that failed at the client but ran in Redis.
        extra = [f.json()["token"] for f in got if f.id not in wanted]
        assert set(extra) <= publisher.failed_tokens, extra

    assert f"127.0.0.1:{sentinel_set.replica}" in gateway.logs()
    status, body = gateway.readyz()
    assert status == 200, body

    # HTTP publish and the CLI publish to the new primary; a stream gets both.
    client, _ = gateway.player_stream(*players[0])
    body = json.dumps({"brand_id": brand, "player_id": players[0][1], "type": "http", "data": 1})
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    response = gateway.request("POST", "/v1/publish", headers=headers, body=body.encode())
    assert response.status == 202, response.body
    argv = ["publish", "--redis", url, "--brand", brand, "--player", players[0][1]]
    done = cli(*argv, "--type", "cli", "--data", "2")
    assert done.returncode == 0, done.stderr
    with client:
        got = [client.read_until(is_event)[-1] for _ in range(2)]
    assert [f.event for f in got] == ["http", "cli"]
    assert [f.id for f in got] == [response.json()["id"], done.stdout.strip()]
    with sentinel_set.client(sentinel_set.replica) as new_primary:
        assert new_primary.execute_command("ROLE")[0] == b"master"
        stored = new_primary.xlen(f"SSE::{brand}::{players[0][1]}")
        assert stored >= len(publisher.acked[players[0]]) + 3


def test_a_sentinel_naming_a_replica_is_not_followed(
    gateway_factory: GatewayFactory, sentinel_set: SentinelSet
) -> None:
    """ROLE is checked after each connect: a stale answer leaves the gateway not ready and
    publishes refused, with a log line that says why. The first sentinel of the list is down:
    the next one is asked."""
    stale = sentinel_set.stale_sentinel("stale")
    hosts = f"127.0.0.1:{free_port()},127.0.0.1:{stale}"
    url = f"redis+sentinel://:{DATA_PASSWORD}@{hosts}/stale?sentinel_password={SENTINEL_PASSWORD}"
    gateway = gateway_factory(redis=url, ready=False)
    line = wait_for(
        lambda: next((x for x in gateway.logs().splitlines() if "redis unreachable" in x), None),
        timeout=20,
        what="the gateway to log why it cannot connect",
    )
    assert f"127.0.0.1:{sentinel_set.replica}" in line and "not the primary" in line, line
    assert gateway.readyz() == (503, {"status": "not_ready", "reason": "broker_disconnected"})

    publisher = SyncPublisher.from_url(url)
    with pytest.raises(PublishUnavailable, match="is not the primary"):
        publisher.publish("b", "p", "t", 1)
    publisher.close()

    async def publish_async() -> None:
        publisher = Publisher.from_url(url)
        try:
            await publisher.publish("b", "p", "t", 1)
        finally:
            await publisher.aclose()

    with pytest.raises(PublishUnavailable, match="is not the primary"):
        asyncio.run(publish_async())
    # Nothing was written anywhere.
    with sentinel_set.client(sentinel_set.primary) as primary:
        assert primary.exists("SSE::b::p") == 0


def test_no_sentinel_answers(gateway_factory: GatewayFactory) -> None:
    dead = f"127.0.0.1:{free_port()},127.0.0.1:{free_port()}"
    gateway = gateway_factory(redis=f"redis+sentinel://{dead}/mymaster", ready=False)
    line = wait_for(
        lambda: next((x for x in gateway.logs().splitlines() if "redis unreachable" in x), None),
        timeout=20,
        what="the gateway to log why it cannot connect",
    )
    assert "no sentinel named the primary of 'mymaster'" in line, line
    assert dead.split(",")[1] in line, line
    assert gateway.readyz()[0] == 503


def test_a_primary_demoted_under_a_connection_is_left(tmp_path: Path) -> None:
    """`-READONLY` on a redis-py connection drops it, so the next connect asks the sentinels
    again (and checks ROLE) instead of writing to a replica for as long as it lives. The one
    sentinel here never fails over by itself: it keeps naming the demoted node."""
    cluster = SentinelSet(tmp_path / "demoted", sentinels=1, down_after_ms=600_000).start()
    sync = SyncPublisher.from_url(cluster.url)

    async def run() -> None:
        publisher = Publisher.from_url(cluster.url)
        try:
            assert (await publisher.publish("b", "p", "t", 0)).receivers == 0
            assert sync.publish("b", "p", "t", 1).receivers == 0
            # Both connected to the primary; it turns replica of the other node.
            with cluster.client(cluster.replica) as other, cluster.client(cluster.primary) as old:
                wait_for(lambda: other.xlen("SSE::b::p") == 2, what="the replica to have both")
                other.execute_command("REPLICAOF", "NO", "ONE")
                old.execute_command("REPLICAOF", "127.0.0.1", str(cluster.replica))
            with pytest.raises(PublishUnavailable, match="READONLY"):
                await publisher.publish("b", "p", "t", 2)
            with pytest.raises(PublishUnavailable, match="READONLY"):
                sync.publish("b", "p", "t", 2)
            # New connections: the sentinel still names the old primary; ROLE refuses it.
            with pytest.raises(PublishUnavailable, match="is not the primary"):
                await publisher.publish("b", "p", "t", 3)
            with pytest.raises(PublishUnavailable, match="is not the primary"):
                sync.publish("b", "p", "t", 3)
        finally:
            await publisher.aclose()

    try:
        asyncio.run(run())
        with cluster.client(cluster.replica) as other:
            assert other.xlen("SSE::b::p") == 2  # nothing written after the demotion
    finally:
        sync.close()
        cluster.stop()
