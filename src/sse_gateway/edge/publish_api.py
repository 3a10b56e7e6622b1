"""`POST /v1/publish` (when SSE_PUBLISH_API_KEY is set): one event or a batch, via the broker."""

from __future__ import annotations

import hmac
import json
import logging

from sse_gateway.broker.base import Broker, BrokerUnavailable
from sse_gateway.edge.admission import unavailable
from sse_gateway.edge.async_answer import AsyncAnswers
from sse_gateway.edge.protocol import RequestReader
from sse_gateway.metrics import Metrics
from sse_gateway.publish.events import MAX_BATCH, InvalidEvent, PreparedEvent, event_from_mapping
from sse_gateway.wire.http import Request, Response, error_response, json_response

log = logging.getLogger("sse_gateway")

PATH = "/v1/publish"


def invalid_api_key() -> Response:
    """The 401 of the publish key's APIs (publish, disconnect)."""
    return error_response(
        401,
        "invalid_api_key",
        "Authorization: Bearer <SSE_PUBLISH_API_KEY> required",
        [("WWW-Authenticate", 'Bearer realm="sse-gateway-publish"')],
    )


class PublishEndpoint:
    def __init__(
        self, *, api_key: str, broker: Broker, metrics: Metrics, max_event_bytes: int
    ) -> None:
        self._api_key = api_key.encode()
        self._broker = broker
        self._metrics = metrics
        self._max_event_bytes = max_event_bytes
        self.max_body_bytes = min(64 << 20, (max_event_bytes + 512) * MAX_BATCH)
        self._answers = AsyncAnswers("publish")

    def authorized(self, authorization: str) -> bool:
        """`Bearer <SSE_PUBLISH_API_KEY>`, compared in constant time."""
        scheme, _, key = authorization.partition(" ")
        presented = key.strip().encode()
        return scheme.lower() == "bearer" and hmac.compare_digest(presented, self._api_key)

    def body_limit(self, url: bytes, headers: list[tuple[bytes, bytes]]) -> int:
        """A POST's body is kept only for an authorized publish, never otherwise."""
        if not url.startswith(PATH.encode()):
            return 0
        authorization = dict(headers).get(b"authorization", b"").decode("latin-1")
        return self.max_body_bytes if self.authorized(authorization) else 0

    def handle(self, reader: RequestReader, request: Request) -> None:
        """Answers once the broker has stored (or refused) the events; the reader holds any
        request pipelined behind this one until then."""
        self._answers.answer(reader, request, self.publish(request))

    async def publish(self, request: Request) -> Response:
        """202 `{"id", "receivers", "online"}` (a batch: `{"ids", "online"}`, lists
        in the batch's order); 400, 401, 413 or 503."""
        if not self.authorized(request.header(b"authorization") or ""):
            return invalid_api_key()
        try:
            body = json.loads(request.body)
        except (ValueError, RecursionError):
            return error_response(400, "invalid_json", "request body is not JSON")
        is_batch = isinstance(body, list)
        items = body if is_batch else [body]
        if is_batch and not 1 <= len(body) <= MAX_BATCH:
            return error_response(400, "invalid_batch", f"a batch holds 1 to {MAX_BATCH} events")
        events: list[PreparedEvent] = []
        for index, item in enumerate(items):
            try:
                events.append(event_from_mapping(item, max_event_bytes=self._max_event_bytes))
            except InvalidEvent as exc:
                where = f"[{index}]." if is_batch else ""
                if exc.too_large:
                    return error_response(413, "payload_too_large", f"{where}{exc}")
                return json_response(
                    400,
                    {"error": "invalid_field", "message": f"{where}{exc}", "field": exc.field},
                )
        try:
            published = await self._broker.publish_events(events)
        except BrokerUnavailable as exc:
            return unavailable("broker_unavailable", f"not stored: {exc}")
        self._metrics.published += len(published)
        # `receivers` counts gateway processes subscribed to the player's channel, and a
        # process is subscribed only while it holds a stream of the player (docs/api.md has
        # the lag): more than none means a stream somewhere.
        if is_batch:
            return json_response(
                202,
                {
                    "ids": [str(p) for p in published],
                    "online": [p.receivers > 0 for p in published],
                },
            )
        first = published[0]
        return json_response(
            202, {"id": str(first), "receivers": first.receivers, "online": first.receivers > 0}
        )
