"""The control channel's connection of the Redis Cluster broker, and its life.

Classic Pub/Sub is broadcast to every node of a cluster, so `PSUBSCRIBE SSE::control` works
on any node; `ControlLink` puts it on the master of the control channel's slot (`where()`),
so that every gateway listens on the same node and a `PUBLISH` there answers how many
gateways heard it. Each connect also reads Redis' clock (`clock_offset_ms`).
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable

from sse_gateway.broker.control import CONTROL_REPLY_KINDS, ControlSubscription
from sse_gateway.broker.pubsub import encode_command
from sse_gateway.broker.shard import Connection, HandshakeError
from sse_gateway.broker.slots import Node
from sse_gateway.redis_address import RedisAddress

log = logging.getLogger("sse_gateway.broker")

BACKOFF_BASE = 0.05
BACKOFF_CAP = 1.0


class ControlConnection(Connection):
    """`PSUBSCRIBE SSE::control` on one node, and Redis' clock read at each connect."""

    def __init__(
        self, node: Node, address: RedisAddress, subscription: ControlSubscription | None
    ) -> None:
        super().__init__(node, address, _no_message)
        self._subscription = subscription
        self.clock_offset_ms = 0.0

    async def open(self) -> None:
        """Connects, reads TIME, subscribes the control channel. As `connect`."""
        await self.connect()
        sent = time.time()
        reply = await self.command(encode_command(b"TIME"))
        received = time.time()
        if isinstance(reply, Exception) or not isinstance(reply, list):
            raise HandshakeError(f"TIME failed: {reply}")
        redis_ms = int(reply[0]) * 1000 + int(reply[1]) / 1000
        self.clock_offset_ms = redis_ms - (sent + received) * 500
        if self._subscription is not None:
            self.write(ControlSubscription.COMMAND)

    def on_pubsub_reply(self, reply: object) -> bool:
        if type(reply) is list and reply and reply[0] in CONTROL_REPLY_KINDS:
            if self._subscription is not None:
                self._subscription.on_reply(reply)
            return True
        return False


def _no_message(channel: bytes, payload: bytes) -> None:
    log.error("redis control connection: unexpected message on %r", channel)


class ControlLink:
    """Keeps a ControlConnection up: to the node `where()` names (None: not known yet, wait),
    again with capped, jittered backoff after each loss. `on_change(up)` hears each change."""

    def __init__(
        self,
        address: RedisAddress,
        subscription: ControlSubscription | None,
        where: Callable[[], Node | None],
        on_change: Callable[[bool], None],
    ) -> None:
        self._address = address
        self._subscription = subscription
        self._where = where
        self._on_change = on_change
        self.connection: ControlConnection | None = None
        self.up = False
        self.closing = False

    @property
    def clock_offset_ms(self) -> float:
        return self.connection.clock_offset_ms if self.connection is not None else 0.0

    async def run(self) -> None:
        attempt = 0
        while not self.closing:
            node = self._where()
            if node is None:
                await asyncio.sleep(0.05)
                continue
            connection = ControlConnection(node, self._address, self._subscription)
            self.connection = connection
            try:
                await connection.open()
                attempt = 0
                self.up = True
                self._on_change(True)
                await connection.run_until_lost()
            except (OSError, TimeoutError, ConnectionError, HandshakeError) as exc:
                if attempt == 0 or attempt % 20 == 0:
                    log.warning("redis control connection to %s:%d: %s", *node, exc)
            finally:
                connection.abort()
                connection.fail_waiters()
                if self._subscription is not None:
                    self._subscription.on_disconnected()
                if self.up:
                    self.up = False
                    self._on_change(False)
            delay = random.uniform(0.5, 1.0) * min(BACKOFF_CAP, BACKOFF_BASE * 2**attempt)
            attempt += 1
            await asyncio.sleep(delay)

    def move_to(self, node: Node) -> None:
        """Drops the connection when it is not on `node` (it comes back there)."""
        connection = self.connection
        if connection is not None and self.up and connection.node != node:
            connection.abort()

    def close(self) -> None:
        self.closing = True
        if self.connection is not None:
            self.connection.abort()
