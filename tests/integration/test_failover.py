"""Nothing lost across failures: Pub/Sub drops, slow clients, Redis restarts, gateway SIGTERM."""

from __future__ import annotations

import contextlib
import queue
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator

import pytest
from support.asserts import assert_close_frame, assert_farewell
from support.procs import Gateway, GatewayFactory, RedisServer, wait_for
from support.sse import SSEEvent, assert_quiet, is_event, read_events, read_through

from sse_gateway.publish import Event, SyncPublisher

pytestmark = pytest.mark.timeout(120)

BIG_HISTORY = "5000"


# --------------------------------------------------------------------------- helpers


def assert_exactly(got: Iterable[str | None], published: list[str], who: str) -> None:
    got = list(got)
    seen: dict[str | None, int] = {}
    dupes: list[str] = []
    for n, event_id in enumerate(got):
        if event_id in seen:
            index = published.index(event_id) if event_id in published else -1
            dupes.append(f"{event_id} (published #{index}) at {seen[event_id]} and {n}")
        seen[event_id] = n
    assert not dupes, f"{who}: {len(dupes)} duplicate events: {dupes[:5]}"
    missing = [i for i in published if i not in set(got)]
    assert not missing, f"{who}: {len(missing)} of {len(published)} events missing: {missing[:5]}"
    assert got == published, f"{who}: out of order or unexpected events"


class PublisherThread(threading.Thread):
    """Publishes round-robin for `players` until `limit` events each, or until stopped."""

    def __init__(
        self,
        url: str,
        players: list[tuple[str, str]],
        *,
        limit: int,
        pause: float,
        size: int = 0,
    ) -> None:
        super().__init__(daemon=True)
        self.url = url
        self.players = players
        self.limit = limit
        self.pause = pause
        self.pad = "x" * size
        self.published: dict[tuple[str, str], list[str]] = {p: [] for p in players}
        self.stop_flag = threading.Event()
        self.error: BaseException | None = None

    @property
    def count(self) -> int:
        return sum(len(v) for v in self.published.values())

    def run(self) -> None:
        publisher = SyncPublisher.from_url(self.url, history_size=int(BIG_HISTORY))
        try:
            for n in range(self.limit):
                for brand, player in self.players:
                    if self.stop_flag.is_set():
                        return
                    event_id = publisher.publish(brand, player, "tick", {"n": n, "pad": self.pad})
                    self.published[(brand, player)].append(event_id)
                if self.pause:
                    time.sleep(self.pause)
        except BaseException as exc:
            self.error = exc
        finally:
            publisher.close()

    def finish(self, *, stop: bool, timeout: float = 60.0) -> dict[tuple[str, str], list[str]]:
        if stop:
            self.stop_flag.set()
        self.join(timeout)
        assert not self.is_alive(), "publisher did not finish"
        if self.error is not None:
            raise self.error
        return self.published


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


# --------------------------------------------------------------------------- Pub/Sub drops


def test_pubsub_connection_killed_repeatedly_loses_nothing(
    gateway_factory: GatewayFactory, fresh_redis: RedisServer, ids: Callable[..., str]
) -> None:
    gateway = gateway_factory("--history-size", BIG_HISTORY, redis=fresh_redis)
    brand = ids("b")
    p1, p2 = (brand, ids("p")), (brand, ids("q"))
    # three clients: two tabs of one player, one of another (two channels to refill)
    clients = [(p, gateway.player_stream(*p)[0]) for p in (p1, p1, p2)]
    r = fresh_redis.client()
    publisher = PublisherThread(fresh_redis.url, [p1, p2], limit=300, pause=0.004)
    kills = 0
    try:
        publisher.start()
        while publisher.is_alive() and kills < 6:
            time.sleep(0.15)
            before = gateway.metrics().value("sse_gateway_broker_reconnects_total")
            killed = r.client_kill_filter(_type="pubsub")
            assert killed >= 1, "no pubsub connection to kill"
            kills += 1
            wait_for(
                lambda n=before: gateway.metrics().value("sse_gateway_broker_reconnects_total") > n,
                timeout=20,
                what="the gateway to reconnect",
            )
        published = publisher.finish(stop=False)
        assert kills >= 3, f"only {kills} kills happened while publishing; publish slower"
        assert all(len(v) == 300 for v in published.values())
        for n, (player, client) in enumerate(clients):
            with client:
                got = read_through(client, published[player][-1])
                assert_exactly((e.id for e in got), published[player], f"client {n}")
                assert [e.json()["n"] for e in got] == list(range(300))
                assert_quiet(client)
    finally:
        publisher.stop_flag.set()
        r.close()
    metrics = gateway.metrics()
    assert metrics.value("sse_gateway_connections_closed_total", reason="slow_consumer") == 0
    # the kills really cost live messages: some events reached the clients only by the refill
    assert metrics.value("sse_gateway_events_received_total") < 600


