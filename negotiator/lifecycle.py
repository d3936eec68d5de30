"""Start-up and shutdown of the ASGI app, under any server: the ASGI lifespan where there is one
(uvicorn), daphne's reactor events where there is not.

At start-up, sessions a dead process left `streaming` and negotiations it left `running` become
`interrupted` (before any request is served); at shutdown, negotiations under way end
`interrupted` (resumable), generations under way end `cancelled` with their text so far (not
`interrupted` at the next start), then the providers' pooled HTTP clients are closed.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from typing import Any

from channels.db import database_sync_to_async
from django.db import DatabaseError

from llm.generation import stop_all
from llm.providers import providers
from llm.sessions import recover_interrupted
from negotiation.runner import stop_all as stop_negotiations
from negotiation.store import recover_interrupted as recover_interrupted_negotiations

logger = logging.getLogger("negotiator.lifecycle")

# How long a stopping server waits for generations under way to store their end.
SHUTDOWN_TIMEOUT = 5.0


class StartUp:
    """Wraps the app: every request waits for the start-up work, which runs once (started by the
    server's start where it says so, else by the first request); the lifespan is answered here."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self._work: asyncio.Future[None] | None = None

    def start(self) -> asyncio.Future[None]:
        """Begin the start-up work, once; later calls return the same future."""
        if self._work is None:
            self._work = asyncio.ensure_future(database_sync_to_async(_recover)())
        return self._work

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        work = self.start()
        if not work.done() and work.get_loop() is asyncio.get_running_loop():
            await asyncio.shield(work)  # concurrent first requests all wait for it
        if scope["type"] != "lifespan":
            await self.app(scope, receive, send)
            return
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await shutdown()
                await send({"type": "lifespan.shutdown.complete"})
                return


async def shutdown() -> None:
    """End the negotiations under way (stored `interrupted`: resumable), then the generations
    (stored `cancelled`), then close the providers' clients."""
    negotiations = await stop_negotiations(timeout=SHUTDOWN_TIMEOUT)
    stopped = await stop_all(timeout=SHUTDOWN_TIMEOUT)
    await providers.aclose()
    logger.info(
        "stopped %d negotiation(s) and %d generation(s); closed the providers' HTTP clients",
        negotiations,
        stopped,
    )


def _recover() -> None:
    for what, recover in (
        ("sessions", recover_interrupted),
        ("negotiations", recover_interrupted_negotiations),
    ):
        try:
            recover()
        except DatabaseError as exc:  # not migrated yet: nothing to recover
            logger.warning("could not check for interrupted %s: %s", what, exc)


def attach_to_daphne(app: StartUp) -> None:
    """Under daphne (its reactor is running this process), run the start-up work as the server
    starts and `shutdown()` before it stops; daphne speaks no ASGI lifespan."""
    reactor = sys.modules.get("twisted.internet.reactor")
    if reactor is None or "daphne.server" not in sys.modules:
        return  # imported by something else (tests, uvicorn, a shell): nothing to attach to
    from twisted.internet.defer import Deferred

    # Once its event loop runs (`callWhenRunning` alone fires just before it does).
    reactor.callWhenRunning(lambda: reactor.callLater(0, app.start))
    reactor.addSystemEventTrigger(
        "before", "shutdown", lambda: Deferred.fromFuture(asyncio.ensure_future(shutdown()))
    )
