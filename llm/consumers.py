"""WebSocket face of the pipeline at `/ws/llm/stream/`: generate, cancel and watch over JSON frames.

Every bad frame gets an `error` frame with the contract's code and the socket stays usable.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from contextlib import aclosing
from typing import Any

import orjson
from channels.consumer import get_handler_name
from channels.generic.websocket import AsyncJsonWebsocketConsumer
from django.conf import settings
from pydantic import BaseModel, ValidationError

from .auth import client_key, socket_authorized
from .broadcast import control_group, frames_group
from .exceptions import (
    ClientError,
    GenerationInProgress,
    InternalError,
    InvalidJSON,
    InvalidRequest,
    MessageTooLarge,
    NegotiatorError,
    SessionNotFound,
    UnknownType,
    WatchLagged,
    WatchUnavailable,
)
from .frames import WatchingFrame
from .generation import Generation
from .ratelimit import check_rate
from .schemas import CancelFrame, GenerateFrame, WatchFrame, describe_validation_errors
from .sessions import stored_reply

logger = logging.getLogger("llm.consumers")

FRAMES: dict[str, type[BaseModel]] = {
    "generate": GenerateFrame,
    "cancel": CancelFrame,
    "watch": WatchFrame,
}
# Channel-layer messages a watching socket relays (`llm_frame`, `llm_snapshot`).
RELAYED = frozenset({"llm.frame", "llm.snapshot"})
# A watcher asks the generating process for its snapshot this often, and after this long with
# no answer shows what the database holds (the process may have died, or just finished).
WATCH_RETRY = 0.5
SNAPSHOT_TIMEOUT = 5.0
# A session not in the database may still be being written while it streams: asked this long.
NOT_STORED_TIMEOUT = 1.0
# Closing waits this long for the generation to store its partial reply.
CLOSE_TIMEOUT = 5.0
# Close code of a refused handshake (before accept it reaches the client as HTTP 403).
CLOSE_UNAUTHORIZED = 4401


class JSONFrameConsumer(AsyncJsonWebsocketConsumer):
    """A socket of JSON text frames, each with a `type` naming its schema in `FRAMES`.

    The parts every such socket shares: the API_TOKEN rule at the handshake, the size limit,
    bad frames answered with an `error` frame (the socket stays usable), a bug in a handler
    answered with INTERNAL_ERROR, and relayed channel-layer frames (`RELAYED`) kept off the
    database thread. A subclass sets `FRAMES` and `RELAYED` and implements `handle(frame)`.
    """

    FRAMES: dict[str, type[BaseModel]] = {}
    RELAYED: frozenset[str] = frozenset()

    async def connect(self) -> None:
        if not socket_authorized(self.scope):
            await self.close(code=CLOSE_UNAUTHORIZED)
            return
        await self.accept()

    async def receive(
        self, text_data: str | None = None, bytes_data: bytes | None = None, **kwargs: Any
    ) -> None:
        # Parsed here rather than in `decode_json` so a bad frame gets an error frame, not a crash.
        try:
            content = self._parse(text_data, bytes_data)
        except ClientError as exc:
            await self._send_error(exc)
            return
        await self.receive_json(content)

    async def receive_json(self, content: Any, **kwargs: Any) -> None:
        try:
            await self.handle(self._validate(content))
        except ClientError as exc:
            await self._send_error(exc, **self.error_context(content))
        except Exception:  # a bug or an outage must not drop the socket
            kind = content.get("type") if isinstance(content, dict) else None
            logger.exception(
                "a %s frame failed", kind[:50] if isinstance(kind, str) else type(kind).__name__
            )
            await self._send_error(
                InternalError("The server failed on this frame; the error is logged"),
                **self.error_context(content),
            )

    async def handle(self, frame: Any) -> None:
        raise NotImplementedError

    def error_context(self, content: Any) -> dict[str, str]:
        """Fields an error frame about `content` carries besides its code (e.g. an id)."""
        return {}

    async def dispatch(self, message: dict[str, Any]) -> None:
        # channels closes stale database connections, on the one thread all sockets' ORM calls
        # share, before every message. Frames relayed to a watcher never touch the database: for
        # them that hop (once per token, queued behind every write of the worker) is skipped, so
        # a busy database thread cannot make a reading watcher overflow its queue.
        if message["type"] in self.RELAYED:
            await getattr(self, get_handler_name(message))(message)
        else:
            await super().dispatch(message)

    def _parse(self, text_data: str | None, bytes_data: bytes | None) -> Any:
        limit = settings.LLM_MAX_REQUEST_BYTES
        if text_data is None:
            if bytes_data is not None and len(bytes_data) > limit:
                raise MessageTooLarge(f"The frame is larger than {limit} bytes")
            raise InvalidJSON("Frames must be JSON text; binary frames are not accepted")
        if len(text_data) > limit or len(text_data.encode()) > limit:
            raise MessageTooLarge(f"The frame is larger than {limit} bytes")
        try:
            return orjson.loads(text_data)
        except orjson.JSONDecodeError as exc:
            raise InvalidJSON(f"The frame is not valid JSON: {exc}") from exc

    def _validate(self, content: Any) -> Any:
        *first, last = self.FRAMES
        known = f"{', '.join(first)} or {last}"
        if not isinstance(content, dict):
            raise InvalidRequest("A frame must be a JSON object with a `type`")
        kind = content.get("type")
        if kind is None:
            raise InvalidRequest(f"type: field required ({known})")
        if not isinstance(kind, str):  # never str() a client's value: it may nest a thousand deep
            raise UnknownType(f"type must be a string, not {type(kind).__name__}: use {known}")
        schema = self.FRAMES.get(kind)
        if schema is None:
            raise UnknownType(f"Unknown frame type {kind[:50]!r}: use {known}")
        try:
            return schema.model_validate(content)
        except ValidationError as exc:
            raise InvalidRequest(describe_validation_errors(exc.errors())) from exc

    async def _send_error(self, error: NegotiatorError, **context: str | None) -> None:
        frame: dict[str, Any] = {"type": "error"}
        frame.update({key: value for key, value in context.items() if value})
        await self.send_json(frame | error.as_dict())

    @classmethod
    async def encode_json(cls, content: Any) -> str:
        return orjson.dumps(content).decode()


class LLMStreamConsumer(JSONFrameConsumer):
    """One socket: at most one generation at a time, and at most one watched session."""

    FRAMES = FRAMES
    RELAYED = RELAYED

    async def connect(self) -> None:
        self.generation: Generation | None = None
        self.task: asyncio.Task[None] | None = None
        self.watch = _Watch()
        await super().connect()

    async def handle(self, frame: GenerateFrame | CancelFrame | WatchFrame) -> None:
        if isinstance(frame, GenerateFrame):
            await self._generate(frame)
        elif isinstance(frame, CancelFrame):
            if self.generation is not None:
                self.generation.cancel()
        else:
            await self._watch(str(frame.session_id))

    async def disconnect(self, code: int) -> None:
        if self.task is not None and not self.task.done():
            self.task.cancel()
            await asyncio.wait([self.task], timeout=CLOSE_TIMEOUT)
        await self._stop_watching()

    async def _generate(self, frame: GenerateFrame) -> None:
        if self.task is not None and not self.task.done():
            raise GenerationInProgress(
                "A generation is still streaming on this connection: cancel it first"
            )
        await check_rate(client_key(self.scope))
        self.generation = Generation(frame.to_request(), session_id=frame.session_key)
        self.task = asyncio.create_task(self._run(self.generation))

    async def _run(self, generation: Generation) -> None:
        try:
            async with aclosing(generation.events()) as events:
                async for event in events:
                    await self.send_json(event.frame())
        except Exception:  # the pipeline turns errors into frames; this is a bug or a dead socket
            logger.exception("relaying session %s failed", generation.session_id)

    # Watching ---------------------------------------------------------------------------------

    async def _watch(self, session_id: str) -> None:
        await self._stop_watching()
        found = await stored_reply(session_id)
        if found is not None and found[0].status != "streaming":
            await self.send_json(_watching(session_id, found[0].status, found[1]))
            return
        # Streaming, or not stored yet (a new session's row is written while it already streams):
        # the generating process, wherever it runs, answers for it.
        self.watch = _Watch(session_id)
        try:
            await self.channel_layer.group_add(frames_group(session_id), self.channel_name)
        except Exception as exc:  # the layer is down (Redis): what the database holds, then the end
            logger.warning("watch of %s: the channel layer failed (%s)", session_id, exc)
            await self.llm_snapshot(_stored_answer(session_id, found))
            return
        timeout = SNAPSHOT_TIMEOUT if found is not None else NOT_STORED_TIMEOUT
        self.watch.asker = asyncio.create_task(self._ask_for_snapshot(session_id, timeout))

    async def _ask_for_snapshot(self, session_id: str, timeout: float) -> None:
        """Ask the generating process until it answers (it may not listen yet); after `timeout`,
        answer from the database through this consumer's own queue, so the answer is handled in
        order with live frames."""
        request = {"type": "llm.watch", "reply_to": self.channel_name}
        deadline = asyncio.get_running_loop().time() + timeout
        while asyncio.get_running_loop().time() < deadline:
            try:
                await self.channel_layer.group_send(control_group(session_id), request)
            except Exception as exc:  # the layer is down: nobody can answer, the database can
                logger.warning("watch of %s: the channel layer failed (%s)", session_id, exc)
                break
            await asyncio.sleep(WATCH_RETRY)
        try:
            answer = _stored_answer(session_id, await stored_reply(session_id))
        except Exception:  # the database failed too: the watch ends with an error, not silence
            logger.exception("watch of %s: reading the stored reply failed", session_id)
            if self.watch.session_id == session_id:
                await self._stop_watching()
                await self._send_error(
                    InternalError("The server failed on this watch; the error is logged")
                )
            return
        try:
            await self.channel_layer.send(self.channel_name, answer)
        except Exception:  # no live frame can come through a broken layer either
            await self.llm_snapshot(answer)

    async def llm_snapshot(self, event: dict[str, Any]) -> None:
        """The generating process's answer to our watch: the reply so far, then buffered frames.

        A snapshot from the database (`final`) ends the watch: no process answered for it.
        """
        watch = self.watch
        if event.get("session_id") != watch.session_id or not watch.pending:
            return
        watch.pending = False
        if watch.asker is not None and watch.asker is not asyncio.current_task():
            watch.asker.cancel()
        if event.get("missing"):
            await self._stop_watching()
            await self._send_error(SessionNotFound(f"Session {watch.session_id} does not exist"))
            return
        assert watch.session_id is not None  # a pending watch has one
        watch.offset = event["offset"]
        await self.send_json(_watching(watch.session_id, event["status"], event["text"]))
        buffered, watch.buffer = watch.buffer, []
        for message in buffered:
            if self.watch is not watch:
                return  # a gap among them ended the watch
            await self._forward(message)
        if (event["status"] != "streaming" or event.get("final")) and self.watch is watch:
            await self._stop_watching()
            if event["status"] == "streaming":  # the database says streaming, nobody streams it
                await self._send_error(
                    WatchUnavailable(
                        "No live frames can be followed for this session: the process "
                        "generating it does not answer (it may have stopped, or the channel "
                        "layer is down). The watching frame holds what is stored; send watch "
                        "again to retry."
                    ),
                    session_id=watch.session_id,
                )

    async def llm_frame(self, event: dict[str, Any]) -> None:
        if event.get("session_id") != self.watch.session_id:
            return
        if self.watch.pending:
            self.watch.buffer.append(event)
        else:
            await self._forward(event)

    async def _forward(self, message: dict[str, Any]) -> None:
        watch, frame, offset = self.watch, message["frame"], message.get("offset")
        if offset is not None:
            if offset < watch.offset:
                return  # already in the snapshot
            if offset > watch.offset:  # the layer dropped frames: this socket reads too slowly
                session_id = watch.session_id
                await self._stop_watching()
                await self._send_error(
                    WatchLagged(
                        "This watcher fell behind and missed frames; send watch again to resume"
                    ),
                    session_id=session_id,
                )
                return
            watch.offset = offset + len(frame["text"])
        elif frame["type"] == "start":
            return  # the watcher's `watching` frame stands for it
        await self.send_json(frame)
        if frame["type"] in ("done", "error"):
            await self._stop_watching()

    async def _stop_watching(self) -> None:
        watch, self.watch = self.watch, _Watch()
        if watch.asker is not None and watch.asker is not asyncio.current_task():
            watch.asker.cancel()
        if watch.session_id is not None:
            with contextlib.suppress(Exception):
                await self.channel_layer.group_discard(
                    frames_group(watch.session_id), self.channel_name
                )


class _Watch:
    """The session this socket watches: waiting for its snapshot, or forwarding live frames."""

    def __init__(self, session_id: str | None = None) -> None:
        self.session_id = session_id
        self.pending = session_id is not None
        self.offset = 0
        self.buffer: list[dict[str, Any]] = []
        self.asker: asyncio.Task[None] | None = None


def _stored_answer(session_id: str, found: tuple[Any, str] | None) -> dict[str, Any]:
    """A snapshot from the database, for when no generating process answers: it ends the watch."""
    if found is None:
        return {"type": "llm.snapshot", "session_id": session_id, "missing": True}
    session, text = found
    return {
        "type": "llm.snapshot",
        "session_id": session_id,
        "status": session.status,
        "text": text,
        "offset": len(text),
        "final": True,
    }


def _watching(session_id: str, status: str, text: str) -> WatchingFrame:
    return {"type": "watching", "session_id": session_id, "status": status, "text": text}
