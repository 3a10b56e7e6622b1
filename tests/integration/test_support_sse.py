"""The test suite's own SSE parser must itself conform, or every stream assertion is moot."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from support.sse import SSEEvent, SSEParser, parse_stream


def test_whatwg_examples() -> None:
    stream = (
        b"\xef\xbb\xbfretry: 1234\n\n"
        b": a comment\n"
        b'event: connected\r\ndata: {"a":1}\r\n\r\n'
        b"data: line1\rdata: line2\r\rid: 7\nevent: x\ndata\n\n"
        b"data:no-space\nretry: nope\nfoo: bar\n\n"
        b"data: incomplete"
    )
    frames = parse_stream(stream)
    assert frames == [
        SSEEvent(retry=1234),
        SSEEvent(event="connected", data='{"a":1}', has_data=True, event_field=True),
        SSEEvent(data="line1\nline2", has_data=True),
        SSEEvent(event="x", data="", id="7", has_data=True, event_field=True),
        SSEEvent(data="no-space", has_data=True),
    ]
    assert frames[0].is_retry_only


def test_cr_split_across_chunks_is_one_line_break() -> None:
    parser = SSEParser()
    assert parser.feed(b"data: a\r") == []
    assert parser.feed(b"\n\r") == []  # the last CR may still be the start of a CRLF
    assert parser.feed(b"\n") == [SSEEvent(data="a", has_data=True)]
    assert parser.feed(b"\r\n") == []  # one more empty line: nothing to dispatch
    assert parser.feed(b"data: b\n\n") == [SSEEvent(data="b", has_data=True)]


_values = st.text(alphabet=st.characters(codec="utf-8", exclude_characters="\r\n\0"), max_size=20)


@given(
    events=st.lists(st.tuples(_values, st.lists(_values, min_size=1, max_size=3)), max_size=5),
    eol=st.sampled_from(["\n", "\r", "\r\n"]),
    cuts=st.lists(st.integers(min_value=0, max_value=400), max_size=8),
)
def test_roundtrip_any_line_ending_any_chunking(
    events: list[tuple[str, list[str]]], eol: str, cuts: list[int]
) -> None:
    text = ""
    for name, lines in events:
        text += f"event: {name}{eol}" if name else ""
        text += "".join(f"data: {line}{eol}" for line in lines) + eol
    data = text.encode()
    parser = SSEParser()
    out: list[SSEEvent] = []
    start = 0
    for cut in sorted({min(c, len(data)) for c in cuts}):
        out += parser.feed(data[start:cut])
        start = cut
    out += parser.feed(data[start:]) + parser.feed_eof()
    assert [(e.event, e.data) for e in out] == [
        (name or "message", "\n".join(lines)) for name, lines in events
    ]
