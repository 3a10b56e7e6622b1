"""Stream: one SSE response, from its hand-over by the request reader to its close.

A stream is the asyncio protocol of its socket once the HTTP request became a stream (the
request reader hands the transport over with `transport.set_protocol`, as uvicorn does on an
upgrade). It owns that transport and writes every field below (but `hb_slot` and `expires_at`,
which the heartbeat scheduler and the session expiry keep here so that removal needs no
lookup); its phase is an explicit state and each change of phase is one method:

    JOINING --begin_replay()--> REPLAYING --go_live()--> LIVE --close()--> CLOSED
       \\____________________go_live()________________/^           ^
        \\_________________________close() from any state___________/

- JOINING: the player's channel is being subscribed; nothing is written, live events are
  not for this stream yet (a client that reads 200 must be able to trust `connected`).
- REPLAYING: history after the client's last event id is being read; live events of the
  channel are held, in arrival order, to be merged with the replay.
- LIVE: `connected` was written; every event is written (or queued while the socket drains).
- CLOSED: terminal. `close()` again does nothing; any other transition raises
  `IllegalTransition`, which is a bug in the caller.

No task, timer or queue exists per idle stream: a LIVE stream is this object, its transport,
a slot in the heartbeat ring and an entry in the expiry heap.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import random
import socket
import struct
import time
from collections import deque
from typing import NamedTuple, Protocol

from sse_gateway.wire.frames import LAST_CHUNK, chunk, chunk_size_line, encode_close, unchunk
from sse_gateway.wire.ids import HistoryEvent, ReplayMerge, StreamId

# On a close that asks clients to come back, each is told to wait SSE_RETRY_MS plus up to
# this much, so that a restart or an outage does not bring every client back at once.
RETRY_SPREAD_MS = 10_000
# The kernel send buffer asked for each stream's socket (Linux doubles it for its bookkeeping):
# enough for any burst a live client reads at once, and a bound on what a stalled client's
# socket holds. Without it the kernel grows the buffer to tcp_wmem's maximum (4 MiB), which a
# client cut off as a slow consumer would still read, stale, long after the cut.
SEND_BUFFER_BYTES = 64 * 1024
# SO_LINGER on, 0 s: close() resets the connection and drops what the kernel still holds.
_RESET_ON_CLOSE = struct.pack("ii", 1, 0)


class StreamState(enum.Enum):
    JOINING = "joining"
    REPLAYING = "replaying"
    LIVE = "live"
    CLOSED = "closed"


JOINING = StreamState.JOINING
REPLAYING = StreamState.REPLAYING
LIVE = StreamState.LIVE
CLOSED = StreamState.CLOSED


class IllegalTransition(RuntimeError):
    """A transition the state machine does not have: a bug in the caller, never the client's."""


class HeldEvent(NamedTuple):
    """A live event that arrived while history was read: its id (None for a plain PUBLISH)
    and its encoded frame."""

    id: str | None
    frame: bytes


class StreamOwner(Protocol):
    """What a stream reports to whoever opened it (the stream lifecycle)."""

    @property
    def event_buffer_size(self) -> int:
        """Frames a stream may queue while its socket does not drain (SSE_EVENT_BUFFER_SIZE)."""

    def stream_closed(self, stream: Stream, reason: str) -> None:
        """The stream entered CLOSED: bookkeeping (hub, heartbeats, counters, log). Once."""

    def socket_closed(self, stream: Stream) -> None:
        """The stream's socket is gone (after `stream_closed`). Once."""


def _socket_option(transport: asyncio.BaseTransport, name: int, value: int | bytes) -> None:
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):  # e.g. the client is already gone
            sock.setsockopt(socket.SOL_SOCKET, name, value)


def bound_send_buffer(transport: asyncio.BaseTransport) -> None:
    """Caps the kernel send buffer of a stream's socket at `SEND_BUFFER_BYTES`."""
    _socket_option(transport, socket.SO_SNDBUF, SEND_BUFFER_BYTES)


# What `event: close` says for each reason a stream is closed and asked to come back.
CLOSE_MESSAGES = {
    "shutdown": "the gateway is shutting down",
    "history_gap": "the history no longer holds every event since the last one sent",
    "replay_failed": "the history could not be read",
    "error": "the gateway failed to serve this stream",
    "session_expired": "the token of this stream has expired: reconnect with a new token and"
    " the last event id",
}