def test_pubsub_outage_longer_than_history_is_not_silent(
    gateway_factory: GatewayFactory, fresh_redis: RedisServer, ids: Callable[..., str]
) -> None:
    """A gap the history cannot fill: each client gets everything, or its stream ends (so it
    reconnects with Last-Event-ID and learns `recovered: false`); never a silent hole."""
    gateway = gateway_factory("--history-size", "5", redis=fresh_redis)
    brand, player = ids("b"), ids("p")
    client, _ = gateway.player_stream(brand, player)
    r = fresh_redis.client()
    publisher = SyncPublisher.from_url(fresh_redis.url, history_size=5)
    try:
        first = publisher.publish(brand, player, "n", -1)
        assert [e.id for e in read_events(client, 1)] == [first]
        # keep the gateway out: no new connection is accepted while the gap is made
        r.config_set("maxclients", len(r.client_list()))
        reconnects = gateway.metrics().value("sse_gateway_broker_reconnects_total")
        assert r.client_kill_filter(_type="pubsub") >= 1
        missed = publisher.publish_many([Event(brand, player, "n", n) for n in range(20)])
        assert all(m.receivers == 0 for m in missed), "the gateway got back in too early"
        r.config_set("maxclients", 10000)
        wait_for(
            lambda: gateway.metrics().value("sse_gateway_broker_reconnects_total") > reconnects,
            timeout=30,
            what="the gateway to reconnect",
        )
        live = publisher.publish(brand, player, "live", 0)
        got: list[str | None] = []
        closed = False
        try:
            while live not in got:
                got += [e.id for e in read_events(client, 1)]
        except EOFError:
            closed = True
        if closed:
            # Said, not silent: `event: close` (history_gap) asks the client back.
            assert_farewell(client, "history_gap", 3000)
        else:
            assert got == [*missed, live], f"{21 - len(got)} events silently missing"
    finally:
        client.close()
        publisher.close()
        r.close()


def test_redis_restart_streams_resume_without_loss(
    gateway_factory: GatewayFactory, fresh_redis: RedisServer, ids: Callable[..., str]
) -> None:
    """Redis killed (history lost with it) and restarted: open streams get everything new."""
    gateway = gateway_factory("--history-size", BIG_HISTORY, redis=fresh_redis)
    brand, player = ids("b"), ids("p")
    client, _ = gateway.player_stream(brand, player)
    with client:
        publisher = SyncPublisher.from_url(fresh_redis.url)
        try:
            before = publisher.publish_many([Event(brand, player, "n", n) for n in range(5)])
            assert [e.id for e in read_events(client, 5)] == before
        finally:
            publisher.close()
        fresh_redis.kill()
        wait_for(lambda: gateway.readyz()[0] == 503, what="gateway to notice Redis is down")
        fresh_redis.start()
        # published at once, most likely before the gateway has resubscribed: refilled from
        # the (new) history when it does
        publisher = SyncPublisher.from_url(fresh_redis.url)
        try:
            after = publisher.publish_many([Event(brand, player, "n", n) for n in range(5, 25)])
        finally:
            publisher.close()
        got = read_through(client, after[-1])
        assert_exactly((e.id for e in got), after, "client")
        assert gateway.metrics().total("sse_gateway_connections") == 1  # the same stream throughout


# --------------------------------------------------------------------------- slow consumers


