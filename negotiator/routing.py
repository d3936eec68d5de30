"""The project's WebSocket routes: every app's patterns, and a refusal for any other path.

An app with WebSockets adds its `websocket_urlpatterns` to `websocket_urlpatterns` below; the
ASGI app (negotiator/asgi.py) serves them through `WebSocketRouter`.
"""

from __future__ import annotations

import logging
from typing import Any

from channels.routing import URLRouter

from llm.routing import websocket_urlpatterns as llm_patterns
from negotiation.routing import websocket_urlpatterns as negotiation_patterns

logger = logging.getLogger("negotiator.websocket")

websocket_urlpatterns = [*llm_patterns, *negotiation_patterns]

# Close code of the refusal; sent before the handshake is accepted, it reaches the client as an
# HTTP 403 (the ASGI rule: daphne, uvicorn).
CLOSE_NO_ROUTE = 4404
_NO_ROUTE = "No route found for path "


class WebSocketRouter(URLRouter):
    """channels' `URLRouter` that refuses a handshake to a path no route matches (HTTP 403 and
    one INFO line) instead of raising, which daphne answers with a 500 and an ERROR traceback.

    Only the router's own "No route found" is caught: a `ValueError` from a routed application
    (raised below the router's frame) propagates as before.
    """

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
            return
        except ValueError as exc:
            if scope.get("type") != "websocket" or not _raised_by_router(exc):
                raise
        client = scope.get("client")
        logger.info(
            "WebSocket handshake refused, no route for %r (client %s)",
            scope.get("path", "")[:200],
            f"{client[0]}:{client[1]}" if client else "unknown",
        )
        message = await receive()  # websocket.connect: no consumer read it
        if message.get("type") == "websocket.connect":
            await send({"type": "websocket.close", "code": CLOSE_NO_ROUTE})


def _raised_by_router(exc: ValueError) -> bool:
    """Whether `exc` is `URLRouter.__call__`'s own "No route found" (the innermost frame of its
    traceback is the router's), not an error of an application it routed to."""
    if not str(exc).startswith(_NO_ROUTE):
        return False
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is not None and tb.tb_frame.f_code is URLRouter.__call__.__code__
