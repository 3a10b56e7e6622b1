"""Redis broker: one shared Pub/Sub connection per process, read with hiredis directly.

`RedisBroker` owns the connection's life: connect, handshake (AUTH, TIME), PING, reconnect with
backoff. What to subscribe, in which batches and when, is decided by its `SubscriptionBook`
(see `subscriptions.py`); the broker writes the commands the book returns and runs the callbacks
it returns. The socket itself is a `PubSubProtocol` (see `pubsub.py`).

Publishing goes through redis-py on a small blocking pool (at most `COMMAND_CONNECTIONS`
sockets); history reads, batched by the caller into pipelines, have a hiredis-read connection
of their own (`reads.py`). Session control: the control channel is subscribed on the Pub/Sub
connection too, as a pattern (see `start`); disconnects, blocks and tickets are `control.py`'s.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from asyncio import FIRST_COMPLETED
from collections import deque
from collections.abc import Callable, Sequence
from typing import cast

import redis.asyncio as aioredis

from sse_gateway.broker.base import (
    BrokerUnavailable,
    ControlHandler,
    HistoryEntry,
    MessageHandler,
    StateHandler,
)
from sse_gateway.broker.batching import TurnBatched
from sse_gateway.broker.control import (
    CONTROL_REPLY_KINDS,
    ControlCommands,
    ControlMethods,
    ControlSubscription,
)
from sse_gateway.broker.pubsub import PubSubProtocol, encode_command
from sse_gateway.broker.reads import HistoryReads
from sse_gateway.broker.subscriptions import SubscriptionBook, SubscriptionCommand
from sse_gateway.publish.events import PreparedEvent, PublishedEvent, PublishUnavailable
from sse_gateway.publish.publisher import Publisher, async_no_retry
from sse_gateway.publish.target import command_pool, is_primary_role, resolve_primary
from sse_gateway.settings import RedisAddress
from sse_gateway.wire.control import CONTROL_CHANNEL

log = logging.getLogger("sse_gateway.broker")
# `extra=` fields of the JSON log lines (logs.py).
_LOST = {"event": "broker_lost"}
_NO_PONG = {"event": "broker_lost", "reason": "ping_timeout"}
_DOWN = {"event": "broker_unreachable"}
_CONNECTED = {"event": "broker_connected", "channels": 0}

CONNECT_TIMEOUT = 5.0
PING_INTERVAL = 5.0
PING_TIMEOUT = 15.0
BACKOFF_BASE = 0.1
BACKOFF_CAP = 5.0
COMMAND_CONNECTIONS = 4

# `message` replies never get here: PubSubProtocol hands them to `_on_message` directly.
_PUBSUB_KINDS = frozenset({b"subscribe", b"unsubscribe", b"pong", *CONTROL_REPLY_KINDS})


class RedisBroker(ControlMethods, TurnBatched):
    """The broker for EVENTS_REDIS_STORAGE: one Pub/Sub connection, redis-py for commands.

    Each method keeps the contract written on `broker.base.Broker`; those of session control
    are `ControlMethods`' (broker/control.py). Source of truth: Redis
    (the player's history stream and its Pub/Sub channel, both named `SSE::{brand}::{player}`).
    """

    def __init__(
        self,
        address: RedisAddress,
        *,
        history_size: int = 100,
        history_ttl: float = 86_400.0,
        max_event_bytes: int = 65_536,
    ) -> None:
        self._address = address
        self._on_message: MessageHandler = _not_started
        self._on_state: StateHandler = _not_started
        self._control_channel: ControlSubscription | None = None
        self._book = SubscriptionBook()
        self._flush_scheduled = False
        self._protocol: PubSubProtocol | None = None
        self._last_protocol: PubSubProtocol | None = None  # kept for close() after cleanup
        self._connected = False
        self._closing = False
        self._task: asyncio.Task[None] | None = None
        self._command_waiters: deque[asyncio.Future[object]] = deque()
        self._last_pong = 0.0
        self._ever_connected = False
        self._clock_offset_ms = 0.0
        self.subscribe_batches = self.unsubscribe_batches = 0
        # With Sentinel, each of its connections asks for the primary first (publish/target.py).
        pool = command_pool(address, async_no_retry(), COMMAND_CONNECTIONS, CONNECT_TIMEOUT)
        self._commands = aioredis.Redis.from_pool(pool)  # its aclose() closes the pool too
        # History reads have a connection of their own (broker/reads.py: the per-stream path).
        self._reads = HistoryReads(address)
        self._publisher = Publisher(
            self._commands,
            history_size=history_size,
            history_ttl=int(history_ttl),
            max_event_bytes=max_event_bytes,
        )
        self._session = ControlCommands(self._commands, self._reads)

    @property
    def connected(self) -> bool:
        return self._connected

    @property
    def description(self) -> str:
        return f"redis broker at {self._address.url()}"

    @property
    def subscribed_count(self) -> int:
        return self._book.wanted_count

    # --- lifecycle ---------------------------------------------------------------------------

    async def start(
        self,
        on_message: MessageHandler,
        on_state: StateHandler,
        on_control: ControlHandler | None = None,
    ) -> None:
        self._on_message = on_message
        self._on_state = on_state
        if on_control is not None:
            self._control_channel = ControlSubscription(on_control)
        self._task = asyncio.create_task(self._run(), name="redis-pubsub")

    async def close(self) -> None:
        self._closing = True
        task = self._task
        # On Python 3.11 a cancel can be swallowed by a wait_for that completes at the same
        # moment, leaving the task parked on its connection: close that connection too, and
        # repeat until the task is really gone.
        while task is not None and not task.done():
            task.cancel()
            protocol = self._protocol
            if protocol is not None and protocol.transport is not None:
                protocol.transport.close()
            await asyncio.wait({task}, timeout=0.5)
        if task is not None and task.done() and not task.cancelled():
            with contextlib.suppress(Exception):
                task.result()
        protocol = self._last_protocol
        if protocol is not None and protocol.transport is not None:
            protocol.transport.close()
        self._reads.close()
        await self._commands.aclose()

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        attempt = 0
        address = self._address
        ssl_context = address.ssl_context()
        while not self._closing:
            protocol: PubSubProtocol | None = None
            try:
                # Sentinel's primary of the moment (each reconnect asks again), else the one Redis.
                address = await resolve_primary(self._address)
                _, connected = await asyncio.wait_for(
                    loop.create_connection(
                        lambda: PubSubProtocol(self._on_message, self._on_reply),
                        address.host,
                        address.port,
                        ssl=ssl_context,
                        server_hostname=address.host if ssl_context else None,
                    ),
                    CONNECT_TIMEOUT,
                )
                self._protocol = self._last_protocol = protocol = connected
                if self._closing:
                    break
                await self._handshake(protocol)
                self._on_connected(address)
                attempt = 0
                pinger = asyncio.create_task(self._ping_loop(protocol))
                try:
                    await protocol.lost
                finally:
                    pinger.cancel()
                if not self._closing:
                    log.warning("redis pubsub connection lost; reconnecting", extra=_LOST)
            except asyncio.CancelledError:
                raise
            except (OSError, TimeoutError, ConnectionError, RedisHandshakeError) as exc:
                if attempt == 0 or attempt % 20 == 0:
                    reason = exc or type(exc)
                    log.warning("redis unreachable at %s: %s", address.url(), reason, extra=_DOWN)
                if protocol is not None and protocol.transport is not None:
                    protocol.transport.abort()
            finally:
                self._on_disconnected()
            if self._closing:
                break
            # Capped exponential backoff with full jitter, so a fleet does not reconnect in step.
            delay = random.uniform(0.5, 1.0) * min(BACKOFF_CAP, BACKOFF_BASE * 2**attempt)
            attempt += 1
            await asyncio.sleep(delay)

    async def _handshake(self, protocol: PubSubProtocol) -> None:
        address = self._address
        if address.password is not None:
            args = [b"AUTH"]
            if address.username:
                args.append(address.username.encode())
            args.append(address.password.encode())
            reply = await self._command(protocol, encode_command(*args))
            if isinstance(reply, Exception):
                raise RedisHandshakeError(f"AUTH failed: {reply}")
        if address.mode == "sentinel":  # a sentinel slow to see a failover names a replica
            reply = await self._command(protocol, encode_command(b"ROLE"))
            if not is_primary_role(reply):
                raise RedisHandshakeError(f"not the primary: ROLE answered {reply!r}")
        sent = time.time()
        reply = await self._command(protocol, encode_command(b"TIME"))
        received = time.time()
        if isinstance(reply, Exception) or not isinstance(reply, list):
            raise RedisHandshakeError(f"TIME failed: {reply}")
        # Redis' clock names stream ids; the offset turns a local instant into such an id.
        redis_ms = int(reply[0]) * 1000 + int(reply[1]) / 1000
        self._clock_offset_ms = redis_ms - (sent + received) * 500

    async def _command(self, protocol: PubSubProtocol, data: bytes) -> object:
        assert protocol.transport is not None
        waiter: asyncio.Future[object] = asyncio.get_running_loop().create_future()
        self._command_waiters.append(waiter)
        protocol.transport.write(data)
        # A connection refused during the handshake (TLS without the client certificate Redis
        # requires) must say why at once, not after the timeout.
        lost: asyncio.Future[object] = cast("asyncio.Future[object]", protocol.lost)
        await asyncio.wait({waiter, lost}, timeout=CONNECT_TIMEOUT, return_when=FIRST_COMPLETED)
        if waiter.done() or not lost.done():
            return await asyncio.wait_for(waiter, 0)  # its reply, or TimeoutError
        waiter.cancel()
        raise ConnectionError(f"connection closed: {protocol.lost_reason or 'by redis'}")

    async def _ping_loop(self, protocol: PubSubProtocol) -> None:
        # A half-open TCP connection shows no error; an unanswered PING does.
        self._last_pong = time.monotonic()
        while True:
            await asyncio.sleep(PING_INTERVAL)
            if time.monotonic() - self._last_pong > PING_TIMEOUT:
                message = "redis pubsub: no PING reply for %.0fs; reconnecting"
                log.warning(message, PING_TIMEOUT, extra=_NO_PONG)
                if protocol.transport is not None:
                    protocol.transport.abort()
                return
            if protocol.transport is None or protocol.transport.is_closing():
                return
            protocol.transport.write(encode_command(b"PING"))

    def _on_connected(self, node: RedisAddress) -> None:
        if self._ever_connected:
            count = self.subscribed_count
            extra = {"event": "broker_connected", "channels": count}
            message = "redis pubsub reconnected to %s; resubscribing %d channels"
            log.info(message, node.url(), count, extra=extra)
        else:
            log.info("redis pubsub connected to %s", node.url(), extra=_CONNECTED)
        self._ever_connected = True
        self._connected = True
        self._last_pong = time.monotonic()
        self._flush_scheduled = False
        if self._control_channel is not None and self._protocol is not None:
            assert self._protocol.transport is not None
            self._protocol.transport.write(ControlSubscription.COMMAND)
        self._write(self._book.on_connected())
        self._on_state(True)

    def _on_disconnected(self) -> None:
        was_connected = self._connected
        self._connected = False
        if self._control_channel is not None:
            self._control_channel.on_disconnected()
        self._protocol = None
        self._book.on_disconnected()
        for waiter in self._command_waiters:
            if not waiter.done():
                waiter.set_exception(ConnectionError("redis connection lost"))
        self._command_waiters.clear()
        if was_connected and not self._closing:
            self._on_state(False)

    # --- subscriptions -----------------------------------------------------------------------

    def when_subscribed(self, channel: bytes, callback: Callable[[], None]) -> None:
        if channel == CONTROL_CHANNEL and self._control_channel is not None:
            self._control_channel.when_active(callback)
            return
        if self._book.when_subscribed(channel, callback):
            callback()

    def _subscriber_up(self) -> bool:
        return self._connected

    def _write(self, commands: Sequence[SubscriptionCommand]) -> None:
        if not commands:
            return
        protocol = self._protocol
        if protocol is None or protocol.transport is None or protocol.transport.is_closing():
            return  # the connection is going; on_disconnected forgets what was not written
        protocol.transport.write(
            b"".join([encode_command(verb, *channels) for verb, channels in commands])
        )
        self._count_batches(commands)

    # --- replies -----------------------------------------------------------------------------

    def _on_reply(self, reply: object) -> None:
        """Any reply but a `message` (PubSubProtocol delivers those to `_on_message`)."""
        if type(reply) is list and reply and reply[0] in _PUBSUB_KINDS:
            kind = reply[0]
            if kind == b"subscribe":
                commands, callbacks = self._book.subscribe_confirmed(reply[1])
                if commands:
                    self._write(commands)
                for callback in callbacks:
                    try:
                        callback()
                    except Exception:  # one waiter's failure must not starve the others
                        log.exception("redis pubsub: error in a subscription waiter")
            elif kind == b"unsubscribe":
                commands = self._book.unsubscribe_confirmed(reply[1])
                if commands:
                    self._write(commands)
            elif kind in CONTROL_REPLY_KINDS:
                if self._control_channel is not None:
                    self._control_channel.on_reply(reply)
            else:
                self._last_pong = time.monotonic()
            return
        if reply == b"PONG" and not self._command_waiters:
            self._last_pong = time.monotonic()
            return
        if self._command_waiters:
            waiter = self._command_waiters.popleft()
            if not waiter.done():
                waiter.set_result(reply)
            return
        log.error("redis pubsub: unexpected reply %r", reply)

    def redis_time_ms(self) -> int:
        return int(time.time() * 1000 + self._clock_offset_ms)

    # --- publishing and history --------------------------------------------------------------

    async def publish_events(self, events: list[PreparedEvent]) -> list[PublishedEvent]:
        try:
            return await self._publisher.publish_many_prepared(events)
        except PublishUnavailable as exc:
            raise BrokerUnavailable(str(exc)) from exc

    async def read_history(
        self, requests: list[tuple[bytes, str]], limit: int
    ) -> list[list[HistoryEntry]]:
        return await self._reads.read_history(requests, limit)

    async def read_heads(self, channels: list[bytes]) -> tuple[list[str | None], int]:
        return await self._reads.read_heads(channels)


def _not_started(*_: object) -> None:
    raise RuntimeError("RedisBroker.start() was not called")


class RedisHandshakeError(Exception):
    pass
