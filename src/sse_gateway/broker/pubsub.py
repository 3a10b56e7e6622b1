"""The Pub/Sub socket: RESP replies read with hiredis, a bounded number per event-loop turn."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import cast

import hiredis

from sse_gateway.broker.base import MessageHandler

log = logging.getLogger("sse_gateway.broker")

REPLIES_PER_TURN = 256
FEED_BYTES = 16 * 1024


def encode_command(*args: bytes) -> bytes:
    """One RESP command (an array of bulk strings), e.g. `encode_command(b"PING")`."""
    out = [b"*%d\r\n" % len(args)]
    for arg in args:
        out.append(b"$%d\r\n%s\r\n" % (len(arg), arg))
    return b"".join(out)


class PubSubProtocol(asyncio.Protocol):
    """Owns the Pub/Sub socket; hands each parsed reply to one of two handlers.

    A `message` reply (`smessage` with `message_kind=b"smessage"`) goes straight to
    `on_message(channel, payload)` (the gateway's message
    handler): it is nearly every reply, and this is the per-event path. Any other reply
    (confirmations, PONG, replies to the handshake's commands) goes to `on_reply(reply)`.

    At most `REPLIES_PER_TURN` replies are handled per event-loop turn. A read can hold
    thousands of messages (uvloop reads up to 256 KB at once); handling them all in one turn
    would hold up accepts, requests, heartbeats and health checks for tens of milliseconds
    while Redis has a backlog. Past the budget the socket is paused, and the rest of what was
    read waits in the hiredis reader for the next turn.
    """

    def __init__(
        self,
        on_message: MessageHandler,
        on_reply: Callable[[object], None],
        message_kind: bytes = b"message",
    ) -> None:
        self.on_message = on_message
        # b"smessage" on a Redis Cluster shard's connection (sharded Pub/Sub).
        self.message_kind = message_kind
        self.on_reply = on_reply
        self.reader = hiredis.Reader()
        self.transport: asyncio.Transport | None = None
        self.lost: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.lost_reason: Exception | None = None  # a TLS alert, a reset: for the log line
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
        on_reply = self.on_reply
        on_message = self.on_message
        message_kind = self.message_kind
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
                # Messages are nearly every reply: handled here, without `on_reply`'s dispatch.
                if type(reply) is list and len(reply) == 3 and reply[0] == message_kind:
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
        self.lost_reason = exc
        if not self.lost.done():
            self.lost.set_result(None)
