"""Which channels a Pub/Sub connection should hold, and which commands get it there (sans-IO).

`SubscriptionBook` is told what the gateway wants and what Redis confirmed, and answers with
the commands to write and the callbacks to run. It never touches a socket or an event loop and
never runs a callback itself, so the adapter decides when to write and when to call back.

Changes are coalesced: `subscribe`/`unsubscribe` only mark a channel dirty, and `flush()` (which
the adapter runs once per loop tick) turns the net change into commands of at most `BATCH_SIZE`
channels each, so a connect storm or a full resubscription never sends Redis one huge command.
No command goes out while `MAX_INFLIGHT` channels are sent and not yet confirmed (so at most
`MAX_INFLIGHT + BATCH_SIZE - 1` are); the rest waits in an outbox and goes out once
confirmations bring that count below half. Redis confirms every channel of a command with one
reply, in order, which ties a waiter to the exact SUBSCRIBE that made its channel active.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence
from typing import NamedTuple

BATCH_SIZE = 1000
MAX_INFLIGHT = 2000

Callback = Callable[[], None]


class SubscriptionCommand(NamedTuple):
    """One command to write: `verb` (say b"SUBSCRIBE") followed by 1..BATCH_SIZE channels."""

    verb: bytes
    channels: list[bytes]


_NO_COMMANDS: tuple[SubscriptionCommand, ...] = ()
_NO_CALLBACKS: tuple[Callback, ...] = ()


class SubscriptionBook:
    """The subscription state of one Pub/Sub connection.

    Channel names are bytes, as on the wire. The adapter's side of the contract:

    - `flush()` runs only while connected, at most once per loop tick, and what it returns is
      written at once; while disconnected, changes simply stay dirty until `on_connected()`.
    - every confirmation Redis sends is reported, `subscribe_confirmed` or
      `unsubscribe_confirmed`, and the commands they return are written before the callbacks run.
    - a lost connection is reported with `on_disconnected()`, a new one with `on_connected()`.

    `subscribe_verb`/`unsubscribe_verb` are the command names written: a Redis Cluster shard's
    book (broker/cluster.py) writes b"SSUBSCRIBE"/b"SUNSUBSCRIBE", and moves channels to another
    shard's book with `subscribe_failed`, `forget` and `take_all`.
    """

    __slots__ = (
        "_dirty",
        "_inflight",
        "_outbox",
        "_pending",
        "_sent",
        "_subscribe_verb",
        "_unconfirmed",
        "_unsubscribe_verb",
        "_wanted",
    )

    def __init__(
        self, subscribe_verb: bytes = b"SUBSCRIBE", unsubscribe_verb: bytes = b"UNSUBSCRIBE"
    ) -> None:
        self._subscribe_verb = subscribe_verb
        self._unsubscribe_verb = unsubscribe_verb
        self._wanted: set[bytes] = set()
        # What Redis will hold once it has read everything we wrote: the last command wins.
        # Only ever filled while connected, so a channel in it is live or on its way.
        self._sent: set[bytes] = set()
        self._dirty: set[bytes] = set()
        # Per channel, one waiter list per SUBSCRIBE sent and not yet confirmed, oldest first.
        self._inflight: dict[bytes, deque[list[Callback]]] = {}
        # Waiters for a channel whose SUBSCRIBE has not been queued yet.
        self._pending: dict[bytes, list[Callback]] = {}
        # Queued past the in-flight cap, oldest first.
        self._outbox: deque[SubscriptionCommand] = deque()
        self._unconfirmed = 0

    @property
    def wanted_count(self) -> int:
        """How many channels the gateway wants, confirmed or not."""
        return len(self._wanted)

    def wanted(self) -> list[bytes]:
        """Every channel the gateway wants of this connection."""
        return list(self._wanted)

    @property
    def unconfirmed(self) -> int:
        """Channels handed out by this book whose confirmation has not come back."""
        return self._unconfirmed

    # --- what the gateway wants --------------------------------------------------------------

    def subscribe(self, channel: bytes) -> None:
        """Wants `channel`; the command goes out with the next `flush()`."""
        self._wanted.add(channel)
        self._dirty.add(channel)

    def unsubscribe(self, channel: bytes) -> None:
        """No longer wants `channel`; its waiters not yet tied to a SUBSCRIBE are dropped."""
        self._wanted.discard(channel)
        self._pending.pop(channel, None)
        self._dirty.add(channel)

    def when_subscribed(self, channel: bytes, callback: Callback) -> bool:
        """Ties `callback` to the SUBSCRIBE that makes `channel` active.

        Returns True when the channel is active already: the caller runs `callback` now, as the
        book keeps no reference to it. Otherwise the callback joins the newest SUBSCRIBE in
        flight for the channel, or else waits for the next one sent (through `flush()` or
        `on_connected()`), and comes back from `subscribe_confirmed`.
        """
        if channel in self._sent:
            inflight = self._inflight.get(channel)
            if not inflight:
                return True
            inflight[-1].append(callback)
        else:
            self._pending.setdefault(channel, []).append(callback)
        return False

    def flush(self) -> Sequence[SubscriptionCommand]:
        """The net change since the last flush, as commands to write now (maybe none).

        UNSUBSCRIBEs come first. Commands past the in-flight cap stay in the outbox and come
        back from a later confirmation.
        """
        dirty, self._dirty = self._dirty, set()
        wanted = self._wanted
        sent = self._sent
        to_subscribe: list[bytes] = []
        to_unsubscribe: list[bytes] = []
        for channel in dirty:
            if channel in wanted:
                if channel not in sent:
                    to_subscribe.append(channel)
            elif channel in sent:
                to_unsubscribe.append(channel)
        if to_unsubscribe:
            sent.difference_update(to_unsubscribe)
            self._queue(self._unsubscribe_verb, to_unsubscribe)
        if to_subscribe:
            inflight = self._inflight
            pending = self._pending
            for channel in to_subscribe:
                sent.add(channel)
                inflight.setdefault(channel, deque()).append(pending.pop(channel, []))
            self._queue(self._subscribe_verb, to_subscribe)
        return self._drain()

    # --- what Redis says ---------------------------------------------------------------------

    def subscribe_confirmed(
        self, channel: bytes
    ) -> tuple[Sequence[SubscriptionCommand], Sequence[Callback]]:
        """Redis confirmed one channel of a SUBSCRIBE: the oldest one in flight for it.

        Returns `(commands, callbacks)`: the commands now allowed out, to be written first, and
        the waiters of that SUBSCRIBE, to be run after.
        """
        # A bare pair rather than a NamedTuple: this runs once per stream set up, and a
        # NamedTuple's Python-level __new__ costs several times a tuple display.
        commands = self._confirmed()
        lists = self._inflight.get(channel)
        if not lists:
            return commands, _NO_CALLBACKS
        callbacks = lists.popleft()
        if not lists:
            del self._inflight[channel]
        return commands, callbacks

    def unsubscribe_confirmed(self, channel: bytes) -> Sequence[SubscriptionCommand]:
        """Redis confirmed one channel of an UNSUBSCRIBE; returns commands now allowed out."""
        return self._confirmed()

    def on_connected(self) -> Sequence[SubscriptionCommand]:
        """A new connection (no subscription on it): SUBSCRIBEs for every wanted channel."""
        self._dirty.update(self._wanted)
        return self.flush()

    def on_disconnected(self) -> None:
        """The connection is gone, and with it everything sent on it.

        Waiters of unconfirmed SUBSCRIBEs wait for the resubscription instead; those of channels
        no longer wanted are dropped.
        """
        self._sent.clear()
        self._outbox.clear()
        self._unconfirmed = 0
        for channel, lists in self._inflight.items():
            pending = self._pending.setdefault(channel, [])
            for callbacks in lists:
                pending.extend(callbacks)
        self._inflight.clear()
        for channel in list(self._pending):
            if channel not in self._wanted:
                del self._pending[channel]

    # --- channels leaving this connection (Redis Cluster) ------------------------------------

    def subscribe_failed(
        self, channel: bytes
    ) -> tuple[Sequence[SubscriptionCommand], Sequence[Callback]]:
        """Redis refused the oldest SUBSCRIBE in flight for `channel` (an error reply, say
        MOVED): as `subscribe_confirmed`, but the channel is not active (and is not sent
        again by itself); its waiters come back for the adapter to carry where it goes."""
        commands = self._confirmed()
        lists = self._inflight.get(channel)
        if not lists:
            self._sent.discard(channel)
            return commands, _NO_CALLBACKS
        callbacks = lists.popleft()
        if not lists:
            del self._inflight[channel]
            self._sent.discard(channel)  # not active, and no other SUBSCRIBE on its way
        return commands, callbacks

    def forget(self, channel: bytes) -> list[Callback]:
        """`channel` leaves this connection without a command (its slot moved elsewhere);
        returns its waiters. Confirmations still due for it are counted as usual."""
        self._wanted.discard(channel)
        self._dirty.discard(channel)
        self._sent.discard(channel)
        waiters = self._pending.pop(channel, [])
        for callbacks in self._inflight.pop(channel, ()):
            waiters.extend(callbacks)
        return waiters

    def take_all(self) -> dict[bytes, list[Callback]]:
        """After `on_disconnected`: every wanted channel with its waiters; the book is empty
        afterwards (the connection is not coming back)."""
        taken = {channel: self._pending.pop(channel, []) for channel in self._wanted}
        self._wanted.clear()
        self._dirty.clear()
        self._pending.clear()
        return taken

    # --- internals ---------------------------------------------------------------------------

    def _confirmed(self) -> Sequence[SubscriptionCommand]:
        self._unconfirmed -= 1
        # Refilled only below half the cap, so the outbox goes out in a few large writes
        # rather than one command per confirmation.
        if self._outbox and self._unconfirmed < MAX_INFLIGHT // 2:
            return self._drain()
        return _NO_COMMANDS

    def _queue(self, verb: bytes, channels: list[bytes]) -> None:
        for start in range(0, len(channels), BATCH_SIZE):
            self._outbox.append(SubscriptionCommand(verb, channels[start : start + BATCH_SIZE]))

    def _drain(self) -> Sequence[SubscriptionCommand]:
        outbox = self._outbox
        if not outbox or self._unconfirmed >= MAX_INFLIGHT:
            return _NO_COMMANDS
        commands: list[SubscriptionCommand] = []
        while outbox and self._unconfirmed < MAX_INFLIGHT:
            command = outbox.popleft()
            commands.append(command)
            self._unconfirmed += len(command.channels)
        return commands
