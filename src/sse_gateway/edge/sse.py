"""`GET /v1/sse`: from a parsed request to a stream, or to the error that says why not.

Authentication (token from `Authorization: Bearer` or `?token=`, brand claims), the
`Last-Event-ID` check and admission happen here, at the edge; once all pass, the request
reader hands its socket over and the stream lifecycle takes it from there.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import NamedTuple

from sse_gateway.broker.base import Broker
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
from sse_gateway.streams.lifecycle import StreamLifecycle
from sse_gateway.wire.envelope import EVENT_ID_PATTERN
from sse_gateway.wire.http import BadQuery, Request, Response, error_response, parse_query
from sse_gateway.wire.http import stream_head as encode_stream_head
from sse_gateway.wire.naming import Identity


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
        self._metrics = metrics
        self._retry_ms = retry_ms
        self._rate_limit = rate_limit
        self._head = encode_stream_head([])

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
        for claimed in (request.header(b"x-brand-id"), query.get("brand_id")):
            if claimed is not None and claimed != identity.brand_id:
                raise AuthError(403, "brand_mismatch", "brand_id does not match the token's brand")
        return Authenticated(identity, cors, query)

    def open(self, reader: RequestReader, request: Request) -> None:
        """Answers an error, or hands the reader's socket to a new stream."""
        if self._rate_limit is not None and self._rate_limited(reader, request):
            return
        try:
            identity, cors, query = self.authenticate(request)
        except AuthError as exc:
            # A page on an allowed origin must be able to read why (an expired token is not
            # an outage): the CORS headers go on errors too; a refused origin gets none.
            origin = self._cors.check(request)
            headers: list[tuple[str, str]] = [] if origin.refusal else list(origin.headers)
            if exc.status == 401:
                challenge = 'Bearer realm="sse-gateway"'
                if exc.code != "missing_token":
                    challenge += ', error="invalid_token"'
                headers.append(("WWW-Authenticate", challenge))
            self._refuse(
                reader, error_response(exc.status, exc.code, exc.message, headers), exc.code
            )
            return
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
        refusal = self._admission.stream_refusal(
            self._lifecycle.open_streams, self._broker.connected
        )
        if refusal is not None:
            # Transient: an EventSource must come back by itself, so it gets a 200 it survives.
            if accepts_event_stream(request):
                response = unavailable_stream(refusal, self._retry_ms, cors)
            else:
                response = unavailable(refusal, headers=cors)
            self._refuse(reader, response, refusal)
            return
        if self._lifecycle.player_at_cap(identity):
            limit = self._lifecycle.max_connections_per_player
            response = too_many_connections(limit, accepts_event_stream(request), cors)
            self._refuse(reader, response, "too_many_connections")
            return
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

    def _refuse(self, reader: RequestReader, response: Response, code: str) -> None:
        self._metrics.rejected[code] += 1
        reader.respond(response, keep_alive=False)
