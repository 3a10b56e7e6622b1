"""`POST /v1/disconnect` (when SSE_PUBLISH_API_KEY is set): the kill switch.

Closes a player's streams, or a whole brand's, on every gateway process on the same Redis
(through the control channel), each with `event: disconnected` as its last frame; with
`block_seconds`, their new streams are refused (403 `blocked`) until the block ends. What a
self-exclusion or an account lock needs, at once rather than when tokens expire.

Every use is logged on `sse_gateway.audit`: who (`requested_by` as the caller gives it, and
the remote address: the API key names no person), whom, why, what came of it; the record's
time is when.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from typing import Any

from sse_gateway.broker.base import Broker, BrokerUnavailable
from sse_gateway.edge.admission import unavailable
from sse_gateway.edge.async_answer import AsyncAnswers
from sse_gateway.edge.protocol import RequestReader
from sse_gateway.edge.publish_api import invalid_api_key
from sse_gateway.edge.ratelimit import peer_host
from sse_gateway.wire.control import (
    Disconnect,
    InvalidField,
    block_key,
    block_value,
    disconnect_from_request,
    encode_control,
)
from sse_gateway.wire.http import Request, Response, error_response, json_response

audit_log = logging.getLogger("sse_gateway.audit")
log = logging.getLogger("sse_gateway")

PATH = "/v1/disconnect"
MAX_BODY_BYTES = 8 * 1024
_MAX_FORWARDED_CHARS = 256


class DisconnectEndpoint:
    def __init__(self, *, authorized: Callable[[str], bool], broker: Broker) -> None:
        """`authorized(authorization header)`: the publish API's own key check."""
        self._authorized = authorized
        self._broker = broker
        self._answers = AsyncAnswers("disconnect")

    def body_limit(self, headers: list[tuple[bytes, bytes]]) -> int:
        """The body is kept only for an authorized request, never otherwise."""
        authorization = dict(headers).get(b"authorization", b"").decode("latin-1")
        return MAX_BODY_BYTES if self._authorized(authorization) else 0

    def handle(self, reader: RequestReader, request: Request) -> None:
        """Answers once the broker has stored the block and published the disconnect."""
        fields = _remote_fields(reader, request)
        who = _remote(fields)
        self._answers.answer(reader, request, self.disconnect(request, who, fields))

    async def disconnect(
        self, request: Request, who: str, fields: dict[str, Any] | None = None
    ) -> Response:
        """200 `{"receivers", "blocked", "block_expires_in"}`; 400, 401 or 503.

        `who` is the caller's address, as logged (`remote=… forwarded_for=…`); `fields` the
        same as structured log fields (`remote`, `forwarded_for`)."""
        refused = {"event": "disconnect_refused", **(fields or {})}
        if not self._authorized(request.header(b"authorization") or ""):
            audit_log.warning(
                "disconnect refused: invalid API key %s",
                who,
                extra={**refused, "reason": "invalid_api_key"},
            )
            return invalid_api_key()
        try:
            body = json.loads(request.body)
        except (ValueError, RecursionError):
            audit_log.warning(
                "disconnect refused: body is not JSON %s",
                who,
                extra={**refused, "reason": "invalid_json"},
            )
            return error_response(400, "invalid_json", "request body is not JSON")
        try:
            command = disconnect_from_request(body)
        except InvalidField as exc:
            audit_log.warning(
                "disconnect refused: %s %s",
                _quote(str(exc)),
                who,
                extra={**refused, "reason": "invalid_field", "field": exc.field},
            )
            return json_response(
                400, {"error": "invalid_field", "message": str(exc), "field": exc.field}
            )
        key = block_key(command.brand_id, command.player_id)
        try:
            outcome = await self._broker.publish_disconnect(
                encode_control(command),
                key,
                command.block_seconds * 1000,
                block_value(command, time.time()),
            )
        except BrokerUnavailable as exc:
            audit_log.error(
                "disconnect failed: %s %s error=%s",
                _describe(command),
                who,
                exc,
                extra={
                    "event": "disconnect_failed",
                    **_command_fields(command),
                    **(fields or {}),
                    "error": str(exc),
                },
            )
            return unavailable("broker_unavailable", f"not done: {exc}")
        blocked = outcome.block_ms is not None
        expires_in = None
        if outcome.block_ms is not None and outcome.block_ms >= 0:
            expires_in = -(-outcome.block_ms // 1000)  # whole seconds, rounded up
        audit_log.info(
            "disconnect: %s %s receivers=%d blocked=%s block_expires_in=%s",
            _describe(command),
            who,
            outcome.receivers,
            "yes" if blocked else "no",
            "-" if expires_in is None else expires_in,
            extra={
                "event": "disconnect",
                **_command_fields(command),
                **(fields or {}),
                "receivers": outcome.receivers,
                "blocked": blocked,
                "block_expires_in": expires_in,
            },
        )
        return json_response(
            200,
            {
                "brand_id": command.brand_id,
                "player_id": command.player_id,
                "receivers": outcome.receivers,
                "blocked": blocked,
                "block_expires_in": expires_in,
            },
        )


def _describe(command: Disconnect) -> str:
    return (
        f"brand={command.brand_id} player={command.player_id or '*'}"
        f" reason={_quote(command.reason)} block_seconds={command.block_seconds}"
        f" requested_by={_quote(command.requested_by or '')}"
    )


def _command_fields(command: Disconnect) -> dict[str, Any]:
    """The command as log fields: `reason` is the caller's free text, `player` null for a
    whole brand."""
    return {
        "brand": command.brand_id,
        "player": command.player_id,
        "reason": command.reason,
        "block_seconds": command.block_seconds,
        "requested_by": command.requested_by,
    }


def _remote_fields(reader: RequestReader, request: Request) -> dict[str, Any]:
    """The caller's address as log fields: `remote` (the peer), and `forwarded_for` as given
    (unchecked: the peer is who connected, the header is what a proxy, or the caller, says)."""
    fields: dict[str, Any] = {"remote": peer_host(reader.transport)}
    forwarded = request.header(b"x-forwarded-for")
    if forwarded is not None:
        fields["forwarded_for"] = forwarded[:_MAX_FORWARDED_CHARS]
    return fields


def _remote(fields: dict[str, Any]) -> str:
    """`_remote_fields` as the text line shows them."""
    remote = f"remote={fields['remote'] or '-'}"
    if "forwarded_for" not in fields:
        return remote
    # ASCII-escaped: nothing checked what it holds (NEL, say).
    return f"{remote} forwarded_for={json.dumps(fields['forwarded_for'])}"


def _quote(text: str) -> str:
    """Checked free text (no control characters) as a JSON string: spaces and quotes cannot
    forge the fields of a log line."""
    return json.dumps(text, ensure_ascii=False)
