"""Published-message envelopes: every drop reason of docs/api.md, and the frames they become."""

from __future__ import annotations

import json

import pytest
from fakes import http_chunk
from hypothesis import given
from hypothesis import strategies as st
from sse_spec_parser import Event, parse_sse

from sse_gateway.wire.envelope import (
    RESERVED_TYPES,
    Envelope,
    EnvelopeError,
    encode_envelope,
    event_frame,
    parse_envelope,
)

MAX = 65_536


def reason_of(payload: bytes, max_bytes: int = MAX) -> str:
    """The drop reason, which the Pub/Sub fast path (`event_frame`) must give too."""
    with pytest.raises(EnvelopeError) as info:
        parse_envelope(payload, max_bytes)
    with pytest.raises(EnvelopeError) as fast:
        event_frame(payload, max_bytes)
    assert fast.value.reason == info.value.reason
    with pytest.raises(EnvelopeError) as chunked:
        event_frame(payload, max_bytes, True)
    assert chunked.value.reason == info.value.reason
    return info.value.reason


def assert_fast_path_agrees(payload: bytes, max_bytes: int = MAX) -> None:
    """The Pub/Sub fast path gives the envelope's frame; chunked (as streams take it), that
    frame as one HTTP/1.1 chunk, built in the same step."""
    envelope = parse_envelope(payload, max_bytes)
    assert event_frame(payload, max_bytes)[:3] == (envelope.encode(), envelope.id, envelope.type)
    chunked = event_frame(payload, max_bytes, True)
    assert chunked[:3] == (http_chunk(envelope.encode()), envelope.id, envelope.type)


# --- every documented reason -----------------------------------------------------------------


def test_too_large() -> None:
    payload = encode_envelope("t", "x" * 200)
    assert reason_of(payload, max_bytes=len(payload) - 1) == "too_large"


def test_exactly_max_bytes_is_accepted() -> None:
    payload = encode_envelope("t", "x" * 200)
    assert parse_envelope(payload, len(payload)).data == "x" * 200


def test_too_large_is_checked_before_anything_else() -> None:
    assert reason_of(b"\xff" * 100, max_bytes=10) == "too_large"


@pytest.mark.parametrize(
    "payload",
    [b"\xff", b'{"type":"t","data":"\xc3"}', b'{"type":"t","data":"\xed\xa0\x80"}', b"\x80abc"],
)
def test_not_utf8(payload: bytes) -> None:
    assert reason_of(payload) == "not_utf8"


@pytest.mark.parametrize(
    "payload",
    [b"", b"   ", b"{", b'{"type":"t","data":}', b"{'type':'t','data':1}", b'{"type":"t"} x'],
)
def test_not_json(payload: bytes) -> None:
    assert reason_of(payload) == "not_json"


@pytest.mark.parametrize("constant", [b"NaN", b"Infinity", b"-Infinity"])
def test_nan_and_infinity_literals_are_not_json(constant: bytes) -> None:
    assert reason_of(b'{"type":"t","data":' + constant + b"}") == "not_json"


@pytest.mark.parametrize("constant", [b"NaN", b"Infinity", b"-Infinity"])
def test_nan_nested_deep_inside_data_is_not_json(constant: bytes) -> None:
    assert reason_of(b'{"type":"t","data":{"a":[1,{"b":' + constant + b"}]}}") == "not_json"


@pytest.mark.parametrize("depth", [2_000, 100_000])
def test_deep_nesting_is_not_json_and_does_not_crash(depth: int) -> None:
    payload = b'{"type":"t","data":' + b"[" * depth + b"]" * depth + b"}"
    assert reason_of(payload, max_bytes=len(payload)) == "not_json"


def test_deep_nesting_of_objects_is_not_json() -> None:
    depth = 50_000
    payload = b'{"a":' * depth + b"1" + b"}" * depth
    assert reason_of(payload, max_bytes=len(payload)) == "not_json"


def test_moderate_nesting_is_fine() -> None:
    payload = b'{"type":"t","data":' + b"[" * 100 + b"]" * 100 + b"}"
    envelope = parse_envelope(payload, MAX)
    assert json.loads(parse_sse(envelope.encode()).events[0].data) == json.loads(payload)["data"]


