"""sse_gateway.publish (Publisher, SyncPublisher), publish.lua and `sse-gateway publish`."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import socket
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import redis
from support.procs import Gateway, GatewayFactory, RedisServer, cli, free_port
from support.sse import read_events

from sse_gateway.publish import (
    Event,
    InvalidEvent,
    PublishedEvent,
    Publisher,
    PublishUnavailable,
    SyncPublisher,
)

pytestmark = pytest.mark.timeout(90)

STREAM_ID = re.compile(r"\d+-\d+")
LUA = Path(__file__).resolve().parents[2] / "src" / "sse_gateway" / "lua" / "publish.lua"
API_KEY = "publisher-lib-test-key-0123456789abcdef"


@pytest.fixture
def sync_pub(publisher: SyncPublisher) -> SyncPublisher:
    """The conftest's sync publisher, under the name these tests use."""
    return publisher


def key(brand: str, player: str) -> str:
    return f"SSE::{brand}::{player}"


def sid(value: str) -> tuple[int, int]:
    ms, _, seq = value.partition("-")
    return int(ms), int(seq)


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def assert_published(value: object) -> PublishedEvent:
    assert isinstance(value, PublishedEvent)
    assert isinstance(value, str)
    assert STREAM_ID.fullmatch(value), value
    assert isinstance(value.receivers, int)
    return value


# --------------------------------------------------------------------------- async Publisher


def test_async_publish_and_receivers(
    gateway: Gateway,
    gateway_factory: GatewayFactory,
    redis_server: RedisServer,
    r: redis.Redis,
    ids: Callable[..., str],
) -> None:
    brand, player = ids("b"), ids("p")

    async def publish_one(data: Any) -> PublishedEvent:
        publisher = Publisher.from_url(redis_server.url)
        try:
            return await publisher.publish(brand, player, "notification", data)
        finally:
            await publisher.aclose()

    alone = assert_published(run(publish_one({"n": 0})))
    assert alone.receivers == 0  # no gateway has this player subscribed

    with gateway.stream(brand, player) as c1:
        one = assert_published(run(publish_one({"n": 1})))
        assert one.receivers == 1
        [got] = read_events(c1, 1)
        assert (got.id, got.event, got.json()) == (one, "notification", {"n": 1})
        # two tabs on the same process: still one receiver (one process)
        with gateway.stream(brand, player):
            assert run(publish_one({"n": 2})).receivers == 1
        other = gateway_factory(redis=redis_server)
        with other.stream(brand, player):
            assert run(publish_one({"n": 3})).receivers == 2  # two gateway processes
    assert sid(alone) < sid(one)
    assert r.xlen(key(brand, player)) == 4


def test_async_publish_many(
    r: redis.Redis, redis_server: RedisServer, ids: Callable[..., str]
) -> None:
    brand, p1, p2 = ids("b"), ids("p"), ids("q")

    async def main() -> list[PublishedEvent]:
        publisher = Publisher.from_url(redis_server.url)
        try:
            assert await publisher.publish_many([]) == []
            return await publisher.publish_many(
                [
                    Event(brand, p1, "n", 0),
                    {"brand_id": brand, "player_id": p2, "type": "n", "data": {"x": 1}},
                    Event(brand, p1, "n", [1, 2]),
                    {"brand_id": brand, "player_id": p1, "type": "n", "data": None},
                ]
            )
        finally:
            await publisher.aclose()

    result = run(main())
    assert len(result) == 4
    for value in result:
        assert_published(value)
    stored1 = r.xrange(key(brand, p1))
    assert [e[0].decode() for e in stored1] == [result[0], result[2], result[3]]
    assert [json.loads(e[1][b"d"]) for e in stored1] == [0, [1, 2], None]
    assert [e[0].decode() for e in r.xrange(key(brand, p2))] == [result[1]]


