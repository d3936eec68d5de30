"""The one generation pipeline. Every face (WebSocket, HTTP, CLI, agents) runs it and renders its
events.

    face -> Generation.events() -> provider.stream() -> bounded_stream -> coalesce_chunks
                 |  yields Start, Token..., then exactly one Done or Failed
                 |-> sessions (stored at the start and the end) and autosave (every 2 s)
                 '-> Broadcaster (the same frames to watchers, once someone watches)

Events carry their contract frame (`event.frame()`), so a face only serialises them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
import weakref
from collections.abc import AsyncGenerator
from contextlib import aclosing
from dataclasses import dataclass, field, replace
from typing import Any, cast, get_args

from .autosave import autosave
from .broadcast import Broadcaster
from .conf import provider_chain
from .exceptions import (
    InternalError,
    InvalidOutput,
    LLMError,
    NegotiatorError,
    ProviderDisabled,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from .frames import DoneFrame, ErrorFrame, FinishReason, StartFrame, TokenFrame, TriedProvider
from .providers import OpenAICompatibleProvider, get_provider
from .sessions import OpenedSession, close_session, mark_unstored, open_session
from .streaming import bounded_stream, coalesce_chunks, estimate_prompt_tokens, estimate_tokens
from .types import ChatRequest, FinishedReply, StreamChunk, Usage

logger = logging.getLogger("llm.generation")

# A provider failing with these before its first token hands over to the next fallback.
FALLBACK_ERRORS = (UpstreamUnavailable, UpstreamTimeout, ProviderDisabled)

# The finish reasons of the contract's `done` frame; any other an upstream gives (`content_filter`,
# `tool_calls`, ...) ends the reply as `stop` there, and is stored as the upstream gave it.
FINISH_REASONS: frozenset[str] = frozenset(get_args(FinishReason))

# Storing the end of a reply is tried this many times, STORE_RETRY_DELAY * 2**attempt apart.
STORE_ATTEMPTS = 3
STORE_RETRY_DELAY = 0.2

# Tokens are merged into one frame for at most this long, or until this many characters.
COALESCE_DELAY = 0.01
COALESCE_CHARS = 2048


@dataclass(frozen=True, slots=True)
class Start:
    session_id: str
    provider: str
    model: str
    tried: tuple[TriedProvider, ...] = ()  # providers that failed before this one, with codes

    def frame(self) -> StartFrame:
        frame: StartFrame = {
            "type": "start",
            "session_id": self.session_id,
            "provider": self.provider,
            "model": self.model,
        }
        if self.tried:
            frame["tried"] = list(self.tried)
        return frame


@dataclass(frozen=True, slots=True)
class Token:
    text: str

    def frame(self) -> TokenFrame:
        return {"type": "token", "text": self.text}


@dataclass(frozen=True, slots=True)
class Done:
    session_id: str
    finish_reason: FinishReason
    usage: Usage
    structured: bool = False  # asked with a response_format: the frame carries `output`
    output: Any = None  # the reply parsed and validated against its schema

    def frame(self) -> DoneFrame:
        frame: DoneFrame = {
            "type": "done",
            "session_id": self.session_id,
            "finish_reason": self.finish_reason,
            "usage": self.usage.as_frame(),
        }
        if self.structured:
            frame["output"] = self.output
        return frame


@dataclass(frozen=True, slots=True)
class Failed:
    session_id: str | None
    error: NegotiatorError

    def frame(self) -> ErrorFrame:
        frame: ErrorFrame = {
            "type": "error",
            "code": self.error.code,
            "message": self.error.message,
        }
        if self.session_id:
            frame["session_id"] = self.session_id
        return frame


Event = Start | Token | Done | Failed


@dataclass(eq=False)  # a live object: compared, hashed and weakly held by identity
class Generation:
    """One reply being generated and stored; its fields fill in as the stream goes."""

    request: ChatRequest
    session_id: str | None = None
    provider_alias: str | None = None
    # Kept out of the sessions API (staff see it in admin): its prompt holds what the reader of
    # the API must not see (a negotiating side's private number, while a person plays against it).
    private: bool = False
    coalesce_delay: float = COALESCE_DELAY
    coalesce_chars: int = COALESCE_CHARS

    provider: str | None = None
    model: str | None = None
    parts: list[str] = field(default_factory=list)
    length: int = 0
    finish_reason: str | None = None
    usage: Usage | None = None
    error: NegotiatorError | None = None
    output: Any = None  # with a response_format: the reply parsed, once validated
    tried: list[TriedProvider] = field(default_factory=list)
    created_at: float = field(default_factory=time.time)
    first_token_at: float | None = None
    finished_at: float | None = None
    _reader: asyncio.Task[Any] | None = field(default=None, repr=False)
    _cancel_requested: bool = field(default=False, repr=False)
    _started: bool = field(default=False, repr=False)

    @property
    def text(self) -> str:
        return "".join(self.parts)

    @property
    def status(self) -> str:
        if self.finished_at is None:
            return "streaming"
        if self.error is not None:
            return "failed"
        return "cancelled" if self.finish_reason == "cancelled" else "completed"

    def snapshot(self) -> dict[str, Any]:
        """What a new watcher is sent first: the reply so far and where live frames resume."""
        return {
            "session_id": self.session_id,
            "status": self.status,
            "text": self.text,
            "offset": self.length,
        }

    def record(self) -> FinishedReply:
        """What storage keeps of this reply once it has ended."""
        assert self.session_id is not None and self.finished_at is not None
        return FinishedReply(
            session_id=self.session_id,
            status=self.status,
            provider=self.provider or "",
            model=self.model or "",
            text=self.text,
            finish_reason=self.finish_reason or "",
            usage=self.usage,
            error_code=self.error.code if self.error else "",
            error_message=self.error.message if self.error else "",
            response_format=(
                self.request.response_format.as_openai() if self.request.response_format else None
            ),
            output=self.output,
            created_at=self.created_at,
            first_token_at=self.first_token_at,
            finished_at=self.finished_at,
            tried=tuple(self.tried),
        )

    def cancel(self) -> None:
        """Stop the generation: the upstream closes at once and `events()` ends with `cancelled`."""
        self._cancel_requested = True
        if self._reader is not None and not self._reader.done():
            self._reader.cancel()

    async def events(self) -> AsyncGenerator[Event, None]:
        """Open the session, stream the reply, store it; every event also goes to watchers.

        Closing this iterator early, or cancelling its task (a client that left), closes the
        upstream request and stores the session as `cancelled` with its partial text. The
        session is opened and closed in shielded tasks, so a client leaving at any moment
        never leaves it `streaming`.
        """
        chain = self._provider_chain()
        self.provider = chain[0].alias
        _running.add(self)
        create = self.session_id is None
        session_id = self.session_id = self.session_id or str(uuid.uuid4())
        opening = asyncio.ensure_future(
            open_session(
                session_id,
                self.request.messages,
                self.provider,
                create=create,
                private=self.private,
            )
        )
        if create:
            # Nothing to read first: the upstream request and the reply start while the session
            # is written, so bookkeeping never delays a token (a burst of new sessions queues
            # their writes). Every later write waits for it; a watcher or a reader of the API may
            # find the session a moment after its start frame.
            opened = OpenedSession(session_id, [], len(self.request.messages))
        else:
            try:
                opened = await asyncio.shield(opening)
            except NegotiatorError as exc:
                self.error = exc
                self.finished_at = time.time()
                yield Failed(None, exc)
                return
            except Exception:
                # The database failed: nothing was stored (the transaction rolled back).
                logger.exception("could not open a session")
                self.error = InternalError(
                    "The server could not store the session; the error is logged"
                )
                self.finished_at = time.time()
                yield Failed(None, self.error)
                return
            except BaseException:  # the client left while the session was being opened
                _in_background(self._close_when_opened(opening))
                _running.discard(self)
                raise
        request = replace(self.request, messages=[*opened.history, *self.request.messages])
        broadcaster = Broadcaster(session_id, self.snapshot)
        saver = autosave()
        position = opened.reply_position
        opening.add_done_callback(
            lambda done: (
                None
                if self.finished_at or done.cancelled() or done.exception()
                else saver.track(self, position)
            )
        )
        end: Done | Failed | None = None
        try:
            await broadcaster.start()
            try:
                async with aclosing(self._stream(chain, request)) as events:
                    async for event in events:
                        offset = self.length - len(event.text) if isinstance(event, Token) else None
                        await broadcaster.publish(event.frame(), offset)
                        yield event
            except NegotiatorError as exc:
                self.error = exc
                logger.info("generation failed session=%s code=%s", self.session_id, exc.code)
            await asyncio.shield(opening)  # a session that could not be stored ends in an error
            end = self._end(request)
        except Exception:
            logger.exception("generation crashed session=%s", self.session_id)
            self.error = InternalError("The generation failed on the server; the error is logged")
            end = self._end(request)
        finally:
            if end is None:  # the client left (closed the iterator or cancelled its task)
                self.finish_reason = "cancelled"
                end = self._end(request)
            saver.untrack(self.session_id)
            finishing = _in_background(self._close(opening, broadcaster, position, end))
            _running.discard(self)
            await asyncio.shield(finishing)
        yield end

    def _end(self, request: ChatRequest) -> Done | Failed:
        """Fill in the finish time and (estimated if need be) usage; the end event."""
        self.finished_at = time.time()
        if self.usage is None or self.finish_reason == "cancelled":
            self.usage = Usage.estimate(
                estimate_prompt_tokens(request.messages), estimate_tokens(self.text)
            )
        structured = request.response_format is not None and self.finish_reason != "cancelled"
        if structured and self.error is None:
            assert request.response_format is not None
            try:
                self.output = request.response_format.validate(self.text)
            except InvalidOutput as exc:  # the text is stored as always, with the code
                self.error = exc
        if self.error is not None:
            return Failed(self.session_id, self.error)
        assert self.session_id is not None
        reason = cast(
            FinishReason, self.finish_reason if self.finish_reason in FINISH_REASONS else "stop"
        )
        return Done(self.session_id, reason, self.usage, structured, self.output)

    async def _close(
        self,
        opening: asyncio.Future[OpenedSession],
        broadcaster: Broadcaster,
        position: int,
        end: Done | Failed,
    ) -> None:
        """Store the end, then tell watchers: runs to completion even if the client leaves."""
        try:
            await opening
        except Exception:
            pass  # nothing was opened: that failure is the end, logged where it happened
        else:
            await self._store_end(position)
        try:
            await broadcaster.publish(end.frame())
        finally:
            await broadcaster.stop()

    async def _store_end(self, position: int) -> None:
        """`close_session`, tried again after a passing fault (a locked SQLite, a pool timeout);
        if it never succeeds, the session is at least not left `streaming` (the log has why)."""
        for attempt in range(STORE_ATTEMPTS):
            try:
                await close_session(self.record(), position)
                return
            except Exception:
                if attempt == STORE_ATTEMPTS - 1:
                    logger.exception("could not store the end of session %s", self.session_id)
                else:
                    logger.warning(
                        "storing the end of session %s failed; trying again", self.session_id
                    )
                    await asyncio.sleep(STORE_RETRY_DELAY * 2**attempt)
        with contextlib.suppress(Exception):
            await mark_unstored(self.session_id)

    async def _close_when_opened(self, opening: asyncio.Future[OpenedSession]) -> None:
        try:
            opened = await opening
        except Exception:
            return  # nothing was opened (or the error was the client's)
        self.session_id = opened.session_id
        self.finish_reason = "cancelled"
        self._end(self.request)
        await close_session(self.record(), opened.reply_position)

    def _provider_chain(self) -> list[OpenAICompatibleProvider]:
        aliases = [self.provider_alias] if self.provider_alias else provider_chain()
        return [get_provider(alias) for alias in aliases]

    async def _stream(
        self, chain: list[OpenAICompatibleProvider], request: ChatRequest
    ) -> AsyncGenerator[Start | Token, None]:
        """Each provider in turn until one yields its first piece; never falls back after that."""
        for position, provider in enumerate(chain):
            self.provider = provider.alias
            try:
                async for event in self._stream_from(provider, request):
                    yield event
                return
            except LLMError as exc:
                last = position == len(chain) - 1
                if self._started or last or not isinstance(exc, FALLBACK_ERRORS):
                    raise
                self.tried.append({"provider": provider.alias, "code": exc.code})
                logger.warning(
                    "provider %s failed before its first token (%s); trying %s",
                    provider.alias,
                    exc.code,
                    chain[position + 1].alias,
                )

    async def _stream_from(
        self, provider: OpenAICompatibleProvider, request: ChatRequest
    ) -> AsyncGenerator[Start | Token, None]:
        """Start and Token events from one provider; sets finish reason and usage."""
        source = bounded_stream(
            self._cancellable(provider.stream(request)),
            max_tokens=request.max_tokens or provider.max_tokens,
            prompt_tokens=estimate_prompt_tokens(request.messages),
        )
        chunks = coalesce_chunks(
            source, max_chars=self.coalesce_chars, max_delay=self.coalesce_delay
        )
        async with aclosing(chunks):
            async for chunk in chunks:
                if not self._started:
                    self._started = True
                    self.model = chunk.model or request.model or ""
                    yield self._start_event()
                if chunk.text:
                    if self.first_token_at is None:
                        self.first_token_at = time.time()
                    self.parts.append(chunk.text)
                    self.length += len(chunk.text)
                    yield Token(chunk.text)
                if chunk.finish_reason:
                    self.finish_reason = chunk.finish_reason
                    self.usage = chunk.usage
        if self._cancel_requested and self.finish_reason is None:
            self.finish_reason = "cancelled"
            if not self._started:
                self._started = True
                self.model = request.model or provider.default_model or ""
                yield self._start_event()

    def _start_event(self) -> Start:
        assert self.session_id is not None and self.provider is not None
        return Start(self.session_id, self.provider, self.model or "", tuple(self.tried))

    async def _cancellable(
        self, chunks: AsyncGenerator[StreamChunk, None]
    ) -> AsyncGenerator[StreamChunk, None]:
        """Pass `chunks` through, in the task that reads the upstream, so `cancel()` can stop it."""
        self._reader = asyncio.current_task()
        if self._cancel_requested:
            return
        async with aclosing(chunks):
            async for chunk in chunks:
                yield chunk


# Tasks that must finish even if whoever started them is cancelled (kept from garbage collection).
_background: set[asyncio.Task[Any]] = set()
# The generations under way in this process, for a shutdown to end first.
_running: weakref.WeakSet[Generation] = weakref.WeakSet()


async def stop_all(timeout: float = 5.0) -> int:
    """End every generation under way (`cancelled`, as if its client had left) and wait, at most
    `timeout` s, until each has stored its end: what a server does before it stops."""
    stopping = list(_running)
    for generation in stopping:
        generation.cancel()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while _running and loop.time() < deadline:
        await asyncio.sleep(0.02)
    pending = [task for task in _background if not task.done()]
    if pending and loop.time() < deadline:
        await asyncio.wait(pending, timeout=deadline - loop.time())
    return len(stopping)


def _in_background(coroutine: Any) -> asyncio.Task[Any]:
    task = asyncio.ensure_future(coroutine)
    _background.add(task)
    task.add_done_callback(_background.discard)
    return task
