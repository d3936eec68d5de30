"""The one generation pipeline. Every face (WebSocket, HTTP, CLI, agents) runs it and renders its events.

    face -> Generation.events() -> provider.stream() -> bounded_stream -> coalesce_chunks
                 yields Start, Token..., then exactly one Done or Failed

Events carry their contract frame (`event.frame()`), so a face only serialises them.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any

from .exceptions import NegotiatorError
from .providers import get_provider
from .streaming import bounded_stream, coalesce_chunks, estimate_prompt_tokens, estimate_tokens
from .types import ChatRequest, StreamChunk, Usage

logger = logging.getLogger("llm.generation")

# Tokens are merged into one frame for at most this long, or until this many characters.
COALESCE_DELAY = 0.01
COALESCE_CHARS = 2048


@dataclass(frozen=True, slots=True)
class Start:
    session_id: str
    provider: str
    model: str

    def frame(self) -> dict[str, Any]:
        return {"type": "start", "session_id": self.session_id, "provider": self.provider, "model": self.model}


@dataclass(frozen=True, slots=True)
class Token:
    text: str

    def frame(self) -> dict[str, Any]:
        return {"type": "token", "text": self.text}


@dataclass(frozen=True, slots=True)
class Done:
    session_id: str
    finish_reason: str
    usage: Usage

    def frame(self) -> dict[str, Any]:
        return {
            "type": "done",
            "session_id": self.session_id,
            "finish_reason": self.finish_reason,
            "usage": self.usage.as_dict(),
        }


@dataclass(frozen=True, slots=True)
class Failed:
    session_id: str | None
    error: NegotiatorError

    def frame(self) -> dict[str, Any]:
        frame: dict[str, Any] = {"type": "error"}
        if self.session_id:
            frame["session_id"] = self.session_id
        return frame | self.error.as_dict()


Event = Start | Token | Done | Failed


@dataclass
class Generation:
    """One reply being generated; its fields fill in as the stream goes (text, timings, usage)."""

    request: ChatRequest
    provider_alias: str | None = None
    session_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    coalesce_delay: float = COALESCE_DELAY
    coalesce_chars: int = COALESCE_CHARS

    provider: str | None = None
    model: str | None = None
    parts: list[str] = field(default_factory=list)
    finish_reason: str | None = None
    usage: Usage | None = None
    error: NegotiatorError | None = None
    created_at: float = field(default_factory=time.time)
    first_token_at: float | None = None
    finished_at: float | None = None
    _reader: asyncio.Task[Any] | None = field(default=None, repr=False)
    _cancel_requested: bool = field(default=False, repr=False)

    @property
    def text(self) -> str:
        return "".join(self.parts)

    def cancel(self) -> None:
        """Stop the generation: the upstream closes at once and `events()` ends with `cancelled`."""
        self._cancel_requested = True
        if self._reader is not None and not self._reader.done():
            self._reader.cancel()

    async def events(self) -> AsyncIterator[Event]:
        """Run the generation. Closing this iterator, or cancelling its task, closes the upstream."""
        provider = get_provider(self.provider_alias)
        self.provider = provider.alias
        request = self.request
        started = False
        try:
            source = bounded_stream(
                self._cancellable(provider.stream(request)),
                max_tokens=request.max_tokens or provider.max_tokens,
                prompt_tokens=estimate_prompt_tokens(request.messages),
            )
            chunks = coalesce_chunks(source, max_chars=self.coalesce_chars, max_delay=self.coalesce_delay)
            async with aclosing(chunks):
                async for chunk in chunks:
                    if not started:
                        started = True
                        self.model = chunk.model or request.model or ""
                        yield Start(self.session_id, self.provider, self.model)
                    if chunk.text:
                        if self.first_token_at is None:
                            self.first_token_at = time.time()
                        self.parts.append(chunk.text)
                        yield Token(chunk.text)
                    if chunk.finish_reason:
                        self.finish_reason = chunk.finish_reason
                        self.usage = chunk.usage
        except NegotiatorError as exc:
            self.error = exc
            self.finished_at = time.time()
            logger.info("generation failed session=%s code=%s", self.session_id, exc.code)
            yield Failed(self.session_id, exc)
            return
        if self._cancel_requested and self.finish_reason is None:
            self.finish_reason = "cancelled"
            if not started:
                self.model = request.model or provider.default_model or ""
                yield Start(self.session_id, self.provider, self.model)
        self.finished_at = time.time()
        if self.usage is None or self.finish_reason == "cancelled":
            prompt = estimate_prompt_tokens(request.messages)
            completion = estimate_tokens(self.text)
            self.usage = Usage(prompt, completion, prompt + completion, estimated=True)
        yield Done(self.session_id, self.finish_reason or "stop", self.usage)

    async def _cancellable(self, chunks: AsyncIterator[StreamChunk]) -> AsyncIterator[StreamChunk]:
        """Pass `chunks` through, in the task that reads the upstream, so `cancel()` can stop it."""
        self._reader = asyncio.current_task()
        if self._cancel_requested:
            return
        async with aclosing(chunks):
            async for chunk in chunks:
                yield chunk
