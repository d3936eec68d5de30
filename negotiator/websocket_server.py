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
        return (
            len(getattr(transport, "dataBuffer", b""))
            - getattr(transport, "offset", 0)
            + getattr(transport, "_tempDataLen", 0)
        )

    def serverSend(self, content: Any, binary: bool = False) -> None:
        if self.too_slow:
            return
        limit = settings.LLM_MAX_SEND_BUFFER_BYTES
        waiting = self.pending_bytes()
        if limit and waiting > limit:
            self.too_slow = True
            logger.warning(
                "closing WebSocket %s: %d bytes wait for a client that reads too slowly",
                self.client_addr,
                waiting,
            )
            self.sendClose(code=CLOSE_TOO_SLOW, reason=f"too slow: over {limit} bytes unread")
            if hasattr(self, "application_queue"):
                self.application_queue.put_nowait(
                    {"type": "websocket.disconnect", "code": CLOSE_TOO_SLOW}
                )
                self.muted = True  # daphne then sends no second disconnect when the socket closes
            return
        super().serverSend(content, binary)

    def sendData(self, data: bytes, sync: bool = False, chopsize: int | None = None) -> None:
        """autobahn's, for the one case the relay uses (a whole frame, nothing queued), without
        what it adds per frame: a debug message built (colours included) whether or not it is
        logged, and a write registered with the event loop for its next turn (two epoll calls)
        when the socket can take the bytes now. Measured: a fifth of the relay's CPU per token."""
        if sync or chopsize or self.send_queue:
            super().sendData(data, sync, chopsize)
            return
        self._write_now(data)
        if self.state == self.STATE_OPEN:
            self.trafficStats.outgoingOctetsWireLevel += len(data)
        elif self.state in (self.STATE_CONNECTING, self.STATE_PROXY_CONNECTING):
            self.trafficStats.preopenOutgoingOctetsWireLevel += len(data)
        if self.logOctets:
            self.logTxOctets(data, False)

    def _write_now(self, data: bytes) -> None:
        """Into the socket at once when nothing waits before it (what the kernel does not take
        goes to the transport's buffer, in order); else, or on TLS, through the transport."""
        transport = self.transport
        sock = getattr(transport, "socket", None)
        if (
            sock is None
            or getattr(transport, "TLS", True)
            or not getattr(transport, "connected", False)
            or getattr(transport, "disconnecting", True)
            or self.pending_bytes()
        ):
            transport.write(data)
            return
        try:
            sent = sock.send(data)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:  # the connection broke: the transport's own write finds it out and closes
            sent = 0
        if sent < len(data):
            transport.write(data[sent:])


def install() -> None:
    """Make daphne build this protocol for every WebSocket (call before the server starts)."""
    ws_protocol.WebSocketFactory.protocol = BoundedSendWebSocketProtocol
