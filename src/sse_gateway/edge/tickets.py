"""`POST /v1/tickets`: a token (in the `Authorization` header) for a connect ticket.

A page that cannot set headers on an EventSource puts a ticket in the stream URL instead of
its token: `GET /v1/sse?ticket=…` takes it once, on any instance, within
`TICKET_TTL_SECONDS` (edge.sse redeems it). Tokens live long and URLs end up in access
logs, browser history and Referer headers; a used or expired ticket is worth nothing there.
"""

from __future__ import annotations

import logging
import time

from sse_gateway.broker.base import Broker, BrokerUnavailable
from sse_gateway.edge.admission import unavailable
from sse_gateway.edge.async_answer import AsyncAnswers
from sse_gateway.edge.auth import AuthError
from sse_gateway.edge.cors import CorsPolicy
from sse_gateway.edge.protocol import RequestReader
from sse_gateway.edge.sse import StreamEndpoint
from sse_gateway.streams.control import SessionControl
from sse_gateway.wire.http import Request, Response, error_response, json_response
from sse_gateway.wire.tickets import (
    TicketClaims,
    encode_claims,
    new_ticket,
    ticket_key,
    ticket_ttl,
)

log = logging.getLogger("sse_gateway")

PATH = "/v1/tickets"


class TicketEndpoint:
    def __init__(
        self,
        *,
        streams: StreamEndpoint,
        broker: Broker,
        cors: CorsPolicy,
        control: SessionControl,
    ) -> None:
        """`streams` authenticates the token exactly as for a stream request."""
        self._streams = streams
        self._broker = broker
        self._cors = cors
        self._control = control
        self._answers = AsyncAnswers("ticket issue")

    def preflight(self, request: Request) -> Response:
        return self._cors.preflight(request, "POST", "Authorization, X-Brand-ID")

    def handle(self, reader: RequestReader, request: Request) -> None:
        """Answers once the broker has stored the ticket (or refused to)."""
        self._answers.answer(reader, request, self.issue(request))

    async def issue(self, request: Request) -> Response:
        """200 `{"ticket", "expires_in"}`; 400, 401 and 403 as for a stream request (403
        `blocked` too); 503."""
        try:
            authorization = request.header(b"authorization")
            if authorization is None:
                # Only the header: the point is to keep tokens out of URLs.
                raise AuthError(
                    401, "missing_token", "POST /v1/tickets needs Authorization: Bearer <token>"
                )
            identity, cors, _ = self._streams.authenticate(request)
        except AuthError as exc:
            return self._streams.auth_refusal(request, exc)
        try:
            # A page that gets its tickets itself reconnects itself: it must be able to read
            # that the player is blocked here (an EventSource cannot read a 403).
            if await self._control.blocked(identity):
                return error_response(
                    403, "blocked", "streams for this player are blocked for now", cors
                )
        except BrokerUnavailable as exc:
            log.warning("ticket not issued: block check failed: %s", exc)
            return unavailable("broker_unavailable", headers=cors)
        now = time.time()
        valid_until = identity.valid_until  # the token's exp plus the clock leeway
        ticket = new_ticket()
        ttl = ticket_ttl(valid_until, now)
        claims = TicketClaims(identity.brand_id, identity.player_id, valid_until)
        try:
            await self._broker.put_ticket(ticket_key(ticket), encode_claims(claims), ttl)
        except BrokerUnavailable as exc:
            log.warning("ticket not stored: %s", exc)
            return unavailable("broker_unavailable", headers=cors)
        # A credential: no cache may keep it.
        headers = [*cors, ("Cache-Control", "no-store")]
        return json_response(200, {"ticket": ticket, "expires_in": ttl}, headers)
