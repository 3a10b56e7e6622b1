"""Writes the seed corpora of `fuzz/corpus/` (run it after changing a seed below).

Each seed is one file named after what it exercises. Request reader seeds are `[knobs][seed]
[head length, 2 bytes]` + the client's bytes (see `request_reader.py`); envelope seeds are a
published message as it comes off Pub/Sub.
"""

from __future__ import annotations

import json
from pathlib import Path

HERE = Path(__file__).resolve().parent

# Knob bits of request_reader.Knobs.
READS_AT_ONCE, NEVER_READS, READS_SOMETIMES, READS_AT_END = 0, 1, 2, 3
TIMEOUT, LEAVES_EARLY, DRAINING, BUDGET_SPENT = 4, 8, 16, 32
REPEAT_16, REPEAT_1024 = 2 << 6, 3 << 6


def get(path: str = "/", extra: str = "") -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: gw\r\n{extra}\r\n".encode()


def post(path: str, body: bytes, extra: str = "") -> bytes:
    head = f"POST {path} HTTP/1.1\r\nHost: gw\r\nContent-Length: {len(body)}\r\n{extra}\r\n"
    return head.encode() + body


def reader(knobs: int, seed: int, head: bytes, tail: bytes = b"") -> bytes:
    """A seed whose client sends `head` once, then `tail` as often as the knobs say."""
    if not tail:
        head, tail = b"", head  # sent once all the same: the knobs repeat it once
    return bytes([knobs, seed]) + len(head).to_bytes(2, "big") + head + tail


CHUNKED_BODY = b"5\r\nhello\r\n0\r\n\r\n"

READER_SEEDS = {
    "get": reader(READS_AT_ONCE, 1, get()),
    "keep_alive_requests": reader(READS_AT_ONCE, 2, get("/a") + get("/b?x=1") + get("/c")),
    "head_big": reader(READS_AT_ONCE, 3, b"HEAD /big HTTP/1.1\r\nHost: gw\r\n\r\n" + get()),
    "http10": reader(READS_AT_ONCE, 4, b"GET / HTTP/1.0\r\n\r\n"),
    "http10_keep_alive": reader(
        READS_AT_ONCE, 5, b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n" + get()
    ),
    "close": reader(READS_AT_ONCE, 6, get("/close") + get()),
    "publish": reader(READS_AT_ONCE, 7, post("/publish", b'{"a":1}') + get()),
    "publish_too_large": reader(READS_AT_ONCE, 8, post("/publish", b"x" * 4100)),
    "body_dropped": reader(READS_AT_ONCE, 9, post("/other", b"y" * 300) + get()),
    "chunked": reader(
        READS_AT_ONCE,
        10,
        b"POST /publish HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: chunked\r\n\r\n" + CHUNKED_BODY,
    ),
    "async_pipelined": reader(READS_SOMETIMES, 11, get("/async") + get("/async") + get("/big")),
    "stream": reader(READS_AT_ONCE, 12, get("/stream") + get() + b"more bytes"),
    "stream_paused": reader(NEVER_READS, 13, get("/big") * 5 + get("/stream")),
    "no_host": reader(READS_AT_ONCE, 14, b"GET / HTTP/1.1\r\n\r\n"),
    "two_hosts": reader(READS_AT_ONCE, 15, get("/", "Host: other\r\n")),
    "two_authorizations": reader(
        READS_AT_ONCE, 16, get("/", "Authorization: a\r\nAuthorization: b\r\n")
    ),
    "garbage": reader(READS_AT_ONCE, 17, b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03"),
    "upgrade": reader(READS_AT_ONCE, 18, get("/", "Connection: Upgrade\r\nUpgrade: websocket\r\n")),
    "long_url": reader(READS_AT_ONCE, 19, b"GET /" + b"u" * 300, b"u" * 100),
    "pipelined_never_read": reader(NEVER_READS | REPEAT_1024, 20, b"", get("/big")),
    "pipelined_small": reader(READS_SOMETIMES | REPEAT_1024, 21, b"", get("/metrics")),
    "endless_header_value": reader(
        READS_AT_END | REPEAT_1024, 22, b"GET / HTTP/1.1\r\nHost: gw\r\nX-Slow: ", b"a" * 4096
    ),
    "endless_header_name": reader(
        READS_AT_END | REPEAT_1024, 23, b"GET / HTTP/1.1\r\n", b"n" * 4096
    ),
    "many_headers": reader(
        READS_AT_ONCE | REPEAT_1024, 24, b"GET / HTTP/1.1\r\n", b"a:\r\nb:\r\nc:\r\nd:\r\n"
    ),
    "slow_request_timeout": reader(TIMEOUT, 25, b"GET / HTTP/1.1\r\nHost: g"),
    "idle_keep_alive_timeout": reader(TIMEOUT, 26, get()),
    "draining": reader(DRAINING, 27, get() + get()),
    "budget_spent": reader(BUDGET_SPENT, 28, get() + get("/async") + get()),
    "leaves_early": reader(LEAVES_EARLY | REPEAT_16, 29, b"", get("/async")),
}

ENVELOPE_SEEDS = {
    "simple": {"type": "bonus", "data": {"amount": 10}, "id": "1700000000000-0"},
    "no_id": {"type": "balance", "data": 12.5},
    "null_data": {"type": "t", "data": None},
    "line_breaks": {"type": "t", "data": "a\nb\r\nc\rd\n\ndata: forged\n\nevent: x"},
    "unicode_breaks": {"type": "t", "data": "\u2028\u2029\u0085\x00\ufeff\x1c"},
    "nested": {"type": "a.b:c-d_e", "data": [[[{"k": [1, -2.5e-300, True, False, None]}]]]},
    "big_int": {"type": "t", "data": 123456789012345678901234567890},
    "reserved": {"type": "connected", "data": 1},
    "bad_id": {"type": "t", "data": 1, "id": "a\nid: b"},
    "missing_data": {"type": "t"},
}
RAW_ENVELOPE_SEEDS = {
    "not_json": b"{",
    "not_utf8": b'{"type":"t","data":"\xff"}',
    "nan": b'{"type":"t","data":NaN}',
    "huge_float": b'{"type":"t","data":1e400}',
    "lone_surrogate": b'{"type":"t","data":"\\ud800"}',
    "duplicate_keys": b'{"type":"t","type":"u","data":1,"data":2}',
    "escaped_line_break": b'{"type":"t","data":"\\n\\r\\u2028","id":"x"}',
    "not_object": b"[1,2]",
}


def main(corpus: Path = HERE / "corpus") -> None:
    """Writes every seed under `corpus/<target>/`, replacing what was there."""
    for target, seeds in (
        ("request_reader", READER_SEEDS),
        (
            "envelope",
            {name: json.dumps(obj).encode() for name, obj in ENVELOPE_SEEDS.items()}
            | RAW_ENVELOPE_SEEDS,
        ),
    ):
        folder = corpus / target
        folder.mkdir(parents=True, exist_ok=True)
        for old in folder.iterdir():
            old.unlink()
        for name, data in seeds.items():
            (folder / name).write_bytes(data)


if __name__ == "__main__":
    main()
