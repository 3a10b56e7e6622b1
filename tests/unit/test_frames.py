"""SSE frame encoding, checked through an independent spec-following parser."""

from __future__ import annotations

import json
import re

import pytest
from fakes import http_chunk, split_chunks
from hypothesis import given
from hypothesis import strategies as st
from sse_spec_parser import Event, parse_sse

from sse_gateway.wire.frames import (
    LAST_CHUNK,
    FrameError,
    chunk,
    chunk_size_line,
    dump_json,
    encode_close,
    encode_comment,
    encode_connected,
    encode_event,
    encode_json_event,
    encode_retry,
    unchunk,
)


def normalize_breaks(text: str) -> str:
    return re.sub(r"\r\n|\r", "\n", text)


# --- the exact bytes -------------------------------------------------------------------------


def test_event_with_id_type_and_data_has_fields_in_order_and_ends_with_blank_line() -> None:
    assert encode_event("notification", '{"a":1}', "42") == (
        b'id: 42\nevent: notification\ndata: {"a":1}\n\n'
    )


def test_event_without_id_has_no_id_line() -> None:
    frame = encode_event("notification", "x")
    assert frame == b"event: notification\ndata: x\n\n"
    assert b"id:" not in frame


def test_event_without_type_is_a_plain_message() -> None:
    frame = encode_event(None, "x")
    assert frame == b"data: x\n\n"
    assert parse_sse(frame).events == [Event(type="message", data="x", id="")]


@pytest.mark.parametrize(
    ("data", "lines"),
    [
        ("a\nb", [b"data: a", b"data: b"]),
        ("a\rb", [b"data: a", b"data: b"]),
        ("a\r\nb", [b"data: a", b"data: b"]),
        ("a\n\nb", [b"data: a", b"data: ", b"data: b"]),
        ("a\r\rb", [b"data: a", b"data: ", b"data: b"]),
        ("a\n", [b"data: a", b"data: "]),
        ("\na", [b"data: ", b"data: a"]),
        ("", [b"data: "]),
    ],
)
def test_data_is_split_into_one_data_line_per_line(data: str, lines: list[bytes]) -> None:
    frame = encode_event("t", data)
    assert frame == b"event: t\n" + b"".join(line + b"\n" for line in lines) + b"\n"


@pytest.mark.parametrize(
    "data",
    ["a\nb", "a\rb", "a\r\nb", "line1\r\n\r\nline3", "\n", "\r", "\r\n", "x\r", "\n\n\n"],
)
def test_data_with_line_breaks_round_trips_through_a_conforming_parser(data: str) -> None:
    parsed = parse_sse(encode_event("t", data, "1"))
    assert parsed.events == [Event(type="t", data=normalize_breaks(data), id="1")]


@pytest.mark.parametrize(
    "data",
    [
        "event: forged\nid: 99\ndata: x\n\n",
        "\n\nevent: close\ndata: bye\n\n",
        "x\r\rretry: 1\r\r",
        "\r\n\r\nid: 7\r\n",
    ],
)
def test_data_cannot_end_the_frame_or_forge_fields(data: str) -> None:
    parsed = parse_sse(encode_event("t", data))
    assert len(parsed.events) == 1
    assert parsed.events[0].type == "t"
    assert parsed.events[0].id == ""
    assert parsed.retry is None
    assert parsed.events[0].data == normalize_breaks(data)


def test_data_keeps_leading_spaces_and_colons() -> None:
    data = "  two spaces\n:not a comment\ndata: nested"
    parsed = parse_sse(encode_event("t", data))
    assert parsed.events == [Event(type="t", data=data, id="")]
    assert parsed.comments == []


def test_unicode_line_separators_are_not_sse_line_breaks() -> None:
    data = "a\u2028b\u0085c\x0bd\x0ce\x1cf"
    frame = encode_event("t", data)
    assert frame.count(b"data:") == 1
    assert parse_sse(frame).events == [Event(type="t", data=data, id="")]


def test_non_ascii_data_is_utf8() -> None:
    frame = encode_event("t", "héllo ✓ 𝄞")
    assert "data: héllo ✓ 𝄞\n".encode() in frame


@pytest.mark.parametrize("bad", ["a\nb", "a\rb", "a\r\nb", "\n", "a\x00b", "\x00"])
def test_id_with_line_break_or_nul_is_refused(bad: str) -> None:
    with pytest.raises(FrameError):
        encode_event("t", "x", bad)


