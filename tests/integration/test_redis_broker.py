"""RedisBroker in-process (asyncio) against a real redis-server of each test's own."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import shutil
import signal
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import pytest
import redis

from sse_gateway.broker.pubsub import REPLIES_PER_TURN
from sse_gateway.broker.redis import RedisBroker
from sse_gateway.broker.subscriptions import BATCH_SIZE
from sse_gateway.settings import RedisAddress

pytestmark = pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs redis-server")

WAIT = 30.0  # generous upper bound for anything that should take well under a second


# --- a redis-server of this file's own ---------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class LocalRedis:
    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        self.workdir = workdir
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        log = (self.workdir / "redis.log").open("ab")
        self.process = subprocess.Popen(
            [
                "redis-server",
                "--port", str(self.port),
                "--bind", "127.0.0.1",
                "--save", "",
                "--appendonly", "no",
                "--dir", str(self.workdir),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
        log.close()
        deadline = time.monotonic() + WAIT
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"redis-server exited: {self.log()}")
            try:
                if self.client().ping():
                    return
            except redis.exceptions.ConnectionError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"redis-server did not answer: {self.log()}")
            time.sleep(0.02)

    def log(self) -> str:
        path = self.workdir / "redis.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def client(self) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=WAIT)

    def kill(self) -> None:
        """SIGKILL: no goodbye on any connection, as when the host dies."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(WAIT)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(WAIT)
            except subprocess.TimeoutExpired:
                self.kill()

    @property
    def address(self) -> RedisAddress:
        return RedisAddress("127.0.0.1", self.port)


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[LocalRedis]:
    server = LocalRedis(tmp_path / "redis")
    server.start()
    try:
        yield server
    finally:
        server.stop()


# --- MONITOR -------------------------------------------------------------------------------------


class CommandLog:
    """Every command Redis executes, read on a MONITOR connection in a thread."""

    def __init__(self, server: LocalRedis) -> None:
        self._client = server.client()
        self._control = server.client()
        self._sentinel = f"monitor-stop-{uuid.uuid4().hex}"
        self.commands: list[list[str]] = []
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._read, daemon=True)

    def __enter__(self) -> CommandLog:
        self._thread.start()
        assert self._ready.wait(WAIT), "MONITOR did not start"
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _read(self) -> None:
        try:
            with self._client.monitor() as monitor:
                self._ready.set()
                while True:
                    entry = monitor.next_command()
                    args = entry["command"].split(" ")
                    if args[:2] == ["ECHO", self._sentinel]:
                        return
                    self.commands.append(args)
        except BaseException as exc:  # reported by stop()
            self._error = exc
            self._ready.set()

    def stop(self) -> None:
        """Returns once every command executed before this call has been read."""
        if self._thread.is_alive():
            self._control.echo(self._sentinel)
            self._thread.join(WAIT)
        self._client.close()
        self._control.close()
        assert not self._thread.is_alive(), "MONITOR reader did not stop"
        if self._error is not None:
            raise self._error

    def named(self, name: str) -> list[list[str]]:
        return [args for args in self.commands if args[0].upper() == name]


# --- the broker under test ---------------------------------------------------------------------


class Harness:
    def __init__(self, server: LocalRedis) -> None:
        self.server = server
        self.messages: list[tuple[bytes, bytes]] = []
        self.states: list[bool] = []
        self.changed = asyncio.Event()
        self.broker = RedisBroker(server.address)
        self.publisher = server.client()  # blocking: usable right inside a callback

    def _on_message(self, channel: bytes, payload: bytes) -> None:
        self.messages.append((channel, payload))
        self.changed.set()

    def _on_state(self, connected: bool) -> None:
        self.states.append(connected)
        self.changed.set()

    async def wait(self, predicate: Callable[[], bool], what: str) -> None:
        async def loop() -> None:
            while not predicate():
                self.changed.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.changed.wait(), 0.05)

        try:
            await asyncio.wait_for(loop(), WAIT)
        except TimeoutError:
            raise AssertionError(f"timed out waiting for {what}") from None

    def mark(self) -> None:
        """Wakes `wait` from a callback."""
        self.changed.set()

    def numsub(self, channels: list[bytes]) -> dict[bytes, int]:
        counts: dict[bytes, int] = {}
        for start in range(0, len(channels), 500):
            for name, count in self.publisher.pubsub_numsub(*channels[start : start + 500]):
                counts[name] = int(count)
        return counts

    def pubsub_channels(self, pattern: str) -> set[bytes]:
        return set(self.publisher.pubsub_channels(pattern))


