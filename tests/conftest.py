"""Fixtures: real redis-server processes and gateway processes on 127.0.0.1."""

from __future__ import annotations

import itertools
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis

sys.path.insert(0, str(Path(__file__).resolve().parent))

from support.procs import DEFAULT_SECRET, Gateway, GatewayFactory, RedisServer

from sse_gateway.publish import SyncPublisher


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One redis-server for the tests that do not break it; use unique channel names."""
    server = RedisServer(tmp_path_factory.mktemp("redis-session")).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def fresh_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server of this test alone (it may be killed and restarted)."""
    server = RedisServer(tmp_path / "redis").start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def r(redis_server: RedisServer) -> Iterator[redis.Redis]:
    """A redis-py client of the session's redis-server."""
    client = redis_server.client()
    try:
        yield client
    finally:
        client.close()


@pytest.fixture
def publisher(redis_server: RedisServer) -> Iterator[SyncPublisher]:
    """The sync publishing library on the session's redis-server (default history)."""
    pub = SyncPublisher.from_url(redis_server.url)
    try:
        yield pub
    finally:
        pub.close()


@pytest.fixture
def gateway_factory(tmp_path: Path) -> Iterator[GatewayFactory]:
    """Starts gateways with any flags/env; every one is stopped after the test."""
    started: list[Gateway] = []
    counter = itertools.count()

    def factory(
        *flags: str,
        redis: RedisServer | str | None = None,
        env: dict[str, str] | None = None,
        jwt_secret: str | None = DEFAULT_SECRET,
        start: bool = True,
        ready: bool = True,
    ) -> Gateway:
        all_flags = list(flags)
        if redis is not None:
            all_flags += ["--redis", redis.url if isinstance(redis, RedisServer) else redis]
        gateway = Gateway(
            all_flags,
            env=env,
            workdir=tmp_path / f"gateway-{next(counter)}",
            jwt_secret=jwt_secret,
        )
        started.append(gateway)
        if start:
            gateway.start(ready=ready)
        return gateway

    try:
        yield factory
    finally:
        for gateway in started:
            gateway.stop()


@pytest.fixture
def gateway(gateway_factory: GatewayFactory, redis_server: RedisServer) -> Gateway:
    """A Redis-backed gateway with default settings and a short keep-alive."""
    return gateway_factory("--keepalive-period", "1s", redis=redis_server)


@pytest.fixture
def ids() -> Callable[..., str]:
    """Unique brand/player ids per test so tests sharing one Redis never see each other."""

    def make(prefix: str = "x") -> str:
        return f"{prefix}-{uuid.uuid4().hex[:10]}"

    return make