@pytest.mark.parametrize("payload", [b"[]", b'[{"type":"t","data":1}]', b'"s"', b"1", b"null"])
def test_not_object(payload: bytes) -> None:
    assert reason_of(payload) == "not_object"


@pytest.mark.parametrize("payload", [b'{"data":1}', b'{"type":null,"data":1}', b"{}"])
def test_missing_type(payload: bytes) -> None:
    assert reason_of(payload) == "missing_type"


@pytest.mark.parametrize(
    "event_type",
    [
        "",
        "a b",
        "a\nb",
        "é",
        "a/b",
        "x" * 65,
        1,
        True,
        ["t"],
        {"t": 1},
    ],
)
def test_bad_type(event_type: object) -> None:
    assert reason_of(json.dumps({"type": event_type, "data": 1}).encode()) == "bad_type"


@pytest.mark.parametrize("event_type", sorted(RESERVED_TYPES))
def test_reserved_type(event_type: str) -> None:
    assert reason_of(json.dumps({"type": event_type, "data": 1}).encode()) == "reserved_type"


def test_reserved_types_are_the_documented_ones() -> None:
    reserved = {"connected", "heartbeat", "error", "close", "session_expired", "disconnected"}
    assert frozenset(reserved) == RESERVED_TYPES


def test_reserved_type_check_is_case_sensitive() -> None:
    assert parse_envelope(b'{"type":"Connected","data":1}', MAX).type == "Connected"


def test_missing_data() -> None:
    assert reason_of(b'{"type":"t"}') == "missing_data"
    assert reason_of(b'{"type":"t","id":"1"}') == "missing_data"


@pytest.mark.parametrize(
    "event_id", ["", "a b", "a\nb", "x" * 129, "é", 1, 1.5, True, ["1"], {"id": "1"}]
)
def test_bad_id(event_id: object) -> None:
    payload = json.dumps({"type": "t", "data": 1, "id": event_id}).encode()
    assert reason_of(payload) == "bad_id"


def test_null_id_counts_as_absent() -> None:
    assert parse_envelope(b'{"type":"t","data":1,"id":null}', MAX).id is None


@pytest.mark.parametrize("event_type", ["a", "x" * 64, "A-z_0.9:x", "order.created", "n:1"])
def test_type_boundaries_accepted(event_type: str) -> None:
    payload = json.dumps({"type": event_type, "data": 1}).encode()
    assert parse_envelope(payload, MAX).type == event_type


@pytest.mark.parametrize("event_id", ["1", "x" * 128, "1764302400000-0", "a:b.c_d-e"])
def test_id_boundaries_accepted(event_id: str) -> None:
    payload = json.dumps({"type": "t", "data": 1, "id": event_id}).encode()
    assert parse_envelope(payload, MAX).id == event_id


def test_envelope_error_carries_reason_and_message() -> None:
    with pytest.raises(EnvelopeError) as info:
        parse_envelope(b'{"type":"close","data":1}', MAX)
    assert info.value.reason == "reserved_type"
    assert "close" in str(info.value)


# --- valid envelopes -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "data",
    [None, 0, -1.5, True, "", "text", [], {}, {"title": "hi", "n": [1, 2, {"x": None}]}],
)
def test_any_json_value_is_valid_data(data: object) -> None:
    envelope = parse_envelope(json.dumps({"type": "t", "data": data}).encode(), MAX)
    assert envelope == Envelope(type="t", data=data, id=None)


def test_unknown_fields_are_ignored() -> None:
    envelope = parse_envelope(b'{"type":"t","data":1,"extra":{"x":1}}', MAX)
    assert envelope == Envelope(type="t", data=1)


def test_valid_envelope_encodes_compact_json_data() -> None:
    payload = b'{ "type" : "notification" , "data" : { "title" : "hi" , "n" : [ 1 , 2 ] } }'
    frame = parse_envelope(payload, MAX).encode()
    assert frame == b'event: notification\ndata: {"title":"hi","n":[1,2]}\n\n'