def run_with_broker(server: LocalRedis, test: Callable[[Harness], Awaitable[None]]) -> None:
    async def body() -> None:
        harness = Harness(server)
        await harness.broker.start(harness._on_message, harness._on_state)
        try:
            await harness.wait(lambda: harness.broker.connected, "the first connection")
            await test(harness)
        finally:
            await harness.broker.close()
            harness.publisher.close()

    asyncio.run(asyncio.wait_for(body(), 4 * WAIT))


def channels(prefix: str, count: int) -> list[bytes]:
    return [f"SSE::{prefix}::p{i}".encode() for i in range(count)]


# --- tests ---------------------------------------------------------------------------------------


def test_2500_channels_in_one_tick_go_out_in_batches_of_at_most_1000(
    redis_server: LocalRedis,
) -> None:
    names = channels("batch", 2500)
    ready: list[bytes] = []

    async def test(h: Harness) -> None:
        with CommandLog(redis_server) as log:
            for name in names:  # one tick: no await in between
                h.broker.subscribe(name)
                h.broker.when_subscribed(name, lambda name=name: (ready.append(name), h.mark()))
            await h.wait(lambda: len(ready) == len(names), "2500 subscriptions")
        subscribes = [args for args in log.named("SUBSCRIBE") if args[1].startswith("SSE::batch")]
        sizes = [len(args) - 1 for args in subscribes]
        assert sum(sizes) == 2500, sizes
        assert max(sizes) <= BATCH_SIZE == 1000, sizes
        assert len(subscribes) >= 3
        sent = {channel.encode() for args in subscribes for channel in args[1:]}
        assert sent == set(names)
        assert sorted(ready) == sorted(names)
        assert h.numsub(names) == dict.fromkeys(names, 1)
        assert h.pubsub_channels("SSE::batch::*") == set(names)
        assert h.broker.subscribed_count == 2500

    run_with_broker(redis_server, test)


def test_when_subscribed_fires_only_once_the_subscription_is_active(
    redis_server: LocalRedis,
) -> None:
    """A PUBLISH made inside the callback must already reach the broker's subscription."""
    names = channels("ready", 2200)  # more than two batches, so some wait for confirmations
    receivers: dict[bytes, int] = {}

    def publish_now(h: Harness, name: bytes) -> None:
        receivers[name] = int(h.publisher.publish(name, b"hello " + name))
        h.mark()

    async def test(h: Harness) -> None:
        for name in names:
            h.broker.subscribe(name)
            h.broker.when_subscribed(name, lambda name=name: publish_now(h, name))
        await h.wait(lambda: len(receivers) == len(names), "every callback")
        assert receivers == dict.fromkeys(names, 1)
        await h.wait(lambda: len(h.messages) == len(names), "every message")
        assert sorted(h.messages) == sorted((name, b"hello " + name) for name in names)

    run_with_broker(redis_server, test)


def test_when_subscribed_on_an_active_channel_runs_at_once(redis_server: LocalRedis) -> None:
    name = b"SSE::active::p1"

    async def test(h: Harness) -> None:
        first: list[int] = []
        h.broker.subscribe(name)
        h.broker.when_subscribed(name, lambda: first.append(h.publisher.publish(name, b"1")))
        await h.wait(lambda: bool(first), "the first callback")
        later: list[int] = []
        h.broker.when_subscribed(name, lambda: later.append(h.publisher.publish(name, b"2")))
        assert later == [1]  # already active: called synchronously, and the publish lands
        assert first == [1]
        await h.wait(lambda: len(h.messages) == 2, "both messages")
        assert h.messages == [(name, b"1"), (name, b"2")]

    run_with_broker(redis_server, test)


