"""daphne's WebSocket protocol with a bounded send buffer, so a client that stops reading is cut.

daphne writes every frame into the connection's transport at once; a client that stops
reading makes that buffer grow with everything later sent to it (its own stream, the streams
it watches), and the application is never told. This subclass checks the bytes still waiting
in the transport before each frame: past `LLM_MAX_SEND_BUFFER_BYTES` it drops the frame and
closes the connection with code 4008 ("too slow"). Other connections are never slowed: the
transport is non-blocking. The application is told of the disconnect at once, not when the
client (which is not reading) completes the close handshake, so a generation on that socket
stops there, `cancelled`, instead of streaming on into frames that are dropped.

It also sets what a client may send. daphne caps messages at 1 MiB and autobahn fails a
connection by dropping the TCP, so a frame just over `LLM_MAX_REQUEST_BYTES` (also 1 MiB by
default) never reached the consumer's `MESSAGE_TOO_LARGE` and the client saw a reset. Here the
transport cap is `transport_cap(LLM_MAX_REQUEST_BYTES)`, well above that limit: a frame up to
the cap reaches the consumer, which answers `MESSAGE_TOO_LARGE` and keeps the socket; past the
cap, and on any protocol violation, the connection is closed with RFC 6455's code and a reason
(1009 too big, 1007 invalid UTF-8 in a text frame, 1002 a protocol error such as a reserved
opcode), logged at INFO, and the application is told at once, so a generation on it stops.
"""

from __future__ import annotations

import logging
from typing import Any

from daphne import ws_protocol
from django.conf import settings

# The private and undocumented names of other packages this module relies on: (distribution,
# dotted name). Checked at start by negotiator/internals.py (system check negotiator.E001) and by
# tests/negotiator/test_internals.py; keep it a literal, it is read from this file, not imported.
# "Class().name" is an attribute only live objects have (set as a connection is made): found
# assigned to `self` in the source of the class or of a class it inherits from.
PRIVATE_NAMES = (
    # install(): the protocol class daphne's factory builds.
    ("daphne", "daphne.ws_protocol.WebSocketProtocol"),
    ("daphne", "daphne.ws_protocol.WebSocketFactory.protocol"),
    # serverSend (overridden): daphne's queue to the application, its mute flag, the peer.
    ("daphne", "daphne.ws_protocol.WebSocketProtocol.serverSend"),
    ("daphne", "daphne.ws_protocol.WebSocketProtocol().application_queue"),
    ("daphne", "daphne.ws_protocol.WebSocketProtocol.muted"),
    ("daphne", "daphne.ws_protocol.WebSocketProtocol().client_addr"),
    # sendData (overridden): autobahn's queue, state and traffic counters it keeps per frame.
    ("autobahn", "autobahn.websocket.protocol.WebSocketProtocol.sendData"),
    ("autobahn", "autobahn.websocket.protocol.WebSocketProtocol().send_queue"),
    ("autobahn", "autobahn.websocket.protocol.WebSocketProtocol().state"),
    ("autobahn", "autobahn.websocket.protocol.WebSocketProtocol.STATE_OPEN"),
    ("autobahn", "autobahn.websocket.protocol.WebSocketProtocol.STATE_CONNECTING"),
    ("autobahn", "autobahn.websocket.protocol.WebSocketProtocol.STATE_PROXY_CONNECTING"),
    ("autobahn", "autobahn.websocket.protocol.WebSocketProtocol().trafficStats"),
    # (a TrafficStats: these two are built with it, so looked up on a throwaway one)
    ("autobahn", "autobahn.websocket.protocol.TrafficStats().outgoingOctetsWireLevel"),
    ("autobahn", "autobahn.websocket.protocol.TrafficStats().preopenOutgoingOctetsWireLevel"),
    ("autobahn", "autobahn.websocket.protocol.WebSocketProtocol.logTxOctets"),
    # (an option autobahn copies from the factory onto each protocol as its connection is made)
    ("autobahn", "autobahn.websocket.protocol.WebSocketServerFactory().logOctets"),
    # onConnect (overridden, daphne's starts the application): the per-connection options it
    # replaces, which autobahn copies from the factory as the connection is made and reads from
    # the protocol; _fail_connection (overridden): where autobahn fails a connection on a frame
    # it refuses; serverSend: the states in which autobahn raises instead of sending.
    ("daphne", "daphne.ws_protocol.WebSocketProtocol.onConnect"),
    ("autobahn", "autobahn.websocket.protocol.WebSocketServerFactory().maxMessagePayloadSize"),
    ("autobahn", "autobahn.websocket.protocol.WebSocketServerFactory().maxFramePayloadSize"),
    ("autobahn", "autobahn.websocket.protocol.WebSocketServerFactory().failByDrop"),
    ("autobahn", "autobahn.websocket.protocol.WebSocketProtocol._fail_connection"),
    ("autobahn", "autobahn.websocket.protocol.WebSocketProtocol.STATE_CLOSING"),
    ("autobahn", "autobahn.websocket.protocol.WebSocketProtocol.STATE_CLOSED"),
    # pending_bytes, _write_now: the TCP transport's (twisted.internet.tcp.Server's) send buffer
    # and state, and its socket.
    ("twisted", "twisted.internet.tcp.Server.dataBuffer"),
    ("twisted", "twisted.internet.tcp.Server.offset"),
    ("twisted", "twisted.internet.tcp.Server()._tempDataLen"),
    ("twisted", "twisted.internet.tcp.Server.TLS"),
    ("twisted", "twisted.internet.tcp.Server.connected"),
    ("twisted", "twisted.internet.tcp.Server.disconnecting"),
    ("twisted", "twisted.internet.tcp.Server().socket"),
)

