"""`GET /v1/sse`: from a parsed request to a stream, or to the error that says why not.

Authentication (token from `Authorization: Bearer` or `?token=`, or a connect ticket from
`?ticket=`; brand claims), the `Last-Event-ID` check, the block check and admission happen
here, at the edge; once all pass, the request reader hands its socket over and the stream
lifecycle takes it from there. A ticket is read from the broker, and so is the block check
when the process's table of blocks cannot answer it alone (`SessionControl`): the reader
waits (`begin_async`) until they are answered.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from functools import partial
from typing import NamedTuple

from sse_gateway.broker.base import Broker, BrokerUnavailable
from sse_gateway.edge.admission import (
    Admission,
    accepts_event_stream,
    too_many_connections,
    unavailable,
    unavailable_stream,
)
from sse_gateway.edge.auth import AuthError, TokenVerifier
from sse_gateway.edge.cors import CorsPolicy
from sse_gateway.edge.protocol import RequestReader
from sse_gateway.edge.ratelimit import ConnectRateLimit, peer_host
from sse_gateway.metrics import Metrics
from sse_gateway.streams.control import SessionControl
from sse_gateway.streams.lifecycle import StreamLifecycle
from sse_gateway.wire.envelope import EVENT_ID_PATTERN
from sse_gateway.wire.http import BadQuery, Request, Response, error_response, parse_query
from sse_gateway.wire.http import stream_head as encode_stream_head
from sse_gateway.wire.naming import Identity
from sse_gateway.wire.tickets import decode_claims, is_ticket, ticket_key

log = logging.getLogger("sse_gateway")

# A check in flight while this many disconnects with a block came in is given up (503):
# only an operator script in a loop gets there.
MAX_BLOCK_CHECKS = 3


class Authenticated(NamedTuple):
    """A stream request that passed authentication."""

    identity: Identity
    cors_headers: Sequence[tuple[str, str]]
    query: dict[str, str]


class StreamEndpoint:
    def __init__(
        self,
        *,
        verifier: TokenVerifier,
        cors: CorsPolicy,
        admission: Admission,
        broker: Broker,
        lifecycle: StreamLifecycle,
        control: SessionControl,
        metrics: Metrics,
        retry_ms: int,
        rate_limit: ConnectRateLimit | None = None,
    ) -> None:
        """`retry_ms` is SSE_RETRY_MS: what `retry:` tells clients that are refused;
        `rate_limit` is SSE_CONNECT_RATE_PER_IP's (None: off)."""
        self._verifier = verifier
        self._cors = cors
        self._admission = admission
        self._broker = broker
        self._lifecycle = lifecycle
        self._control = control
        self._metrics = metrics
        self._retry_ms = retry_ms
        self._rate_limit = rate_limit
        self._head = encode_stream_head([])
        self._tasks: set[asyncio.Future[bytes | None]] = set()

    def authenticate(self, request: Request) -> Authenticated:
        """Who a stream request is for; raises AuthError (400, 401, 403)."""
        cors, refusal = self._cors.check(request)
        if refusal is not None:
            raise refusal
        try:
            query = parse_query(request.query_string)
        except BadQuery as exc:
            raise AuthError(400, "bad_request", str(exc)) from exc
        token: str | None = None
        authorization = request.header(b"authorization")
        if authorization is not None:
            scheme, _, credentials = authorization.strip().partition(" ")
            if scheme.lower() != "bearer" or not credentials.strip():
                raise AuthError(401, "invalid_token", "Authorization must be 'Bearer <token>'")
            token = credentials.strip()
        elif "token" in query:
            token = query["token"]
        if not token:
            raise AuthError(401, "missing_token", "a token is required (Authorization or ?token=)")
        identity = self._verifier.verify(token)
        _check_brand_claims(request, query, identity)
        return Authenticated(identity, cors, query)

    def auth_refusal(self, request: Request, exc: AuthError) -> Response:
        """The error answer to a refused authentication."""
        # A page on an allowed origin must be able to read why (an expired token is not an
        # outage): the CORS headers go on errors too; a refused origin gets none.
        origin = self._cors.check(request)
        headers: list[tuple[str, str]] = [] if origin.refusal else list(origin.headers)
        if exc.status == 401:
            challenge = 'Bearer realm="sse-gateway"'
            if exc.code != "missing_token":
                challenge += ', error="invalid_token"'
            headers.append(("WWW-Authenticate", challenge))
        return error_response(exc.status, exc.code, exc.message, headers)

    def open(self, reader: RequestReader, request: Request) -> None:
        """Answers an error, or hands the reader's socket to a new stream (maybe later,
        once a ticket or the block check is answered)."""
        if self._rate_limit is not None and self._rate_limited(reader, request):
            return
        try:
            ticket = self._ticket(request)
            if ticket is not None:
                self._redeem(reader, request, *ticket)
                return
            identity, cors, query = self.authenticate(request)
        except AuthError as exc:
            self._refuse(reader, self.auth_refusal(request, exc), exc.code)
            return
        self._admit(reader, request, identity, cors, query)

    # --- connect tickets ---------------------------------------------------------------------

    def _ticket(
        self, request: Request
    ) -> tuple[str, Sequence[tuple[str, str]], dict[str, str]] | None:
        """A ticket request's (ticket, CORS headers, query), or None for a token request (an
        `Authorization` header wins over a ticket, as it does over `?token=`). AuthError."""
        if not request.query_string or b"authorization" in request.headers:
            return None
        try:
            query = parse_query(request.query_string)
        except BadQuery:
            return None  # authenticate() gives the 400
        ticket = query.get("ticket")
        if ticket is None:
            return None
        cors, refusal = self._cors.check(request)
        if refusal is not None:
            raise refusal
        if "token" in query:
            raise AuthError(400, "bad_request", "give a ticket or a token, not both")
        if not is_ticket(ticket):
            raise _invalid_ticket()
        return ticket, cors, query

    def _redeem(
        self,
        reader: RequestReader,
        request: Request,
        ticket: str,
        cors: Sequence[tuple[str, str]],
        query: dict[str, str],
    ) -> None:
        reader.begin_async()
        future = asyncio.ensure_future(self._broker.take_ticket(ticket_key(ticket)))
        self._tasks.add(future)
        future.add_done_callback(self._tasks.discard)
        future.add_done_callback(partial(self._redeemed, reader, request, cors, query))

    def _redeemed(
        self,
        reader: RequestReader,
        request: Request,
        cors: Sequence[tuple[str, str]],
        query: dict[str, str],
        future: asyncio.Future[bytes | None],
    ) -> None:
        if reader.closed or reader.transport is None:
            if not future.cancelled():
                future.exception()  # retrieved: the client left, nobody else will
            return
        try:
            failure = None if future.cancelled() else future.exception()
            if future.cancelled() or failure is not None:
                if not isinstance(failure, BrokerUnavailable):
                    log.error("ticket lookup failed", exc_info=failure)
                self._unavailable(reader, request, cors, "broker_unavailable")
                return
            value = future.result()
            claims = None if value is None else decode_claims(value)
            try:
                if claims is None:
                    raise _invalid_ticket()
                # `claims.valid_until` is the token's: it bounded the ticket's TTL, and a
                # stream opened with the ticket ends when one opened with the token would.
                identity = Identity(claims.brand_id, claims.player_id, claims.valid_until)
                _check_brand_claims(request, query, identity)
            except AuthError as exc:
                self._refuse(reader, self.auth_refusal(request, exc), exc.code)
                return
            self._admit(reader, request, identity, cors, query)
        except Exception:
            self._failed(reader, "ticket redemption")

    # --- checks, then the stream -------------------------------------------------------------

    def _admit(
        self,
        reader: RequestReader,
        request: Request,
        identity: Identity,
        cors: Sequence[tuple[str, str]],
        query: dict[str, str],
    ) -> None:
        last_event_id = request.header(b"last-event-id")
        if last_event_id is None:
            last_event_id = query.get("last_event_id")
        if last_event_id is not None:
            # Empty means no id (WHATWG: an empty `id:` resets the last event ID), and an
            # EventSource never recovers from a non-200 answer.
            last_event_id = last_event_id.strip() or None
        if last_event_id is not None and not EVENT_ID_PATTERN.fullmatch(last_event_id):
            response = error_response(
                400,
                "invalid_last_event_id",
                "Last-Event-ID must match [A-Za-z0-9_.:-]{1,128}",
                cors,
            )
            self._refuse(reader, response, "invalid_last_event_id")
            return
        if self._refused_now(reader, request, identity, cors):
            return
        if self._control.surely_unblocked(identity):
            self._hand_over(reader, request, identity, cors, last_event_id)
        else:
            self._check_block(reader, request, identity, cors, last_event_id, 1)

    def _refused_now(
        self,
        reader: RequestReader,
        request: Request,
        identity: Identity,
        cors: Sequence[tuple[str, str]],
    ) -> bool:
        """Refuses (and True) when the process or the player has no room for a stream now."""
        refusal = self._admission.stream_refusal(
            self._lifecycle.open_streams, self._broker.connected
        )
        if refusal is not None:
            self._unavailable(reader, request, cors, refusal)
            return True
        if self._lifecycle.player_at_cap(identity):
            limit = self._lifecycle.max_connections_per_player
            response = too_many_connections(limit, accepts_event_stream(request), cors)
            self._refuse(reader, response, "too_many_connections")
            return True
        return False

    def _check_block(
        self,
        reader: RequestReader,
        request: Request,
        identity: Identity,
        cors: Sequence[tuple[str, str]],
        last_event_id: str | None,
        attempt: int,
    ) -> None:
        reader.begin_async()
        generation = self._control.block_generation
        self._control.check_blocked(
            identity,
            partial(
                self._checked, reader, request, identity, cors, last_event_id, attempt, generation
            ),
        )

    def _checked(
        self,
        reader: RequestReader,
        request: Request,
        identity: Identity,
        cors: Sequence[tuple[str, str]],
        last_event_id: str | None,
        attempt: int,
        generation: int,
        blocked: bool,
        failure: BaseException | None,
    ) -> None:
        if reader.closed or reader.transport is None:
            return  # the client left while it waited
        try:
            if failure is not None:
                if not isinstance(failure, BrokerUnavailable):
                    log.error("block check failed", exc_info=failure)
                self._unavailable(reader, request, cors, "broker_unavailable")
                return
            if blocked:
                # Not transient for the client: an EventSource fails for good on a 403, and
                # must, or a blocked tab would come back every few seconds.
                response = error_response(
                    403, "blocked", "streams for this player are blocked for now", cors
                )
                self._refuse(reader, response, "blocked")
                return
            if self._control.block_generation != generation:
                # A block came in while the check was in flight: it may have been stored
                # after the check read the keys. Read again.
                if attempt >= MAX_BLOCK_CHECKS:
                    self._unavailable(reader, request, cors, "broker_unavailable")
                    return
                self._check_block(reader, request, identity, cors, last_event_id, attempt + 1)
                return
            self._control.forget(identity)
            # Checked again: streams may have opened (or a drain begun) while this waited.
            if self._refused_now(reader, request, identity, cors):
                return
            self._hand_over(reader, request, identity, cors, last_event_id)
        except Exception:
            self._failed(reader, "the block check")

    def _hand_over(
        self,
        reader: RequestReader,
        request: Request,
        identity: Identity,
        cors: Sequence[tuple[str, str]],
        last_event_id: str | None,
    ) -> None:
        chunked = request.http_version != "1.0"
        head = encode_stream_head(cors, chunked=chunked) if cors or not chunked else self._head
        paused = reader.writing_paused
        self._lifecycle.open(
            reader.hand_over(), identity, last_event_id, head, paused, chunked=chunked
        )

    def _rate_limited(self, reader: RequestReader, request: Request) -> bool:
        """Answers 429 if the client address is over SSE_CONNECT_RATE_PER_IP; checked before
        the token, so a flood costs no signature checks."""
        limit = self._rate_limit
        assert limit is not None
        forwarded = request.header(b"x-forwarded-for")
        key = limit.client_key(peer_host(reader.transport), forwarded)
        if key is None:
            return False
        wait = limit.retry_after(key, time.monotonic())
        if not wait:
            return False
        origin = self._cors.check(request)
        headers = [("Retry-After", str(wait))]
        if origin.refusal is None:
            headers.extend(origin.headers)
        message = f"too many stream requests from this address; retry in {wait} s"
        self._refuse(reader, error_response(429, "rate_limited", message, headers), "rate_limited")
        return True

    def _unavailable(
        self,
        reader: RequestReader,
        request: Request,
        cors: Sequence[tuple[str, str]],
        refusal: str,
    ) -> None:
        # Transient: an EventSource must come back by itself, so it gets a 200 it survives.
        if accepts_event_stream(request):
            response = unavailable_stream(refusal, self._retry_ms, cors)
        else:
            response = unavailable(refusal, headers=cors)
        self._refuse(reader, response, refusal)

    def _refuse(self, reader: RequestReader, response: Response, code: str) -> None:
        self._metrics.rejected[code] += 1
        reader.respond(response, keep_alive=False)

    def _failed(self, reader: RequestReader, what: str) -> None:
        log.exception("stream request: %s failed", what)
        reader.respond(error_response(500, "internal_error", "internal error"), keep_alive=False)


def _check_brand_claims(request: Request, query: dict[str, str], identity: Identity) -> None:
    """`X-Brand-ID` / `?brand_id=`, when given, must name the identity's brand (403)."""
    for claimed in (request.header(b"x-brand-id"), query.get("brand_id")):
        if claimed is not None and claimed != identity.brand_id:
            raise AuthError(403, "brand_mismatch", "brand_id does not match the token's brand")


def _invalid_ticket() -> AuthError:
    return AuthError(401, "invalid_ticket", "the ticket is unknown, used or expired: get a new one")
