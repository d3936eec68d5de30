"""The streaming core: OpenAI-compatible chunks in, reply pieces out. Pure: no HTTP, no Django.

`parse_chunk` turns one SSE `data:` payload into a `StreamChunk` (or raises `BadGateway`);
`coalesce_chunks` merges pieces into fewer, larger ones by size and time without losing or
reordering text; `bounded_stream` stops a reply at a token budget with finish reason `length`.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, AsyncIterable
from typing import Any

import orjson

from .exceptions import BadGateway
from .types import Message, StreamChunk, Usage

DONE = "[DONE]"
# Token counts beyond this are not counts (and would not fit the database's integer columns).
MAX_COUNT = 2**31 - 1
DONE_BYTES = b"[DONE]"


class SSEDataReader:
    """The `data` of each Server-Sent Event in a byte stream fed in arbitrary pieces.

    Follows the WHATWG rules as httpx-sse does (the tests hold the two to the same output on
    every split): lines end in LF, CRLF or CR; a blank line ends an event; comments and other
    fields are dropped; an unfinished event at the end is not dispatched. It works on bytes, a
    network read at a time, which the relay's hot path needs (httpx-sse goes event by event
    through text decoding).
    """

    __slots__ = ("_tail",)

    def __init__(self) -> None:
        self._tail = b""

    def flush(self) -> list[bytes]:
        """At the end of the stream: a CR held back as half a CRLF was a line end after all."""
        if not self._tail.endswith(b"\r"):
            return []
        return self.feed(b"\n")

    def feed(self, data: bytes) -> list[bytes]:
        buffer = self._tail + data if self._tail else data
        hold = b""
        if b"\r" in buffer:
            if buffer.endswith(b"\r"):  # maybe the first half of a CRLF: decide on the next read
                buffer, hold = buffer[:-1], b"\r"
            buffer = buffer.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        *events, rest = buffer.split(b"\n\n")
        self._tail = rest + hold
        found = []
        for event in events:
            if event.startswith(b"data: ") and b"\n" not in event:
                found.append(event[6:])
                continue
            lines = []
            for line in event.split(b"\n"):
                name, _, value = line.partition(b":")
                if name == b"data":
                    lines.append(value[1:] if value.startswith(b" ") else value)
            if lines:
                found.append(b"\n".join(lines))
        return found


def parse_chunk(data: str | bytes, *, provider: str | None = None) -> StreamChunk | None:
    """Decode one `data:` payload; `None` for `[DONE]`. In-stream errors raise `BadGateway`."""
    if data == DONE or data == DONE_BYTES:
        return None
    try:
        payload = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise BadGateway(
            f"Upstream sent invalid JSON in its stream: {_shown(data)}", provider=provider
        ) from exc
    if not isinstance(payload, dict):
        raise BadGateway(
            f"Upstream sent a stream chunk that is not an object: {_shown(data)}", provider=provider
        )
    raise_for_error(payload, provider=provider)

    chunk = StreamChunk(
        model=storable(payload.get("model")), usage=parse_usage(payload.get("usage"))
    )
    choices = payload.get("choices") or []
    if choices:
        choice = choices[0]
        delta = choice.get("delta") or {}
        content = delta.get("content") if isinstance(delta, dict) else None
        if content is not None and not isinstance(content, str):
            raise BadGateway("Upstream sent non-text content in its stream", provider=provider)
        chunk.text = storable(content) or ""
        reason = choice.get("finish_reason") or None
        chunk.finish_reason = storable(
            reason if reason is None or isinstance(reason, str) else str(reason)
        )
    return chunk


def storable(value: Any) -> str | None:
    """An upstream's string as the database can store it (PostgreSQL refuses NUL in text); None
    for what is not a string."""
    if not isinstance(value, str) or not value:
        return None
    return value.replace("\x00", "\ufffd") if "\x00" in value else value


def _shown(data: str | bytes) -> str:
    # Whole: the provider cuts messages short only after taking its key out of them.
    text = data.decode("utf-8", "replace") if isinstance(data, bytes) else data
    return repr(text)


def raise_for_error(payload: dict[str, Any], *, provider: str | None = None) -> None:
    """Raise `BadGateway` for an error reported inside a completion or chunk (OpenRouter does)."""
    if payload.get("error"):
        raise BadGateway(_error_text(payload["error"]), provider=provider)
    choices = payload.get("choices")
    if choices is not None and not isinstance(choices, list):
        raise BadGateway("Upstream sent choices that are not a list", provider=provider)
    if choices:
        choice = choices[0]
        if not isinstance(choice, dict):
            raise BadGateway("Upstream sent a malformed choice", provider=provider)
        if choice.get("error"):
            raise BadGateway(_error_text(choice["error"]), provider=provider)
        if choice.get("finish_reason") == "error":
            raise BadGateway(
                "Upstream ended the reply with finish_reason 'error'", provider=provider
            )


def parse_usage(value: Any) -> Usage | None:
    """The upstream's own token counts, when it sent them.

    And when they are counts: none negative or absurd.
    """
    if not isinstance(value, dict):
        return None
    try:
        prompt = int(value.get("prompt_tokens") or 0)
        completion = int(value.get("completion_tokens") or 0)
        total = int(value.get("total_tokens") or prompt + completion)
    except (TypeError, ValueError, OverflowError):
        return None
    if not all(0 <= count <= MAX_COUNT for count in (prompt, completion, total)):
        return None
    return Usage(prompt, completion, total, estimated=False)


def _error_text(error: Any) -> str:
    if isinstance(error, dict):
        message = error.get("message") or "no message"
        code = error.get("code")
        return (
            f"Upstream reported an error ({code}): {message}"
            if code
            else f"Upstream reported an error: {message}"
        )
    return f"Upstream reported an error: {error}"


def estimate_tokens(text: str) -> int:
    """A rough token count (about four characters a token) for upstreams that send no usage."""
    return (len(text) + 3) // 4


def estimate_prompt_tokens(messages: list[Message]) -> int:
    # Chat templates add a few tokens of framing per message.
    return sum(estimate_tokens(m["content"]) + 4 for m in messages)


async def coalesce_chunks(
    chunks: AsyncIterable[StreamChunk],
    *,
    max_chars: int = 2048,
    max_delay: float = 0.01,
) -> AsyncGenerator[StreamChunk, None]:
    """Merge pieces so a fast upstream yields at most one piece per `max_delay` seconds.

    The first piece, and any piece arriving `max_delay` after the last one yielded, goes out at
    once, so a slow stream shows every token without delay. A buffer of `max_chars` goes out at
    once too. The upstream is read by a task of its own, so reading overlaps with whatever the
    caller does between pieces; the read pauses when the caller falls `8 * max_chars` behind.
    Text before an upstream error is yielded before the error is raised. Closing this iterator
    stops the reader and closes `chunks`.
    """
    loop = asyncio.get_running_loop()
    buffer: list[StreamChunk] = []
    buffered_chars = 0
    finished = False
    failure: Exception | None = None
    wake = asyncio.Event()
    room = asyncio.Event()
    room.set()

    async def pump() -> None:
        nonlocal buffered_chars, finished, failure
        try:
            async for chunk in chunks:
                buffer.append(chunk)
                buffered_chars += len(chunk.text)
                if len(buffer) == 1 or buffered_chars >= max_chars or chunk.finish_reason:
                    wake.set()
                if buffered_chars >= 8 * max_chars:
                    room.clear()
                    await room.wait()
        except Exception as exc:
            failure = exc
        finally:
            finished = True
            wake.set()
            aclose = getattr(chunks, "aclose", None)
            if aclose is not None:
                # Shielded: a second cancellation must not cut the close of the upstream short.
                await asyncio.shield(aclose())

    reader = asyncio.create_task(pump())
    last_out = -max_delay
    try:
        while True:
            if not buffer and not finished:
                wake.clear()
                await wake.wait()
            if not finished and buffered_chars < max_chars:
                delay = last_out + max_delay - loop.time()
                if delay > 0:
                    wake.clear()
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(delay):
                            await wake.wait()
            if buffer:
                pieces = buffer[:]
                buffer.clear()
                buffered_chars = 0
                room.set()
                last_out = loop.time()
                yield _merge(pieces)
            elif finished:
                if failure is not None:
                    raise failure
                return
    finally:
        await cancel_and_wait(reader)


async def cancel_and_wait(task: asyncio.Task[Any]) -> None:
    """Cancel `task` (once) and wait for it to end, without swallowing a cancellation of our own."""
    if not task.cancelling():
        task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        current = asyncio.current_task()
        if current is not None and current.cancelling():
            raise


def _merge(pieces: list[StreamChunk]) -> StreamChunk:
    if len(pieces) == 1:
        return pieces[0]
    last = pieces[-1]
    return StreamChunk(
        text="".join([p.text for p in pieces]),
        finish_reason=last.finish_reason,
        usage=last.usage,
        model=last.model or pieces[0].model,
    )


async def bounded_stream(
    chunks: AsyncIterable[StreamChunk], *, max_tokens: int, prompt_tokens: int = 0
) -> AsyncGenerator[StreamChunk, None]:
    """Pass pieces through until `max_tokens` tokens, then close `chunks` and finish `length`.

    A safety net for upstreams that ignore `max_tokens`; a piece holding several tokens is cut
    between them. It never cuts a reply that kept to its budget.
    """
    count = 0
    iterator = aiter(chunks)
    try:
        async for chunk in iterator:
            if chunk.finish_reason or count + chunk.tokens <= max_tokens:
                # Within budget (a reply of exactly max_tokens keeps its own finish and usage).
                count += chunk.tokens
                yield chunk
                if chunk.finish_reason:
                    return
                continue
            kept = (chunk.pieces or [chunk.text])[: max_tokens - count]
            count += len(kept)
            if kept:
                yield StreamChunk(text="".join(kept), model=chunk.model, pieces=kept)
            yield StreamChunk(
                finish_reason="length",
                usage=Usage.estimate(prompt_tokens, count),
                model=chunk.model,
            )
            return
    finally:
        aclose = getattr(iterator, "aclose", None)
        if aclose is not None:
            await aclose()