def test_history_capped_and_expiring(
    r: redis.Redis, redis_server: RedisServer, ids: Callable[..., str]
) -> None:
    brand, small, default = ids("b"), ids("s"), ids("d")

    async def main() -> tuple[list[PublishedEvent], list[PublishedEvent]]:
        capped = Publisher.from_url(redis_server.url, history_size=10, history_ttl=500)
        plain = Publisher.from_url(redis_server.url)
        try:
            a = [await capped.publish(brand, small, "n", n) for n in range(25)]
            b = await plain.publish_many([Event(brand, default, "n", n) for n in range(130)])
            return a, b
        finally:
            await capped.aclose()
            await plain.aclose()

    capped_ids, default_ids = run(main())
    # The stream keeps history_size + 1 entries: a client that saw the oldest of them can
    # still prove it missed nothing of the history_size events after it.
    assert [e[0].decode() for e in r.xrange(key(brand, small))] == capped_ids[-11:]
    assert 0 < r.ttl(key(brand, small)) <= 500
    assert r.xlen(key(brand, default)) == 101  # SSE_HISTORY_SIZE default + 1
    assert [e[0].decode() for e in r.xrange(key(brand, default))] == default_ids[-101:]
    assert 86_000 < r.ttl(key(brand, default)) <= 86_400  # SSE_HISTORY_TTL default: 24h


INVALID: list[tuple[str, tuple[Any, Any, Any, Any]]] = [
    ("brand_id", ("a::b", "p", "n", 1)),
    ("brand_id", ("", "p", "n", 1)),
    ("brand_id", ("x" * 65, "p", "n", 1)),
    ("brand_id", (None, "p", "n", 1)),
    ("player_id", ("b", "p q", "n", 1)),
    ("player_id", ("b", "*", "n", 1)),
    ("player_id", ("b", 5, "n", 1)),
    ("type", ("b", "p", "connected", 1)),
    ("type", ("b", "p", "heartbeat", 1)),
    ("type", ("b", "p", "error", 1)),
    ("type", ("b", "p", "close", 1)),
    ("type", ("b", "p", "bad type", 1)),
    ("type", ("b", "p", "", 1)),
    ("data", ("b", "p", "n", object())),
    ("data", ("b", "p", "n", float("nan"))),
    ("data", ("b", "p", "n", "x" * 70_000)),
]


def test_invalid_events_async(
    r: redis.Redis, redis_server: RedisServer, ids: Callable[..., str]
) -> None:
    brand = ids("b")

    async def main() -> None:
        publisher = Publisher.from_url(redis_server.url)
        try:
            for field, (b, p, t, d) in INVALID:
                b = f"{brand}{b}" if b == "b" else b
                with pytest.raises(InvalidEvent) as info:
                    await publisher.publish(b, p, t, d)
                assert info.value.field == field, (field, b, p, t)
                assert isinstance(info.value, ValueError)
            # a batch is validated first: nothing of it is sent
            with pytest.raises(InvalidEvent) as info:
                await publisher.publish_many(
                    [Event(brand, "p", "n", 1), Event(brand, "p", "close", 2)]
                )
            assert info.value.field == "type"
            with pytest.raises(InvalidEvent) as info:
                await publisher.publish_many([{"brand_id": brand, "player_id": "p", "type": "n"}])
            assert info.value.field == "data"
        finally:
            await publisher.aclose()

    run(main())
    assert r.exists(key(brand, "p")) == 0
    too_big = INVALID[-1][1]
    with pytest.raises(InvalidEvent) as info:
        SyncPublisher.from_url(redis_server.url).publish(brand, "p", "n", too_big[3])
    assert info.value.too_large