def test_slow_consumer_cut_off_then_recovers_everything(
    gateway_factory: GatewayFactory, redis_server: RedisServer, ids: Callable[..., str]
) -> None:
    gateway = gateway_factory(
        "--history-size", BIG_HISTORY, "--event-buffer-size", "10", redis=redis_server
    )
    brand, player = ids("b"), ids("p")
    publisher = SyncPublisher.from_url(redis_server.url, history_size=int(BIG_HISTORY))
    count, pad = 1000, "y" * 16384  # 16 MB in all
    try:
        slow, _ = gateway.player_stream(brand, player, rcvbuf=4096)
        first = publisher.publish(brand, player, "n", {"n": -1})
        [event] = read_events(slow, 1)
        assert event.id == first
        last_seen = slow.parser.last_event_id
        assert last_seen == first
        rss_before = rss_kib(gateway.pid)
        # ... and the client stops reading its socket
        published: list[str] = []
        peak = rss_before
        for start in range(0, count, 50):
            batch = [
                Event(brand, player, "big", {"n": n, "pad": pad}) for n in range(start, start + 50)
            ]
            published += publisher.publish_many(batch)
            peak = max(peak, rss_kib(gateway.pid))
        wait_for(
            lambda: (
                gateway.metrics().value(
                    "sse_gateway_connections_closed_total", reason="slow_consumer"
                )
                == 1
            ),
            timeout=30,
            what="the slow client to be cut off",
        )
        peak = max(peak, rss_kib(gateway.pid))
        # the gateway never held the ~16 MB the client did not read (the socket buffers hold a
        # few MB, the transport 64 KiB, the queue 10 events)
        assert peak - rss_before < 8 * 1024, f"gateway RSS grew by {peak - rss_before} KiB"
        assert "reason=slow_consumer" in gateway.logs()
        assert gateway.metrics().total("sse_gateway_connections") == 0
        slow.close()

        client, connected = gateway.player_stream(brand, player, last_seen)
        with client:
            assert connected["recovered"] is True
            assert client.connected is not None and client.connected.id == last_seen
            got = read_through(client, published[-1], timeout=60)
            assert_exactly((e.id for e in got), published, "reconnected client")
            assert [e.json()["n"] for e in got] == list(range(count))
            live = publisher.publish(brand, player, "live", 1)
            assert [e.id for e in read_events(client, 1)] == [live]
    finally:
        publisher.close()


# --------------------------------------------------------------------------- SIGTERM


class FailoverClient(threading.Thread):
    """An EventSource-like client: on A until it closes, then at once on B with Last-Event-ID."""

    def __init__(self, a: Gateway, b: Gateway, brand: str, player: str) -> None:
        super().__init__(daemon=True)
        self.b = b
        self.brand, self.player = brand, player
        self.client, _ = a.player_stream(brand, player)
        self.ids: list[str | None] = []
        self.retries: list[int] = []
        self.farewell: SSEEvent | None = None  # A's last frame
        self.ended = False  # A's chunked body ended with its last chunk (not a cut)
        self.recovered: bool | None = None
        self.target: str | None = None
        self.got_target = threading.Event()
        self.reconnected = threading.Event()
        self.error: BaseException | None = None

    def _absorb(self, frame: SSEEvent) -> None:
        if is_event(frame):
            self.ids.append(frame.id)

    def run(self) -> None:
        try:
            with self.client:
                while True:
                    try:
                        self._absorb(self.client.next_frame(30))
                    except EOFError:
                        break
            # every `retry:` A sent, from the first frame on, and in which frames
            self.retries = [f.retry for f in self.client.frames if f.retry is not None]
            assert self.retries == self.client.retries
            self.farewell = self.client.frames[-1] if self.client.frames else None
            self.ended = self.client.ended
            last_id = self.client.parser.last_event_id
            client, connected = self.b.player_stream(self.brand, self.player, last_id or None)
            self.recovered = connected.get("recovered")
            self.reconnected.set()
            with client:
                while not (self.target is not None and self.target in self.ids):
                    try:
                        self._absorb(client.next_frame(0.5))
                    except TimeoutError:
                        continue
                self.got_target.set()
                for frame in client.drain_available(0.3):
                    self._absorb(frame)
        except BaseException as exc:
            self.error = exc
            self.reconnected.set()


def test_sigterm_clients_resume_on_another_instance(
    gateway_factory: GatewayFactory, redis_server: RedisServer, ids: Callable[..., str]
) -> None:
    flags = ("--history-size", BIG_HISTORY, "--retry-ms", "1000", "--drain-seconds", "5")
    a = gateway_factory(*flags, redis=redis_server)
    b = gateway_factory(*flags, redis=redis_server)
    brand = ids("b")
    p1, p2 = (brand, ids("p")), (brand, ids("q"))
    clients = [FailoverClient(a, b, *p) for p in (p1, p1, p2, p2)]
    publisher = PublisherThread(redis_server.url, [p1, p2], limit=100_000, pause=0.002)
    try:
        for client in clients:
            client.start()
        publisher.start()
        wait_for(lambda: all(len(c.ids) >= 10 for c in clients), what="events on A")
        a.terminate()
        assert a.wait(10) == 0
        for client in clients:
            assert client.reconnected.wait(20), "client did not reconnect"
        wait_for(lambda: publisher.count > 0 and all(len(c.ids) >= 50 for c in clients))
        time.sleep(0.3)  # publishing goes on while they are on B
    finally:
        published = publisher.finish(stop=True)
    for client in clients:
        client.target = published[(client.brand, client.player)][-1]
    for n, client in enumerate(clients):
        assert client.got_target.wait(30) or client.error is not None, f"client {n} stuck"
        client.join(10)
        if client.error is not None:
            raise client.error
        assert client.recovered is True, f"client {n}"
        assert_exactly(client.ids, published[(client.brand, client.player)], f"client {n}")
        # retry: the configured one in `connected`, then the shutdown one in `event: close`:
        # 1000 ms + up to 10 s of jitter; A's body ends with its last chunk.
        assert len(client.retries) == 2, f"client {n}: retry frames from A: {client.retries}"
        assert client.retries[0] == 1000
        assert client.farewell is not None
        assert_close_frame(client.farewell, "shutdown", 1000)
        assert client.farewell.retry == client.retries[1]
        assert client.ended, f"client {n}: A's stream ended without its last chunk"
    assert b.metrics().value("sse_gateway_replays_total", outcome="recovered") == len(clients)
    shutdown_retries = {c.retries[1] for c in clients}
    assert len(shutdown_retries) > 1, "every client was told the same retry delay (no jitter)"


