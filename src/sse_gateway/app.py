"""Gateway: the composition root. Builds every part from the settings and wires them; no
behaviour of its own beyond start, drain and close.

    broker --on_message--> Fanout --> ConnectionHub --> Channel --> Stream --> socket
    broker --on_state----> OutageRecovery (refill each channel's gap from history)
    broker --on_control--> Presence --> presence queries answered, replies counted
                                 \\-> SessionControl --> streams of the target closed
    broker <-- Presence (PUBSUB NUMSUB, queries and replies on the control channel)
    socket --> RequestReader --> Router --> StreamEndpoint --> StreamLifecycle --> Stream
                                       \\-> PublishEndpoint, DisconnectEndpoint --> broker
                                       \\-> PresenceEndpoint --> Presence, GatewayStats
                                       \\-> TicketEndpoint --> broker
    metrics socket (SSE_METRICS_PORT) --> RequestReader --> MetricsRouter

`docs/architecture.md` walks both paths function by function.
"""

from __future__ import annotations

from sse_gateway.broker.base import Broker
from sse_gateway.broker.cluster import ClusterBroker
from sse_gateway.broker.memory import MemoryBroker
from sse_gateway.broker.redis import RedisBroker
from sse_gateway.edge.admission import Admission, connection_budget
from sse_gateway.edge.auth import TokenVerifier
from sse_gateway.edge.control_api import DisconnectEndpoint
from sse_gateway.edge.cors import CorsPolicy
from sse_gateway.edge.keyring import KeyRing
from sse_gateway.edge.presence_api import PresenceEndpoint
from sse_gateway.edge.protocol import RequestReader
from sse_gateway.edge.publish_api import PublishEndpoint
from sse_gateway.edge.ratelimit import ConnectRateLimit
from sse_gateway.edge.routes import MetricsRouter, Router
from sse_gateway.edge.sse import StreamEndpoint
from sse_gateway.edge.tickets import TicketEndpoint
from sse_gateway.metrics import EventLoopLag, Metrics
from sse_gateway.settings import Settings
from sse_gateway.streams.control import SessionControl
from sse_gateway.streams.fanout import Fanout
from sse_gateway.streams.heartbeat import HeartbeatScheduler
from sse_gateway.streams.history import HistoryReader
from sse_gateway.streams.hub import ConnectionHub
from sse_gateway.streams.lifecycle import StreamLifecycle
from sse_gateway.streams.presence import Presence
from sse_gateway.streams.recovery import OutageRecovery
from sse_gateway.streams.stats import GatewayStats


def broker_from_settings(settings: Settings) -> Broker:
    """RedisBroker for EVENTS_REDIS_STORAGE (ClusterBroker for a redis+cluster:// one), else
    the embedded MemoryBroker."""
    if settings.redis is None:
        return MemoryBroker(history_size=settings.history_size, history_ttl=settings.history_ttl)
    if settings.redis.mode == "cluster":
        return ClusterBroker(
            settings.redis,
            history_size=settings.history_size,
            history_ttl=settings.history_ttl,
            max_event_bytes=settings.max_event_bytes,
        )
    return RedisBroker(
        settings.redis,
        history_size=settings.history_size,
        history_ttl=settings.history_ttl,
        max_event_bytes=settings.max_event_bytes,
    )


