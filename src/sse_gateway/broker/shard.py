"""The Pub/Sub connections of the Redis Cluster broker: one per master, and one for control.

`ShardConnection` holds the sharded subscriptions (`SSUBSCRIBE`) of the channels whose slots
one master serves, through its own `SubscriptionBook`. It is used once: connect, handshake,
subscribe every wanted channel, run until the connection drops, then hand everything back to
the broker (`ClusterBroker`), which re-reads the topology and routes the channels again, maybe
to the replica promoted meanwhile. Redis confirms channel by channel, in the order written;
an error reply (MOVED: the slot moved before our topology did) refuses a whole command, and
an unsolicited `sunsubscribe` means Redis dropped the channel because its slot left that
master. The connection tells the two apart by keeping, per command written, the channels
whose confirmations are still due.

`Connection` is what both have in common with the control channel's connection
(broker/cluster_control.py): connect, AUTH, commands answered in order, PING.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Sequence
from typing import Protocol

from sse_gateway.broker.base import MessageHandler
from sse_gateway.broker.batching import TurnBatched
from sse_gateway.broker.pubsub import PubSubProtocol, encode_command
from sse_gateway.broker.slots import Node, split_by_slot
from sse_gateway.broker.subscriptions import Callback, SubscriptionBook, SubscriptionCommand
from sse_gateway.redis_address import RedisAddress

log = logging.getLogger("sse_gateway.broker")

CONNECT_TIMEOUT = 5.0
PING_INTERVAL = 5.0
PING_TIMEOUT = 15.0

_SSUBSCRIBE = b"ssubscribe"
_SUNSUBSCRIBE = b"sunsubscribe"


class HandshakeError(Exception):
    pass


class _Due:
    """A command written whose confirmations are due: `channels[index:]`, in order."""

    __slots__ = ("channels", "index", "kind")

    def __init__(self, kind: bytes, channels: list[bytes]) -> None:
        self.kind = kind
        self.channels = channels
        self.index = 0


class Connection:
    """A Pub/Sub connection to one node: connect, AUTH, commands answered in order, PING."""

    message_kind = b"message"

    def __init__(self, node: Node, address: RedisAddress, on_message: MessageHandler) -> None:
        self.node = node
        self._address = address.with_node(*node)
        self._on_message = on_message
        self.protocol: PubSubProtocol | None = None
        self._waiters: deque[asyncio.Future[object]] = deque()
        self._last_pong = 0.0

    async def connect(self) -> PubSubProtocol:
        """Connects and authenticates. OSError, TimeoutError or HandshakeError."""
        loop = asyncio.get_running_loop()
        address = self._address
        ssl_context = address.ssl_context()
        _, protocol = await asyncio.wait_for(
            loop.create_connection(
                lambda: PubSubProtocol(self._on_message, self._on_reply, self.message_kind),
                address.host,
                address.port,
                ssl=ssl_context,
                server_hostname=address.host if ssl_context else None,
            ),
            CONNECT_TIMEOUT,
        )
        self.protocol = protocol
        if address.password is not None:
            args = [b"AUTH"]
            if address.username:
                args.append(address.username.encode())
            args.append(address.password.encode())
            reply = await self.command(encode_command(*args))
            if isinstance(reply, Exception):
                raise HandshakeError(f"AUTH failed: {reply}")
        return protocol

    async def command(self, data: bytes) -> object:
        """Writes one command and waits for its reply (before any subscription is made)."""
        protocol = self.protocol
        assert protocol is not None and protocol.transport is not None
        waiter: asyncio.Future[object] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        protocol.transport.write(data)
        return await asyncio.wait_for(waiter, CONNECT_TIMEOUT)

    async def run_until_lost(self) -> None:
        """PINGs until the connection drops (or stops answering: then it is aborted)."""
        protocol = self.protocol
        assert protocol is not None
        pinger = asyncio.create_task(self._ping_loop(protocol))
        try:
            await protocol.lost
        finally:
            pinger.cancel()

    def abort(self) -> None:
        protocol = self.protocol
        if protocol is not None and protocol.transport is not None:
            protocol.transport.abort()

    def write(self, data: bytes) -> bool:
        protocol = self.protocol
        if protocol is None or protocol.transport is None or protocol.transport.is_closing():
            return False
        protocol.transport.write(data)
        return True

    def fail_waiters(self) -> None:
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_exception(ConnectionError("redis connection lost"))
        self._waiters.clear()

    async def _ping_loop(self, protocol: PubSubProtocol) -> None:
        # A half-open TCP connection shows no error; an unanswered PING does.
        self._last_pong = time.monotonic()
        while True:
            await asyncio.sleep(PING_INTERVAL)
            if time.monotonic() - self._last_pong > PING_TIMEOUT:
                log.warning("redis %s:%d: no PING reply; reconnecting", *self.node)
                self.abort()
                return
            if not self.write(encode_command(b"PING")):
                return

    def _on_reply(self, reply: object) -> None:
        pong = type(reply) is list and reply and reply[0] == b"pong"
        if pong or (reply == b"PONG" and not self._waiters):
            self._last_pong = time.monotonic()
        elif self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(reply)
        elif not self.on_pubsub_reply(reply):
            log.error("redis pubsub %s:%d: unexpected reply %r", *self.node, reply)

    def on_pubsub_reply(self, reply: object) -> bool:
        """A reply after the handshake; False when it was not expected."""
        return False


class ShardHandler(Protocol):
    """What a ShardConnection reports to its broker (see ClusterBroker)."""

    def shard_up(self, shard: ShardConnection) -> None: ...

    def shard_lost(self, shard: ShardConnection, was_connected: bool) -> None: ...

    def channels_moved(self, shard: ShardConnection, channels: list[bytes]) -> None: ...

    def subscribe_refused(
        self, shard: ShardConnection, refused: dict[bytes, list[Callback]], error: str
    ) -> None: ...


class ShardConnection(Connection, TurnBatched):
    """The sharded subscriptions on one master (see the module docstring)."""

    message_kind = b"smessage"

    def __init__(
        self,
        node: Node,
        address: RedisAddress,
        on_message: MessageHandler,
        handler: ShardHandler,
    ) -> None:
        super().__init__(node, address, on_message)
        self._book = SubscriptionBook(b"SSUBSCRIBE", b"SUNSUBSCRIBE")
        self.connected = False
        self.closing = False
        self.subscribe_batches = self.unsubscribe_batches = 0
        self._handler = handler
        self._due: deque[_Due] = deque()
        self._flush_scheduled = False
        self.task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self.task = asyncio.create_task(self._run(), name=f"redis-shard-{self.node[1]}")

    async def _run(self) -> None:
        was_connected = False
        try:
            await self.connect()
            if self.closing:
                return
            self.connected = was_connected = True
            self._write(self._book.on_connected())
            log.info("redis shard %s:%d: subscriber connected", *self.node)
            self._handler.shard_up(self)
            await self.run_until_lost()
            if not self.closing:
                log.warning(
                    "redis shard %s:%d: pubsub connection lost",
                    *self.node,
                    extra={"event": "broker_lost", "node": f"{self.node[0]}:{self.node[1]}"},
                )
        except (OSError, TimeoutError, ConnectionError, HandshakeError) as exc:
            log.warning("redis shard %s:%d unreachable: %s", *self.node, exc or type(exc))
        finally:
            self.connected = False
            self.abort()
            self.fail_waiters()
            self._book.on_disconnected()
            self._due.clear()
            if not self.closing:
                self._handler.shard_lost(self, was_connected)

    # --- subscriptions -----------------------------------------------------------------------

    def _subscriber_up(self) -> bool:
        return self.connected

    @property
    def book(self) -> SubscriptionBook:
        """This master's subscriptions (the cluster broker moves waiters and channels)."""
        return self._book

    @property
    def wanted_count(self) -> int:
        """Channels this master should hold (subscribed, or to be)."""
        return self._book.wanted_count

    def _write(self, commands: Sequence[SubscriptionCommand]) -> None:
        if not commands:
            return
        commands = split_by_slot(commands)  # one slot per command, else CROSSSLOT
        data = b"".join([encode_command(verb, *channels) for verb, channels in commands])
        if not self.write(data):
            return  # the connection is going; on_disconnected forgets what was not written
        for verb, channels in commands:
            kind = _SSUBSCRIBE if verb == b"SSUBSCRIBE" else _SUNSUBSCRIBE
            self._due.append(_Due(kind, channels))
        self._count_batches(commands)

    # --- replies -----------------------------------------------------------------------------

    def on_pubsub_reply(self, reply: object) -> bool:
        if isinstance(reply, Exception):
            return self._refused(str(reply))
        if type(reply) is not list or len(reply) < 2:
            return False
        kind = reply[0]
        if kind != _SSUBSCRIBE and kind != _SUNSUBSCRIBE:
            return False
        channel = reply[1]
        due = self._due[0] if self._due else None
        if due is None or due.kind != kind or due.channels[due.index] != channel:
            if kind == _SUNSUBSCRIBE:
                # Not ours: Redis dropped the channel, its slot left this master.
                self._handler.channels_moved(self, [channel])
                return True
            return False
        due.index += 1
        if due.index == len(due.channels):
            self._due.popleft()
        if kind == _SSUBSCRIBE:
            commands, callbacks = self._book.subscribe_confirmed(channel)
            self._write(commands)
            for callback in callbacks:
                try:
                    callback()
                except Exception:  # one waiter's failure must not starve the others
                    log.exception("redis pubsub: error in a subscription waiter")
        else:
            self._write(self._book.unsubscribe_confirmed(channel))
        return True

    def _refused(self, error: str) -> bool:
        if not self._due:
            return False
        due = self._due.popleft()
        channels = due.channels[due.index :]
        if due.kind == _SUNSUBSCRIBE:
            for channel in channels:
                self._write(self._book.unsubscribe_confirmed(channel))
            return True
        refused: dict[bytes, list[Callback]] = {}
        for channel in channels:
            commands, callbacks = self._book.subscribe_failed(channel)
            self._write(commands)
            refused[channel] = list(callbacks)
        self._handler.subscribe_refused(self, refused, error)
        return True

    @property
    def wanted(self) -> bool:
        """Whether this connection is asked to hold any channel."""
        return self._book.wanted_count > 0

    def book_channels(self) -> list[bytes]:
        """Every channel this connection is asked to hold."""
        return self._book.wanted()

    def close(self) -> None:
        self.closing = True
        self.abort()