def test_id_is_in_the_frame_only_when_present() -> None:
    with_id = parse_envelope(b'{"type":"t","data":1,"id":"42"}', MAX).encode()
    without_id = parse_envelope(b'{"type":"t","data":1}', MAX).encode()
    assert with_id == b"id: 42\nevent: t\ndata: 1\n\n"
    assert without_id == b"event: t\ndata: 1\n\n"
    assert parse_sse(with_id).events == [Event(type="t", data="1", id="42")]


def test_null_data_is_sent_as_null() -> None:
    frame = parse_envelope(b'{"type":"t","data":null}', MAX).encode()
    assert parse_sse(frame).events == [Event(type="t", data="null", id="")]


def test_non_ascii_data_stays_utf8_in_the_frame() -> None:
    frame = parse_envelope('{"type":"t","data":"héllo \\u00e9 ✓"}'.encode(), MAX).encode()
    assert frame == 'event: t\ndata: "héllo é ✓"\n\n'.encode()


def test_string_data_with_line_breaks_stays_one_event() -> None:
    payload = encode_envelope("t", "a\nb\r\nevent: close\n\n")
    frame = parse_envelope(payload, MAX).encode()
    events = parse_sse(frame).events
    assert len(events) == 1
    assert json.loads(events[0].data) == "a\nb\r\nevent: close\n\n"


def test_encode_envelope_wire_form() -> None:
    assert encode_envelope("t", {"a": 1}) == b'{"type":"t","data":{"a":1}}'
    assert encode_envelope("t", None, "7") == b'{"type":"t","data":null,"id":"7"}'


# --- parse, then encode: only EnvelopeError may ever escape ----------------------------------
#
# The gateway calls parse_envelope(...).encode() inside the Redis reader's data_received and
# catches only EnvelopeError there, so any other exception from either step drops the shared
# Pub/Sub connection. These payloads are all syntactically valid JSON.


@pytest.mark.parametrize(
    "payload",
    [
        pytest.param(b'{"type":"t","data":1e400}', id="float-overflow"),
        pytest.param(b'{"type":"t","data":-1e400}', id="negative-float-overflow"),
        pytest.param(b'{"type":"t","data":[1,{"x":1e999}]}', id="nested-float-overflow"),
        pytest.param(b'{"type":"t","data":"\\ud800"}', id="lone-high-surrogate"),
        pytest.param(b'{"type":"t","data":"a\\udc00b"}', id="lone-low-surrogate"),
        pytest.param(b'{"type":"t","data":{"\\udfff":1}}', id="lone-surrogate-in-key"),
    ],
)
def test_valid_json_payload_is_either_dropped_or_encodable(payload: bytes) -> None:
    try:
        envelope = parse_envelope(payload, MAX)
    except EnvelopeError:
        return
    frame = envelope.encode()  # must not raise: the envelope was accepted
    assert len(parse_sse(frame).events) == 1


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=20,
)


@given(
    data=json_values,
    event_type=st.from_regex(r"[A-Za-z0-9_.:-]{1,64}", fullmatch=True).filter(
        lambda t: t not in RESERVED_TYPES
    ),
    event_id=st.none() | st.from_regex(r"[A-Za-z0-9_.:-]{1,128}", fullmatch=True),
)
def test_published_envelope_round_trips_to_one_event(
    data: object, event_type: str, event_id: str | None
) -> None:
    payload = encode_envelope(event_type, data, event_id)
    envelope = parse_envelope(payload, len(payload))
    assert_fast_path_agrees(payload, len(payload))
    events = parse_sse(envelope.encode()).events
    assert len(events) == 1
    assert events[0].type == event_type
    assert events[0].id == (event_id or "")
    # Compact JSON on one line; floats may be spelled differently (5e-06 / 5e-6), same value.
    assert "\n" not in events[0].data
    assert json.loads(events[0].data) == data


@given(payload=st.binary(max_size=200) | st.text(max_size=200).map(str.encode))
def test_arbitrary_payload_raises_only_envelope_error(payload: bytes) -> None:
    try:
        envelope = parse_envelope(payload, MAX)
    except EnvelopeError as exc:
        assert reason_of(payload) == exc.reason
        assert exc.reason in {
            "too_large",
            "not_utf8",
            "not_json",
            "not_object",
            "missing_type",
            "bad_type",
            "reserved_type",
            "missing_data",
            "bad_id",
        }
        return
    assert_fast_path_agrees(payload)
    assert len(parse_sse(envelope.encode()).events) == 1


