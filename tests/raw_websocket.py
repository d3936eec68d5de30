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
        f"GET /ws/llm/stream/ HTTP/1.1\r\nHost: {host}:{port}\r\n"
        "Upgrade: websocket\r\nConnection: Upgrade\r\n"
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


# Crafted frames, for protocol violations no WebSocket library sends --------------------------


def handshake(
    base: str, path: str = "/ws/llm/stream/", timeout: float = 5.0
) -> tuple[socket.socket, bytes]:
    """Send the upgrade request for `path` at `base` (http://host:port): the socket and the
    response head (status line and headers). A 101 leaves the socket open for frames."""
    host, port = base.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=timeout)
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall(
        f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
        "Sec-WebSocket-Version: 13\r\n\r\n".encode()
    )
    head = b""
    while b"\r\n\r\n" not in head:
        byte = sock.recv(1)
        if not byte:
            break
        head += byte
    return sock, head


def client_frame(
    payload: bytes,
    opcode: int = 0x1,
    *,
    fin: bool = True,
    rsv: int = 0,
    masked: bool = True,
    length: int | None = None,
) -> bytes:
    """One client frame as it goes on the wire (masked unless told otherwise). `length` declares
    another payload length than `payload`'s, to announce a frame larger than what is sent."""
    size = len(payload) if length is None else length
    head = bytes([(0x80 if fin else 0) | (rsv & 0x7) << 4 | (opcode & 0x0F)])
    bit = 0x80 if masked else 0
    if size < 126:
        head += bytes([bit | size])
    elif size < 1 << 16:
        head += bytes([bit | 126]) + struct.pack("!H", size)
    else:
        head += bytes([bit | 127]) + struct.pack("!Q", size)
    if not masked:
        return head + payload
    mask = os.urandom(4)
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


def read_until_closed(sock: socket.socket, timeout: float = 5.0) -> tuple[bytes, bool]:
    """Everything the server sends until it closes the connection: (bytes, closed in time).
    A reset after the server's last bytes counts as closed."""
    sock.settimeout(timeout)
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except (ConnectionResetError, BrokenPipeError):
        pass
    except TimeoutError:
        return data, False
    return data, True


def close_frame(data: bytes) -> tuple[int, str] | None:
    """(code, reason) of the close frame among the server's frames, if one arrived."""
    for opcode, payload in server_frames(data):
        if opcode == 0x8 and len(payload) >= 2:
            return struct.unpack("!H", payload[:2])[0], payload[2:].decode()
    return None


def closing_handshake(
    sock: socket.socket, data: bytes = b"", timeout: float = 5.0
) -> tuple[bytes, bool]:
    """Read until the server's close frame, answer it with the same code as a client does, then
    read until the server ends the connection: (everything it sent, `data` first; closed in
    time). A server that closes or resets without a close frame ends it too."""
    sock.settimeout(timeout)
    try:
        while close_frame(data) is None:
            chunk = sock.recv(65536)
            if not chunk:
                return data, True
            data += chunk
        code = close_frame(data)
        assert code is not None
        sock.sendall(client_frame(struct.pack("!H", code[0]), opcode=0x8))
    except (ConnectionResetError, BrokenPipeError):
        return data, True
    except TimeoutError:
        return data, False
    rest, closed = read_until_closed(sock, timeout)
    return data + rest, closed
