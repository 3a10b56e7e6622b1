"""StreamLifecycle: a stream from hand-over to close: join -> replay -> live -> close.

open()            JOINING: the stream joins its channel; the hub subscribes it if new
_ready()          the subscription is active: REPLAYING; read the history after the
                  client's last id, or (no usable id) only where the history ends
_replayed()       history read: decide `recovered`; not recovered: read where it ends
_positioned()     the resume id is known (the history's newest entry id, or a position)
_go_live()        LIVE: `connected` with its `id:` (+ replayed events) written, heartbeats begin
_expired()        the token's `exp` (plus leeway) passed: `session_expired`, then CLOSED
stream_closed()   CLOSED, whoever closed it: hub, heartbeats, expiry, counters, log line
socket_closed()   the socket is gone: the drain and the socket budget stop counting it

Every `connected` carries an `id:`, the resume id, so that an EventSource has a last event
id to reconnect with from its first frame on: the client's own id when its replay was
recovered, else where the player's history ended once the stream was subscribed (its newest
entry id, or a `position_id` of Redis' clock when empty; `HistoryReader.head`). Live events
at or below it were published before that point and are not sent; a reconnect with it
replays exactly the events after it.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import secrets
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import orjson

from sse_gateway.broker.base import HistoryEntry
from sse_gateway.metrics import Metrics
from sse_gateway.settings import Settings
from sse_gateway.streams.expiry import SessionExpiry
from sse_gateway.streams.heartbeat import HeartbeatScheduler
from sse_gateway.streams.history import HistoryReader
from sse_gateway.streams.hub import ConnectionHub
from sse_gateway.streams.stream import (
    CLOSED,
    PlainStream,
    Stream,
    farewell,
    session_expired,
)
from sse_gateway.wire.frames import encode_connected
from sse_gateway.wire.ids import (
    POSITION_SEQ,
    HistoryEvent,
    StreamId,
    format_stream_id,
    is_position,
    parse_stream_id,
)
from sse_gateway.wire.naming import Identity, brand_of, channel_name, split_channel

conn_log = logging.getLogger("sse_gateway.connection")


class StreamLifecycle:
    """Opens streams and keeps count of them; the `StreamOwner` of every stream it opens."""

    def __init__(
        self,
        settings: Settings,
        *,
        hub: ConnectionHub,
        heartbeats: HeartbeatScheduler,
        history: HistoryReader,
        metrics: Metrics,
        release_socket: Callable[[], None],
    ) -> None:
        """`release_socket` is called once per stream socket that closes (the socket budget
        counted it when the request reader accepted it)."""
        self._settings = settings
        self._hub = hub
        self._heartbeats = heartbeats
        self._history = history
        self._metrics = metrics
        self._release_socket = release_socket
        self.event_buffer_size = settings.event_buffer_size
        self.max_connections_per_player = settings.max_connections_per_player
        """SSE_MAX_CONNECTIONS_PER_PLAYER: streams of one player in this process; 0: no cap."""
        self.open_streams = 0
        """Streams not yet CLOSED: what SSE_CONNECTION_LIMIT counts."""
        self.open_sockets = 0
        """Streams whose socket is not closed yet: the drain waits for these."""
        self._conn_numbers = itertools.count(1)
        self._conn_prefix = f"{os.getpid():06x}{secrets.token_hex(3)}"
        self.expiry: SessionExpiry[Stream] = SessionExpiry(self._expired)
        """Closes each stream when its token expires (one timer for all)."""

    @property
    def instance(self) -> str:
        """This process's id (`/v1/stats`, presence replies): every connection id begins with it."""
        return self._conn_prefix

    def connection_id(self, conn_no: int) -> str:
        """Unique across workers and restarts: a per-process prefix, then a fixed-width count."""
        return f"{self._conn_prefix}{conn_no:010x}"

    def player_at_cap(self, identity: Identity) -> bool:
        """Whether the player already has SSE_MAX_CONNECTIONS_PER_PLAYER streams open in this
        process (every stream not yet CLOSED counts, whatever its phase); never with 0."""
        cap = self.max_connections_per_player
        if not cap:
            return False
        channel = self._hub.get(channel_name(identity.brand_id, identity.player_id))
        return channel is not None and len(channel.streams) >= cap

    # --- open -> replay -> live --------------------------------------------------------------

    def open(
        self,
        transport: asyncio.Transport,
        identity: Identity,
        last_event_id: str | None,
        head: bytes,
        paused: bool = False,
        *,
        chunked: bool = True,
    ) -> Stream:
        """Makes an authenticated, admitted request's socket a JOINING stream.

        `head` is the HTTP response head (written with `connected`); `last_event_id` is the
        client's, already checked against the id pattern, or None; `paused`: the transport
        has asked its protocol to pause writing and not resumed it yet; `chunked`: the head
        announced a chunked body (HTTP/1.1), else the body is close-delimited (HTTP/1.0).
        The stream is closed with `session_expired` at `identity.valid_until`, if any.
        """
        self.open_streams += 1
        self.open_sockets += 1
        self._metrics.stream_opened(identity.brand_id)
        conn_no = next(self._conn_numbers)
        name = self._hub.intern(channel_name(identity.brand_id, identity.player_id))
        kind = Stream if chunked else PlainStream
        stream = kind(transport, name, conn_no, head, self, paused)
        transport.set_protocol(stream)  # its SO_SNDBUF was capped when the socket was accepted
        if identity.valid_until is not None:
            self.expiry.add(stream, identity.valid_until)
        if conn_log.isEnabledFor(logging.INFO):
            conn_id = self.connection_id(conn_no)
            conn_log.info(
                "stream open id=%s brand=%s player=%s",
                conn_id,
                identity.brand_id,
                identity.player_id,
                extra={
                    "event": "stream_open",
                    "conn": conn_id,
                    "brand": identity.brand_id,
                    "player": identity.player_id,
                },
            )
        self._hub.join(stream, partial(self._ready, stream, identity, last_event_id))
        return stream

    def _ready(self, stream: Stream, identity: Identity, last_event_id: str | None) -> None:
        """The channel is subscribed: replay what was missed, or find where the history ends."""
        if stream.state is CLOSED:
            return
        try:
            stream.begin_replay()
            last = parse_stream_id(last_event_id)
            if last is None:
                # No id, or one that is not a history id (it cannot be recovered).
                recovered = None if last_event_id is None else False
                self._read_position(stream, identity, recovered)
                return
            future = self._history.read(stream.channel, format_stream_id(last))
            future.add_done_callback(partial(self._replayed, stream, identity, last))
        except Exception:
            # A bug must not leave the stream open and silent: the client comes back instead.
            self._failed(stream, "error", "starting")

    def _read_position(self, stream: Stream, identity: Identity, recovered: bool | None) -> None:
        self._history.head(stream.channel, partial(self._positioned, stream, identity, recovered))

    def _replayed(
        self,
        stream: Stream,
        identity: Identity,
        last: StreamId,
        future: asyncio.Future[list[HistoryEntry]],
    ) -> None:
        if stream.state is CLOSED:
            return
        if future.cancelled() or future.exception() is not None:
            self._metrics.replays["failed"] += 1
            self._history_failed(stream)
            return
        try:
            entries = future.result()
            history = self._history
            # Recovered only when the history still holds the client's last id and the read
            # was not cut short: then nothing between it and the events we send can be missing.
            if not history.replay_covers(last, entries):
                # The client's id is no floor (it may come from a Redis that restarted empty,
                # with higher ids than any the new one gives): it starts from where the history
                # ends now, and is told so.
                self._metrics.replays["not_recovered"] += 1
                self._read_position(stream, identity, False)
                return
            first = 0 if is_position(last) else 1  # a position is no entry; an id is first
            replayed = history.events(stream.channel, entries[first:])
            resume_id = format_stream_id(last)
            self._go_live(stream, identity, True, resume_id, replayed, last)
            self._metrics.replays["recovered"] += 1
            self._metrics.replayed_events += len(replayed)
        except Exception:
            self._metrics.replays["failed"] += 1
            self._failed(stream, "replay_failed", "the replay")

    def _positioned(
        self,
        stream: Stream,
        identity: Identity,
        recovered: bool | None,
        resume_id: str | None,
        failure: BaseException | None,
    ) -> None:
        if stream.state is CLOSED:
            return
        if resume_id is None:  # the read failed (`failure`, logged by the reader)
            self._history_failed(stream)
            return
        try:
            # Live events at or below an entry id were published before it: left out. Nothing
            # the history adds later is at or below a position, so that floor is not needed
            # (and would drop a plain PUBLISH whose custom id looks like a lower stream id).
            floor = None if resume_id.endswith(POSITION_SEQ) else parse_stream_id(resume_id)
            self._go_live(stream, identity, recovered, resume_id, [], floor)
        except Exception:
            self._failed(stream, "error", "going live")

    def _history_failed(self, stream: Stream) -> None:
        # Not "recovered: false" (that tells the client to refetch its state): the history
        # could not be read, so the client is asked to come back and try again.
        stream.close("replay_failed", final=farewell("replay_failed", self._settings.retry_ms))

    def _failed(self, stream: Stream, reason: str, what: str) -> None:
        conn_id = self.connection_id(stream.conn_no)
        brand_player = split_channel(stream.channel) or (None, None)
        conn_log.exception(
            "stream %s: %s failed; closing it with a retry",
            conn_id,
            what,
            extra={
                "event": "stream_failed",
                "conn": conn_id,
                "brand": brand_player[0],
                "player": brand_player[1],
                "reason": reason,
            },
        )
        stream.close(reason, final=farewell(reason, self._settings.retry_ms))

    def _go_live(
        self,
        stream: Stream,
        identity: Identity,
        recovered: bool | None,
        resume_id: str,
        replayed: list[HistoryEvent],
        last: StreamId | None,
    ) -> None:
        """`resume_id` is the `connected` frame's `id:`; `last` the same id parsed (None for
        a plain one), the floor of the live events held meanwhile."""
        payload: dict[str, Any] = {
            "connection_id": self.connection_id(stream.conn_no),
            "brand_id": identity.brand_id,
            "player_id": identity.player_id,
            "heartbeat_interval": self._settings.keepalive_period,
        }
        if recovered is not None:
            payload["recovered"] = recovered
        # orjson writes what dump_json would here: ids are ASCII, the rest ints and bools.
        connected = encode_connected(orjson.dumps(payload), resume_id, self._settings.retry_ms)
        self._metrics.delivered += stream.go_live(connected, replayed, last)
        self._heartbeats.add(stream)

    # --- close -------------------------------------------------------------------------------

    def _expired(self, stream: Stream) -> None:
        """The stream's token is no longer accepted: it ends with `session_expired` (no `id:`,
        so the client keeps its last event id for the reconnect with a new token)."""
        stream.close("session_expired", final=session_expired(self._settings.retry_ms))

    def close_all(self, reason: str) -> None:
        """Closes every stream, each with its own `retry:` so clients do not return at once."""
        for stream in self._hub.streams():
            stream.close(reason, final=farewell(reason, self._settings.retry_ms))

    def stream_closed(self, stream: Stream, reason: str) -> None:
        """Bookkeeping for a stream that ends, whoever ended it. Called once per stream."""
        self.open_streams -= 1
        self._metrics.stream_closed(brand_of(stream.channel), reason)
        self._hub.leave(stream)
        if stream.hb_slot >= 0:
            self._heartbeats.remove(stream)
        if stream.expires_at:
            self.expiry.remove(stream)
        level = logging.WARNING if reason == "slow_consumer" else logging.INFO
        if not conn_log.isEnabledFor(level):
            return
        brand_player = split_channel(stream.channel) or ("?", "?")
        conn_id = self.connection_id(stream.conn_no)
        duration = time.monotonic() - stream.opened_at
        conn_log.log(
            level,
            "stream close id=%s brand=%s player=%s duration=%.3fs reason=%s",
            conn_id,
            brand_player[0],
            brand_player[1],
            duration,
            reason,
            extra={
                "event": "stream_close",
                "conn": conn_id,
                "brand": brand_player[0],
                "player": brand_player[1],
                "reason": reason,
                "duration": round(duration, 3),
            },
        )

    def socket_closed(self, stream: Stream) -> None:
        self.open_sockets -= 1
        self._release_socket()
