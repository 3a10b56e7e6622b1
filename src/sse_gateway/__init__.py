"""sse-gateway: Server-Sent Events streams for players, fed by Redis Pub/Sub."""

__version__ = "0.1.0"