def test_several_waiters_on_one_channel_all_fire(redis_server: LocalRedis) -> None:
    name = b"SSE::many::p1"

    async def test(h: Harness) -> None:
        fired: list[int] = []
        h.broker.subscribe(name)
        for i in range(5):
            h.broker.when_subscribed(name, lambda i=i: (fired.append(i), h.mark()))
        await h.wait(lambda: len(fired) == 5, "five callbacks")
        assert sorted(fired) == [0, 1, 2, 3, 4]
        assert h.numsub([name]) == {name: 1}

    run_with_broker(redis_server, test)


def test_subscribe_and_unsubscribe_in_one_tick_sends_nothing(redis_server: LocalRedis) -> None:
    churned = channels("churn", 10)
    marker = b"SSE::marker::p1"

    async def test(h: Harness) -> None:
        with CommandLog(redis_server) as log:
            for name in churned:
                h.broker.subscribe(name)
                h.broker.unsubscribe(name)
            await asyncio.sleep(0)  # the churn's flush has run by now
            marked: list[bool] = []
            h.broker.subscribe(marker)
            h.broker.when_subscribed(marker, lambda: (marked.append(True), h.mark()))
            await h.wait(lambda: bool(marked), "the marker subscription")
        touched = [
            args
            for args in log.commands
            if args[0].upper() in ("SUBSCRIBE", "UNSUBSCRIBE")
            and any(arg.startswith("SSE::churn") for arg in args[1:])
        ]
        assert touched == []
        assert ["SUBSCRIBE", marker.decode()] in log.commands  # the log did see the broker
        assert h.numsub(churned) == dict.fromkeys(churned, 0)
        assert h.broker.subscribed_count == 1

    run_with_broker(redis_server, test)


def test_unsubscribe_removes_the_channel_at_redis(redis_server: LocalRedis) -> None:
    names = channels("unsub", 3)

    async def test(h: Harness) -> None:
        ready: list[bytes] = []
        for name in names:
            h.broker.subscribe(name)
            h.broker.when_subscribed(name, lambda name=name: (ready.append(name), h.mark()))
        await h.wait(lambda: len(ready) == 3, "three subscriptions")
        assert h.pubsub_channels("SSE::unsub::*") == set(names)
        h.broker.unsubscribe(names[0])
        await h.wait(
            lambda: h.pubsub_channels("SSE::unsub::*") == set(names[1:]), "the unsubscribe"
        )
        assert h.publisher.publish(names[0], b"gone") == 0
        assert h.publisher.publish(names[1], b"here") == 1
        await h.wait(lambda: bool(h.messages), "the message")
        assert h.messages == [(names[1], b"here")]
        assert h.broker.subscribed_count == 2

    run_with_broker(redis_server, test)


def test_unsubscribe_then_subscribe_again(redis_server: LocalRedis) -> None:
    name = b"SSE::again::p1"

    async def test(h: Harness) -> None:
        ready: list[int] = []
        h.broker.subscribe(name)
        h.broker.when_subscribed(name, lambda: (ready.append(1), h.mark()))
        await h.wait(lambda: len(ready) == 1, "the subscription")
        h.broker.unsubscribe(name)
        await h.wait(lambda: h.numsub([name]) == {name: 0}, "the unsubscribe")
        h.broker.subscribe(name)
        h.broker.when_subscribed(name, lambda: ready.append(h.publisher.publish(name, b"x")))
        await h.wait(lambda: len(ready) == 2, "the second subscription")
        assert ready == [1, 1]
        await h.wait(lambda: bool(h.messages), "the message")
        assert h.messages == [(name, b"x")]

    run_with_broker(redis_server, test)


