"""Where to connect: the one Redis, or the primary that Sentinel names right now.

With `redis+sentinel://` every connection asks the sentinels before each connect
(`SENTINEL get-master-addr-by-name`, each sentinel in turn, with the sentinel credentials)
and checks `ROLE` once connected, so a sentinel that has not yet seen a failover cannot keep
a connection on a replica. A connection that gets `-READONLY` (its primary was demoted under
it) is dropped, so the next connect asks again. The gateway's own hiredis connections call
`resolve_primary` and `is_primary_role`; redis-py clients get it from `command_pool` and
`sync_client`, which everything built on redis-py here uses.
"""

from __future__ import annotations

from typing import Any

import redis
import redis.asyncio as aioredis
import redis.exceptions
from redis.backoff import NoBackoff
from redis.retry import Retry

from sse_gateway.redis_address import RedisAddress

SENTINEL_TIMEOUT = 2.0
"""Seconds for each sentinel to answer, connect included; then the next one is asked."""


class PrimaryUnknown(ConnectionError):
    """No sentinel named a primary (all down, or none knows the master name), or the node it
    named is not a primary. An OSError, as a refused connect is."""


def client_kwargs(address: RedisAddress) -> dict[str, Any]:
    """redis-py's keyword arguments for a client of `address`'s node (for Sentinel, the first
    sentinel: use `command_pool`/`sync_client` there)."""
    kwargs: dict[str, Any] = {
        "host": address.host,
        "port": address.port,
        "db": address.db,
        "username": address.username,
        "password": address.password,
        "ssl": address.tls,
        "socket_connect_timeout": 5.0,
        "socket_timeout": 5.0,
    }
    if address.tls:  # a plain connection takes no TLS options at all
        kwargs["ssl_ca_certs"] = address.ssl_ca_certs
        kwargs["ssl_certfile"] = address.ssl_certfile
        kwargs["ssl_keyfile"] = address.ssl_keyfile
    kwargs.update(_checked_idle_connections())
    return kwargs


def _checked_idle_connections() -> dict[str, Any]:
    """redis-py 7+ skips the check that a pooled connection was not closed by Redis (a
    restart, Redis' idle `timeout`) while maintenance notifications are "auto", its default,
    though only RESP3 has them: the next command then failed on it, "Connection closed by
    server". Turned off, the pool reconnects before sending anything."""
    try:
        from redis.maint_notifications import MaintNotificationsConfig
    except ImportError:  # redis-py < 7: no such notifications, the check always runs
        return {}
    return {"maint_notifications_config": MaintNotificationsConfig(enabled=False)}


def _sentinel_kwargs(address: RedisAddress, host: str, port: int) -> dict[str, Any]:
    kwargs = client_kwargs(address.with_node(host, port))
    kwargs.update(
        db=0,
        username=address.sentinel_username,
        password=address.sentinel_password,
        socket_connect_timeout=SENTINEL_TIMEOUT,
        socket_timeout=SENTINEL_TIMEOUT,
        retry=Retry(NoBackoff(), 0),
    )
    return kwargs


def _primary(address: RedisAddress, reply: object) -> RedisAddress | None:
    # redis-py answers (host, port) or None; host is bytes without decode_responses.
    if not isinstance(reply, tuple | list) or len(reply) != 2:
        return None
    host, port = reply
    host = host.decode() if isinstance(host, bytes) else str(host)
    return address.with_node(host, int(port))


def _not_found(address: RedisAddress, errors: list[str]) -> PrimaryUnknown:
    name = address.master_name
    return PrimaryUnknown(f"no sentinel named the primary of {name!r}: {'; '.join(errors)}")


async def resolve_primary(address: RedisAddress) -> RedisAddress:
    """The node to connect to: `address` itself unless it is a Sentinel set, else its
    primary as the first sentinel that answers names it (mode "single", the data nodes'
    credentials and TLS). Raises PrimaryUnknown when none does."""
    if address.mode != "sentinel":
        return address
    errors: list[str] = []
    for host, port in address.all_nodes:
        client = aioredis.Redis(**_sentinel_kwargs(address, host, port))
        try:
            reply = await client.sentinel_get_master_addr_by_name(address.master_name)
        except (redis.exceptions.RedisError, OSError) as exc:
            errors.append(f"{host}:{port}: {exc or type(exc).__name__}")
            continue
        finally:
            await client.aclose()
        primary = _primary(address, reply)
        if primary is not None:
            return primary
        errors.append(f"{host}:{port}: unknown master name")
    raise _not_found(address, errors)


