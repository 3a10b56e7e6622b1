"""SubscriptionBook on its own: no redis-server, no event loop; Redis is played by the tests."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from sse_gateway.broker.subscriptions import (
    BATCH_SIZE,
    MAX_INFLIGHT,
    SubscriptionBook,
    SubscriptionCommand,
)

SUB = b"SUBSCRIBE"
UNSUB = b"UNSUBSCRIBE"


def names(count: int, prefix: str = "ch") -> list[bytes]:
    return [f"{prefix}{i}".encode() for i in range(count)]


def connected_book() -> SubscriptionBook:
    book = SubscriptionBook()
    assert list(book.on_connected()) == []
    return book


def recorder() -> tuple[list[str], Callable[[str], Callable[[], None]]]:
    fired: list[str] = []

    def make(name: str) -> Callable[[], None]:
        return lambda: fired.append(name)

    return fired, make


def confirm_all(book: SubscriptionBook, commands: Sequence[SubscriptionCommand]) -> list[str]:
    """Redis' answer to `commands`: one confirmation per channel, in order; runs the callbacks.

    Returns what was written in reply (commands released by the confirmations), as
    "VERB count" strings, in order.
    """
    released: list[str] = []
    for verb, channels in commands:
        for channel in channels:
            if verb == SUB:
                more, callbacks = book.subscribe_confirmed(channel)
                for callback in callbacks:
                    callback()
            else:
                more = book.unsubscribe_confirmed(channel)
            released += [f"{c.verb.decode()} {len(c.channels)}" for c in more]
    return released


def test_a_tick_of_subscribes_goes_out_in_batches() -> None:
    book = connected_book()
    channels = names(2_500)
    for channel in channels:
        book.subscribe(channel)
    commands = list(book.flush())
    assert BATCH_SIZE == 1000
    assert [(c.verb, len(c.channels)) for c in commands] == [(SUB, 1000), (SUB, 1000)]
    assert book.unconfirmed == 2000
    # The last 500 wait in the outbox until confirmations bring the count below half.
    for channel in commands[0].channels + commands[1].channels:
        more, _ = book.subscribe_confirmed(channel)
        commands += more
    assert [(c.verb, len(c.channels)) for c in commands] == [(SUB, 1000), (SUB, 1000), (SUB, 500)]
    sent = [ch for c in commands for ch in c.channels]
    assert sorted(sent) == sorted(channels)
    assert book.wanted_count == 2_500


def test_no_more_than_max_inflight_unconfirmed_and_refill_below_half() -> None:
    book = connected_book()
    channels = names(5_000)
    for channel in channels:
        book.subscribe(channel)
    first = book.flush()
    assert sum(len(c.channels) for c in first) == MAX_INFLIGHT == 2000
    in_flight = [ch for c in first for ch in c.channels]
    # Confirmations down to exactly half release nothing...
    for channel in in_flight[: MAX_INFLIGHT // 2]:
        more, _ = book.subscribe_confirmed(channel)
        assert list(more) == []
    assert book.unconfirmed == MAX_INFLIGHT // 2
    # ...the one below half refills: commands go out while fewer than MAX_INFLIGHT are
    # unconfirmed, so the last one may take the count past the cap by less than a batch.
    more, _ = book.subscribe_confirmed(in_flight[MAX_INFLIGHT // 2])
    assert [(c.verb, len(c.channels)) for c in more] == [(SUB, 1000), (SUB, 1000)]
    assert book.unconfirmed == MAX_INFLIGHT // 2 - 1 + 2000
    assert book.unconfirmed < MAX_INFLIGHT + BATCH_SIZE
    # At or over the cap nothing more goes out, however many wait.
    for channel in in_flight[MAX_INFLIGHT // 2 + 1 :]:
        more, _ = book.subscribe_confirmed(channel)
        assert list(more) == []
    assert book.unconfirmed == 2000


def test_waiters_fire_with_their_own_commands_confirmation_oldest_first() -> None:
    book = connected_book()
    fired, make = recorder()
    book.subscribe(b"a")
    book.when_subscribed(b"a", make("first"))
    assert list(book.flush()) == [SubscriptionCommand(SUB, [b"a"])]
    # Unsubscribed and subscribed again before Redis answered: a second SUBSCRIBE in flight.
    book.unsubscribe(b"a")
    assert list(book.flush()) == [SubscriptionCommand(UNSUB, [b"a"])]
    book.subscribe(b"a")
    assert book.when_subscribed(b"a", make("second")) is False
    assert list(book.flush()) == [SubscriptionCommand(SUB, [b"a"])]
    # A waiter added now joins the newest SUBSCRIBE.
    assert book.when_subscribed(b"a", make("third")) is False

    _, callbacks = book.subscribe_confirmed(b"a")
    for callback in callbacks:
        callback()
    assert fired == ["first"]
    book.unsubscribe_confirmed(b"a")
    _, callbacks = book.subscribe_confirmed(b"a")
    for callback in callbacks:
        callback()
    assert fired == ["first", "second", "third"]
    assert book.unconfirmed == 0
    # Active now, nothing in flight: the caller runs it at once.
    assert book.when_subscribed(b"a", make("fourth")) is True


def test_subscribe_and_unsubscribe_in_one_tick_send_nothing() -> None:
    book = connected_book()
    fired, make = recorder()
    book.subscribe(b"a")
    book.when_subscribed(b"a", make("a"))
    book.unsubscribe(b"a")
    assert list(book.flush()) == []
    assert book.unconfirmed == 0
    assert book.wanted_count == 0
    # The waiter went with the unsubscribe: a later subscription does not fire it.
    book.subscribe(b"a")
    assert confirm_all(book, book.flush()) == []
    assert fired == []


def test_unsubscribe_of_a_sent_channel() -> None:
    book = connected_book()
    book.subscribe(b"a")
    book.subscribe(b"b")
    confirm_all(book, book.flush())
    book.unsubscribe(b"a")
    assert list(book.flush()) == [SubscriptionCommand(UNSUB, [b"a"])]
    assert book.unconfirmed == 1
    assert book.wanted_count == 1
    assert list(book.unsubscribe_confirmed(b"a")) == []
    assert book.unconfirmed == 0
    # No longer active: a waiter waits for the next SUBSCRIBE.
    fired, make = recorder()
    assert book.when_subscribed(b"a", make("a")) is False
    book.subscribe(b"a")
    assert confirm_all(book, book.flush()) == []
    assert fired == ["a"]


def test_unsubscribe_then_subscribe_of_a_sent_channel_sends_nothing() -> None:
    book = connected_book()
    book.subscribe(b"a")
    confirm_all(book, book.flush())
    book.unsubscribe(b"a")
    book.subscribe(b"a")
    assert list(book.flush()) == []


def test_when_subscribed_in_each_state() -> None:
    book = SubscriptionBook()
    fired, make = recorder()
    # Wanted, not sent (no connection yet): pending.
    book.subscribe(b"a")
    assert book.when_subscribed(b"a", make("pending")) is False
    # Sent, SUBSCRIBE in flight: joins it.
    commands = book.on_connected()
    assert list(commands) == [SubscriptionCommand(SUB, [b"a"])]
    assert book.when_subscribed(b"a", make("inflight")) is False
    assert fired == []
    confirm_all(book, commands)
    assert fired == ["pending", "inflight"]
    # Sent and confirmed: now, by the caller.
    assert book.when_subscribed(b"a", make("now")) is True
    assert fired == ["pending", "inflight"]
    # Not even wanted: pending, and fired by the SUBSCRIBE that comes later.
    assert book.when_subscribed(b"b", make("b")) is False
    book.subscribe(b"b")
    confirm_all(book, book.flush())
    assert fired == ["pending", "inflight", "b"]


def test_resubscribe_after_a_drop() -> None:
    book = connected_book()
    fired, make = recorder()
    book.subscribe(b"live")
    confirm_all(book, book.flush())
    for channel in (b"a", b"gone"):
        book.subscribe(channel)
        book.when_subscribed(channel, make(channel.decode()))
    sent = book.flush()
    assert sorted(ch for c in sent for ch in c.channels) == [b"a", b"gone"]
    # Unwanted while its SUBSCRIBE was in flight, and the connection drops before any reply.
    book.unsubscribe(b"gone")
    book.on_disconnected()
    assert book.unconfirmed == 0
    # Not sent on any connection now: waiters wait.
    assert book.when_subscribed(b"live", make("live")) is False

    commands = book.on_connected()
    assert [(c.verb, sorted(c.channels)) for c in commands] == [(SUB, [b"a", b"live"])]
    assert fired == []
    confirm_all(book, commands)
    assert sorted(fired) == ["a", "live"]
    assert book.unconfirmed == 0


def test_resubscription_is_batched_and_capped_too() -> None:
    book = connected_book()
    for channel in names(4_500):
        book.subscribe(channel)
    confirm_all(book, book.flush())
    book.on_disconnected()
    commands = book.on_connected()
    assert [len(c.channels) for c in commands] == [1000, 1000]
    assert book.unconfirmed == MAX_INFLIGHT


def test_verbs_are_configurable() -> None:
    book = SubscriptionBook(b"SSUBSCRIBE", b"SUNSUBSCRIBE")
    book.on_connected()
    book.subscribe(b"a")
    assert list(book.flush()) == [SubscriptionCommand(b"SSUBSCRIBE", [b"a"])]
    book.unsubscribe(b"a")
    assert list(book.flush()) == [SubscriptionCommand(b"SUNSUBSCRIBE", [b"a"])]