def test_messages_arrive_byte_exact_and_in_order(redis_server: LocalRedis) -> None:
    name = b"SSE::bytes::p1"
    payloads = [b"", b"\x00\xff\r\n", "é✓".encode(), b"x" * 200_000, b'{"type":"t","data":1}']

    async def test(h: Harness) -> None:
        ready: list[int] = []
        h.broker.subscribe(name)
        h.broker.when_subscribed(name, lambda: (ready.append(1), h.mark()))
        await h.wait(lambda: bool(ready), "the subscription")
        for payload in payloads:
            assert h.publisher.publish(name, payload) == 1
        await h.wait(lambda: len(h.messages) == len(payloads), "every message")
        assert h.messages == [(name, payload) for payload in payloads]

    run_with_broker(redis_server, test)


def test_a_burst_beyond_the_turn_budget_arrives_whole_in_order_and_yields(
    redis_server: LocalRedis,
) -> None:
    """Thousands of messages read at once are handled over several loop turns, in order."""
    name = b"SSE::burst::p1"
    count = REPLIES_PER_TURN * 20

    async def test(h: Harness) -> None:
        ready: list[int] = []
        h.broker.subscribe(name)
        h.broker.when_subscribed(name, lambda: (ready.append(1), h.mark()))
        await h.wait(lambda: bool(ready), "the subscription")
        # A ticker that records how many messages had been handled at each loop turn.
        seen_at_turn: list[int] = []
        loop = asyncio.get_running_loop()

        def tick() -> None:
            seen_at_turn.append(len(h.messages))
            if len(h.messages) < count:
                loop.call_soon(tick)

        # Published while this loop is blocked, so the whole burst is waiting in one go.
        pipe = h.publisher.pipeline(transaction=False)
        for i in range(count):
            pipe.publish(name, b"%d" % i)
        pipe.execute()
        loop.call_soon(tick)
        await h.wait(lambda: len(h.messages) == count, "every message")
        assert [payload for _, payload in h.messages] == [b"%d" % i for i in range(count)]
        steps = [b - a for a, b in itertools.pairwise(seen_at_turn)]
        assert max(steps) <= REPLIES_PER_TURN
        assert sum(1 for step in steps if step) >= count // REPLIES_PER_TURN

    run_with_broker(redis_server, test)


def test_reconnects_and_resubscribes_after_redis_is_killed(redis_server: LocalRedis) -> None:
    names = channels("restart", 1500)
    late = b"SSE::restart::late"

    async def test(h: Harness) -> None:
        ready: list[bytes] = []
        for name in names:
            h.broker.subscribe(name)
            h.broker.when_subscribed(name, lambda name=name: (ready.append(name), h.mark()))
        await h.wait(lambda: len(ready) == len(names), "the first subscriptions")
        assert h.states == [True]

        redis_server.kill()
        await h.wait(lambda: h.states[-1:] == [False], "the disconnect to be noticed")
        assert not h.broker.connected

        # Subscribed while Redis is down: the callback must wait for the new connection.
        late_receivers: list[int] = []
        h.broker.subscribe(late)
        h.broker.when_subscribed(
            late, lambda: late_receivers.append(h.publisher.publish(late, b"hi"))
        )
        await asyncio.sleep(0.2)
        assert late_receivers == []

        redis_server.start()  # same port
        await h.wait(lambda: h.states[-1:] == [True], "the reconnect")
        assert h.states == [True, False, True]
        await h.wait(lambda: late_receivers == [1], "the late channel's callback")
        everything = [*names, late]
        await h.wait(
            lambda: h.numsub(everything) == dict.fromkeys(everything, 1), "the resubscription"
        )
        assert h.pubsub_channels("SSE::restart::*") == set(everything)
        assert h.publisher.publish(names[0], b"after") == 1
        await h.wait(lambda: (names[0], b"after") in h.messages, "a message after reconnect")
        assert (late, b"hi") in h.messages

    run_with_broker(redis_server, test)


