"""The streaming core (`llm/streaming.py`): chunk parsing, token estimates, coalescing, bounding.

Pure asyncio tests: sources are small async generators; no HTTP and no Django settings.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections.abc import AsyncIterator, Iterable
from typing import Any

import pytest

from llm.exceptions import BadGateway
from llm.streaming import (
    bounded_stream,
    coalesce_chunks,
    estimate_prompt_tokens,
    estimate_tokens,
    parse_chunk,
    parse_usage,
)
from llm.types import Message, StreamChunk, Usage


def data(payload: Any) -> str:
    return json.dumps(payload)


def delta(content: Any = None, *, finish_reason: str | None = None, **extra: Any) -> str:
    choice: dict[str, Any] = {"index": 0, "delta": {} if content is None else {"content": content}}
    choice["finish_reason"] = finish_reason
    return data(
        {
            "id": "gen-1",
            "object": "chat.completion.chunk",
            "model": "m-1",
            "choices": [choice],
            **extra,
        }
    )


# parse_chunk -------------------------------------------------------------------------------------


def test_parse_chunk_text_delta() -> None:
    chunk = parse_chunk(delta("Hel"))
    assert chunk == StreamChunk(text="Hel", finish_reason=None, usage=None, model="m-1")


def test_parse_chunk_keeps_whitespace_and_unicode_exactly() -> None:
    chunk = parse_chunk(delta("  h\u00e9\n\u4f60\U0001f600 "))
    assert chunk is not None and chunk.text == "  h\u00e9\n\u4f60\U0001f600 "


def test_parse_chunk_role_only_delta_has_empty_text() -> None:
    chunk = parse_chunk(
        data({"model": "m", "choices": [{"delta": {"role": "assistant"}, "finish_reason": None}]})
    )
    assert chunk is not None
    assert chunk.text == ""
    assert chunk.finish_reason is None


def test_parse_chunk_null_content_is_empty_text() -> None:
    chunk = parse_chunk(data({"choices": [{"delta": {"content": None}}]}))
    assert chunk is not None and chunk.text == ""


def test_parse_chunk_finish_reason() -> None:
    chunk = parse_chunk(delta(None, finish_reason="stop"))
    assert chunk is not None
    assert chunk.finish_reason == "stop"
    assert chunk.text == ""


def test_parse_chunk_finish_reason_length() -> None:
    chunk = parse_chunk(delta("end", finish_reason="length"))
    assert chunk is not None
    assert (chunk.text, chunk.finish_reason) == ("end", "length")


def test_parse_chunk_reports_upstream_model() -> None:
    chunk = parse_chunk(
        data({"model": "smollm2-135m-instruct", "choices": [{"delta": {"content": "x"}}]})
    )
    assert chunk is not None and chunk.model == "smollm2-135m-instruct"


def test_parse_chunk_without_model_has_none() -> None:
    chunk = parse_chunk(data({"choices": [{"delta": {"content": "x"}}]}))
    assert chunk is not None and chunk.model is None


def test_parse_chunk_usage_chunk_with_empty_choices() -> None:
    chunk = parse_chunk(
        data(
            {
                "model": "m",
                "choices": [],
                "usage": {"prompt_tokens": 9, "completion_tokens": 3, "total_tokens": 12},
            }
        )
    )
    assert chunk is not None
    assert chunk.text == ""
    assert chunk.finish_reason is None
    assert chunk.usage == Usage(9, 3, 12, estimated=False)


def test_parse_chunk_usage_together_with_finish_reason() -> None:
    chunk = parse_chunk(
        delta(None, finish_reason="stop", usage={"prompt_tokens": 1, "completion_tokens": 2})
    )
    assert chunk is not None
    assert chunk.finish_reason == "stop"
    assert chunk.usage == Usage(1, 2, 3, estimated=False)


def test_parse_chunk_done_is_none() -> None:
    assert parse_chunk("[DONE]") is None


@pytest.mark.parametrize(
    "payload", ['{"choices": [', "not json", "", "{'single': 'quotes'}", "data: {}"]
)
def test_parse_chunk_invalid_json_is_bad_gateway(payload: str) -> None:
    with pytest.raises(BadGateway) as info:
        parse_chunk(payload, provider="lm_studio")
    assert info.value.code == "LLM_BAD_GATEWAY"
    assert info.value.status == 502
    assert info.value.provider == "lm_studio"


@pytest.mark.parametrize("payload", ["[1, 2]", '"text"', "42", "null", "true"])
def test_parse_chunk_non_object_json_is_bad_gateway(payload: str) -> None:
    with pytest.raises(BadGateway) as info:
        parse_chunk(payload)
    assert info.value.code == "LLM_BAD_GATEWAY"


def test_parse_chunk_top_level_error_carries_upstream_message() -> None:
    payload = data({"error": {"code": 502, "message": "Provider returned error: model overloaded"}})
    with pytest.raises(BadGateway) as info:
        parse_chunk(payload, provider="openrouter")
    assert info.value.code == "LLM_BAD_GATEWAY"
    assert "Provider returned error: model overloaded" in info.value.message
    assert "Provider returned error: model overloaded" in str(info.value)
    assert info.value.provider == "openrouter"


def test_parse_chunk_top_level_error_string() -> None:
    with pytest.raises(BadGateway) as info:
        parse_chunk(data({"error": "upstream exploded"}))
    assert "upstream exploded" in info.value.message


def test_parse_chunk_top_level_error_after_some_fields() -> None:
    # OpenRouter: a mid-stream error arrives as a chunk with both `error` and a choice.
    payload = data(
        {
            "id": "gen-1",
            "model": "openai/gpt-4o",
            "error": {"code": "server_error", "message": "Upstream provider crashed mid-stream"},
            "choices": [{"index": 0, "delta": {"content": ""}, "finish_reason": "error"}],
        }
    )
    with pytest.raises(BadGateway) as info:
        parse_chunk(payload)
    assert "Upstream provider crashed mid-stream" in info.value.message


def test_parse_chunk_choice_error_carries_upstream_message() -> None:
    payload = data(
        {"choices": [{"index": 0, "delta": {}, "error": {"message": "content filter tripped"}}]}
    )
    with pytest.raises(BadGateway) as info:
        parse_chunk(payload)
    assert info.value.code == "LLM_BAD_GATEWAY"
    assert "content filter tripped" in info.value.message


def test_parse_chunk_finish_reason_error_is_bad_gateway() -> None:
    with pytest.raises(BadGateway) as info:
        parse_chunk(delta("partial", finish_reason="error"))
    assert info.value.code == "LLM_BAD_GATEWAY"


def test_parse_chunk_finish_reason_error_with_message_carries_it() -> None:
    payload = data(
        {
            "choices": [
                {
                    "delta": {},
                    "finish_reason": "error",
                    "error": {"code": 500, "message": "rate limited by provider"},
                }
            ]
        }
    )
    with pytest.raises(BadGateway) as info:
        parse_chunk(payload)
    assert "rate limited by provider" in info.value.message


def test_parse_chunk_null_error_is_not_an_error() -> None:
    chunk = parse_chunk(
        data({"error": None, "choices": [{"delta": {"content": "ok"}, "error": None}]})
    )
    assert chunk is not None and chunk.text == "ok"


@pytest.mark.parametrize("content", [123, 1.5, ["a"], {"text": "a"}, True])
def test_parse_chunk_non_string_content_is_bad_gateway(content: Any) -> None:
    with pytest.raises(BadGateway) as info:
        parse_chunk(delta(content))
    assert info.value.code == "LLM_BAD_GATEWAY"


@pytest.mark.parametrize("choices", ['"nope"', "{}", "[1]", '["x"]'])
def test_parse_chunk_malformed_choices_is_bad_gateway(choices: str) -> None:
    with pytest.raises(BadGateway):
        parse_chunk('{"choices": ' + choices + "}")


# parse_usage / estimates ------------------------------------------------------------------------


def test_parse_usage_full() -> None:
    assert parse_usage({"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}) == Usage(
        10, 5, 15, False
    )


def test_parse_usage_total_missing_is_the_sum() -> None:
    assert parse_usage({"prompt_tokens": 10, "completion_tokens": 5}) == Usage(10, 5, 15, False)


def test_parse_usage_is_not_estimated() -> None:
    usage = parse_usage({"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2})
    assert usage is not None and usage.estimated is False


@pytest.mark.parametrize(
    "value", [None, "12", 12, [1, 2], {"prompt_tokens": "many"}, {"completion_tokens": [1]}]
)
def test_parse_usage_unusable_is_none(value: Any) -> None:
    assert parse_usage(value) is None


def test_estimate_tokens() -> None:
    assert estimate_tokens("") == 0
    assert estimate_tokens("a") >= 1
    for n in (1, 4, 5, 40, 401, 4000):
        estimate = estimate_tokens("x" * n)
        # About four characters a token, never zero for non-empty text.
        assert n / 4 <= estimate <= n / 4 + 1
    assert estimate_tokens("x" * 100) < estimate_tokens("x" * 1000)


def test_estimate_prompt_tokens() -> None:
    assert estimate_prompt_tokens([]) == 0
    one: list[Message] = [{"role": "user", "content": "Hello there, how are you?"}]
    two: list[Message] = [{"role": "system", "content": "Be brief."}, *one]
    # Framing per message: more than the bare content, and one more message costs more.
    assert estimate_prompt_tokens(one) > estimate_tokens(one[0]["content"])
    assert estimate_prompt_tokens(two) > estimate_prompt_tokens(one)
    assert estimate_prompt_tokens([{"role": "user", "content": ""}]) > 0
    long: list[Message] = [{"role": "user", "content": "x" * 4000}]
    assert 1000 <= estimate_prompt_tokens(long) <= 1010


# helpers for the async tests --------------------------------------------------------------------


class Source:
    """An async generator source that records what it produced and whether it was closed."""

    def __init__(
        self,
        texts: Iterable[str],
        *,
        delay: float | None = None,
        final: StreamChunk | None = None,
        error: BaseException | None = None,
        then_sleep: float | None = None,
    ) -> None:
        self.texts = list(texts)
        self.delay = delay
        self.final = final
        self.error = error
        self.then_sleep = then_sleep
        self.produced = 0
        self.times: list[float] = []
        self.closed = False
        self.finished = False

    async def __call__(self) -> AsyncIterator[StreamChunk]:
        try:
            for text in self.texts:
                self.produced += 1
                self.times.append(time.monotonic())
                yield StreamChunk(text=text, model="m-1")
                if self.delay is not None:
                    await asyncio.sleep(self.delay)
            if self.then_sleep is not None:
                await asyncio.sleep(self.then_sleep)
            if self.error is not None:
                raise self.error
            if self.final is not None:
                self.produced += 1
                yield self.final
            self.finished = True
        finally:
            self.closed = True


async def collect(agen: AsyncIterator[StreamChunk]) -> list[StreamChunk]:
    return [chunk async for chunk in agen]


def joined(chunks: Iterable[StreamChunk]) -> str:
    return "".join(c.text for c in chunks)


async def settle() -> None:
    for _ in range(3):
        await asyncio.sleep(0)


# coalesce_chunks ---------------------------------------------------------------------------------


def _random_text(rng: random.Random) -> str:
    alphabet = "ab c\n\u00e9\u4f60\U0001f600."
    return "".join(rng.choice(alphabet) for _ in range(rng.choice([0, 0, 1, 1, 1, 2, 3, 5, 17])))


async def test_coalesce_keeps_all_text_in_order_for_random_inputs() -> None:
    rng = random.Random(20240601)
    baseline = asyncio.all_tasks()
    for case in range(200):
        texts = [_random_text(rng) for _ in range(rng.randint(0, 60))]
        # Each chunk text is unique-ish (numbered) so a reorder or a duplicate cannot go unnoticed.
        texts = [f"{t}<{i}>" if rng.random() < 0.5 else t for i, t in enumerate(texts)]
        pauses = [rng.choice([None, None, None, 0, 0, 0, 0.0005, 0.0015]) for _ in texts]
        max_chars = rng.choice([1, 3, 8, 64, 2048])

        async def source(
            texts: list[str], pauses: list[float | None]
        ) -> AsyncIterator[StreamChunk]:
            for text, pause in zip(texts, pauses, strict=True):
                yield StreamChunk(text=text)
                if pause is not None:
                    await asyncio.sleep(pause)

        out: list[StreamChunk] = []
        pieces = coalesce_chunks(source(texts, pauses), max_chars=max_chars, max_delay=0.001)
        async for piece in pieces:
            out.append(piece)
            if rng.random() < 0.3:
                await asyncio.sleep(0)
        assert joined(out) == "".join(texts), f"case {case}"
        assert len(out) <= len(texts), f"case {case}"
    await settle()
    assert asyncio.all_tasks() == baseline


async def test_coalesce_empty_source_yields_nothing() -> None:
    source = Source([])
    assert await collect(coalesce_chunks(source())) == []
    assert source.closed


async def test_coalesce_yields_first_chunk_at_once() -> None:
    # The source then sleeps 0.5 s; even with a long max_delay the first piece must not wait for it.
    source = Source(
        ["Hello"], then_sleep=0.5, final=StreamChunk(text=" world", finish_reason="stop")
    )
    coalescer = coalesce_chunks(source(), max_delay=1.0)
    started = time.monotonic()
    first = await asyncio.wait_for(coalescer.__anext__(), timeout=2)
    elapsed = time.monotonic() - started
    assert first.text == "Hello"
    assert elapsed < 0.25, f"first piece took {elapsed:.3f}s"
    rest = await collect(coalescer)
    assert joined([first, *rest]) == "Hello world"
    assert rest[-1].finish_reason == "stop"


async def test_coalesce_fast_source_yields_far_fewer_pieces() -> None:
    texts = [f"t{i} " for i in range(100)]

    async def source() -> AsyncIterator[StreamChunk]:
        for text in texts:
            yield StreamChunk(text=text)
            await asyncio.sleep(0)  # let the event loop run, as a real network read would

    out = await collect(coalesce_chunks(source(), max_delay=0.01))
    assert joined(out) == "".join(texts)
    assert len(out) <= 10, [c.text for c in out]


async def test_coalesce_fast_source_without_any_await_yields_few_pieces() -> None:
    source = Source([f"{i}," for i in range(100)])
    out = await collect(coalesce_chunks(source(), max_delay=0.01))
    assert joined(out) == "".join(f"{i}," for i in range(100))
    assert len(out) <= 5


async def test_coalesce_slow_source_yields_each_chunk_without_waiting_for_the_next() -> None:
    texts = ["one ", "two ", "three ", "four ", "five"]
    source = Source(texts, delay=0.03)
    received: list[tuple[str, float]] = []
    async for piece in coalesce_chunks(source(), max_delay=0.01):
        received.append((piece.text, time.monotonic()))
    assert [text for text, _ in received] == texts
    for i, (_, at) in enumerate(received):
        lag = at - source.times[i]
        assert lag < 0.02, f"piece {i} arrived {lag * 1000:.1f} ms after it was produced"
        if i + 1 < len(source.times):
            assert at < source.times[i + 1], f"piece {i} waited for the next chunk"


async def test_coalesce_end_of_stream_is_not_delayed() -> None:
    # After the source ends, what is buffered goes out at once, not after max_delay.
    source = Source(["a", "b", "c"], final=StreamChunk(text="", finish_reason="stop"))
    started = time.monotonic()
    out = await asyncio.wait_for(collect(coalesce_chunks(source(), max_delay=5.0)), timeout=3)
    assert time.monotonic() - started < 1.0
    assert joined(out) == "abc"
    assert out[-1].finish_reason == "stop"


async def test_coalesce_max_chars_forces_a_flush() -> None:
    # First piece out at once; then 5-char chunks until 20 chars, then the source stalls.
    # With max_delay = 10 s only the max_chars rule can deliver the buffered 20 chars in time.
    source = Source(["first", "aaaaa", "bbbbb", "ccccc", "ddddd"], delay=0, then_sleep=10)
    coalescer = coalesce_chunks(source(), max_chars=20, max_delay=10.0)
    try:
        first = await asyncio.wait_for(coalescer.__anext__(), timeout=1)
        assert first.text == "first"
        second = await asyncio.wait_for(coalescer.__anext__(), timeout=1)
        assert second.text == "aaaaabbbbbcccccddddd"
    finally:
        await coalescer.aclose()
    assert source.closed


async def test_coalesce_below_max_chars_waits_for_max_delay() -> None:
    # The counterpart: under max_chars and within max_delay, pieces are held back and merged.
    source = Source(["first", "a", "b", "c"], delay=0.002)
    out = await collect(coalesce_chunks(source(), max_chars=2048, max_delay=0.2))
    assert [c.text for c in out] == ["first", "abc"]


async def test_coalesce_final_finish_reason_and_usage_survive_merging() -> None:
    usage = Usage(11, 40, 51, estimated=False)
    final = StreamChunk(text="!", finish_reason="stop", usage=usage, model="m-final")
    source = Source([f"w{i} " for i in range(40)], final=final)
    out = await collect(coalesce_chunks(source(), max_delay=0.01))
    assert len(out) < 41  # it did merge
    last = out[-1]
    assert last.finish_reason == "stop"
    assert last.usage == usage
    assert last.model == "m-final"
    assert joined(out) == "".join(f"w{i} " for i in range(40)) + "!"
    assert all(c.finish_reason is None and c.usage is None for c in out[:-1])


async def test_coalesce_final_empty_chunk_with_finish_reason_survives() -> None:
    usage = Usage(3, 2, 5, estimated=True)
    source = Source(["x", "y"], final=StreamChunk(finish_reason="length", usage=usage))
    out = await collect(coalesce_chunks(source(), max_delay=0.05))
    assert joined(out) == "xy"
    assert (out[-1].finish_reason, out[-1].usage) == ("length", usage)


async def test_coalesce_keeps_model_when_last_chunk_has_none() -> None:
    async def source() -> AsyncIterator[StreamChunk]:
        yield StreamChunk(text="a", model="real-model")
        yield StreamChunk(text="b", model="real-model")
        yield StreamChunk(text="", finish_reason="stop")

    out = await collect(coalesce_chunks(source(), max_delay=0.05))
    assert all(c.model == "real-model" for c in out)


async def test_coalesce_source_error_yields_text_first_then_raises_the_same_exception() -> None:
    error = BadGateway("cut stream", provider="lm_studio")
    source = Source(["Hel", "lo", ", wor", "ld"], error=error)
    received: list[str] = []
    with pytest.raises(BadGateway) as info:
        async for piece in coalesce_chunks(source(), max_delay=5.0):
            received.append(piece.text)
    assert info.value is error
    assert "".join(received) == "Hello, world"
    assert source.closed


async def test_coalesce_source_error_after_slow_chunks() -> None:
    error = ValueError("boom")
    source = Source(["a", "b", "c"], delay=0.02, error=error)
    received: list[str] = []
    with pytest.raises(ValueError) as info:
        async for piece in coalesce_chunks(source(), max_delay=0.005):
            received.append(piece.text)
    assert info.value is error
    assert received == ["a", "b", "c"]


async def test_coalesce_source_error_before_any_chunk() -> None:
    error = BadGateway("bad JSON")
    source = Source([], error=error)
    with pytest.raises(BadGateway) as info:
        await collect(coalesce_chunks(source()))
    assert info.value is error


async def test_coalesce_error_is_not_delayed_by_max_delay() -> None:
    source = Source(["a", "b"], error=RuntimeError("down"))
    started = time.monotonic()
    with pytest.raises(RuntimeError):
        await asyncio.wait_for(collect(coalesce_chunks(source(), max_delay=5.0)), timeout=3)
    assert time.monotonic() - started < 1.0


async def test_coalesce_aclose_early_closes_source_and_leaves_no_task() -> None:
    baseline = asyncio.all_tasks()
    source = Source((f"{i} " for i in range(10_000)), delay=0.001)
    coalescer = coalesce_chunks(source(), max_delay=0.01)
    first = await coalescer.__anext__()
    assert first.text == "0 "
    assert asyncio.all_tasks() != baseline  # the reader task runs while the coalescer is open
    await coalescer.aclose()
    assert source.closed, "closing the coalescer must run the source's finally"
    assert not source.finished
    await settle()
    assert asyncio.all_tasks() == baseline
    produced = source.produced
    await asyncio.sleep(0.03)
    assert source.produced == produced  # nothing keeps reading after close


async def test_coalesce_aclose_while_source_is_blocked() -> None:
    baseline = asyncio.all_tasks()
    source = Source(["only"], then_sleep=30)
    coalescer = coalesce_chunks(source())
    assert (await coalescer.__anext__()).text == "only"
    await asyncio.sleep(0.01)  # the reader is now parked inside the source's sleep
    await asyncio.wait_for(coalescer.aclose(), timeout=1)
    assert source.closed
    await settle()
    assert asyncio.all_tasks() == baseline


async def test_coalesce_cancelling_the_consumer_closes_the_source() -> None:
    baseline = asyncio.all_tasks()
    source = Source((str(i) for i in range(10_000)), delay=0.005)
    got: list[str] = []

    async def consume() -> None:
        async for piece in coalesce_chunks(source(), max_delay=0.01):
            got.append(piece.text)

    task = asyncio.create_task(consume())
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert got, "the consumer received pieces before it was cancelled"
    assert source.closed
    await settle()
    assert asyncio.all_tasks() == baseline


async def test_coalesce_backpressure_bounds_reading_ahead() -> None:
    max_chars = 16
    source = Source(("x" for _ in range(1_000_000)), delay=0)
    coalescer = coalesce_chunks(source(), max_chars=max_chars, max_delay=0.001)
    try:
        first = await coalescer.__anext__()
        consumed = len(first.text)
        await asyncio.sleep(0.2)  # a consumer that does not read for a while
        ahead = source.produced - consumed
        # The pump pauses around 8 * max_chars buffered; without a bound it would read thousands.
        assert ahead <= 8 * max_chars + max_chars, f"read {ahead} chunks ahead of the consumer"
        # And it resumes once the consumer reads again.
        second = await coalescer.__anext__()
        assert len(second.text) >= 1
        await asyncio.sleep(0.05)
        assert source.produced > consumed + ahead
    finally:
        await coalescer.aclose()
    assert source.closed


# bounded_stream ----------------------------------------------------------------------------------


async def test_bounded_stream_stops_at_max_tokens_with_length_and_estimated_usage() -> None:
    source = Source([f"t{i}" for i in range(50)])
    out = await collect(bounded_stream(source(), max_tokens=5, prompt_tokens=7))
    assert [c.text for c in out[:-1]] == ["t0", "t1", "t2", "t3", "t4"]
    final = out[-1]
    assert final.text == ""
    assert final.finish_reason == "length"
    assert final.usage == Usage(7, 5, 12, estimated=True)
    assert final.model == "m-1"
    assert source.closed, "the source must be closed when the bound is reached"
    assert not source.finished
    assert source.produced <= 6


async def test_bounded_stream_empty_pieces_do_not_count() -> None:
    async def source() -> AsyncIterator[StreamChunk]:
        yield StreamChunk(text="", model="m")  # role-only first delta
        for i in range(10):
            yield StreamChunk(text=str(i))
            yield StreamChunk(text="")

    out = await collect(bounded_stream(source(), max_tokens=3))
    assert joined(out) == "012"
    assert out[-1].finish_reason == "length"
    assert out[-1].usage is not None and out[-1].usage.completion_tokens == 3


async def test_bounded_stream_passes_a_short_stream_through_unchanged() -> None:
    usage = Usage(4, 3, 7, estimated=False)
    chunks = [
        StreamChunk(text="a", model="m"),
        StreamChunk(text="b", model="m"),
        StreamChunk(text="c", finish_reason="stop", usage=usage, model="m"),
    ]

    async def source() -> AsyncIterator[StreamChunk]:
        for chunk in chunks:
            yield chunk

    out = await collect(bounded_stream(source(), max_tokens=10, prompt_tokens=99))
    assert out == chunks
    assert [c is o for c, o in zip(chunks, out, strict=True)] == [True, True, True]


async def test_bounded_stream_exactly_at_budget_with_finish_keeps_upstream_finish() -> None:
    usage = Usage(1, 3, 4)

    async def source() -> AsyncIterator[StreamChunk]:
        yield StreamChunk(text="a")
        yield StreamChunk(text="b")
        yield StreamChunk(text="c", finish_reason="stop", usage=usage)

    out = await collect(bounded_stream(source(), max_tokens=3))
    assert [c.finish_reason for c in out] == [None, None, "stop"]
    assert out[-1].usage == usage


async def test_bounded_stream_aclose_closes_the_source() -> None:
    source = Source([str(i) for i in range(100)])
    bounded = bounded_stream(source(), max_tokens=50)
    assert (await bounded.__anext__()).text == "0"
    await bounded.aclose()
    assert source.closed


async def test_bounded_stream_propagates_source_errors() -> None:
    error = BadGateway("cut")
    source = Source(["a", "b"], error=error)
    received: list[str] = []
    with pytest.raises(BadGateway) as info:
        async for piece in bounded_stream(source(), max_tokens=10):
            received.append(piece.text)
    assert info.value is error
    assert received == ["a", "b"]
    assert source.closed


async def test_bounded_then_coalesced_like_generation() -> None:
    baseline = asyncio.all_tasks()
    source = Source([f"{i} " for i in range(200)])
    out = await collect(
        coalesce_chunks(bounded_stream(source(), max_tokens=20, prompt_tokens=2), max_delay=0.01)
    )
    assert joined(out) == "".join(f"{i} " for i in range(20))
    assert out[-1].finish_reason == "length"
    assert out[-1].usage == Usage(2, 20, 22, estimated=True)
    assert source.closed
    await settle()
    assert asyncio.all_tasks() == baseline
