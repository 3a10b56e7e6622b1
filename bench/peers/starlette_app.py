"""The usual Python pattern, as a peer for bench/compare.py: sse-starlette under uvicorn, one
Redis Pub/Sub connection per client.

`GET /v1/sse` with `Authorization: Bearer <HS256 JWT>` (claims `brand_id`, `sub`, `exp`, the
same tokens sse-gateway takes) subscribes its own redis-py Pub/Sub to `SSE::<brand>::<player>`,
writes `event: connected` once subscribed, then one SSE event per published envelope
`{"type": ..., "data": ..., "id": ...}`, and `event: heartbeat` every BENCH_PING seconds. There
is no history: a client that was away misses what was published meanwhile (`Last-Event-ID` is
ignored).

    BENCH_REDIS_URL=redis://127.0.0.1:6379 BENCH_JWT_SECRET=... BENCH_PING=15 \\
        uvicorn starlette_app:app --app-dir bench/peers --port 8090
"""

from __future__ import annotations

import json
import os
import signal
from collections.abc import AsyncIterator
from types import FrameType
from typing import Any

import jwt
import redis.asyncio as aioredis
from sse_starlette.sse import EventSourceResponse, ServerSentEvent
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

REDIS_URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379")
JWT_SECRET = os.environ.get("BENCH_JWT_SECRET", "")
PING_SECONDS = float(os.environ.get("BENCH_PING", "15"))
FAST_PING_SECONDS = float(os.environ.get("BENCH_PING_FAST", "1"))

# One Pub/Sub connection per stream: the pool must allow as many (redis-py's default is 100).
redis_client = aioredis.Redis.from_url(REDIS_URL, max_connections=1_000_000)


class _Ping:
    """The keep-alive period of every stream of this process, read before each ping.

    A benchmark control, not part of the pattern: SIGUSR1 switches every open stream to
    BENCH_PING_FAST, SIGUSR2 back to BENCH_PING (each stream picks it up after its current
    sleep), so bench/compare.py measures the heartbeat cost of 1 s pings at N connections
    without connecting N clients a second time."""

    seconds = PING_SECONDS


def _switch_ping(signum: int, frame: FrameType | None) -> None:
    _Ping.seconds = FAST_PING_SECONDS if signum == signal.SIGUSR1 else PING_SECONDS


signal.signal(signal.SIGUSR1, _switch_ping)
signal.signal(signal.SIGUSR2, _switch_ping)


class SwitchablePingResponse(EventSourceResponse):
    """EventSourceResponse whose ping loop reads the period from `_Ping` (sse-starlette's
    `_ping` reads `self._ping_interval` before each sleep)."""

    @property  # type: ignore[override]
    def _ping_interval(self) -> float:
        return _Ping.seconds

    @_ping_interval.setter
    def _ping_interval(self, value: Any) -> None:
        pass


def _heartbeat() -> ServerSentEvent:
    return ServerSentEvent(data="{}", event="heartbeat", sep="\n")


async def stream(request: Request) -> Response:
    auth = request.headers.get("authorization", "")
    if not auth.startswith("Bearer "):
        return JSONResponse({"error": "missing_token"}, status_code=401)
    try:
        claims = jwt.decode(
            auth[7:], JWT_SECRET, algorithms=["HS256"], options={"require": ["exp", "sub"]}
        )
        channel = f"SSE::{claims['brand_id']}::{claims['sub']}"
    except (jwt.PyJWTError, KeyError):
        return JSONResponse({"error": "invalid_token"}, status_code=401)
    pubsub = redis_client.pubsub(ignore_subscribe_messages=True)
    try:
        await pubsub.subscribe(channel)
    except Exception:
        await pubsub.aclose()
        return JSONResponse({"error": "broker_unavailable"}, status_code=503)

    async def events() -> AsyncIterator[ServerSentEvent]:
        try:
            yield ServerSentEvent(data="{}", event="connected", sep="\n")
            async for message in pubsub.listen():
                if message is None or message.get("type") != "message":
                    continue
                envelope = json.loads(message["data"])
                yield ServerSentEvent(
                    data=json.dumps(envelope.get("data"), separators=(",", ":")),
                    event=envelope.get("type", "message"),
                    id=envelope.get("id"),
                    sep="\n",
                )
        finally:
            await pubsub.aclose()

    return SwitchablePingResponse(
        events(), ping=PING_SECONDS, sep="\n", ping_message_factory=_heartbeat
    )


async def healthz(request: Request) -> Response:
    return PlainTextResponse("ok\n")


app = Starlette(routes=[Route("/v1/sse", stream), Route("/healthz", healthz)])
