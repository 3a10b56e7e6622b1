"""The broker interface the hub talks to.

The hub reference-counts channels and calls `subscribe` for a channel's first local client and
`unsubscribe` after its last; a broker only tracks which channels are wanted. `when_subscribed`
lets a connection write `connected` only once its channel's subscription is really active.

A broker also keeps each player's history (a Redis stream, or memory for the embedded broker):
`publish_events` appends and publishes, `read_history` reads entries back for replays.

Session control (`wire.control`, `wire.tickets`) goes through the broker too: the control
channel every gateway process listens to, blocks, and connect tickets, all shared by every
instance on one Redis (in memory for the embedded broker).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple, Protocol

from sse_gateway.publish.events import PreparedEvent, PublishedEvent

MessageHandler = Callable[[bytes, bytes], None]
"""Called with (channel, payload) for every message of a subscribed channel."""

StateHandler = Callable[[bool], None]
"""Called with True when the broker connection is up, False when it is lost."""

ControlHandler = Callable[[bytes], None]
"""Called with the payload of every message of the control channel (`wire.control`)."""


class HistoryEntry(NamedTuple):
    """One entry of a player's history stream, as `publish.lua` stores it."""

    id: str
    """The Redis stream entry id, `<ms>-<seq>`; also the event's SSE `id:`."""
    type: str
    """The event type (field `t`)."""
    data: str
    """The event data as JSON text (field `d`), not yet checked."""


class DisconnectOutcome(NamedTuple):
    """What `Broker.publish_disconnect` did."""

    receivers: int
    """Gateway processes that received the control message (PUBLISH's answer)."""
    block_ms: int | None
    """The block now in force on the target: milliseconds left, -1 for one without expiry,
    None for none."""


class BrokerUnavailable(Exception):
    """The broker could not be reached; for a publish: the event was not stored."""


class Broker(Protocol):
    @property
    def connected(self) -> bool: ...

    @property
    def description(self) -> str: ...

    @property
    def subscribed_count(self) -> int:
        """Channels wanted (subscribed, or to be once connected)."""

    @property
    def subscribe_batches(self) -> int:
        """SUBSCRIBE commands written so far (each carries a batch of channels); 0 for a
        broker that sends no commands."""

    @property
    def unsubscribe_batches(self) -> int:
        """UNSUBSCRIBE commands written so far."""

    async def start(
        self,
        on_message: MessageHandler,
        on_state: StateHandler,
        on_control: ControlHandler | None = None,
    ) -> None:
        """Begins connecting; returns without waiting for the connection. From then on every
        message of a subscribed channel goes to `on_message` (on the event loop, in the order
        the broker received them), and every connect and disconnect to `on_state`. With
        `on_control`, the control channel is subscribed for as long as the broker runs, and
        its messages go there (never to `on_message`); `when_subscribed(CONTROL_CHANNEL, …)`
        waits until it is active on the current connection."""

    async def close(self) -> None: ...

    def subscribe(self, channel: bytes) -> None:
        """Wants `channel`; subscriptions of one loop tick are sent together."""

    def unsubscribe(self, channel: bytes) -> None:
        """No longer wants `channel`; waiters of `when_subscribed` whose SUBSCRIBE was not
        written yet are dropped (those of a SUBSCRIBE in flight run at its confirmation)."""

    def when_subscribed(self, channel: bytes, callback: Callable[[], None]) -> None:
        """Calls `callback` once the subscription to a wanted channel is active (maybe now).

        Active means the broker confirmed it: every message published after `callback` runs
        reaches `on_message`. After a reconnect, waiters run again only if registered again.
        """

    def redis_time_ms(self) -> int:
        """Now, on the clock that names history ids (Redis' own clock for Redis)."""

    async def publish_events(self, events: list[PreparedEvent]) -> list[PublishedEvent]:
        """Appends each event to its player's history and publishes it. BrokerUnavailable."""

    async def read_history(
        self, requests: list[tuple[bytes, str]], limit: int
    ) -> list[list[HistoryEntry]]:
        """For each (channel, start id): at most `limit` entries with id >= start, oldest first.

        The history stream is the source of truth for replays and refills; an entry not
        written by `publish.lua` (no `t`/`d` fields) is left out. BrokerUnavailable when the
        broker cannot be reached.
        """

    async def read_heads(self, channels: list[bytes]) -> tuple[list[str | None], int]:
        """For each channel the id of the newest entry of its history (None when it is empty
        or gone), and the broker's clock (milliseconds) read before them: every entry added
        after the heads were read has a later id. BrokerUnavailable as `read_history`."""

    async def publish_disconnect(
        self, message: bytes, block_key: bytes, block_ms: int, block_value: bytes
    ) -> DisconnectOutcome:
        """Publishes a control message to every gateway process. With `block_ms` > 0, first
        (atomically, so that no reconnect can slip in between) makes `block_key` (the
        target's block key) hold `block_value` for at least `block_ms` milliseconds, and
        indexes it (`read_block_index`): a block is lengthened, never shortened.
        BrokerUnavailable."""

    async def publish_control(self, message: bytes) -> int:
        """Publishes `message` on the control channel (this process hears it too); returns
        the gateway processes that received it. BrokerUnavailable."""

    async def count_subscribers(self, channel: bytes) -> int:
        """Gateway processes subscribed to `channel` now (`PUBSUB NUMSUB`; the embedded
        broker: 1 or 0). BrokerUnavailable."""

    async def read_blocks(self, keys: list[tuple[bytes, bytes]]) -> list[bool]:
        """For each group of keys (a player's brand block key and its own): whether either
        exists. BrokerUnavailable."""

    async def read_block_index(self) -> list[tuple[bytes, float]]:
        """Every block in force, as (block key, seconds left; `math.inf`: no end), from the
        index `publish_disconnect` keeps. BrokerUnavailable."""

    async def put_ticket(self, key: bytes, value: bytes, ttl: int) -> None:
        """Stores a connect ticket for `ttl` seconds. BrokerUnavailable."""

    async def take_ticket(self, key: bytes) -> bytes | None:
        """The value of a ticket, which is gone from then on (None: unknown, used or
        expired); atomic across instances. BrokerUnavailable."""
