"""Brokers: where published messages come from. One interface, several adapters."""

from sse_gateway.broker.base import Broker, MessageHandler, StateHandler
from sse_gateway.broker.memory import MemoryBroker
from sse_gateway.broker.redis import RedisBroker

__all__ = ["Broker", "MemoryBroker", "MessageHandler", "RedisBroker", "StateHandler"]
