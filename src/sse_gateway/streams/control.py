"""SessionControl: the kill switch on this process, and the block check of new streams.

on_control(payload)   a message of the control channel (every gateway process gets each one):
                      the target's local streams end with `event: disconnected`, close
                      reason `kicked`
blocked(identity)     whether a block stops a new stream of this player: the block keys
                      are read from the broker (the source of truth, shared by every
                      instance), the checks of one loop turn in one pipeline
block_generation      bumped by each disconnect with a block applied here
on_broker_state(up)   after a (re)connect, once the control channel is subscribed again:
                      the blocks stored while this process could not hear it close the
                      streams they cover (a disconnect without block is lost to it)

A stream request whose check was answered "not blocked" and that opens only after a
disconnect with a block came in here may have been checked before that block was stored:
the caller compares `block_generation` before and after and checks again when it moved. A
request opened before the disconnect came in is a stream by then, and is closed with the
others. (`POST /v1/disconnect` stores the block before it publishes the message, atomically.)
"""

from __future__ import annotations

import asyncio
import logging

from sse_gateway.broker.base import Broker, BrokerUnavailable
from sse_gateway.metrics import Metrics
from sse_gateway.streams.hub import ConnectionHub
from sse_gateway.streams.stream import spread_retry
from sse_gateway.wire.control import (
    CONTROL_CHANNEL,
    Disconnect,
    InvalidField,
    block_keys,
    decode_control,
)
from sse_gateway.wire.frames import dump_json, encode_disconnected
from sse_gateway.wire.naming import Identity, split_channel

audit_log = logging.getLogger("sse_gateway.audit")
log = logging.getLogger("sse_gateway")

_Check = tuple[tuple[bytes, bytes], "asyncio.Future[bool]"]


class SessionControl:
    def __init__(
        self, *, broker: Broker, hub: ConnectionHub, metrics: Metrics, retry_ms: int
    ) -> None:
        """`retry_ms` is SSE_RETRY_MS: the `retry:` of `event: disconnected`, spread."""
        self._broker = broker
        self._hub = hub
        self._metrics = metrics
        self._retry_ms = retry_ms
        self.block_generation = 0
        self._pending: list[_Check] = []
        self._scheduled = False
        self._tasks: set[asyncio.Task[None]] = set()

    # --- the control channel -----------------------------------------------------------------

    def on_control(self, payload: bytes) -> None:
        """The broker's control handler. A message this gateway cannot read is dropped."""
        try:
            disconnect = decode_control(payload)
        except InvalidField as exc:
            log.warning("control message dropped: %s", exc)
            return
        self.disconnect(disconnect)

    def disconnect(self, disconnect: Disconnect) -> int:
        """Closes the target's streams of this process, each with `event: disconnected` as
        its last frame; returns how many."""
        if disconnect.block_seconds > 0:
            self.block_generation += 1
        payload: dict[str, object] = {
            "reason": disconnect.reason,
            "blocked": disconnect.block_seconds > 0,
        }
        if disconnect.block_seconds > 0:
            payload["block_seconds"] = disconnect.block_seconds
        closed = self._close(disconnect.brand_id, disconnect.player_id, payload)
        audit_log.info(
            "disconnect applied: target=%s closed=%d block_seconds=%d",
            disconnect.target,
            closed,
            disconnect.block_seconds,
        )
        return closed

    def _close(self, brand_id: str, player_id: str | None, payload: dict[str, object]) -> int:
        data = dump_json(payload).encode("utf-8")
        streams = self._hub.streams_of(brand_id, player_id)
        for stream in streams:
            # A `retry:` of its own per stream: a brand's clients, closed together, must not
            # come back together (a blocked one is refused 403 `blocked` and stops).
            stream.close("kicked", final=encode_disconnected(data, spread_retry(self._retry_ms)))
        return len(streams)

    # --- after a broker outage ---------------------------------------------------------------

    def on_broker_state(self, up: bool) -> None:
        """The broker's state handler (beside `OutageRecovery`'s)."""
        if up:
            # Read once the control channel is subscribed again: a block stored after the
            # read comes in as a message.
            self._broker.when_subscribed(CONTROL_CHANNEL, self._sweep_soon)

    def _sweep_soon(self) -> None:
        task = asyncio.get_running_loop().create_task(self._sweep())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _sweep(self) -> None:
        players = [split_channel(channel.name) for channel in self._hub.channels()]
        targets = [player for player in players if player is not None]
        if not targets:
            return
        try:
            blocked = await self._broker.read_blocks([block_keys(*who) for who in targets])
        except BrokerUnavailable as exc:
            log.warning("blocks not checked after the broker reconnected: %s", exc)
            return
        for (brand_id, player_id), is_blocked in zip(targets, blocked, strict=True):
            if is_blocked:
                # The disconnect's own reason went by while this process could not hear it.
                closed = self._close(brand_id, player_id, {"reason": "blocked", "blocked": True})
                audit_log.info(
                    "disconnect applied after a broker outage: target=%s/%s closed=%d",
                    brand_id,
                    player_id,
                    closed,
                )

    # --- block checks ------------------------------------------------------------------------

    def blocked(self, identity: Identity) -> asyncio.Future[bool]:
        """Whether the player or its brand is blocked; the future fails with the broker's
        exception (BrokerUnavailable) when the check does. Sent with the other checks of this
        loop turn."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[bool] = loop.create_future()
        self._pending.append((block_keys(identity.brand_id, identity.player_id), future))
        if not self._scheduled:
            self._scheduled = True
            loop.call_soon(self._flush)
        return future

    def _flush(self) -> None:
        self._scheduled = False
        pending, self._pending = self._pending, []
        task = asyncio.get_running_loop().create_task(self._check(pending))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _check(self, pending: list[_Check]) -> None:
        try:
            results = await self._broker.read_blocks([keys for keys, _ in pending])
        except Exception as exc:
            for _, future in pending:
                if not future.done():
                    future.set_exception(exc)
            return
        for (_, future), blocked in zip(pending, results, strict=True):
            if not future.done():
                future.set_result(blocked)
