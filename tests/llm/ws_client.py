"""Helpers for the WebSocket tests: open `/ws/llm/stream/` on the real ASGI app and read frames.

Every frame read here is checked for a leaked traceback, and every read is bounded.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

from channels.db import database_sync_to_async
from channels.testing import WebsocketCommunicator

from llm.models import Message, Session
from llm.types import Message as ChatMessage
from negotiator.asgi import application

PATH = "/ws/llm/stream/"
LOCALHOST = [(b"origin", b"http://localhost")]
HI: list[ChatMessage] = [{"role": "user", "content": "Hi"}]
HELLO_REPLY = "Hello, world!"  # FakeUpstream's default reply
TIMEOUT = 5


def tokens(n: int, prefix: str = " t") -> list[str]:
    return [f"{prefix}{i}" for i in range(n)]


async def open_socket(
    path: str = PATH, headers: list[tuple[bytes, bytes]] | None = None
) -> WebsocketCommunicator:
    comm = WebsocketCommunicator(
        application, path, headers=LOCALHOST if headers is None else headers
    )
    connected, code = await comm.connect(timeout=TIMEOUT)
    assert connected, f"handshake refused ({code})"
    return comm


async def try_connect(
    path: str = PATH, headers: list[tuple[bytes, bytes]] | None = None
) -> tuple[bool, Any]:
    comm = WebsocketCommunicator(
        application, path, headers=LOCALHOST if headers is None else headers
    )
    connected, code = await comm.connect(timeout=TIMEOUT)
    await comm.disconnect(
        timeout=TIMEOUT
    )  # a refused handshake still waits for the client to leave
    return connected, code


def parse(text: str) -> dict[str, Any]:
    assert "Traceback" not in text, text
    frame = json.loads(text)
    assert isinstance(frame, dict), text
    return frame


async def recv(comm: WebsocketCommunicator, timeout: float = TIMEOUT) -> dict[str, Any]:
    return parse(await comm.receive_from(timeout=timeout))


async def until_end(comm: WebsocketCommunicator, timeout: float = TIMEOUT) -> list[dict[str, Any]]:
    """Frames up to and including the first `done` or `error`."""
    frames = []
    deadline = time.monotonic() + timeout
    while True:
        frame = await recv(comm, timeout=max(0.05, deadline - time.monotonic()))
        frames.append(frame)
        if frame["type"] in ("done", "error"):
            return frames


def text_of(frames: list[dict[str, Any]]) -> str:
    return "".join(f["text"] for f in frames if f["type"] == "token")


def token_frames(frames: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [f for f in frames if f["type"] == "token"]


def assert_sequence(frames: list[dict[str, Any]], end: str = "done") -> None:
    """start, token..., then exactly one end frame, last."""
    kinds = [f["type"] for f in frames]
    assert kinds[0] == "start", kinds
    assert kinds[-1] == end, kinds
    assert set(kinds[1:-1]) <= {"token"}, kinds
    assert kinds.count("done") + kinds.count("error") == 1, kinds


async def generate(
    comm: WebsocketCommunicator, messages: list[dict[str, str]] | None = None, **fields: Any
) -> None:
    await comm.send_json_to({"type": "generate", "messages": messages or HI, **fields})


async def generate_ok(
    comm: WebsocketCommunicator, expected: str = HELLO_REPLY, **fields: Any
) -> list[dict[str, Any]]:
    """A normal generate on `comm` works: start, tokens that make `expected`, done/stop."""
    await generate(comm, **fields)
    frames = await until_end(comm)
    assert_sequence(frames)
    assert text_of(frames) == expected
    assert frames[-1]["finish_reason"] == "stop"
    return frames


def drained(comm: WebsocketCommunicator) -> list[dict[str, Any]]:
    """Frames the app sent that nobody read yet (e.g. after a disconnect)."""
    frames = []
    while not comm.output_queue.empty():
        message = comm.output_queue.get_nowait()
        if message.get("type") == "websocket.send" and message.get("text") is not None:
            frames.append(parse(message["text"]))
    return frames


@database_sync_to_async
def session_row(session_id: str) -> tuple[Session, list[tuple[str, str]]]:
    session = Session.objects.get(pk=session_id)
    messages = list(
        Message.objects.filter(session=session).order_by("position").values_list("role", "content")
    )
    return session, messages


@database_sync_to_async
def all_sessions() -> list[Session]:
    return list(Session.objects.all())


async def wait_for_status(
    session_id: str, status: str, timeout: float = 3.0
) -> tuple[Session, list[tuple[str, str]]]:
    """Poll the database until the session has `status` (the pipeline stores it from a thread)."""
    deadline = time.monotonic() + timeout
    while True:
        session, messages = await session_row(session_id)
        if session.status == status or time.monotonic() > deadline:
            return session, messages
        await asyncio.sleep(0.02)


def reply_text(messages: list[tuple[str, str]]) -> str:
    """The stored text of the last reply (empty when the last turn is not the assistant's)."""
    return messages[-1][1] if messages and messages[-1][0] == "assistant" else ""