def test_unavailable_against_a_dead_port() -> None:
    """Async and sync, single and batch: PublishUnavailable (run side by side: redis-py's
    default retries take a few seconds each)."""
    url = f"redis://127.0.0.1:{free_port()}"

    def async_call(many: bool) -> None:
        async def main() -> None:
            publisher = Publisher.from_url(url)
            try:
                if many:
                    await publisher.publish_many([Event("b", "p", "n", 1)])
                else:
                    await publisher.publish("b", "p", "n", 1)
            finally:
                await publisher.aclose()

        run(main())

    def sync_call(many: bool) -> None:
        publisher = SyncPublisher.from_url(url)
        try:
            if many:
                publisher.publish_many([Event("b", "p", "n", 1)])
            else:
                publisher.publish("b", "p", "n", 1)
        finally:
            publisher.close()

    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(call, many) for call in (async_call, sync_call) for many in (0, 1)]
        for future in futures:
            error = future.exception(timeout=60)
            assert isinstance(error, PublishUnavailable), repr(error)
            assert isinstance(error, ConnectionError)


# --------------------------------------------------------------------------- SyncPublisher


def test_sync_publish_publish_many_receivers(
    gateway: Gateway, sync_pub: SyncPublisher, r: redis.Redis, ids: Callable[..., str]
) -> None:
    brand, player = ids("b"), ids("p")
    alone = assert_published(sync_pub.publish(brand, player, "n", {"n": 0}))
    assert alone.receivers == 0
    with gateway.stream(brand, player) as client:
        one = assert_published(sync_pub.publish(brand, player, "n", {"n": 1}))
        assert one.receivers == 1
        many = sync_pub.publish_many(
            [Event(brand, player, "m", k) for k in range(3)]
            + [{"brand_id": brand, "player_id": player, "type": "m", "data": 3}]
        )
        assert [assert_published(m).receivers for m in many] == [1, 1, 1, 1]
        got = read_events(client, 5)
    assert [(e.id, e.json()) for e in got] == [(one, {"n": 1})] + [
        (m, k) for k, m in enumerate(many)
    ]
    assert sync_pub.publish_many([]) == []
    assert [e[0].decode() for e in r.xrange(key(brand, player))] == [alone, one, *many]


def test_sync_history_capped_and_expiring(
    r: redis.Redis, redis_server: RedisServer, ids: Callable[..., str]
) -> None:
    brand, player = ids("b"), ids("p")
    publisher = SyncPublisher.from_url(redis_server.url, history_size=7, history_ttl=300)
    try:
        sent = publisher.publish_many([Event(brand, player, "n", n) for n in range(20)])
    finally:
        publisher.close()
    assert [e[0].decode() for e in r.xrange(key(brand, player))] == sent[-8:]  # size + 1
    assert 0 < r.ttl(key(brand, player)) <= 300


def test_sync_invalid_events(
    r: redis.Redis, sync_pub: SyncPublisher, ids: Callable[..., str]
) -> None:
    brand = ids("b")
    for field, (b, p, t, d) in INVALID:
        b = f"{brand}{b}" if b == "b" else b
        with pytest.raises(InvalidEvent) as info:
            sync_pub.publish(b, p, t, d)
        assert info.value.field == field
    with pytest.raises(InvalidEvent):
        sync_pub.publish_many([Event(brand, "p", "n", 1), Event(brand, "p", "n", object())])
    assert r.exists(key(brand, "p")) == 0


def test_envelope_on_the_channel(
    sync_pub: SyncPublisher, r: redis.Redis, ids: Callable[..., str]
) -> None:
    """What other subscribers see: {"type", "data", "id", "ts"}: the history entry's id, and
    the publish time (Unix seconds, by Redis' clock, as the id's milliseconds are)."""
    brand, player = ids("b"), ids("p")
    pubsub = r.pubsub()
    try:
        pubsub.subscribe(key(brand, player))
        assert pubsub.get_message(timeout=5)["type"] == "subscribe"  # type: ignore[index]
        data = {"title": 'quote " and ✓', "list": [1, 2.5, None]}
        event_id = sync_pub.publish(brand, player, "type.with:chars-_", data)
        assert event_id.receivers == 1
        message = pubsub.get_message(timeout=5)
        assert message is not None and message["type"] == "message"
        envelope = json.loads(message["data"])
        stamp = envelope.pop("ts")
        assert envelope == {"type": "type.with:chars-_", "data": data, "id": event_id}
        assert isinstance(stamp, float)
        # The id's milliseconds come from the same clock, read a moment before in the script.
        assert abs(stamp - int(str(event_id).split("-")[0]) / 1000) < 1
    finally:
        pubsub.close()