# --------------------------------------------------------------------------- races between
# the Pub/Sub connection and the command connection (history reads): a Redis proxy that delays
# what Redis sends on one kind of connection makes each race happen every time.


class _Link:
    """One proxied client connection: Redis -> client data is sent `delay()` seconds late."""

    def __init__(self, proxy: LaggyRedisProxy, downstream: socket.socket) -> None:
        self.proxy = proxy
        self.downstream = downstream
        self.upstream = socket.create_connection(("127.0.0.1", proxy.target_port))
        self.kind = "command"
        self.outbox: queue.Queue[tuple[float, bytes]] = queue.Queue()
        for target in (self._client_to_redis, self._redis_to_outbox, self._outbox_to_client):
            threading.Thread(target=target, daemon=True).start()

    def _client_to_redis(self) -> None:
        with contextlib.suppress(OSError):
            while chunk := self.downstream.recv(65536):
                if b"SUBSCRIBE" in chunk.upper():
                    self.kind = "pubsub"
                if b"XRANGE" in chunk.upper():
                    self.proxy.history_reads.set()
                self.upstream.sendall(chunk)
        self.close()

    def _redis_to_outbox(self) -> None:
        with contextlib.suppress(OSError):
            while chunk := self.upstream.recv(65536):
                delay = (
                    self.proxy.pubsub_delay if self.kind == "pubsub" else self.proxy.command_delay
                )
                self.outbox.put((time.monotonic() + delay, chunk))
        self.outbox.put((0.0, b""))

    def _outbox_to_client(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                due, chunk = self.outbox.get()
                if not chunk:
                    break
                time.sleep(max(0.0, due - time.monotonic()))
                self.downstream.sendall(chunk)
        self.close()

    def close(self) -> None:
        for sock in (self.downstream, self.upstream):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                sock.close()


class LaggyRedisProxy:
    """Between the gateway and Redis; latency per connection kind, changeable at any time."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.pubsub_delay = 0.0
        self.command_delay = 0.0
        self.history_reads = threading.Event()  # set when an XRANGE goes through
        self.links: list[_Link] = []
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self.listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def _accept(self) -> None:
        while True:
            try:
                downstream, _ = self.listener.accept()
            except OSError:
                return
            self.links.append(_Link(self, downstream))

    def close(self) -> None:
        self.listener.close()
        for link in self.links:
            link.close()


@pytest.fixture
def laggy(redis_server: RedisServer) -> Iterator[LaggyRedisProxy]:
    proxy = LaggyRedisProxy(redis_server.port)
    try:
        yield proxy
    finally:
        proxy.close()


def test_replay_then_late_live_copy_is_not_sent_twice(
    gateway_factory: GatewayFactory,
    redis_server: RedisServer,
    laggy: LaggyRedisProxy,
    ids: Callable[..., str],
) -> None:
    gateway = gateway_factory(redis=laggy.url)
    brand, player = ids("b"), ids("p")
    publisher = SyncPublisher.from_url(redis_server.url)
    r = redis_server.client()
    try:
        last = publisher.publish(brand, player, "n", 0)
        laggy.pubsub_delay = 0.5  # Pub/Sub traffic reaches the gateway half a second late
        token = gateway.token(brand, player)
        client = gateway.open(headers={"Authorization": f"Bearer {token}", "Last-Event-ID": last})
        with client:
            assert client.status == 200
            # Redis has the subscription now (its confirmation is on its way, late)
            channel = f"SSE::{brand}::{player}"
            wait_for(
                lambda: dict(r.pubsub_numsub(channel)).get(channel.encode()) == 1,
                what="the gateway's SUBSCRIBE to reach Redis",
            )
            time.sleep(0.2)  # the replay's history read comes 0.3 s before this arrives live
            missed = publisher.publish(brand, player, "n", 1)  # in history, and live (late)
            assert client.wait_connected()["recovered"] is True
            laggy.pubsub_delay = 0.0
            after = publisher.publish(brand, player, "n", 2)
            got = [e.id for e in read_through(client, after)]
            assert_quiet(client)
    finally:
        publisher.close()
        r.close()
    assert_exactly(got, [missed, after], "replayed client")


def test_refill_then_late_live_copy_is_not_sent_twice(
    gateway_factory: GatewayFactory,
    redis_server: RedisServer,
    laggy: LaggyRedisProxy,
    ids: Callable[..., str],
) -> None:
    gateway = gateway_factory(redis=laggy.url)
    brand, player = ids("b"), ids("p")
    r = redis_server.client()
    publisher = SyncPublisher.from_url(redis_server.url)
    channel = f"SSE::{brand}::{player}"

    def subscribed() -> bool:
        return bool(dict(r.pubsub_numsub(channel)).get(channel.encode()))

    try:
        client, _ = gateway.player_stream(brand, player)
        with client:
            first = publisher.publish(brand, player, "n", 0)
            assert [e.id for e in read_events(client, 1)] == [first]
            laggy.pubsub_delay = 0.5
            reconnects = gateway.metrics().value("sse_gateway_broker_reconnects_total")
            assert r.client_kill_filter(_type="pubsub") >= 1
            wait_for(lambda: not subscribed(), what="the kill")
            gap = publisher.publish(brand, player, "n", 1)  # history only: refilled
            wait_for(subscribed, what="the gateway to subscribe again")
            time.sleep(0.2)  # the refill's history read comes 0.3 s before this arrives live
            late = publisher.publish(brand, player, "n", 2)  # history, and live but late
            assert gateway.metrics().value("sse_gateway_broker_reconnects_total") > reconnects
            got = [e.id for e in read_through(client, late)]  # refilled from history
            laggy.pubsub_delay = 0.0
            after = publisher.publish(brand, player, "n", 3)
            got += [e.id for e in read_through(client, after)]
    finally:
        publisher.close()
        r.close()
    assert_exactly(got, [gap, late, after], "client")


def test_drop_during_refill_loses_nothing(
    gateway_factory: GatewayFactory,
    redis_server: RedisServer,
    laggy: LaggyRedisProxy,
    ids: Callable[..., str],
) -> None:
    gateway = gateway_factory(redis=laggy.url)
    brand, player = ids("b"), ids("p")
    r = redis_server.client()
    publisher = SyncPublisher.from_url(redis_server.url)
    channel = f"SSE::{brand}::{player}"

    def subscribed() -> bool:
        return bool(dict(r.pubsub_numsub(channel)).get(channel.encode()))

    try:
        zero = publisher.publish(brand, player, "n", 0)
        # a replay first, so the gateway's history connection is open before the delays start
        client, connected = gateway.player_stream(brand, player, zero)
        assert connected["recovered"] is True
        with client:
            first = publisher.publish(brand, player, "n", 1)
            assert [e.id for e in read_events(client, 1)] == [first]
            laggy.command_delay = 1.0  # history reads take a second
            laggy.history_reads.clear()
            assert r.client_kill_filter(_type="pubsub") >= 1
            wait_for(lambda: not subscribed(), what="the first kill")
            gap1 = publisher.publish(brand, player, "n", 2)
            assert laggy.history_reads.wait(15), "no refill read after the reconnect"
            # the refill's read is in flight: drop the Pub/Sub connection again, and keep the
            # gateway out (no new connections) until that read has completed
            r.config_set("maxclients", len(r.client_list()) - 1)
            assert r.client_kill_filter(_type="pubsub") >= 1
            wait_for(lambda: not subscribed(), what="the second kill")
            gap2 = publisher.publish(brand, player, "n", 3)
            assert gap2.receivers == 0
            time.sleep(1.5)
            laggy.command_delay = 0.0
            r.config_set("maxclients", 10000)
            wait_for(subscribed, what="the gateway to subscribe again")
            after = publisher.publish(brand, player, "n", 4)
            got = [e.id for e in read_through(client, after)]
    finally:
        r.config_set("maxclients", 10000)
        publisher.close()
        r.close()
    assert_exactly(got, [gap1, gap2, after], "client")
