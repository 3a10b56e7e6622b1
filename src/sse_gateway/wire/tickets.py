"""Connect tickets (pure): a short-lived, single-use stand-in for a token in a stream URL.

`POST /v1/tickets` trades a token (in the `Authorization` header) for a ticket; `GET
/v1/sse?ticket=…` takes the ticket once. A ticket is 32 random bytes, base64url (43
characters, 256 bits: unguessable). Redis holds it under `SSE:ticket:{sha256 hex of the
ticket}`: what Redis shows (`MONITOR`, `SLOWLOG`, a dump) is no ticket anyone could use.
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
from typing import NamedTuple

from sse_gateway.wire.naming import is_valid_id

TICKET_PREFIX = "SSE:ticket:"
TICKET_BYTES = 32
TICKET_TTL_SECONDS = 30
_TICKET = re.compile(r"[A-Za-z0-9_-]{43}")


class TicketClaims(NamedTuple):
    """What a ticket stands for: the player, and until when its token is accepted (epoch
    seconds, None when the token gave no bound)."""

    brand_id: str
    player_id: str
    valid_until: float | None


def new_ticket() -> str:
    return secrets.token_urlsafe(TICKET_BYTES)


def is_ticket(value: str) -> bool:
    """Whether `value` has a ticket's shape (worth a lookup)."""
    return _TICKET.fullmatch(value) is not None


def ticket_key(ticket: str) -> bytes:
    return (TICKET_PREFIX + hashlib.sha256(ticket.encode("ascii")).hexdigest()).encode("ascii")


def ticket_ttl(valid_until: float | None, now: float) -> int:
    """Seconds a new ticket lives: `TICKET_TTL_SECONDS`, less when its token expires sooner
    (a ticket never outlives its token), at least 1."""
    if valid_until is None:
        return TICKET_TTL_SECONDS
    return max(1, min(TICKET_TTL_SECONDS, int(valid_until - now)))


def encode_claims(claims: TicketClaims) -> bytes:
    value = {"b": claims.brand_id, "p": claims.player_id, "u": claims.valid_until}
    return json.dumps(value, separators=(",", ":")).encode("ascii")


def decode_claims(value: bytes) -> TicketClaims | None:
    """The claims a stored ticket holds; None when the value is not one (e.g. written by
    something else): the ticket is refused like an unknown one."""
    try:
        claims = json.loads(value)
    except (ValueError, RecursionError):
        return None
    if not isinstance(claims, dict):
        return None
    brand, player, until = claims.get("b"), claims.get("p"), claims.get("u")
    if not (is_valid_id(brand) and is_valid_id(player)):
        return None
    if until is not None and (not isinstance(until, int | float) or isinstance(until, bool)):
        return None
    assert isinstance(brand, str) and isinstance(player, str)
    return TicketClaims(brand, player, None if until is None else float(until))