logger = logging.getLogger("negotiator.websocket")

CLOSE_TOO_SLOW = 4008
# The transport cap: this many times LLM_MAX_REQUEST_BYTES, and never under the floor.
CAP_FACTOR = 16
CAP_FLOOR = 16 * 1024 * 1024


def transport_cap(limit: int) -> int:
    """The largest message a client may send before the connection is closed with 1009: far
    enough above `limit` (LLM_MAX_REQUEST_BYTES) that a client which overshoots it, even
    several times over, gets `MESSAGE_TOO_LARGE` and keeps its socket; bounded so one
    connection cannot make the server buffer more than this."""
    return max(CAP_FACTOR * limit, CAP_FLOOR)


class BoundedSendWebSocketProtocol(ws_protocol.WebSocketProtocol):
    too_slow = False
    muted: bool  # daphne's: set, no frame of the client reaches the application any more

    def onConnect(self, request: Any) -> Any:
        # autobahn copied the factory's options (daphne's 1 MiB, fail by drop) into this
        # connection when it was made; these replace them before any frame is read.
        cap = transport_cap(settings.LLM_MAX_REQUEST_BYTES)
        self.maxMessagePayloadSize = self.maxFramePayloadSize = cap
        self.failByDrop = False  # a close frame with the code and a reason, not a reset
        return super().onConnect(request)

    def _fail_connection(self, code: int = 1001, reason: str = "going away") -> None:
        """autobahn's, called for every frame it refuses (too big, invalid UTF-8, a protocol
        violation): it sends the close frame; the first time, this also logs it and tells the
        application at once rather than when the client answers the close."""
        was_open = self.state == self.STATE_OPEN
        super()._fail_connection(code, reason)
        if was_open:
            logger.info("closing WebSocket %s with %d: %s", self.client_addr, code, reason)
            self._disconnect_application(code)

    def _disconnect_application(self, code: int) -> None:
        if hasattr(self, "application_queue") and not self.muted:
            self.application_queue.put_nowait({"type": "websocket.disconnect", "code": code})
            self.muted = True  # daphne then sends no second disconnect when the socket closes

    def pending_bytes(self) -> int:
        """Bytes given to the TCP transport and not yet sent (0 where it cannot be told: TLS)."""
        transport = self.transport
        return (
            len(getattr(transport, "dataBuffer", b""))
            - getattr(transport, "offset", 0)
            + getattr(transport, "_tempDataLen", 0)
        )

    def serverSend(self, content: Any, binary: bool = False) -> None:
        if self.too_slow or self.state in (self.STATE_CLOSING, self.STATE_CLOSED):
            return  # autobahn would raise `Disconnected` into the application's send
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
            self._disconnect_application(CLOSE_TOO_SLOW)
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
