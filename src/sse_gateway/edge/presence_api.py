"""`GET /v1/players/{brand_id}/{player_id}` and `GET /v1/stats` (when SSE_PUBLISH_API_KEY is
set): who is online, on every gateway process, and this process at a glance.

Both take the publish API's key (`Authorization: Bearer <SSE_PUBLISH_API_KEY>`) and answer
401 `invalid_api_key` as `POST /v1/publish` does without it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from sse_gateway.broker.base import BrokerUnavailable
from sse_gateway.edge.admission import unavailable
from sse_gateway.edge.async_answer import AsyncAnswers
from sse_gateway.edge.protocol import RequestReader
from sse_gateway.edge.publish_api import invalid_api_key
from sse_gateway.streams.presence import Presence
from sse_gateway.streams.stats import GatewayStats
from sse_gateway.wire.http import Request, Response, error_response, json_response
from sse_gateway.wire.naming import is_valid_id

PLAYERS_PREFIX = "/v1/players/"
STATS_PATH = "/v1/stats"
_ID_RULE = "must be 1-64 chars of [A-Za-z0-9_.-]"


class PresenceEndpoint:
    def __init__(
        self, *, authorized: Callable[[str], bool], presence: Presence, stats: GatewayStats
    ) -> None:
        """`authorized(authorization header)`: the publish API's own key check."""
        self._authorized = authorized
        self._presence = presence
        self._stats = stats
        self._answers = AsyncAnswers("presence")

    def handle_player(self, reader: RequestReader, request: Request) -> None:
        """Answers once the other processes replied, or the presence timeout passed."""
        self._answers.answer(reader, request, self.player(request))

    async def player(self, request: Request) -> Response:
        """200 `PlayerPresence` as JSON; 400 `invalid_field`, 401, 404 or 503
        `broker_unavailable`."""
        if not self._authorized(request.header(b"authorization") or ""):
            return invalid_api_key()
        parts = request.path[len(PLAYERS_PREFIX) :].split("/")
        if len(parts) != 2:
            return error_response(
                404,
                "not_found",
                f"no route for {request.path}; use {PLAYERS_PREFIX}{{brand}}/{{player}}",
            )
        for field, value in zip(("brand_id", "player_id"), parts, strict=True):
            if not is_valid_id(value):
                return json_response(
                    400,
                    {"error": "invalid_field", "message": f"{field}: {_ID_RULE}", "field": field},
                )
        try:
            found = await self._presence.ask(parts[0], parts[1])
        except BrokerUnavailable as exc:
            return unavailable("broker_unavailable", f"not counted: {exc}")
        return json_response(200, dataclasses.asdict(found))

    def stats(self, request: Request) -> Response:
        """200 `GatewayStats.snapshot()` as JSON; 401."""
        if not self._authorized(request.header(b"authorization") or ""):
            return invalid_api_key()
        return json_response(200, self._stats.snapshot())
