"""A WebSocket client by hand, for tests of clients that stop reading: one frame out, then silence.

`websockets` reads on its own; a socket with a tiny receive buffer that is never read is what
makes the server's send buffer for it grow.
"""

from __future__ import annotations

import base64
import json
import os
import socket
import struct
from collections.abc import Iterator
from datetime import datetime
from typing import Any


def open_stalled_socket(base: str, frame: dict[str, Any]) -> socket.socket:
    """Open `/ws/llm/stream/` at `base` (http://host:port) with a 4 KiB receive buffer, send
    `frame`, and hand back the socket unread."""
    host, port = base.removeprefix("http://").split(":")
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect((host, int(port)))
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall(
        f"GET /ws/llm/stream/ HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
    )
    head = b""
    while b"\r\n\r\n" not in head:
        head += sock.recv(1)
    assert b" 101 " in head.split(b"\r\n")[0], head
    payload = json.dumps(frame).encode()
    mask = os.urandom(4)
    size = len(payload)
    header = bytes([0x81]) + (
        bytes([0x80 | size]) if size < 126 else bytes([0x80 | 126]) + struct.pack("!H", size)
    )
    sock.sendall(header + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload)))
    return sock


def server_frames(data: bytes) -> Iterator[tuple[int, bytes]]:
    """(opcode, payload) of each complete unmasked frame the server sent."""
    at = 0
    while at + 2 <= len(data):
        opcode, length = data[at] & 0x0F, data[at + 1] & 0x7F
        at += 2
        if length == 126:
            length, at = struct.unpack("!H", data[at : at + 2])[0], at + 2
        elif length == 127:
            length, at = struct.unpack("!Q", data[at : at + 8])[0], at + 8
        if at + length > len(data):
            return
        yield opcode, data[at : at + length]
        at += length


def close_code(data: bytes) -> int | None:
    """The code of the close frame among the server's frames, if one arrived."""
    for opcode, payload in server_frames(data):
        if opcode == 0x8 and len(payload) >= 2:
            return struct.unpack("!H", payload[:2])[0]
    return None


def logged_at(line: str) -> float:
    """The time of a log line (`2026-12-01 08:05:50,957 ...`), in seconds since the epoch."""
    return datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()