def test_lua_script_usable_from_any_client(
    gateway: Gateway, r: redis.Redis, ids: Callable[..., str]
) -> None:
    """The shipped script, EVALSHA'd by a plain client as documented, feeds the gateway."""
    brand, player = ids("b"), ids("p")
    sha = r.script_load(LUA.read_text())
    with gateway.stream(brand, player) as client:
        reply = r.evalsha(sha, 1, key(brand, player), "notification", '{"title":"hi"}', 100, 86400)
        event_id, receivers = reply[0].decode(), reply[1]
        assert STREAM_ID.fullmatch(event_id)
        assert receivers == 1
        [got] = read_events(client, 1)
    assert (got.id, got.event, got.json()) == (event_id, "notification", {"title": "hi"})
    assert r.xlen(key(brand, player)) == 1


# --------------------------------------------------------------------------- CLI


def test_cli_publish_prints_the_id(
    gateway: Gateway, redis_server: RedisServer, r: redis.Redis, ids: Callable[..., str]
) -> None:
    brand, player = ids("b"), ids("p")
    with gateway.stream(brand, player) as client:
        done = cli(
            "publish",
            "--brand",
            brand,
            "--player",
            player,
            "--type",
            "notification",
            "--data",
            '{"title": "hi"}',
            "--redis",
            redis_server.url,
        )
        assert done.returncode == 0, done.stderr
        event_id = done.stdout.strip()
        assert STREAM_ID.fullmatch(event_id), done.stdout
        [got] = read_events(client, 1)
        assert (got.id, got.event, got.json()) == (event_id, "notification", {"title": "hi"})

        # EVENTS_REDIS_STORAGE instead of --redis
        done = cli(
            *("publish", "--brand", brand, "--player", player, "--type", "n", "--data", "2"),
            env={"EVENTS_REDIS_STORAGE": redis_server.url},
        )
        assert done.returncode == 0, done.stderr
        second = done.stdout.strip()
        assert [(e.id, e.json()) for e in read_events(client, 1)] == [(second, 2)]
    assert [e[0].decode() for e in r.xrange(key(brand, player))] == [event_id, second]
    assert r.ttl(key(brand, player)) > 0


def test_cli_history_size_flag(
    redis_server: RedisServer, r: redis.Redis, ids: Callable[..., str]
) -> None:
    brand, player = ids("b"), ids("p")
    for n in range(4):
        done = cli(
            *("publish", "--brand", brand, "--player", player, "--type", "n", "--data", str(n)),
            *("--redis", redis_server.url, "--history-size", "2", "--history-ttl", "1m"),
        )
        assert done.returncode == 0, done.stderr
    assert r.xlen(key(brand, player)) == 3  # history size 2, + 1
    assert 0 < r.ttl(key(brand, player)) <= 60


def test_cli_history_size_flag_wins_over_env(
    redis_server: RedisServer, r: redis.Redis, ids: Callable[..., str]
) -> None:
    brand, player = ids("b"), ids("p")
    for n in range(4):
        done = cli(
            *("publish", "--brand", brand, "--player", player, "--type", "n", "--data", str(n)),
            *("--redis", redis_server.url, "--history-size", "2"),
            env={"SSE_HISTORY_SIZE": "50"},
        )
        assert done.returncode == 0, done.stderr
    assert r.xlen(key(brand, player)) == 3  # the flag's 2, + 1


def test_cli_bad_history_size_exits_2(redis_server: RedisServer, ids: Callable[..., str]) -> None:
    args = ("publish", "--brand", ids("b"), "--player", ids("p"), "--type", "n", "--data", "1")
    done = cli(*args, "--redis", redis_server.url, "--history-size", "lots")
    assert done.returncode == 2
    assert "--history-size" in done.stderr and "lots" in done.stderr


