"""Router: the request handler of every request reader; one branch per path.

/v1/sse        GET: a stream (edge.sse); OPTIONS: the CORS preflight
/v1/tickets    POST: a connect ticket for a token (edge.tickets); OPTIONS: the CORS preflight
/v1/publish    POST, when SSE_PUBLISH_API_KEY is set (edge.publish_api)
/v1/disconnect POST, when SSE_PUBLISH_API_KEY is set (edge.control_api)
/v1/players/{brand}/{player}, /v1/stats
               GET, when SSE_PUBLISH_API_KEY is set (edge.presence_api)
/healthz      200 while the process serves
/readyz       200, or 503 with the reason (draining, broker_disconnected; under --workers
              for the whole instance, with the worker's pid)
/metrics      Prometheus text format or OpenMetrics (docs/metrics.md; on the metrics listener
              instead when SSE_METRICS_PORT is set)
/, /demo      the demo page, in dev mode only

MetricsRouter: the handler of the metrics listener (SSE_METRICS_PORT): /metrics, /healthz and
/readyz, nothing else.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from importlib import resources
from typing import Any

from sse_gateway.edge.auth import make_token
from sse_gateway.edge.control_api import PATH as DISCONNECT_PATH
from sse_gateway.edge.control_api import DisconnectEndpoint
from sse_gateway.edge.cors import CorsPolicy
from sse_gateway.edge.presence_api import PLAYERS_PREFIX, STATS_PATH, PresenceEndpoint
from sse_gateway.edge.protocol import RequestReader
from sse_gateway.edge.publish_api import PATH as PUBLISH_PATH
from sse_gateway.edge.publish_api import PublishEndpoint
from sse_gateway.edge.sse import StreamEndpoint
from sse_gateway.edge.tickets import PATH as TICKETS_PATH
from sse_gateway.edge.tickets import TicketEndpoint
from sse_gateway.metrics import Exposition, Metrics
from sse_gateway.settings import Settings
from sse_gateway.wire.http import Request, Response, error_response, json_response

log = logging.getLogger("sse_gateway")

_PLAIN_PATHS = {"/healthz", "/readyz", "/metrics"}
_DISCONNECT = DISCONNECT_PATH.encode()
_DEV_PATHS = {"/", "/demo"}


class Router:
    def __init__(
        self,
        settings: Settings,
        *,
        streams: StreamEndpoint,
        tickets: TicketEndpoint,
        publish: PublishEndpoint | None,
        disconnect: DisconnectEndpoint | None = None,
        presence: PresenceEndpoint | None = None,
        cors: CorsPolicy,
        metrics: Metrics,
        ready_reason: Callable[[], str | None],
        serve_metrics: bool = True,
    ) -> None:
        """`publish`, `disconnect` and `presence` are None when the publish API key is not set;
        `ready_reason()` says why the process is not ready (`/readyz`), or None;
        `serve_metrics` False: `/metrics` is 404 here (a metrics listener of its own serves it)."""
        self._plain_paths = _PLAIN_PATHS if serve_metrics else _PLAIN_PATHS - {"/metrics"}
        self._settings = settings
        self._streams = streams
        self._tickets = tickets
        self._publish = publish
        self._disconnect = disconnect
        self._presence = presence
        self._cors = cors
        self._metrics = metrics
        self.exposition = Exposition(metrics)
        self._render: Callable[[str | None], tuple[bytes, str]] = self.exposition.render
        self._ready_reason = ready_reason
        self._readiness: Callable[[], dict[str, Any] | None] | None = None
        self._demo_page: bytes | None = None

    def show_instance(
        self,
        render: Callable[[str | None], tuple[bytes, str]],
        readiness: Callable[[], dict[str, Any] | None],
    ) -> None:
        """Under `--workers`: `/metrics` is `render(accept)` and `/readyz` 503 carries
        `readiness()` (`{"reason", "worker"}`, None when ready), both for the whole instance
        (sse_gateway.instance) instead of this process."""
        self._render = render
        self._readiness = readiness

    def body_limit(self, url: bytes, headers: list[tuple[bytes, bytes]]) -> int:
        if self._disconnect is not None and url.split(b"?", 1)[0] == _DISCONNECT:
            return self._disconnect.body_limit(headers)
        return 0 if self._publish is None else self._publish.body_limit(url, headers)

    def handle(self, reader: RequestReader, request: Request) -> None:
        """Answers one request; a 500 for anything a branch raises (the socket closes)."""
        path = request.path
        method = request.method
        # RFC 9110 §9.3.2: never content in an answer to HEAD, whatever the status.
        head_only = method == "HEAD"
        try:
            if path == "/v1/sse":
                if method == "GET":
                    self._streams.open(reader, request)
                elif method == "OPTIONS":
                    reader.respond(self._cors.preflight(request), keep_alive=request.keep_alive)
                else:
                    self._metrics.rejected["method_not_allowed"] += 1
                    self._error(
                        reader, request, _method_not_allowed("GET, OPTIONS"), keep_alive=False
                    )
                return
            if path == TICKETS_PATH:
                if method == "POST":
                    self._tickets.handle(reader, request)
                elif method == "OPTIONS":
                    reader.respond(self._tickets.preflight(request), keep_alive=request.keep_alive)
                else:
                    self._error(
                        reader, request, _method_not_allowed("POST, OPTIONS"), keep_alive=False
                    )
                return
            if path == DISCONNECT_PATH and self._disconnect is not None:
                if method != "POST":
                    self._error(reader, request, _method_not_allowed("POST"))
                    return
                self._disconnect.handle(reader, request)
                return
            if self._presence is not None and (
                path == STATS_PATH or path.startswith(PLAYERS_PREFIX)
            ):
                if method != "GET":
                    self._error(reader, request, _method_not_allowed("GET"))
                elif path == STATS_PATH:
                    reader.respond(self._presence.stats(request), keep_alive=request.keep_alive)
                else:
                    self._presence.handle_player(reader, request)
                return
            if path == PUBLISH_PATH and self._publish is not None:
                if method != "POST":
                    self._error(reader, request, _method_not_allowed("POST"))
                    return
                self._publish.handle(reader, request)
                return
            if path in self._plain_paths or (path in _DEV_PATHS and self._settings.dev):
                if method not in ("GET", "HEAD"):
                    self._error(reader, request, _method_not_allowed("GET, HEAD"))
                    return
                response = self.plain(path, request.header(b"accept"))
                reader.respond(response, keep_alive=request.keep_alive, head_only=head_only)
                return
            not_found = error_response(404, "not_found", f"no route for {path}")
            self._error(reader, request, not_found, keep_alive=request.keep_alive)
        except Exception:
            log.exception("error handling %s %s", method, path)
            internal = error_response(500, "internal_error", "internal error")
            self._error(reader, request, internal)

    def _error(
        self,
        reader: RequestReader,
        request: Request,
        response: Response,
        *,
        keep_alive: bool = False,
    ) -> None:
        """A 404, 405 or 500, with the CORS headers for an allowed origin: a page must be
        able to read why (item 14 of issue 10: every answer to an allowed origin)."""
        cors = self._cors.check(request).headers
        if cors:
            response = dataclasses.replace(response, headers=[*response.headers, *cors])
        reader.respond(response, keep_alive=keep_alive, head_only=request.method == "HEAD")

    def plain(self, path: str, accept: str | None = None) -> Response:
        """`accept`: the request's Accept header (`/metrics` answers OpenMetrics when asked)."""
        if path == "/healthz":
            return json_response(200, {"status": "ok"})
        if path == "/readyz":
            if self._readiness is not None:
                problem = self._readiness()
            else:
                reason = self._ready_reason()
                problem = None if reason is None else {"reason": reason}
            if problem is None:
                return json_response(200, {"status": "ready"})
            return json_response(503, {"status": "not_ready", **problem})
        if path == "/metrics":
            body, content_type = self._render(accept)
            return Response(200, body, content_type=content_type)
        return Response(200, self.demo_page(), content_type="text/html; charset=utf-8")

    def demo_page(self) -> bytes:
        if self._demo_page is None:
            page = resources.files("sse_gateway").joinpath("static/demo.html").read_text()
            # Dev mode only: the page comes pre-filled with a sample token and the publish key.
            secret = self._settings.jwt_secret
            token = make_token(secret, "demo", "player-1", ttl=24 * 3600) if secret else ""
            page = page.replace("__TOKEN__", token)
            page = page.replace("__PUBLISH_KEY__", self._settings.publish_api_key or "")
            self._demo_page = page.encode("utf-8")
        return self._demo_page


class MetricsRouter:
    """The request handler of the metrics listener: `/metrics`, `/healthz` and `/readyz`
    (GET, HEAD), answered as the public router answers them; 404 for any other path."""

    def __init__(self, router: Router) -> None:
        self._router = router

    def body_limit(self, url: bytes, headers: list[tuple[bytes, bytes]]) -> int:
        return 0  # no body is kept: every body is read and dropped

    def handle(self, reader: RequestReader, request: Request) -> None:
        path = request.path
        head_only = request.method == "HEAD"
        if path not in _PLAIN_PATHS:
            response = error_response(404, "not_found", f"no route for {path}")
        elif request.method not in ("GET", "HEAD"):
            reader.respond(_method_not_allowed("GET, HEAD"), keep_alive=False)
            return
        else:
            try:
                response = self._router.plain(path, request.header(b"accept"))
            except Exception:  # a gauge that fails to read must not take the socket down
                log.exception("error handling %s %s", request.method, path)
                response = error_response(500, "internal_error", "internal error")
        reader.respond(response, keep_alive=request.keep_alive, head_only=head_only)


def _method_not_allowed(allow: str) -> Response:
    return error_response(
        405, "method_not_allowed", f"method not allowed; use {allow}", [("Allow", allow)]
    )
