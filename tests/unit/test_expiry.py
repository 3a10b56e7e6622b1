"""SessionExpiry: one heap and one timer close every stream at its token's deadline.

A wall clock the test sets and a loop whose clock only moves when told (`FakeClockLoop`):
nothing here waits in real time.
"""

from __future__ import annotations

import asyncio

import pytest
from fakes import advance, run_in_loop, turns

from sse_gateway.streams.expiry import MAX_SLEEP_SECONDS, MIN_SWEEP, SessionExpiry

T0 = 1_700_000_000.0


class Wall:
    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class FakeStream:
    def __init__(self, name: str) -> None:
        self.name = name
        self.expires_at = 0.0

    def __repr__(self) -> str:
        return self.name


class Recorder:
    def __init__(self) -> None:
        self.expired: list[FakeStream] = []

    def __call__(self, stream: FakeStream) -> None:
        self.expired.append(stream)


def make(now: float = T0) -> tuple[SessionExpiry[FakeStream], Wall, Recorder]:
    wall, recorder = Wall(now), Recorder()
    return SessionExpiry(recorder, wall), wall, recorder


async def move(wall: Wall, seconds: float) -> None:
    """Both clocks move together, as they do in a real process."""
    wall.now += seconds
    await advance(seconds)


# --- the heap, driven by hand -------------------------------------------------------------------


@run_in_loop
async def test_a_stream_expires_once_its_deadline_rounded_up_to_the_second_has_passed() -> None:
    expiry, wall, recorder = make()
    stream = FakeStream("s")
    expiry.add(stream, T0 + 10.2)
    assert stream.expires_at == T0 + 11  # whole seconds: one firing per second at most
    assert len(expiry) == 1
    wall.now = T0 + 10.9
    assert expiry.expire_due() == 0
    wall.now = T0 + 11
    assert expiry.expire_due() == 1
    assert recorder.expired == [stream]
    assert stream.expires_at == 0.0 and len(expiry) == 0
    assert expiry.expire_due() == 0  # once
    expiry.stop()


@run_in_loop
async def test_streams_expire_in_deadline_order_and_removed_ones_never() -> None:
    expiry, wall, recorder = make()
    streams = {name: FakeStream(name) for name in "abcde"}
    for offset, name in ((5, "c"), (1, "a"), (9, "e"), (3, "b"), (7, "d")):
        expiry.add(streams[name], T0 + offset)
    expiry.remove(streams["b"])
    expiry.remove(streams["b"])  # idempotent
    assert len(expiry) == 4
    wall.now = T0 + 7
    assert expiry.expire_due() == 3
    assert [s.name for s in recorder.expired] == ["a", "c", "d"]
    expiry.remove(streams["a"])  # already expired: nothing to do
    assert len(expiry) == 1
    wall.now = T0 + 100
    expiry.expire_due()
    assert [s.name for s in recorder.expired] == ["a", "c", "d", "e"]
    assert len(expiry) == 0 and expiry.heap_size == 0
    expiry.stop()


@run_in_loop
async def test_the_heap_stays_bounded_however_many_streams_come_and_go() -> None:
    # Streams that close before their deadline leave a mark, not an entry held until then (a
    # day ahead with SSE_JWT_MAX_TTL at 24h): reconnect churn must not grow the heap.
    expiry, _, _ = make()
    steady = [FakeStream(f"steady{i}") for i in range(100)]
    for stream in steady:
        expiry.add(stream, T0 + 86_400)
    for i in range(20_000):
        churn = FakeStream(f"churn{i}")
        expiry.add(churn, T0 + 3600 + i % 7)
        expiry.remove(churn)
        assert expiry.heap_size <= 2 * len(expiry) + MIN_SWEEP + 1
    assert len(expiry) == 100
    expiry.stop()


# --- the timer ----------------------------------------------------------------------------------


@run_in_loop
async def test_the_timer_fires_at_the_earliest_deadline_and_rearms_for_the_next() -> None:
    expiry, wall, recorder = make()
    late, early = FakeStream("late"), FakeStream("early")
    expiry.add(late, T0 + 30)
    expiry.add(early, T0 + 5)  # earlier than what the timer was armed for: rearmed
    await move(wall, 4)
    assert recorder.expired == []
    await move(wall, 1)
    assert recorder.expired == [early]
    await move(wall, 24)
    assert recorder.expired == [early]
    await move(wall, 1)
    assert recorder.expired == [early, late]
    expiry.stop()


@run_in_loop
async def test_a_deadline_already_passed_expires_on_the_next_turn() -> None:
    expiry, _, recorder = make()
    stream = FakeStream("s")
    expiry.add(stream, T0 - 3)
    assert recorder.expired == []  # never from inside add(): the caller is still opening it
    await turns(2)
    assert recorder.expired == [stream]
    expiry.stop()


@run_in_loop
async def test_a_wall_clock_set_forward_is_noticed_within_the_longest_sleep() -> None:
    expiry, wall, recorder = make()
    stream = FakeStream("s")
    expiry.add(stream, T0 + 3600)
    wall.now += 7200  # NTP steps the wall clock; the loop's monotonic clock does not jump
    await advance(MAX_SLEEP_SECONDS)
    assert recorder.expired == [stream]
    expiry.stop()


@run_in_loop
async def test_a_wall_clock_set_back_delays_nothing_that_is_not_due() -> None:
    expiry, wall, recorder = make()
    stream = FakeStream("s")
    expiry.add(stream, T0 + 10)
    wall.now -= 100
    await move(wall, 10)  # the timer fires, finds nothing due by the wall clock, rearms
    assert recorder.expired == []
    await move(wall, 100)
    assert recorder.expired == [stream]
    expiry.stop()


@run_in_loop
async def test_an_expiry_that_raises_does_not_stop_the_others() -> None:
    wall = Wall()
    done: list[str] = []

    def expire(stream: FakeStream) -> None:
        done.append(stream.name)
        if stream.name == "bad":
            raise RuntimeError("boom")

    expiry = SessionExpiry(expire, wall)
    errors: list[object] = []
    asyncio.get_running_loop().set_exception_handler(lambda _, context: errors.append(context))
    expiry.add(FakeStream("bad"), T0 + 1)
    expiry.add(FakeStream("good"), T0 + 1)
    await move(wall, 1)
    await turns(2)
    assert sorted(done) == ["bad", "good"]
    assert len(errors) == 1
    expiry.stop()


@pytest.mark.parametrize("count", [1, 50_000])
@run_in_loop
async def test_one_timer_for_any_number_of_streams(count: int) -> None:
    expiry, wall, recorder = make()
    loop = asyncio.get_running_loop()
    timers_before = len(loop._scheduled)  # type: ignore[attr-defined]
    for i in range(count):
        expiry.add(FakeStream(f"s{i}"), T0 + 60 + i % 600)
    assert len(loop._scheduled) - timers_before == 1  # type: ignore[attr-defined]
    await move(wall, 60 + 600)
    assert len(recorder.expired) == count
    expiry.stop()
