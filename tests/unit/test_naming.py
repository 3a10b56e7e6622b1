"""Ids and channel names: one rule, so a channel can never be widened or collide."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sse_gateway.wire.naming import (
    CHANNEL_PREFIX,
    brand_of,
    channel_name,
    is_valid_id,
    split_channel,
)

valid_ids = st.from_regex(r"[A-Za-z0-9_.-]{1,64}", fullmatch=True)


@pytest.mark.parametrize("value", ["a", "Z", "0", "_", ".", "-", "a.b-c_D9", "x" * 64])
def test_valid_ids(value: str) -> None:
    assert is_valid_id(value)


@pytest.mark.parametrize(
    "value",
    [
        "",
        "x" * 65,
        "a b",
        "a:b",
        "a::b",
        "a*",
        "a?",
        "a[b]",
        "a\\b",
        "a/b",
        "a\n",
        "\na",
        "é",
        "٣",
        "\uff41",  # fullwidth a
        "a\x00",
        None,
        1,
        b"abc",
        ["a"],
    ],
)
def test_invalid_ids(value: object) -> None:
    assert not is_valid_id(value)


def test_channel_name_format() -> None:
    assert channel_name("brand1", "player42") == b"SSE::brand1::player42"
    assert CHANNEL_PREFIX == "SSE::"


@given(brand=valid_ids, player=valid_ids)
def test_split_channel_inverts_channel_name(brand: str, player: str) -> None:
    assert split_channel(channel_name(brand, player)) == (brand, player)


@given(a=st.tuples(valid_ids, valid_ids), b=st.tuples(valid_ids, valid_ids))
def test_distinct_identities_have_distinct_channels(a: tuple[str, str], b: tuple[str, str]) -> None:
    assert (channel_name(*a) == channel_name(*b)) == (a == b)


@pytest.mark.parametrize(
    "channel",
    [
        b"",
        b"SSE::",
        b"SSE::b",
        b"SSE::b::",
        b"SSE::::p",
        b"SSE::b::p::x",
        b"SSE::b:::p",
        b"sse::b::p",
        b"XSE::b::p",
        b"SSE:b::p",
        b"SSE::b*::p",
        b"SSE::b::p q",
        b"SSE::\xc3\xa9::p",
        b"SSE::\xff::p",
        b"SSE::" + b"x" * 65 + b"::p",
    ],
)
def test_split_channel_refuses_foreign_names(channel: bytes) -> None:
    assert split_channel(channel) is None


@given(channel=st.binary(max_size=80))
def test_split_channel_accepts_only_what_channel_name_produces(channel: bytes) -> None:
    parts = split_channel(channel)
    if parts is not None:
        assert channel_name(*parts) == channel
        assert all(is_valid_id(part) for part in parts)


@pytest.mark.parametrize("brand", ["b", "casino.1", "a-b_c", "x" * 64])
def test_brand_of_a_channel_name_is_its_brand(brand: str) -> None:
    assert brand_of(channel_name(brand, "player-42")) == brand
