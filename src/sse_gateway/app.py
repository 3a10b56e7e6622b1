"""Gateway: wires settings, broker, hub, heartbeats and metrics, and routes requests."""

from __future__ import annotations

import asyncio
import hmac
import itertools
import json
import logging
import os
import random
import secrets
import time
from collections import deque
from functools import partial
from importlib import resources
from typing import Any

import orjson

from sse_gateway.broker import MemoryBroker, RedisBroker
from sse_gateway.broker.base import Broker, BrokerUnavailable, HistoryEntry
from sse_gateway.edge.auth import AuthError, Identity, TokenVerifier, make_token
from sse_gateway.edge.protocol import HttpConnection
from sse_gateway.metrics import Metrics
from sse_gateway.publish.events import InvalidEvent, PreparedEvent, event_from_mapping
from sse_gateway.settings import Settings
from sse_gateway.streams.heartbeat import HeartbeatScheduler
from sse_gateway.streams.history import HistoryReader
from sse_gateway.streams.hub import Channel, ConnectionHub
from sse_gateway.wire.envelope import (
    EVENT_ID_PATTERN,
    EnvelopeError,
    envelope_from_object,
    event_frame,
    load_json,
)
from sse_gateway.wire.frames import encode_json_line_event, encode_retry
from sse_gateway.wire.http import (
    BadQuery,
    Request,
    Response,
    error_response,
    json_response,
    parse_query,
    stream_head,
)
from sse_gateway.wire.ids import (
    HistoryEvent,
    ReplayMerge,
    StreamId,
    parse_stream_id,
)
from sse_gateway.wire.naming import channel_name, split_channel

log = logging.getLogger("sse_gateway")
conn_log = logging.getLogger("sse_gateway.connection")

RETRY_AFTER_SECONDS = "5"
# Requests parsed per event-loop turn; the rest wait a turn, so Pub/Sub delivery, heartbeats
# and health checks keep running through a storm of 10,000 (re)connects.
REQUESTS_PER_TICK = 100
# On shutdown each client is told to come back after SSE_RETRY_MS plus up to this much.
SHUTDOWN_RETRY_SPREAD_MS = 10_000
REFILL_RETRY_SECONDS = 1.0
MAX_PUBLISH_BATCH = 1000
# Descriptors kept back from the open-file limit for Redis, the listener, logs and the loop.
FD_RESERVE = 100
# Extra sockets (health checks, refused clients) allowed beyond the stream limit.
FD_SOCKET_SLACK = 50

_PLAIN_PATHS = {"/healthz", "/readyz", "/metrics"}
_DEV_PATHS = {"/", "/demo"}


def effective_connection_limit(configured: int, fd_limit: int) -> int:
    """Streams one process can hold without running out of file descriptors."""
    return max(1, min(configured, fd_limit - FD_RESERVE - FD_SOCKET_SLACK))


