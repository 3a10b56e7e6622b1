"""AsyncAnswers: requests answered by a coroutine (a publish, a ticket, a disconnect).

The reader holds whatever the client pipelines behind such a request (`begin_async`) until
its answer is written (`end_async`); a coroutine that raises is answered 500 and logged.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any

from sse_gateway.edge.protocol import RequestReader
from sse_gateway.wire.http import Request, Response, error_response

log = logging.getLogger("sse_gateway")


class AsyncAnswers:
    """The answers in flight of one endpoint; `what` names it in the log ("publish")."""

    __slots__ = ("_tasks", "_what")

    def __init__(self, what: str) -> None:
        self._what = what
        # Referenced until done: the loop keeps only weak references to tasks.
        self._tasks: set[asyncio.Task[None]] = set()

    def answer(
        self, reader: RequestReader, request: Request, answer: Coroutine[Any, Any, Response]
    ) -> None:
        """Writes what `answer` returns once it is done; keep-alive as the request asks."""
        reader.begin_async()
        task = asyncio.get_running_loop().create_task(self._respond(reader, request, answer))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _respond(
        self, reader: RequestReader, request: Request, answer: Coroutine[Any, Any, Response]
    ) -> None:
        try:
            response = await answer
        except Exception:
            log.exception("%s failed", self._what)
            response = error_response(500, "internal_error", "internal error")
        reader.respond(response, keep_alive=request.keep_alive)
        reader.end_async()