@pytest.mark.parametrize(
    ("payload", "data_line"),
    [
        (b'{"type":"t","data":18446744073709551616}', b"data: 18446744073709551616\n"),  # > u64
        (b'{"type":"t","data":-9223372036854775809}', b"data: -9223372036854775809\n"),  # < i64
        (b'{"type":"t","data":18446744073709551615,"id":"1-0"}', b"data: 18446744073709551615\n"),
        # a false alarm of the quick check: still exact
        (
            b'{"type":"t","data":"2024-01-01-0000000000000000000"}',
            b'data: "2024-01-01-0000000000000000000"\n',
        ),
        (
            b'{"type":"t","data":{"n":123456789012345678901234567890}}',
            b'data: {"n":123456789012345678901234567890}\n',
        ),
    ],
)
def test_fast_path_keeps_integers_beyond_64_bits_exact(payload: bytes, data_line: bytes) -> None:
    assert_fast_path_agrees(payload)
    assert data_line in event_frame(payload, MAX)[0]


def test_fast_path_caches_a_type_only_once_it_is_valid() -> None:
    assert reason_of(b'{"type":"connected","data":1}') == "reserved_type"
    assert reason_of(b'{"type":"connected","data":1}') == "reserved_type"
    assert_fast_path_agrees(b'{"type":"cached.type","data":1}')
    assert_fast_path_agrees(b'{"type":"cached.type","data":2,"id":"7"}')
    assert reason_of(b'{"type":"cached.type","id":"7"}') == "missing_data"


@pytest.mark.parametrize(
    "data_len",
    [0, 1, 4000, 4060, 4070, 4080, 4090, 4100, 70_000],
)
@pytest.mark.parametrize("event_id", [None, "1700000000000-1"])
def test_chunked_fast_path_around_the_cached_size_lines(
    data_len: int, event_id: str | None
) -> None:
    # Chunk size lines up to 4 KiB are made once; longer frames format their own.
    payload = encode_envelope("t", "x" * data_len, event_id)
    assert_fast_path_agrees(payload, len(payload))
    frame = event_frame(payload, len(payload), True)[0]
    size_line, _, rest = frame.partition(b"\r\n")
    assert int(size_line, 16) == len(rest) - 2 and rest.endswith(b"\n\n\r\n")


def test_chunked_fast_path_of_integers_beyond_64_bits() -> None:
    # orjson refuses them: the general path, chunked as well.
    payload = b'{"type":"t","data":18446744073709551616,"id":"5-0"}'
    assert_fast_path_agrees(payload)
    frame, event_id, _, _ = event_frame(payload, MAX, True)
    assert event_id == "5-0"
    assert frame == http_chunk(b"id: 5-0\nevent: t\ndata: 18446744073709551616\n\n")


@pytest.mark.parametrize(
    ("ts", "stamp"),
    [
        ("1764480000.123456", 1764480000.123456),
        ("1764480000", 1764480000.0),
        ('"1764480000"', None),  # a string is not a stamp
        ("-5", None),
        ("0", None),
        ("1e300", None),
        ("123456789012345678901234567890", None),  # beyond 64 bits: the exact path
        ("null", None),
        ("true", None),
    ],
)
def test_the_publish_stamp_is_read_and_never_makes_a_message_invalid(
    ts: str, stamp: float | None
) -> None:
    payload = f'{{"type":"t","data":1,"ts":{ts}}}'.encode()
    frame, _, event_type, found = event_frame(payload, MAX, True)
    assert found == stamp
    assert event_type == "t"
    # The stamp is the gateway's business: the frame is the same with or without it.
    assert frame == event_frame(b'{"type":"t","data":1}', MAX, True)[0]


def test_a_message_without_a_stamp_has_none() -> None:
    assert event_frame(b'{"type":"t","data":1,"id":"1-0"}', MAX)[3] is None