class Gateway:
    def __init__(
        self,
        settings: Settings,
        broker: Broker,
        *,
        fd_limit: int,
        connection_limit: int | None = None,
    ) -> None:
        """`connection_limit` overrides SSE_CONNECTION_LIMIT (a worker's share of it); the
        limit in force is lowered to what `fd_limit` (open files) allows."""
        self.settings = settings
        # SIGTERM came: `/readyz` says `draining`, everything else is served as before
        # (SSE_SHUTDOWN_DELAY, until the drain begins).
        self.leaving = False
        self.metrics = metrics = Metrics(settings.metrics_max_brands)
        self.broker = broker
        limit = connection_limit if connection_limit is not None else settings.connection_limit
        budget = connection_budget(limit, fd_limit)
        self.admission = Admission(
            budget.streams,
            metrics,
            reader_budget=budget.readers,
            header_timeout=settings.header_timeout,
        )
        self.hub = ConnectionHub(broker)
        self.heartbeats = HeartbeatScheduler(settings.keepalive_period)
        self.loop_lag = EventLoopLag()
        history = HistoryReader(broker, settings.history_size, metrics, settings.history_ttl)
        self.lifecycle = StreamLifecycle(
            settings,
            hub=self.hub,
            heartbeats=self.heartbeats,
            history=history,
            metrics=metrics,
            release_socket=self.admission.socket_closed,
        )
        self.fanout = Fanout(self.hub, metrics, settings.max_event_bytes)
        self.recovery = OutageRecovery(
            broker=broker,
            hub=self.hub,
            history=history,
            metrics=metrics,
            retry_ms=settings.retry_ms,
            per_channel=isinstance(broker, ClusterBroker),
        )
        self.control = SessionControl(broker=broker, hub=self.hub, retry_ms=settings.retry_ms)
        self.presence = Presence(
            broker=broker,
            hub=self.hub,
            instance=self.lifecycle.instance,
            on_other=self.control.on_control,
        )
        self.stats = GatewayStats(
            hub=self.hub,
            instance=self.lifecycle.instance,
            open_streams=lambda: self.lifecycle.open_streams,
            received=lambda: metrics.messages_received,
            delivered=lambda: metrics.delivered,
        )
        cors = CorsPolicy(settings.cors_origins)
        verifier = TokenVerifier(
            secret=settings.jwt_secret,
            brand_keys=settings.jwt_keys,
            audience=settings.jwt_audience,
            issuer=settings.jwt_issuer,
            max_ttl=settings.jwt_max_ttl,
        )
        self.keys = KeyRing(
            verifier,
            keys_file=settings.jwt_keys_file,
            brand_keys=settings.jwt_keys,
            jwks_refresh=settings.jwks_refresh,
        )
        streams = StreamEndpoint(
            verifier=verifier,
            cors=cors,
            admission=self.admission,
            broker=broker,
            lifecycle=self.lifecycle,
            control=self.control,
            metrics=metrics,
            retry_ms=settings.retry_ms,
            rate_limit=(
                ConnectRateLimit(settings.connect_rate_per_ip, settings.trusted_proxies)
                if settings.connect_rate_per_ip > 0
                else None
            ),
        )
        publish = disconnect = presence = None
        if settings.publish_api_key is not None:
            publish = PublishEndpoint(
                api_key=settings.publish_api_key,
                broker=broker,
                metrics=metrics,
                max_event_bytes=settings.max_event_bytes,
            )
            disconnect = DisconnectEndpoint(authorized=publish.authorized, broker=broker)
            presence = PresenceEndpoint(
                authorized=publish.authorized, presence=self.presence, stats=self.stats
            )
        self.router = Router(
            settings,
            streams=streams,
            tickets=TicketEndpoint(streams=streams, broker=broker, cors=cors, control=self.control),
            publish=publish,
            disconnect=disconnect,
            presence=presence,
            cors=cors,
            metrics=metrics,
            ready_reason=self.ready_reason,
            serve_metrics=settings.metrics_port is None,
        )
        # The metrics listener (SSE_METRICS_PORT) has sockets of its own: a flood of the public
        # port cannot crowd out a scrape. Its refusals are not stream refusals: counted apart.
        self.metrics_router = MetricsRouter(self.router)
        self.metrics_admission = Admission(1, Metrics(), header_timeout=settings.header_timeout)
        self._register_gauges()

    def _register_gauges(self) -> None:
        m = self.metrics
        broker = self.broker
        m.gauge("connection_limit", "The stream limit in force.", lambda: self.connection_limit)
        m.gauge("broker_connected", "1 while the broker is connected.", self._broker_up)
        m.gauge("broker_subscribed_channels", "Channels with local streams.", self._channel_count)
        m.gauge("event_loop_lag_seconds", "How late a periodic timer fired.", self._lag)
        if isinstance(broker, ClusterBroker):
            shards = broker.shard_channels
            m.labelled_gauge(
                "broker_shard_connected",
                "1 while the subscriber connection to this Redis Cluster master is up.",
                "shard",
                lambda: {shard: float(up) for shard, (up, _) in shards().items()},
            )
            m.labelled_gauge(
                "broker_shard_subscribed_channels",
                "Channels subscribed on this Redis Cluster master.",
                "shard",
                lambda: {shard: float(n) for shard, (_, n) in shards().items()},
            )
        m.counter(
            "broker_subscribe_batches_total",
            "SUBSCRIBE commands sent.",
            lambda: broker.subscribe_batches,
        )
        m.counter(
            "broker_unsubscribe_batches_total",
            "UNSUBSCRIBE commands sent.",
            lambda: broker.unsubscribe_batches,
        )
        m.counter(
            "heartbeats_sent_total", "Heartbeat frames written.", lambda: self.heartbeats.sent
        )

    def _lag(self) -> float:
        return self.loop_lag.lag

    def _broker_up(self) -> float:
        return 1.0 if self.broker.connected else 0.0

    def _channel_count(self) -> float:
        return float(self.hub.channel_count)

    @property
    def connection_limit(self) -> int:
        """The stream limit in force in this process."""
        return self.admission.connection_limit

    def protocol_factory(self) -> RequestReader:
        """The protocol of each accepted socket (for `loop.create_server`)."""
        return RequestReader(self.router, self.admission)

    def metrics_protocol_factory(self) -> RequestReader:
        """The protocol of each socket accepted by the metrics listener (SSE_METRICS_PORT)."""
        return RequestReader(self.metrics_router, self.metrics_admission)

    # --- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        if isinstance(self.broker, ClusterBroker):  # a shard's lost channels: refilled alone
            await self.broker.start(
                self.fanout.on_message,
                self._on_broker_state,
                self.presence.on_control,
                on_channels_lost=self.recovery.on_channels_lost,
            )
        else:
            await self.broker.start(
                self.fanout.on_message, self._on_broker_state, self.presence.on_control
            )
        self.heartbeats.start()
        self.loop_lag.start()
        self.stats.start()
        await self.keys.start()

    def _on_broker_state(self, up: bool) -> None:
        self.recovery.on_broker_state(up)
        self.control.on_broker_state(up)

    def ready_reason(self) -> str | None:
        if self.leaving or self.admission.draining:
            return "draining"
        if not self.broker.connected:
            return "broker_disconnected"
        return None

    def announce_shutdown(self) -> None:
        """`/readyz` 503 `draining`, so load balancers stop sending new clients; the listener,
        keep-alive and new streams are unchanged until `begin_drain`."""
        self.leaving = True

    def begin_drain(self) -> None:
        """`/readyz` 503, no keep-alive, new streams refused (503 `draining`)."""
        self.admission.draining = True

    def reload_keys(self) -> bool:
        """SIGHUP: SSE_JWT_KEYS_FILE read anew; open streams stay (see KeyRing.reload)."""
        return self.keys.reload()

    def close_all_streams(self, reason: str = "shutdown") -> None:
        """Closes every stream, each with its own `retry:` so clients do not return at once."""
        self.lifecycle.close_all(reason)

    async def close(self) -> None:
        self.heartbeats.stop()
        self.loop_lag.stop()
        self.stats.stop()
        self.lifecycle.expiry.stop()
        await self.keys.close()
        await self.broker.close()
