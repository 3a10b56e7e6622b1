"""Brokers: where published messages come from. One interface, several adapters."""

from .base import Broker, MessageHandler, StateHandler
from .memory import MemoryBroker
from .redis import RedisBroker

__all__ = ["Broker", "MemoryBroker", "MessageHandler", "RedisBroker", "StateHandler"]
