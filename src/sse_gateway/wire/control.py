"""Session control: the kill switch's request, its control message and its Redis keys (pure).

`POST /v1/disconnect` takes `{"brand_id", "player_id"?, "reason", "block_seconds"?,
"requested_by"?}`; `disconnect_from_request` checks it. Every gateway process subscribes the
control channel `SSE::control` on its Pub/Sub connection, and the disconnect travels there as
`{"op": "disconnect", "brand_id", "player_id", "reason", "block_seconds"}` (`encode_control`,
`decode_control`).

A block lives in Redis as a key with a TTL: `SSE:block:{brand}` for a whole brand,
`SSE:block:{brand}:{player}` for one player; the sorted set `SSE:blocks` indexes them by when
they end, so that a gateway can learn every block in force in one read. Single colons, not
the `SSE::` of the players' channels and history keys: ids cannot contain `:`, so no brand or
player id can make a block key equal to a history key (with `SSE::block::…`, brand `block`'s
player `x` would own the history key of a block on brand `x`), nor to `SSE:blocks`.
`SSE::control` has one `::` part where every player channel has two, so it is no player's
channel either.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass

from sse_gateway.wire.naming import is_valid_id

CONTROL_CHANNEL = b"SSE::control"
BLOCK_PREFIX = "SSE:block:"
BLOCK_INDEX = b"SSE:blocks"

MAX_REASON_CHARS = 256
MAX_REQUESTED_BY_CHARS = 128
# A block bridges the time until the account system stops issuing tokens (a self-exclusion
# is enforced there for good): a year is far beyond that, and a typo of "weeks" for
# "seconds" still ends.
MAX_BLOCK_SECONDS = 366 * 86_400

_ID_RULE = "must be 1-64 chars of [A-Za-z0-9_.-]"
# C0 and C1 controls, and the Unicode line and paragraph separators: free text goes into
# log lines and SSE data, and must not be able to start a line of its own in either.
_CONTROL_CHARS = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_REQUEST_FIELDS = frozenset({"brand_id", "player_id", "reason", "block_seconds", "requested_by"})


class InvalidField(ValueError):
    """A request or control message that cannot be used; `field` names the culprit."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


@dataclass(frozen=True, slots=True)
class Disconnect:
    """Close the streams of one player (`player_id`) or of a whole brand (None), telling
    them `reason`; with `block_seconds` > 0, refuse their new streams that long."""

    brand_id: str
    player_id: str | None
    reason: str
    block_seconds: int = 0
    requested_by: str | None = None
    """Who asked (audit only: it is logged, never sent to clients or other gateways)."""

    def matches(self, brand_id: str, player_id: str) -> bool:
        return brand_id == self.brand_id and self.player_id in (None, player_id)

    @property
    def target(self) -> str:
        """`brand` or `brand/player`, for log lines."""
        return self.brand_id if self.player_id is None else f"{self.brand_id}/{self.player_id}"


def _text(body: Mapping[str, object], field: str, limit: int, required: bool) -> str | None:
    value = body.get(field)
    if value is None and not required:
        return None
    if not isinstance(value, str) or not value.strip():
        raise InvalidField(field, "must be a non-empty string")
    if len(value) > limit:
        raise InvalidField(field, f"must be at most {limit} characters")
    if _CONTROL_CHARS.search(value):
        raise InvalidField(field, "must not contain control characters or line breaks")
    return value


def disconnect_from_request(body: object) -> Disconnect:
    """The `POST /v1/disconnect` body as a Disconnect; raises InvalidField.

    `brand_id`: an id; `player_id`: an id, or absent/null for the whole brand; `reason`: 1 to
    `MAX_REASON_CHARS` characters, no control characters; `block_seconds`: absent, null or an
    integer 0..`MAX_BLOCK_SECONDS` (0: no block); `requested_by`: absent, null or 1 to
    `MAX_REQUESTED_BY_CHARS` characters. Any other field is refused (a misspelt
    `block_seconds` must not kick without the block it was meant to set).
    """
    if not isinstance(body, Mapping):
        raise InvalidField("body", "must be a JSON object")
    unknown = sorted(set(body) - _REQUEST_FIELDS)
    if unknown:
        raise InvalidField(unknown[0], "is not a field of this request")
    brand_id = body.get("brand_id")
    if not is_valid_id(brand_id):
        raise InvalidField("brand_id", _ID_RULE)
    player_id = body.get("player_id")
    if player_id is not None and not is_valid_id(player_id):
        raise InvalidField("player_id", _ID_RULE + " (or absent, for the whole brand)")
    reason = _text(body, "reason", MAX_REASON_CHARS, required=True)
    requested_by = _text(body, "requested_by", MAX_REQUESTED_BY_CHARS, required=False)
    block = body.get("block_seconds")
    if block is None:
        block = 0
    if not isinstance(block, int) or isinstance(block, bool) or block < 0:
        raise InvalidField("block_seconds", "must be a non-negative integer (seconds)")
    if block > MAX_BLOCK_SECONDS:
        raise InvalidField("block_seconds", f"must be at most {MAX_BLOCK_SECONDS} (366 days)")
    assert isinstance(brand_id, str) and reason is not None
    assert player_id is None or isinstance(player_id, str)
    return Disconnect(brand_id, player_id, reason, block, requested_by)


def encode_control(disconnect: Disconnect) -> bytes:
    """The control message of a disconnect (`requested_by` stays out: audit only)."""
    message = {
        "op": "disconnect",
        "brand_id": disconnect.brand_id,
        "player_id": disconnect.player_id,
        "reason": disconnect.reason,
        "block_seconds": disconnect.block_seconds,
    }
    return json.dumps(message, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def decode_control(payload: bytes) -> Disconnect:
    """A control message read from `SSE::control`; InvalidField when it is not one this
    gateway understands (the caller drops it with a warning: a newer gateway's `op`, or
    anything else someone with access to Redis published there)."""
    try:
        message = json.loads(payload)
    except (ValueError, RecursionError) as exc:
        raise InvalidField("payload", "is not UTF-8 JSON") from exc
    if not isinstance(message, dict):
        raise InvalidField("payload", "is not a JSON object")
    op = message.pop("op", None)
    if op != "disconnect":
        raise InvalidField("op", f"unknown operation {op!r}")
    return disconnect_from_request(message)


def block_key(brand_id: str, player_id: str | None = None) -> bytes:
    """The Redis key of a block on a whole brand (`player_id` None) or on one player."""
    if player_id is None:
        return f"{BLOCK_PREFIX}{brand_id}".encode("ascii")
    return f"{BLOCK_PREFIX}{brand_id}:{player_id}".encode("ascii")


def block_keys(brand_id: str, player_id: str) -> tuple[bytes, bytes]:
    """The keys whose existence blocks a player's streams: its brand's and its own."""
    return block_key(brand_id), block_key(brand_id, player_id)


def block_value(disconnect: Disconnect, now: float) -> bytes:
    """What a block key holds, for an operator who reads it: why, who, when (epoch s)."""
    value = {"reason": disconnect.reason, "requested_by": disconnect.requested_by, "at": int(now)}
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