def test_cli_publish_through_the_gateway(
    gateway_factory: GatewayFactory, ids: Callable[..., str]
) -> None:
    gateway = gateway_factory("--publish-api-key", API_KEY)  # embedded broker: HTTP only
    brand, player = ids("b"), ids("p")
    args = ("publish", "--brand", brand, "--player", player, "--type", "n", "--data", '{"k": 1}')
    with gateway.stream(brand, player) as client:
        done = cli(*args, "--gateway", gateway.url, "--api-key", API_KEY)
        assert done.returncode == 0, done.stderr
        event_id = done.stdout.strip()
        assert STREAM_ID.fullmatch(event_id), done.stdout
        assert [(e.id, e.json()) for e in read_events(client, 1)] == [(event_id, {"k": 1})]
        wrong = cli(*args, "--gateway", gateway.url, "--api-key", "wrong")
        assert wrong.returncode == 1
        assert "401" in wrong.stderr
        assert wrong.stdout.strip() == ""


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (("--data", "not json"), "--data"),
        (("--data", "1", "--type", "connected"), "type"),
        (("--data", "1", "--brand", "a::b"), "brand_id"),
    ],
)
def test_cli_refuses_bad_input(
    redis_server: RedisServer, extra: tuple[str, ...], message: str
) -> None:
    base = {"--brand": "b", "--player": "p", "--type": "n"}
    args: list[str] = ["publish"]
    overrides = dict(zip(extra[::2], extra[1::2], strict=True))
    for flag, value in {**base, **overrides}.items():
        args += [flag, value]
    done = cli(*args, "--redis", redis_server.url)
    assert done.returncode == 2, (done.stdout, done.stderr)
    assert message in done.stderr
    assert done.stdout.strip() == ""


def test_cli_without_redis_says_so() -> None:
    done = cli("publish", "--brand", "b", "--player", "p", "--type", "n", "--data", "1")
    assert done.returncode == 2
    assert "EVENTS_REDIS_STORAGE" in done.stderr


# --------------------------------------------------------------------------- retries


class SlowRepliesProxy:
    """TCP proxy to Redis; after `slow_down()`, replies on the connections open then are late."""

    def __init__(self, target_port: int, delay: float) -> None:
        self.target_port = target_port
        self.delay = delay
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self.listener.getsockname()[1]
        self.connections = 0
        self.slow_below = 0  # connections numbered below this one reply late
        self.sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def slow_down(self) -> None:
        self.slow_below = self.connections

    def _accept(self) -> None:
        while True:
            try:
                downstream, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            self.sockets += [downstream, upstream]
            number = self.connections
            self.connections += 1
            for args in ((downstream, upstream, None), (upstream, downstream, number)):
                threading.Thread(target=self._pipe, args=args, daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, number: int | None) -> None:
        with contextlib.suppress(OSError):
            while chunk := src.recv(65536):
                if number is not None and number < self.slow_below:
                    time.sleep(self.delay)
                dst.sendall(chunk)

    def close(self) -> None:
        self.listener.close()
        for sock in self.sockets:
            with contextlib.suppress(OSError):
                sock.close()


@pytest.mark.timeout(60)
def test_publish_reply_timeout_does_not_duplicate(
    redis_server: RedisServer, r: redis.Redis, ids: Callable[..., str]
) -> None:
    brand, player = ids("b"), ids("p")
    proxy = SlowRepliesProxy(redis_server.port, delay=6.0)  # > the 5 s socket timeout
    publisher = SyncPublisher.from_url(f"redis://127.0.0.1:{proxy.port}")
    try:
        publisher.publish(brand, player, "warm-up", 0)  # connection open, script loaded
        proxy.slow_down()
        with contextlib.suppress(PublishUnavailable):
            publisher.publish(brand, player, "n", {"once": True})
        time.sleep(1.5)  # the late reply of the first run has arrived by now
        stored = [f[b"t"] for _, f in r.xrange(key(brand, player))]
        assert stored.count(b"n") <= 1, f"one publish call stored the event twice: {stored}"
    finally:
        publisher.close()
        proxy.close()