@pytest.mark.parametrize("bad", ["a\nb", "a\rb", "a\r\nb", "\r", "a\x00b", ""])
def test_event_type_with_line_break_nul_or_empty_is_refused(bad: str) -> None:
    with pytest.raises(FrameError):
        encode_event(bad, "x")


def test_frame_error_is_a_value_error() -> None:
    assert issubclass(FrameError, ValueError)


def test_retry_frame() -> None:
    assert encode_retry(3000) == b"retry: 3000\n\n"
    parsed = parse_sse(encode_retry(3000))
    assert parsed.retry == 3000
    assert parsed.events == []


def test_retry_frame_then_event() -> None:
    parsed = parse_sse(encode_retry(1500) + encode_event("connected", "{}"))
    assert parsed.retry == 1500
    assert parsed.events == [Event(type="connected", data="{}", id="")]


# --- connected and close: `retry:` inside an event, never a block of its own ----------------


def test_connected_exact_bytes() -> None:
    frame = encode_connected(b'{"connection_id":"0a","recovered":true}', "1700000000000-3", 3000)
    assert frame == (
        b"id: 1700000000000-3\nevent: connected\nretry: 3000\n"
        b'data: {"connection_id":"0a","recovered":true}\n\n'
    )


def test_connected_parses_as_one_event_with_its_id_and_retry() -> None:
    parsed = parse_sse(encode_connected(b"{}", "0-0", 1234))
    assert parsed.events == [Event(type="connected", data="{}", id="0-0")]
    assert parsed.last_event_id == "0-0"  # an EventSource resumes from it
    assert parsed.retry == 1234


def test_close_exact_bytes() -> None:
    assert encode_close("shutdown", "the gateway is shutting down", 3517) == (
        b"event: close\nretry: 3517\n"
        b'data: {"reason":"shutdown","message":"the gateway is shutting down"}\n\n'
    )


def test_close_data_is_one_json_line_whatever_the_message() -> None:
    message = 'line 1\nline 2\r\n"quoted" é ✓'
    frame = encode_close("error", message, 10)
    assert frame.count(b"\n") == 4  # event, retry, data, blank: nothing else breaks a line
    assert "é ✓".encode() in frame  # UTF-8, not escaped
    parsed = parse_sse(frame)
    [event] = parsed.events
    assert (event.type, event.id) == ("close", "")
    assert json.loads(event.data) == {"reason": "error", "message": message}
    assert parsed.retry == 10


def test_close_with_another_event_type_exact_bytes() -> None:
    # `session_expired` is a frame of its own type, with the data of every gateway close.
    assert encode_close("session_expired", "m", 3000, event="session_expired") == (
        b'event: session_expired\nretry: 3000\ndata: {"reason":"session_expired","message":"m"}\n\n'
    )


@pytest.mark.parametrize("retry", [0, 1, 3000, 13_000])
def test_retry_values_are_plain_decimal(retry: int) -> None:
    assert parse_sse(encode_close("r", "m", retry)).retry == retry
    assert parse_sse(encode_connected(b"{}", "1-0", retry)).retry == retry


# --- chunks: each frame one HTTP/1.1 chunk (RFC 9112 §7.1) ---------------------------------


@pytest.mark.parametrize(
    ("frame", "expected"),
    [
        (b"data: x\n\n", b"9\r\ndata: x\n\n\r\n"),
        (b"x" * 15, b"f\r\n" + b"x" * 15 + b"\r\n"),
        (b"x" * 16, b"10\r\n" + b"x" * 16 + b"\r\n"),
        (b"x" * 255, b"ff\r\n" + b"x" * 255 + b"\r\n"),
        (b"x" * 4096, b"1000\r\n" + b"x" * 4096 + b"\r\n"),
        ("é\n\n".encode(), b"4\r\n" + "é\n\n".encode() + b"\r\n"),  # bytes, not characters
    ],
    ids=["small", "15", "16", "255", "4096", "utf8"],
)
def test_chunk_exact_bytes(frame: bytes, expected: bytes) -> None:
    assert chunk(frame) == expected
    assert chunk(frame) == http_chunk(frame)
    assert unchunk(expected) == frame


@pytest.mark.parametrize("size", [1, 9, 10, 15, 16, 255, 4095, 4096, 4097, 65_535, 1 << 20])
def test_chunk_size_line(size: int) -> None:
    assert chunk_size_line(size) == f"{size:x}\r\n".encode()
    assert chunk(b"x" * size) == http_chunk(b"x" * size)


