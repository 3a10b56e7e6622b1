"""Redis broker: one shared Pub/Sub connection per process, read with hiredis directly.

Subscriptions are coalesced per loop tick and sent in batches of at most `BATCH_SIZE` channels,
with at most `MAX_INFLIGHT` confirmations outstanding, so neither a connect storm nor a full
resubscription after a reconnect sends Redis one huge command. Redis answers every SUBSCRIBE
with one confirmation per channel, in order, which lets a waiter be tied to the exact command
that made its channel active.

Publishing and history reads go through redis-py on a small blocking pool (at most
`COMMAND_CONNECTIONS` sockets), with reads batched by the caller into pipelines.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import ssl
import time
from collections import deque
from collections.abc import Callable
from typing import cast

import hiredis
import redis.asyncio as aioredis
import redis.exceptions

from sse_gateway.broker.base import BrokerUnavailable, HistoryEntry, MessageHandler, StateHandler
from sse_gateway.publish.events import PreparedEvent, PublishedEvent, PublishUnavailable
from sse_gateway.publish.publisher import Publisher, async_no_retry, client_kwargs
from sse_gateway.settings import RedisAddress

log = logging.getLogger("sse_gateway.broker")

BATCH_SIZE = 1000
MAX_INFLIGHT = 2000
CONNECT_TIMEOUT = 5.0
PING_INTERVAL = 5.0
PING_TIMEOUT = 15.0
BACKOFF_BASE = 0.1
BACKOFF_CAP = 5.0
COMMAND_CONNECTIONS = 4
REPLIES_PER_TURN = 256
FEED_BYTES = 16 * 1024
HISTORY_PIPELINE = 1000


_PUBSUB_KINDS = frozenset({b"message", b"subscribe", b"unsubscribe", b"pong"})


def encode_command(*args: bytes) -> bytes:
    out = [b"*%d\r\n" % len(args)]
    for arg in args:
        out.append(b"$%d\r\n%s\r\n" % (len(arg), arg))
    return b"".join(out)


class _PubSubProtocol(asyncio.Protocol):
    """Owns the Pub/Sub socket; hands each parsed reply to the broker.

    At most `REPLIES_PER_TURN` replies are handled per event-loop turn. A read can hold
    thousands of messages (uvloop reads up to 256 KB at once); handling them all in one turn
    would hold up accepts, requests, heartbeats and health checks for tens of milliseconds
    while Redis has a backlog. Past the budget the socket is paused, and the rest of what was
    read waits in the hiredis reader for the next turn.
    """

    def __init__(self, broker: RedisBroker) -> None:
        self.broker = broker
        self.reader = hiredis.Reader()
        self.transport: asyncio.Transport | None = None
        self.lost: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._paused = False
        # Read but not yet fed to the reader: `_unfed[_fed:]`.
        self._unfed = b""
        self._fed = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        if self._fed < len(self._unfed):
            self._unfed = self._unfed[self._fed :] + data
        else:
            self._unfed = data
        self._fed = 0
        if not self._paused:
            self._handle_replies()

    def _handle_replies(self) -> None:
        transport = self.transport
        if transport is None or self.lost.done():
            return  # what was read before the connection dropped is lost with it
        reader = self.reader
        broker = self.broker
        on_reply = broker._on_reply
        on_message = broker._on_message
        budget = REPLIES_PER_TURN
        while budget:
            budget -= 1
            try:
                reply = reader.gets()
            except hiredis.ProtocolError:
                log.error("redis pubsub: protocol error, reconnecting")
                transport.abort()
                return
            if reply is False:
                unfed = len(self._unfed) - self._fed
                if unfed > 0:
                    # Fed in slices: hiredis moves what is left of its buffer to the front
                    # each time it has consumed 1 KB, so a 256 KB read fed whole costs a
                    # memmove of ~128 KB per KB of messages.
                    size = FEED_BYTES if unfed > FEED_BYTES else unfed
                    reader.feed(self._unfed, self._fed, size)
                    self._fed += size
                    budget += 1  # feeding is not a reply
                    continue
                if self._paused:
                    self._paused = False
                    if not transport.is_closing():
                        transport.resume_reading()
                return
            try:
                # Messages are nearly every reply: handled here, without the dispatch below.
                if type(reply) is list and len(reply) == 3 and reply[0] == b"message":
                    on_message(reply[1], reply[2])
                else:
                    on_reply(reply)
            except Exception:  # one bad message must not cost every client its connection
                log.exception("redis pubsub: error while handling a reply")
        if not self._paused:
            self._paused = True
            transport.pause_reading()
        asyncio.get_running_loop().call_soon(self._handle_replies)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.lost.done():
            self.lost.set_result(None)


class RedisBroker:
    def __init__(
        self,
        address: RedisAddress,
        on_message: MessageHandler,
        on_state: StateHandler,
        *,
        history_size: int = 100,
        history_ttl: float = 86_400.0,
        max_event_bytes: int = 65_536,
    ) -> None:
        self._address = address
        self._on_message = on_message
        self._on_state = on_state
        self._wanted: set[bytes] = set()
        # What Redis will hold once it has read everything we wrote: the last command wins.
        self._sent: set[bytes] = set()
        self._dirty: set[bytes] = set()
        self._flush_scheduled = False
        # Per channel, one waiter list per SUBSCRIBE sent and not yet confirmed, oldest first.
        self._inflight: dict[bytes, deque[list[Callable[[], None]]]] = {}
        # Waiters for a channel whose SUBSCRIBE has not been written yet.
        self._pending: dict[bytes, list[Callable[[], None]]] = {}
        self._outbox: deque[tuple[bytes, list[bytes]]] = deque()
        self._unconfirmed = 0
        self._protocol: _PubSubProtocol | None = None
        self._last_protocol: _PubSubProtocol | None = None  # kept for close() after cleanup
        self._connected = False
        self._closing = False
        self._task: asyncio.Task[None] | None = None
        self._command_waiters: deque[asyncio.Future[object]] = deque()
        self._last_pong = 0.0
        self._ever_connected = False
        self._clock_offset_ms = 0.0
        kwargs = client_kwargs(address)
        ssl_enabled = kwargs.pop("ssl")
        pool = aioredis.BlockingConnectionPool(
            max_connections=COMMAND_CONNECTIONS,
            timeout=CONNECT_TIMEOUT,
            retry=async_no_retry(),
            connection_class=(aioredis.SSLConnection if ssl_enabled else aioredis.Connection),
            **kwargs,
        )
        self._commands = aioredis.Redis(connection_pool=pool)
        self._publisher = Publisher(
            self._commands,
            history_size=history_size,
            history_ttl=int(history_ttl),
            max_event_bytes=max_event_bytes,
        )

    @property
    def connected(self) -> bool:
        return self._connected

    @property
    def description(self) -> str:
        return f"redis broker at {self._address.url()}"

    @property
    def subscribed_count(self) -> int:
        return len(self._wanted)

    # --- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
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
        await self._commands.aclose()

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        attempt = 0
        address = self._address
        ssl_context = ssl.create_default_context() if address.tls else None
        while not self._closing:
            protocol: _PubSubProtocol | None = None
            try:
                _, connected = await asyncio.wait_for(
                    loop.create_connection(
                        lambda: _PubSubProtocol(self),
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
                self._on_connected()
                attempt = 0
                pinger = asyncio.create_task(self._ping_loop(protocol))
                try:
                    await protocol.lost
                finally:
                    pinger.cancel()
                if not self._closing:
                    log.warning("redis pubsub connection lost; reconnecting")
            except asyncio.CancelledError:
                raise
            except (OSError, TimeoutError, ConnectionError, RedisHandshakeError) as exc:
                if attempt == 0 or attempt % 20 == 0:
                    log.warning("redis unreachable at %s: %s", address.url(), exc or type(exc))
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

    async def _handshake(self, protocol: _PubSubProtocol) -> None:
        address = self._address
        if address.password is not None:
            args = [b"AUTH"]
            if address.username:
                args.append(address.username.encode())
            args.append(address.password.encode())
            reply = await self._command(protocol, encode_command(*args))
            if isinstance(reply, Exception):
                raise RedisHandshakeError(f"AUTH failed: {reply}")
        sent = time.time()
        reply = await self._command(protocol, encode_command(b"TIME"))
        received = time.time()
        if isinstance(reply, Exception) or not isinstance(reply, list):
            raise RedisHandshakeError(f"TIME failed: {reply}")
        # Redis' clock names stream ids; the offset turns a local instant into such an id.
        redis_ms = int(reply[0]) * 1000 + int(reply[1]) / 1000
        self._clock_offset_ms = redis_ms - (sent + received) * 500

    async def _command(self, protocol: _PubSubProtocol, data: bytes) -> object:
        assert protocol.transport is not None
        waiter: asyncio.Future[object] = asyncio.get_running_loop().create_future()
        self._command_waiters.append(waiter)
        protocol.transport.write(data)
        return await asyncio.wait_for(waiter, CONNECT_TIMEOUT)

    async def _ping_loop(self, protocol: _PubSubProtocol) -> None:
        # A half-open TCP connection shows no error; an unanswered PING does.
        self._last_pong = time.monotonic()
        while True:
            await asyncio.sleep(PING_INTERVAL)
            if time.monotonic() - self._last_pong > PING_TIMEOUT:
                log.warning("redis pubsub: no PING reply for %.0fs; reconnecting", PING_TIMEOUT)
                if protocol.transport is not None:
                    protocol.transport.abort()
                return
            if protocol.transport is None or protocol.transport.is_closing():
                return
            protocol.transport.write(encode_command(b"PING"))

    def _on_connected(self) -> None:
        if self._ever_connected:
            log.info("redis pubsub reconnected; resubscribing %d channels", len(self._wanted))
        else:
            log.info("redis pubsub connected to %s", self._address.url())
        self._ever_connected = True
        self._connected = True
        self._last_pong = time.monotonic()
        self._dirty.update(self._wanted)
        self._flush()
        self._on_state(True)

    def _on_disconnected(self) -> None:
        was_connected = self._connected
        self._connected = False
        self._protocol = None
        self._sent.clear()
        self._outbox.clear()
        self._unconfirmed = 0
        for waiter in self._command_waiters:
            if not waiter.done():
                waiter.set_exception(ConnectionError("redis connection lost"))
        self._command_waiters.clear()
        # Waiters of unconfirmed subscriptions wait for the resubscription instead.
        for channel, lists in self._inflight.items():
            pending = self._pending.setdefault(channel, [])
            for callbacks in lists:
                pending.extend(callbacks)
        self._inflight.clear()
        for channel in list(self._pending):
            if channel not in self._wanted:
                del self._pending[channel]
        if was_connected and not self._closing:
            self._on_state(False)

    # --- subscriptions -----------------------------------------------------------------------

    def subscribe(self, channel: bytes) -> None:
        self._wanted.add(channel)
        self._mark_dirty(channel)

    def unsubscribe(self, channel: bytes) -> None:
        self._wanted.discard(channel)
        self._pending.pop(channel, None)
        self._mark_dirty(channel)

    def when_subscribed(self, channel: bytes, callback: Callable[[], None]) -> None:
        if channel in self._sent and self._connected:
            inflight = self._inflight.get(channel)
            if inflight:
                inflight[-1].append(callback)
            else:
                callback()
        else:
            self._pending.setdefault(channel, []).append(callback)

    def _mark_dirty(self, channel: bytes) -> None:
        self._dirty.add(channel)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        """Turns this tick's changes into batched SUBSCRIBE / UNSUBSCRIBE commands."""
        self._flush_scheduled = False
        if not self._connected:
            return  # kept dirty: _on_connected resubscribes every wanted channel
        dirty, self._dirty = self._dirty, set()
        to_subscribe: list[bytes] = []
        to_unsubscribe: list[bytes] = []
        for channel in dirty:
            wanted = channel in self._wanted
            if wanted and channel not in self._sent:
                to_subscribe.append(channel)
            elif not wanted and channel in self._sent:
                to_unsubscribe.append(channel)
        self._queue(b"UNSUBSCRIBE", to_unsubscribe)
        self._queue(b"SUBSCRIBE", to_subscribe)
        self._drain_outbox()

    def _queue(self, command: bytes, channels: list[bytes]) -> None:
        subscribing = command == b"SUBSCRIBE"
        for channel in channels:
            if subscribing:
                self._sent.add(channel)
                self._inflight.setdefault(channel, deque()).append(self._pending.pop(channel, []))
            else:
                self._sent.discard(channel)
        for start in range(0, len(channels), BATCH_SIZE):
            self._outbox.append((command, channels[start : start + BATCH_SIZE]))

    def _drain_outbox(self) -> None:
        protocol = self._protocol
        if protocol is None or protocol.transport is None or protocol.transport.is_closing():
            return
        chunks: list[bytes] = []
        while self._outbox and self._unconfirmed < MAX_INFLIGHT:
            command, channels = self._outbox.popleft()
            chunks.append(encode_command(command, *channels))
            self._unconfirmed += len(channels)
        if chunks:
            protocol.transport.write(b"".join(chunks))

    # --- replies -----------------------------------------------------------------------------

    def _on_reply(self, reply: object) -> None:
        if type(reply) is list and reply and reply[0] in _PUBSUB_KINDS:
            kind = reply[0]
            if kind == b"message":
                self._on_message(reply[1], reply[2])
            elif kind == b"subscribe":
                self._confirmed(reply[1])
                callbacks_by_channel = self._inflight.get(reply[1])
                if callbacks_by_channel:
                    callbacks = callbacks_by_channel.popleft()
                    if not callbacks_by_channel:
                        del self._inflight[reply[1]]
                    for callback in callbacks:
                        callback()
            elif kind == b"unsubscribe":
                self._confirmed(reply[1])
            elif kind == b"pong":
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

    def _confirmed(self, channel: bytes) -> None:
        self._unconfirmed -= 1
        if self._outbox and self._unconfirmed < MAX_INFLIGHT // 2:
            self._drain_outbox()

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
        results: list[list[HistoryEntry]] = []
        try:
            for start in range(0, len(requests), HISTORY_PIPELINE):
                async with self._commands.pipeline(transaction=False) as pipe:
                    for channel, first_id in requests[start : start + HISTORY_PIPELINE]:
                        pipe.xrange(channel, min=first_id, max="+", count=limit)
                    # One refused XRANGE (say a key that is not a stream) must not fail the
                    # other replays of its batch.
                    replies = await pipe.execute(raise_on_error=False)
                for reply in replies:
                    if isinstance(reply, Exception):
                        log.warning("history read refused by redis: %s", reply)
                        reply = []
                    results.append(_entries(reply))
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError) as exc:
            raise BrokerUnavailable(f"redis unavailable: {exc}") from exc
        return results


class RedisHandshakeError(Exception):
    pass


def _entries(reply: list[tuple[bytes, dict[bytes, bytes]]]) -> list[HistoryEntry]:
    entries: list[HistoryEntry] = []
    for entry_id, fields in reply:
        event_type, data = fields.get(b"t"), fields.get(b"d")
        if event_type is None or data is None:
            continue  # not written by publish.lua; nothing to replay
        entries.append(
            HistoryEntry(
                entry_id.decode("ascii"),
                event_type.decode("utf-8", "replace"),
                data.decode("utf-8", "replace"),
            )
        )
    return entries