def spread_retry(retry_ms: int) -> int:
    """SSE_RETRY_MS plus a random 0-`RETRY_SPREAD_MS`: clients closed together (a restart, an
    outage) do not all come back in the same instant."""
    return retry_ms + random.randrange(RETRY_SPREAD_MS)


def farewell(reason: str, retry_ms: int, message: str | None = None) -> bytes:
    """The `event: close` frame (with its `retry:`) of a stream the gateway closes and wants
    back: `reason` is the close reason, `retry_ms` SSE_RETRY_MS, spread here."""
    text = message if message is not None else CLOSE_MESSAGES.get(reason, reason)
    return encode_close(reason, text, spread_retry(retry_ms))


def session_expired(retry_ms: int) -> bytes:
    """The last frame of a stream whose token expired: `event: session_expired`, `retry:`
    (SSE_RETRY_MS, not spread: streams expire one by one, at their own tokens' `exp`) and
    `{"reason": "session_expired", "message": …}`. An EventSource that reconnects by itself
    sends the expired token again and is refused 401 `token_expired` (and stops): the page
    must reconnect with a new token and its last event id."""
    reason = "session_expired"
    return encode_close(reason, CLOSE_MESSAGES[reason], retry_ms, event=reason)


class Stream(asyncio.Protocol):
    """One SSE stream on its own socket. Created JOINING by the stream lifecycle.

    Frames come as HTTP/1.1 chunks (`wire.frames.chunk`, made once per message for every
    stream of a channel): this class writes them as they are, `PlainStream` (HTTP/1.0) takes
    the frame back out.
    """

    CHUNKED = True

    __slots__ = (
        "channel",
        "conn_no",
        "expires_at",
        "floor",
        "hb_slot",
        "head",
        "held",
        "opened_at",
        "owner",
        "paused",
        "queue",
        "state",
        "transport",
    )

    def __init__(
        self,
        transport: asyncio.Transport,
        channel: bytes,
        conn_no: int,
        head: bytes,
        owner: StreamOwner,
        paused: bool = False,
    ) -> None:
        """`head` is the HTTP response head; it goes out with the first frames (`connected`,
        or a closing `retry:`), so a client that sees 200 knows its channel is subscribed.
        `paused`: the transport already asked to pause writing (before the hand-over)."""
        self.transport: asyncio.Transport | None = transport
        self.channel = channel
        self.conn_no = conn_no
        self.head: bytes | None = head
        self.owner = owner
        self.state = JOINING
        self.opened_at = time.monotonic()
        # Live events that arrive while this stream replays history wait here (REPLAYING only).
        self.held: list[HeldEvent] | None = None
        # After a replay: the newest id this stream was sent. Live copies of replayed events
        # that arrive late (Pub/Sub and history reads are separate sockets) are skipped.
        self.floor: StreamId | None = None
        self.paused = paused
        self.queue: deque[bytes] | None = None
        # The heartbeat ring's slot of this stream (set by the scheduler; -1: not in the ring).
        self.hb_slot = -1
        # When its token expires, as the expiry heap holds it (set by `SessionExpiry`; 0.0:
        # not in the heap).
        self.expires_at = 0.0

    # --- transitions -------------------------------------------------------------------------

    def begin_replay(self) -> None:
        """JOINING -> REPLAYING: from now on live events are held until `go_live`."""
        if self.state is not JOINING:
            raise IllegalTransition(f"begin_replay in state {self.state.value}")
        self.state = REPLAYING
        self.held = []

    def go_live(self, connected: bytes, replayed: list[HistoryEvent], last: StreamId | None) -> int:
        """JOINING or REPLAYING -> LIVE: writes the head, `connected`, then the events.

        `connected` is a plain frame; `replayed` are history events (chunks) after `last`, the
        position the client resumes from, oldest first. They are merged with the live events
        held meanwhile, each id once and in order, and none at or below `last`
        (`ReplayMerge`). Returns the number of events written after `connected`.
        """
        state = self.state
        if state is not JOINING and state is not REPLAYING:
            raise IllegalTransition(f"go_live in state {state.value}")
        chunked = self.CHUNKED
        # The head goes out with the first frames, in one write.
        frames = [self.head or b""]
        if chunked:
            frames += (chunk_size_line(len(connected)), connected, b"\r\n")
        else:
            frames.append(connected)
        self.head = None
        written = 0
        held = self.held
        self.held = None
        if not held and not replayed:
            self.floor = last  # nothing to merge (the usual first connect)
        elif held is not None:
            merge = ReplayMerge(last)
            events = merge.merge(replayed, held)
            if chunked:
                frames.extend(frame for _, frame in events)
            else:
                frames.extend(unchunk(frame) for _, frame in events)
            self.floor = merge.last
            written = len(events)
        self.state = LIVE
        assert self.transport is not None  # a lost socket closes the stream first
        self.transport.write(b"".join(frames))
        return written

    def close(self, reason: str, *, abort: bool = False, final: bytes = b"") -> None:
        """Any state -> CLOSED; again: nothing. Writes `final` (a plain frame, e.g. `farewell`)
        and the body's end, then closes the socket; or resets it at once with `abort`.
        `reason` is the metric and log label."""
        if self.state is CLOSED:
            return
        self.state = CLOSED
        self.queue = None
        self.held = None
        self.owner.stream_closed(self, reason)
        transport = self.transport
        if transport is None:
            return
        if abort:
            # A reset, not a FIN after whatever the kernel still holds: the client learns of the
            # cut at once instead of reading stale frames, and the memory is freed now.
            _socket_option(transport, socket.SO_LINGER, _RESET_ON_CLOSE)
            transport.abort()
            return
        end = final
        if self.CHUNKED:
            # A chunked body ends with its last chunk: the client sees a clean end, not a cut.
            end = chunk(final) + LAST_CHUNK if final else LAST_CHUNK
        transport.write((self.head or b"") + end)
        self.head = None
        transport.close()

    # --- events ------------------------------------------------------------------------------

    def deliver(self, frame: bytes, event_id: str | None, parsed: StreamId | None) -> int:
        """One live event of the channel: written when LIVE (1), held when REPLAYING (0),
        ignored when JOINING or CLOSED, or when at or below the replay floor (0).

        `parsed` is `event_id` as a stream id, or None when it is not one. Per event and per
        stream this is the whole path from the channel to `transport.write`.
        """
        if self.state is not LIVE:
            held = self.held
            if held is not None:
                held.append(HeldEvent(event_id, frame))
            return 0
        floor = self.floor
        if floor is not None and parsed is not None:
            if parsed <= floor:
                return 0
            self.floor = None  # caught up: channel order suffices from here on
        if self.paused:
            self._enqueue(frame)
        else:
            transport = self.transport
            if transport is not None:
                transport.write(frame)
        return 1

    def forget_floor(self) -> None:
        """The channel's history restarted (`OutageRecovery`): its ids owe nothing to the old
        ones, so the floor would hide new events."""
        self.floor = None

    def _enqueue(self, frame: bytes) -> None:
        """Queues a frame while the socket does not drain; one more than the owner's
        `event_buffer_size` cuts the stream off (`slow_consumer`)."""
        queue = self.queue
        if queue is None:
            self.queue = queue = deque()
        queue.append(frame)
        if len(queue) > self.owner.event_buffer_size:
            self.close("slow_consumer", abort=True)

    def heartbeat(self, frame: bytes) -> bool:
        """Writes `frame` unless the socket is not draining (it has no use for another
        heartbeat then); whether it was written."""
        if not self.paused and self.transport is not None:
            self.transport.write(frame)
            return True
        return False

    # --- asyncio.Protocol --------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        pass  # a stream reads no requests; anything the client sends is ignored

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        queue = self.queue
        transport = self.transport
        if queue and transport is not None:
            while queue and not self.paused:
                transport.write(queue.popleft())
        if not queue:
            self.queue = None

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None  # nothing more can be written: close() only does the bookkeeping
        self.close("client" if exc is None else "error")
        self.owner.socket_closed(self)


class PlainStream(Stream):
    """A stream to an HTTP/1.0 client: the body is not chunked, it ends when the socket
    closes. Rare (browsers and SSE libraries speak HTTP/1.1), so it pays the unchunking."""

    __slots__ = ()

    CHUNKED = False

    def deliver(self, frame: bytes, event_id: str | None, parsed: StreamId | None) -> int:
        # Held events stay chunks, like the replayed ones they are merged with in `go_live`.
        return Stream.deliver(
            self, unchunk(frame) if self.state is LIVE else frame, event_id, parsed
        )

    def heartbeat(self, frame: bytes) -> bool:
        return Stream.heartbeat(self, unchunk(frame))