def resolve_primary_sync(address: RedisAddress) -> RedisAddress:
    """`resolve_primary` for code that is not async."""
    if address.mode != "sentinel":
        return address
    errors: list[str] = []
    for host, port in address.all_nodes:
        client = redis.Redis(**_sentinel_kwargs(address, host, port))
        try:
            reply = client.sentinel_get_master_addr_by_name(address.master_name)
        except (redis.exceptions.RedisError, OSError) as exc:
            errors.append(f"{host}:{port}: {exc or type(exc).__name__}")
            continue
        finally:
            client.close()
        primary = _primary(address, reply)
        if primary is not None:
            return primary
        errors.append(f"{host}:{port}: unknown master name")
    raise _not_found(address, errors)


def is_primary_role(reply: object) -> bool:
    """Whether a ROLE reply (`[b"master", offset, replicas]` for a primary) is a primary's."""
    return isinstance(reply, list) and bool(reply) and reply[0] in (b"master", "master")


_DEMOTED = "the primary turned replica (READONLY); asking the sentinels again"


class SentinelConnection(aioredis.Connection):
    """A redis-py connection to the primary Sentinel names at each connect."""

    def __init__(self, *, sentinel_address: RedisAddress, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.sentinel_address = sentinel_address

    async def _connect(self) -> None:
        primary = await resolve_primary(self.sentinel_address)
        self.host, self.port = primary.host, primary.port
        await super()._connect()  # type: ignore[no-untyped-call]

    async def on_connect_check_health(self, check_health: bool = True) -> None:
        await super().on_connect_check_health(check_health)
        await self.send_command("ROLE")
        role = await self.read_response()
        if not is_primary_role(role):
            raise redis.exceptions.ConnectionError(
                f"{self.host}:{self.port} is not the primary (ROLE {role!r})"
            )

    async def read_response(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return await super().read_response(*args, **kwargs)
        except redis.exceptions.ReadOnlyError:
            await self.disconnect()
            raise redis.exceptions.ConnectionError(_DEMOTED) from None


class SentinelSSLConnection(SentinelConnection, aioredis.SSLConnection):
    """`SentinelConnection` over TLS."""


class SyncSentinelConnection(redis.Connection):
    """`SentinelConnection` for redis-py's blocking client."""

    def __init__(self, *, sentinel_address: RedisAddress, **kwargs: Any) -> None:
        super().__init__(**kwargs)  # type: ignore[no-untyped-call]
        self.sentinel_address = sentinel_address

    def _connect(self) -> Any:
        primary = resolve_primary_sync(self.sentinel_address)
        self.host, self.port = primary.host, primary.port
        return super()._connect()  # type: ignore[no-untyped-call]

    def on_connect_check_health(self, check_health: bool = True) -> None:
        super().on_connect_check_health(check_health)
        self.send_command("ROLE")  # type: ignore[no-untyped-call]
        role = self.read_response()
        if not is_primary_role(role):
            raise redis.exceptions.ConnectionError(
                f"{self.host}:{self.port} is not the primary (ROLE {role!r})"
            )

    def read_response(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().read_response(*args, **kwargs)
        except redis.exceptions.ReadOnlyError:
            self.disconnect()  # type: ignore[no-untyped-call]
            raise redis.exceptions.ConnectionError(_DEMOTED) from None


class SyncSentinelSSLConnection(SyncSentinelConnection, redis.SSLConnection):
    """`SyncSentinelConnection` over TLS."""


def _pool_kwargs(address: RedisAddress) -> dict[str, Any]:
    kwargs = client_kwargs(address)
    del kwargs["ssl"]  # the connection class says it
    if address.mode == "sentinel":
        kwargs["sentinel_address"] = address
    return kwargs


def command_pool(
    address: RedisAddress,
    retry: Any,
    max_connections: int | None = None,
    timeout: float | None = None,
) -> aioredis.ConnectionPool:
    """redis-py's asyncio pool for `address`: to the one node, or to Sentinel's primary of
    the moment. With `timeout` (seconds), a BlockingConnectionPool of `max_connections`
    whose callers wait that long for a free connection."""
    kwargs = _pool_kwargs(address)
    tls = address.tls
    if address.mode == "sentinel":
        kwargs["connection_class"] = SentinelSSLConnection if tls else SentinelConnection
    else:
        kwargs["connection_class"] = aioredis.SSLConnection if tls else aioredis.Connection
    if timeout is not None:
        return aioredis.BlockingConnectionPool(
            max_connections=max_connections or 50, timeout=timeout, retry=retry, **kwargs
        )
    return aioredis.ConnectionPool(max_connections=max_connections, retry=retry, **kwargs)


def sync_client(address: RedisAddress, retry: Retry) -> redis.Redis:
    """redis-py's blocking client for `address` (one node, or Sentinel's primary)."""
    if address.mode != "sentinel":
        return redis.Redis(**client_kwargs(address), retry=retry)
    kwargs = _pool_kwargs(address)
    kwargs["connection_class"] = (
        SyncSentinelSSLConnection if address.tls else SyncSentinelConnection
    )
    return redis.Redis.from_pool(redis.ConnectionPool(retry=retry, **kwargs))