class Gateway:
    def __init__(
        self,
        settings: Settings,
        *,
        fd_limit: int,
        connection_limit: int | None = None,
    ) -> None:
        self.settings = settings
        self.metrics = Metrics()
        self.broker: Broker
        if settings.redis is None:
            self.broker = MemoryBroker(
                self.on_message,
                self.on_broker_state,
                history_size=settings.history_size,
                history_ttl=settings.history_ttl,
            )
        else:
            self.broker = RedisBroker(
                settings.redis,
                self.on_message,
                self.on_broker_state,
                history_size=settings.history_size,
                history_ttl=settings.history_ttl,
                max_event_bytes=settings.max_event_bytes,
            )
        self.hub = ConnectionHub(self.broker)
        self.heartbeats = HeartbeatScheduler(settings.keepalive_period)
        self.verifier = TokenVerifier(
            secret=settings.jwt_secret,
            brand_keys=settings.jwt_keys,
            audience=settings.jwt_audience,
            issuer=settings.jwt_issuer,
        )
        limit = connection_limit if connection_limit is not None else settings.connection_limit
        self.connection_limit = effective_connection_limit(limit, fd_limit)
        self.socket_budget = self.connection_limit + FD_SOCKET_SLACK
        self.publish_api_key = settings.publish_api_key
        self.max_body_bytes = min(64 << 20, (settings.max_event_bytes + 512) * MAX_PUBLISH_BATCH)
        self.open_sockets = 0
        self.stream_sockets = 0  # streams whose socket is not closed yet (drain waits on it)
        self.streams = 0
        self._ever_connected = False
        self.request_budget = REQUESTS_PER_TICK
        self._budget_refill_scheduled = False
        self._deferred: deque[tuple[HttpConnection, bytes]] = deque()
        self.draining = False
        self._conn_numbers = itertools.count(1)
        self._conn_prefix = f"{os.getpid():06x}{secrets.token_hex(3)}"
        self._retry_frame = encode_retry(settings.retry_ms)
        self._stream_head = stream_head([]) + self._retry_frame
        self.history = HistoryReader(self.broker, settings.history_size)
        self._demo_page: bytes | None = None
        self._register_gauges()

    def _register_gauges(self) -> None:
        m = self.metrics
        m.gauge("sse_connections", "Open SSE streams.", lambda: self.streams)
        m.gauge("sse_connection_limit", "Effective stream limit.", lambda: self.connection_limit)
        m.gauge("sse_broker_connected", "1 when the broker is connected.", self._broker_up)
        m.gauge("sse_subscribed_channels", "Channels with local clients.", self._channel_count)

    def _broker_up(self) -> float:
        return 1.0 if self.broker.connected else 0.0

    def _channel_count(self) -> float:
        return float(self.hub.channel_count)

    # --- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        await self.broker.start()
        self.heartbeats.start()

    def begin_drain(self) -> None:
        self.draining = True

    def close_all_streams(self, reason: str = "shutdown") -> None:
        """Closes every stream, each with its own `retry:` so clients do not return at once."""
        for stream in self.hub.streams():
            assert isinstance(stream, HttpConnection)
            stream.close_stream(reason, final=self._jittered_retry())

    def _jittered_retry(self) -> bytes:
        base = self.settings.retry_ms
        return encode_retry(base + random.randrange(SHUTDOWN_RETRY_SPREAD_MS))

    async def close(self) -> None:
        self.heartbeats.stop()
        await self.broker.close()

    def ready_reason(self) -> str | None:
        if self.draining:
            return "draining"
        if not self.broker.connected:
            return "broker_disconnected"
        return None

    # --- broker callbacks --------------------------------------------------------------------

    def on_broker_state(self, connected: bool) -> None:
        if connected:
            if self._ever_connected:
                self.metrics.broker_reconnects += 1
            self._ever_connected = True
            return
        log.warning("broker disconnected: open streams stay open, new ones get 503")
        # Whatever is published until each channel is subscribed again is read back from
        # history; live events of the channel wait until that refill has been delivered.
        for channel in self.hub.channels():
            channel.generation += 1
            if channel.held is None:
                channel.held = []
            self.broker.when_subscribed(
                channel.name, partial(self._refill, channel, channel.generation)
            )

    def _refill(self, channel: Channel, generation: int) -> None:
        if channel.generation != generation or self.hub.get(channel.name) is not channel:
            return
        future = self.history.read(channel.name, channel.gap_start())
        future.add_done_callback(partial(self._refilled, channel, generation))

    def _refilled(
        self, channel: Channel, generation: int, future: asyncio.Future[list[HistoryEntry]]
    ) -> None:
        failed = future.cancelled() or future.exception() is not None
        held = channel.held
        if (
            held is None
            or channel.generation != generation
            or self.hub.get(channel.name) is not channel
        ):
            return  # a newer outage owns this channel's refill now
        if failed:
            if self.broker.connected:  # only the read failed: try again shortly
                asyncio.get_running_loop().call_later(
                    REFILL_RETRY_SECONDS, self._refill, channel, generation
                )
            return  # else the next on_broker_state(False) registers the next attempt
        entries = future.result()
        if not self._refill_covers(channel.last, entries):
            # History no longer reaches back to the gap: say so rather than skip events
            # silently. Reconnecting clients get `recovered: false` and refetch their state.
            channel.held = None
            log.warning(
                "history does not cover the outage of %s; closing its %d streams",
                channel.name.decode(),
                len(channel.streams),
            )
            for stream in tuple(channel.streams):
                assert isinstance(stream, HttpConnection)
                stream.close_stream("history_gap", final=self._jittered_retry())
            return
        merge = ReplayMerge(channel.last)
        events = merge.merge(self._history_events(channel.name, entries), held)
        channel.held = None
        channel.last = merge.last
        for event_id, frame in events:
            self.metrics.delivered += channel.write(frame, event_id, parse_stream_id(event_id))

    def _replay_covers(self, last: StreamId, entries: list[HistoryEntry]) -> bool:
        """A client's replay: the history must still hold its last id, and all that follows."""
        if len(entries) >= self.history.limit:
            return False  # the read was cut short: there is more than a replay may send
        return bool(entries) and parse_stream_id(entries[0][0]) == last

    def _refill_covers(self, last: StreamId | None, entries: list[HistoryEntry]) -> bool:
        """A channel's refill after an outage: is every event since `last` among `entries`?

        Unlike a client's replay, `last` may legitimately be absent: a Redis restart without
        persistence starts the stream afresh (all it holds came after the outage), and a plain
        PUBLISH never was in the history. Only a stream trimmed past `last` (it holds one more
        entry than the history size only once trimming began) proves events are lost.
        """
        if last is not None and entries and parse_stream_id(entries[0][0]) == last:
            return len(entries) < self.history.limit
        # `last` is not there (or the channel delivered nothing yet): only a stream that is
        # full may have been trimmed past the gap's start.
        return len(entries) <= self.settings.history_size

    def _history_events(self, channel: bytes, entries: list[HistoryEntry]) -> list[HistoryEvent]:
        events = []
        for event_id, event_type, data in entries:
            try:
                envelope = envelope_from_object(
                    {"type": event_type, "data": load_json(data.encode()), "id": event_id}
                )
            except EnvelopeError as exc:
                reason = exc.reason
                self.metrics.invalid_messages[reason] += 1
                log.warning(
                    "invalid history entry skipped: channel=%s id=%s reason=%s",
                    channel.decode("utf-8", "replace"),
                    event_id,
                    reason,
                )
                continue
            events.append(HistoryEvent(event_id, envelope.encode()))
        return events

    def on_message(self, channel: bytes, payload: bytes) -> None:
        self.metrics.messages_received += 1
        try:
            frame, event_id = event_frame(payload, self.settings.max_event_bytes)
        except EnvelopeError as exc:
            self.metrics.invalid_messages[exc.reason] += 1
            log.warning(
                "invalid published message dropped: channel=%s reason=%s detail=%s",
                channel.decode("utf-8", "replace"),
                exc.reason,
                exc,
            )
            return
        except Exception:
            # Whatever a publisher sends must never take down the shared Pub/Sub reader.
            self.metrics.invalid_messages["unencodable"] += 1
            log.exception(
                "invalid published message dropped: channel=%s reason=unencodable",
                channel.decode("utf-8", "replace"),
            )
            return
        self.metrics.delivered += self.hub.deliver(channel, frame, event_id)

    # --- routing -----------------------------------------------------------------------------

    def handle(self, conn: HttpConnection, request: Request) -> None:
        path = request.path
        method = request.method
        head_only = method == "HEAD"
        try:
            if path == "/v1/sse":
                if method == "GET":
                    self.open_stream(conn, request)
                elif method == "OPTIONS":
                    conn.respond(self.preflight(request), keep_alive=request.keep_alive)
                else:
                    conn.respond(_method_not_allowed("GET, OPTIONS"), keep_alive=False)
                return
            if path == "/v1/publish" and self.publish_api_key is not None:
                if method != "POST":
                    conn.respond(_method_not_allowed("POST"), keep_alive=False)
                    return
                conn.begin_async()
                asyncio.get_running_loop().create_task(self._publish_and_respond(conn, request))
                return
            if path in _PLAIN_PATHS or (path in _DEV_PATHS and self.settings.dev):
                if method not in ("GET", "HEAD"):
                    conn.respond(_method_not_allowed("GET, HEAD"), keep_alive=False)
                    return
                conn.respond(self.plain(path), keep_alive=request.keep_alive, head_only=head_only)
                return
            conn.respond(
                error_response(404, "not_found", f"no route for {path}"),
                keep_alive=request.keep_alive,
                head_only=head_only,
            )
        except Exception:
            log.exception("error handling %s %s", method, path)
            conn.respond(error_response(500, "internal_error", "internal error"), keep_alive=False)

    # --- request budget ----------------------------------------------------------------------

    def spend_request_budget(self) -> None:
        self.request_budget -= 1
        if not self._budget_refill_scheduled:
            self._budget_refill_scheduled = True
            asyncio.get_running_loop().call_soon(self._refill_request_budget)

    def defer_request(self, conn: HttpConnection, data: bytes) -> None:
        if conn.transport is not None:
            conn.transport.pause_reading()
        self._deferred.append((conn, data))
        if not self._budget_refill_scheduled:
            self._budget_refill_scheduled = True
            asyncio.get_running_loop().call_soon(self._refill_request_budget)

    def _refill_request_budget(self) -> None:
        self._budget_refill_scheduled = False
        self.request_budget = REQUESTS_PER_TICK
        deferred = self._deferred
        while deferred and self.request_budget > 0:
            conn, data = deferred.popleft()
            if conn.closed or conn.transport is None:
                continue
            conn.transport.resume_reading()
            conn.data_received(data)
        if deferred and not self._budget_refill_scheduled:
            self._budget_refill_scheduled = True
            asyncio.get_running_loop().call_soon(self._refill_request_budget)

    def accepts_body(self, url: bytes, headers: list[tuple[bytes, bytes]]) -> bool:
        """Whether a POST's body is kept: only for an authorized publish, never otherwise."""
        if self.publish_api_key is None or not url.startswith(b"/v1/publish"):
            return False
        authorization = dict(headers).get(b"authorization", b"").decode("latin-1")
        return self._publish_authorized(authorization)

    def _publish_authorized(self, authorization: str) -> bool:
        assert self.publish_api_key is not None
        scheme, _, key = authorization.partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(
            key.strip().encode(), self.publish_api_key.encode()
        )

    def plain(self, path: str) -> Response:
        if path == "/healthz":
            return json_response(200, {"status": "ok"})
        if path == "/readyz":
            reason = self.ready_reason()
            if reason is None:
                return json_response(200, {"status": "ready"})
            return json_response(503, {"status": "not_ready", "reason": reason})
        if path == "/metrics":
            return Response(
                200, self.metrics.render(), content_type="text/plain; version=0.0.4; charset=utf-8"
            )
        return Response(200, self.demo_page(), content_type="text/html; charset=utf-8")

    def demo_page(self) -> bytes:
        if self._demo_page is None:
            page = resources.files("sse_gateway").joinpath("static/demo.html").read_text()
            # Dev mode only: the page comes pre-filled with a sample token and the publish key.
            secret = self.settings.jwt_secret
            token = make_token(secret, "demo", "player-1", ttl=24 * 3600) if secret else ""
            page = page.replace("__TOKEN__", token)
            page = page.replace("__PUBLISH_KEY__", self.settings.publish_api_key or "")
            self._demo_page = page.encode("utf-8")
        return self._demo_page

    # --- CORS --------------------------------------------------------------------------------

    def _origin_check(self, request: Request) -> tuple[list[tuple[str, str]], Response | None]:
        """CORS headers for an allowed browser origin, or the 403 for one that is not."""
        origin = request.header(b"origin")
        if origin is None:
            return [], None
        if origin.rstrip("/") in self.settings.cors_origins:
            return [
                ("Access-Control-Allow-Origin", origin),
                ("Access-Control-Allow-Credentials", "true"),
                ("Vary", "Origin"),
            ], None
        host = request.header(b"host")
        if host is not None and origin in (f"http://{host}", f"https://{host}"):
            return [], None  # the gateway's own pages (the demo) are same-origin
        return [], error_response(
            403, "origin_not_allowed", f"origin {origin} is not allowed (SSE_CORS_ORIGINS)"
        )

    def preflight(self, request: Request) -> Response:
        cors, refusal = self._origin_check(request)
        if refusal is not None:
            return refusal
        if not cors:
            return error_response(400, "bad_request", "a CORS preflight needs an Origin header")
        cors += [
            ("Access-Control-Allow-Methods", "GET"),
            (
                "Access-Control-Allow-Headers",
                "Authorization, Last-Event-ID, X-Brand-ID, Cache-Control",
            ),
            ("Access-Control-Max-Age", "600"),
        ]
        return Response(204, b"", headers=cors)

    # --- streams -----------------------------------------------------------------------------

    def _refuse(self, conn: HttpConnection, response: Response, code: str) -> None:
        self.metrics.rejected[code] += 1
        conn.respond(response, keep_alive=False)

    def authenticate(
        self, request: Request
    ) -> tuple[Identity, list[tuple[str, str]], dict[str, str]]:
        """The identity of a stream request, its CORS headers and query; raises AuthError."""
        cors, refusal = self._origin_check(request)
        if refusal is not None:
            origin = request.header(b"origin")
            raise AuthError(
                403, "origin_not_allowed", f"origin {origin} is not allowed (SSE_CORS_ORIGINS)"
            )
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
        identity = self.verifier.verify(token)
        for claimed in (request.header(b"x-brand-id"), query.get("brand_id")):
            if claimed is not None and claimed != identity.brand_id:
                raise AuthError(403, "brand_mismatch", "brand_id does not match the token's brand")
        return identity, cors, query

    def open_stream(self, conn: HttpConnection, request: Request) -> None:
        try:
            identity, cors, query = self.authenticate(request)
        except AuthError as exc:
            headers: list[tuple[str, str]] = []
            if exc.status == 401:
                challenge = 'Bearer realm="sse-gateway"'
                if exc.code != "missing_token":
                    challenge += ', error="invalid_token"'
                headers.append(("WWW-Authenticate", challenge))
            self._refuse(conn, error_response(exc.status, exc.code, exc.message, headers), exc.code)
            return
        last_event_id = request.header(b"last-event-id")
        if last_event_id is None:
            last_event_id = query.get("last_event_id")
        if last_event_id is not None:
            last_event_id = last_event_id.strip()
            if not EVENT_ID_PATTERN.fullmatch(last_event_id):
                response = error_response(
                    400, "invalid_last_event_id", "Last-Event-ID must match [A-Za-z0-9_.:-]{1,128}"
                )
                self._refuse(conn, response, "invalid_last_event_id")
                return
        retry_after = [("Retry-After", RETRY_AFTER_SECONDS), *cors]
        if self.draining:
            response = error_response(503, "draining", "the gateway is shutting down", retry_after)
            self._refuse(conn, response, "draining")
            return
        if self.streams >= self.connection_limit:
            response = error_response(
                503, "connection_limit", "the gateway is at its connection limit", retry_after
            )
            self._refuse(conn, response, "connection_limit")
            return
        if not self.broker.connected:
            response = error_response(
                503, "broker_unavailable", "the message broker is not connected", retry_after
            )
            self._refuse(conn, response, "broker_unavailable")
            return
        self.streams += 1
        self.metrics.opened += 1
        conn_no = next(self._conn_numbers)
        conn.become_stream(
            channel_name(identity.brand_id, identity.player_id),
            conn_no,
            self._stream_head if not cors else stream_head(cors) + self._retry_frame,
        )
        if conn_log.isEnabledFor(logging.INFO):
            conn_log.info(
                "stream open id=%s brand=%s player=%s",
                self.connection_id(conn_no),
                identity.brand_id,
                identity.player_id,
            )
        self.hub.join(conn, partial(self._stream_ready, conn, identity, last_event_id))

    def connection_id(self, conn_no: int) -> str:
        # Fixed-width counter after a per-process prefix: unique across workers and restarts.
        return f"{self._conn_prefix}{conn_no:010x}"

    def _stream_ready(
        self, conn: HttpConnection, identity: Identity, last_event_id: str | None
    ) -> None:
        """The channel is subscribed: replay what was missed, say `connected`, go live."""
        if conn.closed or conn.transport is None:
            return
        if last_event_id is None:
            self._go_live(conn, identity, None, [], None)
            return
        last = parse_stream_id(last_event_id)
        if last is None:
            self._go_live(conn, identity, False, [], None)  # not a history id: can't recover
            return
        # Live events from now on wait in `held`, history is read, then both are merged.
        conn.held = []
        future = self.history.read(conn.channel, last_event_id)
        future.add_done_callback(partial(self._replayed, conn, identity, last))

    def _replayed(
        self,
        conn: HttpConnection,
        identity: Identity,
        last: StreamId,
        future: asyncio.Future[list[HistoryEntry]],
    ) -> None:
        failed = future.cancelled() or future.exception() is not None
        if conn.closed or conn.transport is None:
            return
        if failed:
            # Not "recovered: false" (that tells the client to refetch its state): the history
            # could not be read, so the client is asked to come back and try again.
            self.metrics.replays["failed"] += 1
            conn.close_stream("replay_failed", final=self._jittered_retry())
            return
        entries = future.result()
        # Recovered only when the history still holds the client's last id and the read was
        # not cut short: then nothing between it and the events we send can be missing.
        recovered = self._replay_covers(last, entries)
        replayed = self._history_events(conn.channel, entries[1:]) if recovered else []
        self.metrics.replays["recovered" if recovered else "not_recovered"] += 1
        self._go_live(conn, identity, recovered, replayed, last)

    def _go_live(
        self,
        conn: HttpConnection,
        identity: Identity,
        recovered: bool | None,
        replayed: list[HistoryEvent],
        last: StreamId | None,
    ) -> None:
        """Writes `connected`, the replayed and held events, then makes the stream live."""
        assert conn.transport is not None
        payload: dict[str, Any] = {
            "connection_id": self.connection_id(conn.conn_no),
            "brand_id": identity.brand_id,
            "player_id": identity.player_id,
            "heartbeat_interval": self.settings.keepalive_period,
        }
        if recovered is not None:
            payload["recovered"] = recovered
        # orjson writes what dump_json would here: ids are ASCII, the rest ints and bools.
        frames = [encode_json_line_event("connected", orjson.dumps(payload))]
        held = conn.held
        conn.held = None
        if held is not None:
            merge = ReplayMerge(last)
            events = merge.merge(replayed, held)
            frames.extend(frame for _, frame in events)
            conn.floor = merge.last
            self.metrics.replayed_events += len(replayed)
            self.metrics.delivered += len(events)
        conn.transport.write(conn.take_head() + b"".join(frames))
        conn.active = True
        self.heartbeats.add(conn)

    def stream_closed(self, conn: HttpConnection, reason: str) -> None:
        """Bookkeeping for a stream that ends, whoever ended it. Called once per stream."""
        self.streams -= 1
        self.metrics.closed[reason] += 1
        self.hub.leave(conn)
        if conn.hb_slot >= 0:
            self.heartbeats.remove(conn)
        conn.active = False
        level = logging.WARNING if reason == "slow_consumer" else logging.INFO
        if not conn_log.isEnabledFor(level):
            return
        brand_player = split_channel(conn.channel) or ("?", "?")
        conn_log.log(
            level,
            "stream close id=%s brand=%s player=%s duration=%.3fs reason=%s",
            self.connection_id(conn.conn_no),
            brand_player[0],
            brand_player[1],
            time.monotonic() - conn.opened_at,
            reason,
        )

    # --- publishing --------------------------------------------------------------------------

    async def _publish_and_respond(self, conn: HttpConnection, request: Request) -> None:
        try:
            response = await self.publish_request(request)
        except Exception:
            log.exception("publish failed")
            response = error_response(500, "internal_error", "internal error")
        conn.respond(response, keep_alive=request.keep_alive)
        conn.end_async()

    async def publish_request(self, request: Request) -> Response:
        if not self._publish_authorized(request.header(b"authorization") or ""):
            return error_response(
                401,
                "invalid_api_key",
                "Authorization: Bearer <SSE_PUBLISH_API_KEY> required",
                [("WWW-Authenticate", 'Bearer realm="sse-gateway-publish"')],
            )
        try:
            body = json.loads(request.body)
        except (ValueError, RecursionError):
            return error_response(400, "invalid_json", "request body is not JSON")
        is_batch = isinstance(body, list)
        items = body if is_batch else [body]
        if is_batch and not 1 <= len(body) <= MAX_PUBLISH_BATCH:
            return error_response(
                400, "invalid_batch", f"a batch holds 1 to {MAX_PUBLISH_BATCH} events"
            )
        events: list[PreparedEvent] = []
        for index, item in enumerate(items):
            try:
                events.append(
                    event_from_mapping(item, max_event_bytes=self.settings.max_event_bytes)
                )
            except InvalidEvent as exc:
                where = f"[{index}]." if is_batch else ""
                if exc.too_large:
                    return error_response(413, "payload_too_large", f"{where}{exc}")
                return json_response(
                    400,
                    {"error": "invalid_field", "message": f"{where}{exc}", "field": exc.field},
                )
        try:
            published = await self.broker.publish_events(events)
        except BrokerUnavailable as exc:
            return error_response(
                503,
                "broker_unavailable",
                f"not stored: {exc}",
                [("Retry-After", RETRY_AFTER_SECONDS)],
            )
        self.metrics.published += len(published)
        if is_batch:
            return json_response(202, {"ids": [str(p) for p in published]})
        return json_response(202, {"id": str(published[0]), "receivers": published[0].receivers})


def _method_not_allowed(allow: str) -> Response:
    return error_response(
        405, "method_not_allowed", f"method not allowed; use {allow}", [("Allow", allow)]
    )