def test_resubscription_after_restart_is_batched_too(redis_server: LocalRedis) -> None:
    names = channels("rebatch", 2100)

    async def test(h: Harness) -> None:
        ready: list[bytes] = []
        for name in names:
            h.broker.subscribe(name)
            h.broker.when_subscribed(name, lambda name=name: (ready.append(name), h.mark()))
        await h.wait(lambda: len(ready) == len(names), "the first subscriptions")
        redis_server.kill()
        await h.wait(lambda: h.states[-1:] == [False], "the disconnect")
        redis_server.start()
        with CommandLog(redis_server) as log:
            await h.wait(lambda: h.states[-1:] == [True], "the reconnect")
            await h.wait(lambda: h.numsub(names) == dict.fromkeys(names, 1), "resubscription")
        sizes = [len(args) - 1 for args in log.named("SUBSCRIBE")]
        assert sum(sizes) == len(names), sizes
        assert max(sizes) <= BATCH_SIZE, sizes

    run_with_broker(redis_server, test)


def test_unsubscribed_during_the_outage_is_not_resubscribed(redis_server: LocalRedis) -> None:
    kept, dropped = b"SSE::outage::kept", b"SSE::outage::dropped"

    async def test(h: Harness) -> None:
        ready: list[bytes] = []
        for name in (kept, dropped):
            h.broker.subscribe(name)
            h.broker.when_subscribed(name, lambda name=name: (ready.append(name), h.mark()))
        await h.wait(lambda: len(ready) == 2, "both subscriptions")
        redis_server.kill()
        await h.wait(lambda: h.states[-1:] == [False], "the disconnect")
        h.broker.unsubscribe(dropped)
        redis_server.start()
        await h.wait(lambda: h.numsub([kept]) == {kept: 1}, "the resubscription")
        assert h.numsub([dropped]) == {dropped: 0}
        assert h.pubsub_channels("SSE::outage::*") == {kept}

    run_with_broker(redis_server, test)


def test_close_releases_the_pubsub_connection(redis_server: LocalRedis) -> None:
    """After close() Redis must not keep a subscriber for this process."""
    name = b"SSE::close::p1"
    client = redis_server.client()

    async def body() -> None:
        harness = Harness(redis_server)
        await harness.broker.start(harness._on_message, harness._on_state)
        ready: list[int] = []
        harness.broker.subscribe(name)
        harness.broker.when_subscribed(name, lambda: (ready.append(1), harness.mark()))
        await harness.wait(lambda: bool(ready), "the subscription")
        assert client.pubsub_numsub(name) == [(name, 1)]
        await harness.broker.close()
        harness.publisher.close()
        deadline = time.monotonic() + 5.0
        while client.pubsub_numsub(name) != [(name, 0)] and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert client.pubsub_numsub(name) == [(name, 0)], "the Pub/Sub socket is still open"

    try:
        asyncio.run(asyncio.wait_for(body(), 4 * WAIT))
    finally:
        client.close()


def test_no_message_is_delivered_after_close(redis_server: LocalRedis) -> None:
    """close() ends the broker: its message handler must not run any more."""
    name = b"SSE::closed::p1"
    client = redis_server.client()

    async def body() -> None:
        harness = Harness(redis_server)
        await harness.broker.start(harness._on_message, harness._on_state)
        ready: list[int] = []
        harness.broker.subscribe(name)
        harness.broker.when_subscribed(name, lambda: (ready.append(1), harness.mark()))
        await harness.wait(lambda: bool(ready), "the subscription")
        await harness.broker.close()
        harness.publisher.close()
        client.publish(name, b"after close")
        await asyncio.sleep(0.5)  # the loop keeps running, as in a host application
        assert harness.messages == []

    try:
        asyncio.run(asyncio.wait_for(body(), 4 * WAIT))
    finally:
        client.close()
