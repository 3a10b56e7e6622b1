"""CORS for browser pages on other origins (SSE_CORS_ORIGINS): origin checks and preflights."""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

from sse_gateway.edge.auth import AuthError
from sse_gateway.wire.http import Request, Response, error_response


class OriginCheck(NamedTuple):
    """The answer to a request's Origin: CORS headers to add, or why it is refused (403)."""

    headers: Sequence[tuple[str, str]]
    refusal: AuthError | None


# Most stream requests (apps, same-origin pages) send no Origin: one shared answer, no copy.
_NO_CORS = OriginCheck((), None)


class CorsPolicy:
    def __init__(self, allowed_origins: frozenset[str]) -> None:
        """`allowed_origins`: exact `scheme://host[:port]` values, no trailing slash."""
        self._allowed = allowed_origins

    def check(self, request: Request) -> OriginCheck:
        """CORS headers for an allowed browser origin, or the 403 for one that is not.

        No Origin (not a browser's cross-origin request) and the gateway's own pages (the
        demo: same origin as Host) need neither.
        """
        origin = request.header(b"origin")
        if origin is None:
            return _NO_CORS
        if origin.rstrip("/") in self._allowed:
            return OriginCheck(
                [
                    ("Access-Control-Allow-Origin", origin),
                    ("Access-Control-Allow-Credentials", "true"),
                    # What a fetch-based client needs to read on a refusal.
                    ("Access-Control-Expose-Headers", "WWW-Authenticate, Retry-After"),
                    ("Vary", "Origin"),
                ],
                None,
            )
        host = request.header(b"host")
        if host is not None and origin in (f"http://{host}", f"https://{host}"):
            return _NO_CORS
        return OriginCheck(
            [],
            AuthError(
                403, "origin_not_allowed", f"origin {origin} is not allowed (SSE_CORS_ORIGINS)"
            ),
        )

    def preflight(
        self,
        request: Request,
        methods: str = "GET",
        allow_headers: str = "Authorization, Last-Event-ID, X-Brand-ID, Cache-Control",
    ) -> Response:
        """The answer to `OPTIONS /v1/sse` (or, with its methods and request headers, to the
        preflight of another path)."""
        headers, refusal = self.check(request)
        if refusal is not None:
            return error_response(refusal.status, refusal.code, refusal.message)
        if not headers:
            return error_response(400, "bad_request", "a CORS preflight needs an Origin header")
        headers = [
            *headers,
            ("Access-Control-Allow-Methods", methods),
            ("Access-Control-Allow-Headers", allow_headers),
            ("Access-Control-Max-Age", "600"),
        ]
        return Response(204, b"", headers=headers)
