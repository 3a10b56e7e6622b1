"""SessionControl: the kill switch on this process, and the block check of new streams.

on_control(payload)     a message of the control channel (every gateway process gets each
                        one): the target's local streams end with `event: disconnected`,
                        close reason `kicked`; a block it brings goes into the table
surely_unblocked(who)   the block check of a new stream, without I/O: True when the table
                        is complete and holds no block of the player or its brand
check_blocked(who, cb)  otherwise: the block keys are read from the broker (the source of
                        truth), the checks of one loop turn in one pipeline
on_broker_state(up)     after each (re)connect, once the control channel is subscribed
                        again: the table is loaded from the broker's index of blocks, then
                        complete, and the local streams of players blocked meanwhile (their
                        disconnect went by unheard) are closed; until then, and after a
                        disconnect, every check asks the broker

The table (block key -> when it ends, on the loop's clock) holds every block in force while it
is complete: the index read at connect, and every disconnect heard since (a disconnect stores
its block, and indexes it, before it publishes). A hit in the table is still checked with the
broker, which answers for a block lifted by hand (`DEL`), so the table may hold too much but,
while complete, never too little.

A check sent to the broker and answered "not blocked" may have been read before a block that
came in while it was in flight: `block_generation` (bumped by each disconnect with a block
heard here) moved, and the caller checks again. A stream opened before a disconnect comes in
is in the hub by then, and is closed with the others.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from functools import partial
from typing import Any

from sse_gateway.broker.base import Broker, BrokerUnavailable
from sse_gateway.streams.hub import ConnectionHub
from sse_gateway.streams.stream import spread_retry
from sse_gateway.wire.control import (
    CONTROL_CHANNEL,
    Disconnect,
    InvalidField,
    block_key,
    block_keys,
    decode_control,
)
from sse_gateway.wire.frames import dump_json, encode_disconnected
from sse_gateway.wire.naming import Identity, split_channel

audit_log = logging.getLogger("sse_gateway.audit")
log = logging.getLogger("sse_gateway")

BlockCallback = Callable[[bool, BaseException | None], None]
"""Called once per check: (blocked, None), or (False, the exception) when it failed."""

# A failed read of the index is tried again this often while the broker is connected.
INDEX_RETRY_SECONDS = 1.0


class SessionControl:
    def __init__(self, *, broker: Broker, hub: ConnectionHub, retry_ms: int) -> None:
        """`retry_ms` is SSE_RETRY_MS: the `retry:` of `event: disconnected`, spread."""
        self._broker = broker
        self._hub = hub
        self._retry_ms = retry_ms
        self.block_generation = 0
        self._table: dict[bytes, float] = {}
        self._complete = False
        # Bumped at each broker state change: an index read of an older connection is void.
        self._connection = 0
        # A callback per stream rather than a future: this is on a stream's way in.
        self._pending_keys: list[tuple[bytes, bytes]] = []
        self._pending_callbacks: list[BlockCallback] = []
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
            key = block_key(disconnect.brand_id, disconnect.player_id)
            ends = asyncio.get_running_loop().time() + disconnect.block_seconds
            self._table[key] = max(ends, self._table.get(key, 0.0))
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
            extra={
                "event": "disconnect_applied",
                "brand": disconnect.brand_id,
                "player": disconnect.player_id,
                "reason": disconnect.reason,
                "closed": closed,
                "block_seconds": disconnect.block_seconds,
            },
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

    # --- block checks ------------------------------------------------------------------------

    def surely_unblocked(self, identity: Identity) -> bool:
        """True when no block can stop a new stream of this player: the table is complete
        and holds none of the player or its brand. False: ask `check_blocked`."""
        if not self._complete:
            return False
        table = self._table
        if not table:
            return True  # nearly always: no block in force anywhere
        brand, own = block_keys(identity.brand_id, identity.player_id)
        now = asyncio.get_running_loop().time()
        return table.get(brand, 0.0) <= now and table.get(own, 0.0) <= now

    def check_blocked(self, identity: Identity, callback: BlockCallback) -> None:
        """Whether the player or its brand is blocked, asked of the broker:
        `callback(blocked, None)`, or `callback(False, exception)` when the broker could not
        tell (BrokerUnavailable). Sent with the other checks of this loop turn; never calls
        back before it returns."""
        self._pending_keys.append(block_keys(identity.brand_id, identity.player_id))
        self._pending_callbacks.append(callback)
        if not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    async def blocked(self, identity: Identity) -> bool:
        """Both checks for a coroutine; raises what the broker's check failed with."""
        if self.surely_unblocked(identity):
            return False
        future: asyncio.Future[bool] = asyncio.get_running_loop().create_future()

        def done(blocked: bool, failure: BaseException | None) -> None:
            if future.done():
                return  # the awaiting task was cancelled (its client left)
            if failure is not None:
                future.set_exception(failure)
            else:
                future.set_result(blocked)

        generation = self.block_generation
        self.check_blocked(identity, done)
        blocked = await future
        if not blocked and self.block_generation == generation:
            self.forget(identity)
        return blocked

    def forget(self, identity: Identity) -> None:
        """The broker said the player is not blocked, with no block heard meanwhile: a block
        in the table was lifted by hand (`DEL`) or ended; the table stops asking about it."""
        if self._table:
            for key in block_keys(identity.brand_id, identity.player_id):
                self._table.pop(key, None)

    def _flush(self) -> None:
        self._scheduled = False
        keys, callbacks = self._pending_keys, self._pending_callbacks
        self._pending_keys, self._pending_callbacks = [], []
        self._spawn(self._check(keys, callbacks))

    async def _check(self, keys: list[tuple[bytes, bytes]], callbacks: list[BlockCallback]) -> None:
        failure: BaseException | None = None
        try:
            results = await self._broker.read_blocks(keys)
        except Exception as exc:
            failure = exc
            results = [False] * len(callbacks)
        for callback, blocked in zip(callbacks, results, strict=True):
            try:
                callback(blocked, failure)
            except Exception:  # one caller's failure must not starve the others
                log.exception("block check: error in a callback")

    # --- the table across broker outages ------------------------------------------------------

    def on_broker_state(self, up: bool) -> None:
        """The broker's state handler (beside `OutageRecovery`'s)."""
        self._connection += 1
        # Down: disconnects are published unheard. Up: not complete before the index is read.
        self._complete = False
        if up:
            # Read once the control channel is subscribed again: a block stored after the
            # read comes in as a message.
            self._broker.when_subscribed(
                CONTROL_CHANNEL, partial(self._load_soon, self._connection)
            )

    def _load_soon(self, connection: int) -> None:
        if connection == self._connection:
            self._spawn(self._load(connection))

    async def _load(self, connection: int) -> None:
        try:
            index = await self._broker.read_block_index()
        except Exception as exc:
            if connection == self._connection:
                log.warning("index of blocks not read (new streams ask redis): %s", exc)
                loop = asyncio.get_running_loop()
                loop.call_later(INDEX_RETRY_SECONDS, self._load_soon, connection)
            return
        if connection != self._connection:
            return  # the connection it was read on is gone: the next one reads again
        now = asyncio.get_running_loop().time()
        table = self._table
        for key in [key for key, ends in table.items() if ends <= now]:
            del table[key]
        for key, left in index:
            table[key] = max(now + left, table.get(key, 0.0))
        self._complete = True
        await self._sweep()

    async def _sweep(self) -> None:
        """Closes the local streams of players blocked in the table (confirmed by the
        broker): their disconnect may have gone by while this process could not hear it."""
        table = self._table
        if not table:
            return
        now = asyncio.get_running_loop().time()
        targets: list[tuple[str, str]] = []
        for channel in self._hub.channels():
            who = split_channel(channel.name)
            if who is not None and any(table.get(key, 0.0) > now for key in block_keys(*who)):
                targets.append(who)
        if not targets:
            return
        try:
            blocked = await self._broker.read_blocks([block_keys(*who) for who in targets])
        except BrokerUnavailable as exc:
            log.warning("blocked streams not closed after the broker reconnected: %s", exc)
            return
        except Exception:  # a background task: nobody else would hear of it
            log.exception("blocked streams not closed after the broker reconnected")
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
                    extra={
                        "event": "disconnect_applied",
                        "brand": brand_id,
                        "player": player_id,
                        "reason": "blocked",
                        "closed": closed,
                    },
                )

    def _spawn(self, coroutine: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
