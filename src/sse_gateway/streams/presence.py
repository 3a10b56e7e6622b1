"""Presence: who is online, asked of every gateway process on the same Redis.

`ask(brand, player)` counts the player's streams here, reads `PUBSUB NUMSUB` on the player's
channel (the processes subscribed to it: those holding its streams, see below) and, when
other processes hold some, publishes a presence query on the control channel and waits for
their replies, at most `timeout` seconds (`wire.presence` has the messages). Every process
hears the query; one holding streams of the player replies with their count, the oldest
one's opening time and the newest event id it delivered to them.

A process is subscribed to a player's channel exactly while it holds a stream of the player
(the hub subscribes for the first and unsubscribes after the last), but for the lag of the
subscription commands: a stream's UNSUBSCRIBE goes out on the next loop turn and counts once
Redis ran it (later, behind the in-flight cap, while thousands of SUBSCRIBEs await their
confirmation). A process still subscribed with no stream left does not reply: the asker then
waits the whole timeout, and `answered` stays below `instances`.

`on_control` is the broker's control handler: presence messages are answered here, every
other message goes on to `on_other` (session control).
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import Callable
from dataclasses import dataclass

from sse_gateway.broker.base import Broker, BrokerUnavailable
from sse_gateway.streams.hub import ConnectionHub
from sse_gateway.wire.ids import format_stream_id
from sse_gateway.wire.naming import channel_name
from sse_gateway.wire.presence import (
    InvalidPresence,
    PresenceQuery,
    PresenceReply,
    PresenceTally,
    decode_presence,
    is_presence,
)

log = logging.getLogger("sse_gateway")

DEFAULT_TIMEOUT = 0.5


@dataclass(frozen=True, slots=True)
class PlayerPresence:
    """The answer of `GET /v1/players/{brand}/{player}` (docs/api.md has each field)."""

    brand_id: str
    player_id: str
    online: bool
    connections: int
    local_connections: int
    instances: int
    answered: int
    since: float | None
    last_event_id: str | None


@dataclass(slots=True)
class LocalPresence:
    connections: int
    since: float | None
    last_event_id: str | None


class _Query:
    __slots__ = ("done", "expected", "replies", "tally")

    def __init__(self, tally: PresenceTally, expected: int, done: asyncio.Future[None]) -> None:
        self.tally = tally
        self.expected = expected
        self.replies = 0
        self.done = done


class Presence:
    def __init__(
        self,
        *,
        broker: Broker,
        hub: ConnectionHub,
        instance: str,
        on_other: Callable[[bytes], None],
        timeout: float = DEFAULT_TIMEOUT,
    ) -> None:
        """`instance`: this process's id (replies are addressed to it); `timeout`: seconds
        an asker waits for the replies of the other processes."""
        self._broker = broker
        self._hub = hub
        self.instance = instance
        self._on_other = on_other
        self.timeout = timeout
        self._queries: dict[str, _Query] = {}
        # Referenced until done: the loop keeps only weak references to tasks.
        self._replies: set[asyncio.Task[None]] = set()

    def local(self, brand_id: str, player_id: str) -> LocalPresence:
        """The player's streams in this process (every one not yet closed, whatever its phase)."""
        channel = self._hub.get(channel_name(brand_id, player_id))
        if channel is None or not channel.streams:
            return LocalPresence(0, None, None)
        last = None if channel.last is None else format_stream_id(channel.last)
        return LocalPresence(len(channel.streams), min(channel.joined_at), last)

    async def ask(self, brand_id: str, player_id: str) -> PlayerPresence:
        """The player's streams on every process that answers in time. BrokerUnavailable."""
        instances = await self._broker.count_subscribers(channel_name(brand_id, player_id))
        here = self.local(brand_id, player_id)
        tally = PresenceTally()
        tally.add(here.connections, here.since, here.last_event_id)
        # This process, when it holds streams, is one of `instances` (once its SUBSCRIBE ran).
        expected = instances - (1 if here.connections else 0)
        if expected > 0:
            await self._query(brand_id, player_id, tally, expected)
        return PlayerPresence(
            brand_id=brand_id,
            player_id=player_id,
            online=tally.connections > 0,
            connections=tally.connections,
            local_connections=here.connections,
            instances=instances,
            answered=tally.answered,
            since=tally.since,
            last_event_id=tally.last_event_id,
        )

    async def _query(
        self, brand_id: str, player_id: str, tally: PresenceTally, expected: int
    ) -> None:
        query_id = secrets.token_hex(8)
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._queries[query_id] = _Query(tally, expected, done)
        try:
            query = PresenceQuery(query_id, self.instance, brand_id, player_id)
            await self._broker.publish_control(query.encode())
            await asyncio.wait_for(done, self.timeout)
        except TimeoutError:
            pass  # answered with the replies that came: `answered` says how many
        finally:
            del self._queries[query_id]

    # --- the control channel -----------------------------------------------------------------

    def on_control(self, payload: bytes) -> None:
        """Every message of the control channel."""
        if not is_presence(payload):
            self._on_other(payload)
            return
        try:
            message = decode_presence(payload)
        except InvalidPresence as exc:
            log.warning("control channel: presence message dropped: %s", exc)
            return
        if isinstance(message, PresenceReply):
            self._replied(message)
        elif message.reply_to != self.instance:  # its own query: the asker counted itself
            self._answer(message)

    def _replied(self, reply: PresenceReply) -> None:
        if reply.to != self.instance:
            return  # another process's query
        query = self._queries.get(reply.id)
        if query is None or query.done.done():
            return  # late: the asker has answered already
        query.tally.add(reply.connections, reply.since, reply.last_event_id)
        query.replies += 1
        if query.replies >= query.expected:
            query.done.set_result(None)

    def _answer(self, query: PresenceQuery) -> None:
        here = self.local(query.brand_id, query.player_id)
        if not here.connections:
            return
        reply = PresenceReply(
            query.id, query.reply_to, here.connections, here.since, here.last_event_id
        )
        task = asyncio.get_running_loop().create_task(self._send(reply.encode()))
        self._replies.add(task)
        task.add_done_callback(self._replies.discard)

    async def _send(self, reply: bytes) -> None:
        try:
            await self._broker.publish_control(reply)
        except BrokerUnavailable as exc:
            log.warning("presence reply not sent: %s", exc)
