"""daphne's WebSocket protocol with a bounded send buffer, so a client that stops reading is cut.

daphne writes every frame into the connection's transport at once; a client that stops
reading makes that buffer grow with everything later sent to it (its own stream, the streams
it watches), and the application is never told. This subclass checks the bytes still waiting
in the transport before each frame: past `LLM_MAX_SEND_BUFFER_BYTES` it drops the frame and
closes the connection with code 4008 ("too slow"). Other connections are never slowed: the
transport is non-blocking. The application is told of the disconnect at once, not when the
client (which is not reading) completes the close handshake, so a generation on that socket
stops there, `cancelled`, instead of streaming on into frames that are dropped.
"""

from __future__ import annotations

import logging
from typing import Any

from daphne import ws_protocol
from django.conf import settings

logger = logging.getLogger("negotiator.websocket")

CLOSE_TOO_SLOW = 4008


class BoundedSendWebSocketProtocol(ws_protocol.WebSocketProtocol):
    too_slow = False

    def pending_bytes(self) -> int:
        """Bytes given to the TCP transport and not yet sent (0 where it cannot be told, as on TLS)."""
        transport = self.transport
        return len(getattr(transport, "dataBuffer", b"")) - getattr(transport, "offset", 0) + getattr(
            transport, "_tempDataLen", 0
        )

    def serverSend(self, content: Any, binary: bool = False) -> None:
        if self.too_slow:
            return
        limit = settings.LLM_MAX_SEND_BUFFER_BYTES
        waiting = self.pending_bytes()
        if limit and waiting > limit:
            self.too_slow = True
            logger.warning("closing WebSocket %s: %d bytes wait for a client that reads too slowly",
                           self.client_addr, waiting)
            self.sendClose(code=CLOSE_TOO_SLOW, reason=f"too slow: over {limit} bytes unread")
            if hasattr(self, "application_queue"):
                self.application_queue.put_nowait({"type": "websocket.disconnect", "code": CLOSE_TOO_SLOW})
                self.muted = True  # daphne then sends no second disconnect when the socket closes
            return
        super().serverSend(content, binary)


def install() -> None:
    """Make daphne build this protocol for every WebSocket (call before the server starts)."""
    ws_protocol.WebSocketFactory.protocol = BoundedSendWebSocketProtocol