def test_last_chunk() -> None:
    assert LAST_CHUNK == b"0\r\n\r\n"
    assert split_chunks(chunk(b"data: a\n\n") + LAST_CHUNK) == ([b"data: a\n\n"], True)


def test_chunk_of_a_frame_with_crlf_inside_round_trips() -> None:
    frame = b"data: a\r\n\r\ndata: 0\r\n\r\n"
    assert unchunk(chunk(frame)) == frame
    assert split_chunks(chunk(frame)) == ([frame], False)


@given(frame=st.binary(min_size=1, max_size=70_000))
def test_chunk_unchunk_round_trip(frame: bytes) -> None:
    data = chunk(frame)
    assert unchunk(data) == frame
    assert split_chunks(data) == ([frame], False)  # exactly one whole chunk, not the last


def test_comment_frame_dispatches_no_event_even_with_line_breaks() -> None:
    frame = encode_comment("keep\nalive\r\nplease")
    parsed = parse_sse(frame)
    assert parsed.events == []
    assert parsed.comments == ["keep", "alive", "please"]
    assert frame.endswith(b"\n\n")


def test_empty_comment() -> None:
    assert encode_comment() == b": \n\n"


def test_encode_json_event_is_compact_and_keeps_non_ascii() -> None:
    frame = encode_json_event("connected", {"b": "é", "a": [1, 2]}, "5")
    assert frame == 'id: 5\nevent: connected\ndata: {"b":"é","a":[1,2]}\n\n'.encode()


def test_json_with_line_breaks_in_strings_stays_on_one_data_line() -> None:
    frame = encode_json_event("t", {"text": "a\nb\r\nc"})
    assert frame.count(b"data:") == 1
    assert json.loads(parse_sse(frame).events[0].data) == {"text": "a\nb\r\nc"}


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_dump_json_refuses_non_finite_numbers(value: float) -> None:
    with pytest.raises(ValueError):
        dump_json({"v": value})


# --- properties ------------------------------------------------------------------------------

event_types = st.text(min_size=1).filter(lambda s: not re.search(r"[\r\n\x00]", s))
event_ids = st.text().filter(lambda s: not re.search(r"[\r\n\x00]", s))


@given(data=st.text())
def test_any_text_data_parses_back_as_exactly_one_event(data: str) -> None:
    parsed = parse_sse(encode_event("t", data))
    assert len(parsed.events) == 1
    assert parsed.events[0].data == normalize_breaks(data)
    assert parsed.events[0].type == "t"


@given(
    data=st.lists(st.sampled_from(["a", " ", ":", "\r", "\n", "\r\n", "é", "data: "])).map("".join)
)
def test_data_made_of_separators_parses_back_as_exactly_one_event(data: str) -> None:
    parsed = parse_sse(encode_event("t", data))
    assert len(parsed.events) == 1
    assert parsed.events[0].data == normalize_breaks(data)


@given(event=event_types, event_id=event_ids, data=st.text())
def test_type_and_id_round_trip(event: str, event_id: str, data: str) -> None:
    parsed = parse_sse(encode_event(event, data, event_id))
    assert parsed.events == [Event(type=event, data=normalize_breaks(data), id=event_id)]


@given(
    prefix=st.text(),
    breaker=st.sampled_from(["\r", "\n", "\r\n", "\x00"]),
    suffix=st.text(),
)
def test_any_id_or_type_with_a_breaker_is_refused(prefix: str, breaker: str, suffix: str) -> None:
    bad = prefix + breaker + suffix
    with pytest.raises(FrameError):
        encode_event("t", "x", bad)
    with pytest.raises(FrameError):
        encode_event(bad, "x")


@given(frames=st.lists(st.tuples(event_types, st.text()), min_size=1, max_size=5))
def test_concatenated_frames_parse_as_as_many_events(frames: list[tuple[str, str]]) -> None:
    stream = b"".join(encode_event(event, data) for event, data in frames)
    parsed = parse_sse(stream)
    assert [(e.type, e.data) for e in parsed.events] == [
        (event, normalize_breaks(data)) for event, data in frames
    ]


@given(frames=st.lists(st.tuples(event_types, st.text()), min_size=1, max_size=5))
def test_chunked_frames_decode_to_the_same_events(frames: list[tuple[str, str]]) -> None:
    encoded = [encode_event(event, data) for event, data in frames]
    body = b"".join(chunk(frame) for frame in encoded) + LAST_CHUNK
    chunks, ended = split_chunks(body)
    assert ended and chunks == encoded
    assert parse_sse(b"".join(chunks)).events == parse_sse(b"".join(encoded)).events
