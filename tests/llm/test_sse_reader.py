"""The relay's own SSE reader is held to httpx-sse's output, the reference, on every split."""

from __future__ import annotations

from httpx_sse._decoders import SSEDecoder, SSELineDecoder
from hypothesis import given, settings
from hypothesis import strategies as st

from llm.streaming import SSEDataReader, bounded_stream
from llm.types import StreamChunk


def reference(stream: bytes) -> list[str]:
    """What httpx-sse makes of the whole stream (the data of each dispatched event)."""
    lines, decoder, found = SSELineDecoder(), SSEDecoder(), []
    for line in [*lines.decode(stream.decode()), *lines.flush()]:
        had_data = bool(decoder._data)  # events with no data line carry nothing for the relay
        event = decoder.decode(line.rstrip("\n"))
        if event is not None and had_data:
            found.append(event.data)
    return found


def ours(stream: bytes, cuts: list[int]) -> list[str]:
    reader, found, start = SSEDataReader(), [], 0
    for cut in [*cuts, len(stream)]:
        found += [data.decode() for data in reader.feed(stream[start:cut])]
        start = cut
    return found + [data.decode() for data in reader.flush()]


FIELDS = [
    b'data: {"choices": [{"delta": {"content": "Hi \xc3\xa9\xe2\x82\xac"}}]}',
    b"data: [DONE]",
    b": OPENROUTER PROCESSING",
    b":",
    b"event: ping",
    b"id: 7",
    b"retry: 100",
    b"data:no-space",
    b"data:  two spaces",
    b"data",
    b"data: multi",
    b"data: line",
    b"unknown: x",
]


@st.composite
def streams_and_cuts(draw: st.DrawFn) -> tuple[bytes, list[int]]:
    """An SSE stream of 1-12 events of 1-3 lines each (any of the three line ends), and where
    the network splits it (up to 8 places)."""
    parts = []
    for _ in range(draw(st.integers(1, 12))):
        event = draw(st.lists(st.sampled_from(FIELDS), min_size=1, max_size=3))
        newline = draw(st.sampled_from([b"\n", b"\r\n", b"\r"]))
        parts.append(newline.join(event) + newline * 2)
    stream = b"".join(parts)
    cuts = draw(st.lists(st.integers(1, len(stream) - 1), max_size=8, unique=True))
    return stream, sorted(cuts)


# Was 300 seeded cases of one parametrized test (300 collected items): one property, as many
# examples, shrunk to the smallest failing stream when it fails.
@settings(max_examples=300, deadline=None, derandomize=True, database=None)
@given(streams_and_cuts())
def test_same_events_as_httpx_sse_on_any_split(case: tuple[bytes, list[int]]) -> None:
    stream, cuts = case
    assert ours(stream, cuts) == reference(stream)


def test_every_single_byte_split_of_a_realistic_stream() -> None:
    stream = (
        b": OPENROUTER PROCESSING\r\n\r\n"
        b'data: {"choices":[{"delta":{"content":"caf\xc3\xa9"}}]}\r\n\r\n'
        b'data: {"choices":[],"usage":{"prompt_tokens":1}}\n\n'
        b"data: [DONE]\n\n"
    )
    for cut in range(1, len(stream)):
        assert ours(stream, [cut]) == reference(stream)


def test_an_unfinished_event_at_the_end_is_not_dispatched() -> None:
    reader = SSEDataReader()
    assert reader.feed(b"data: one\n\ndata: two") == [b"one"]
    assert reader.feed(b"\n") == []
    assert reader.feed(b"\n") == [b"two"]


async def test_bounded_stream_cuts_between_tokens_of_one_piece() -> None:
    async def source():
        yield StreamChunk(text="a b c", pieces=["a", " b", " c"])
        yield StreamChunk(text=" d e", pieces=[" d", " e"])
        yield StreamChunk(finish_reason="stop")

    out = [chunk async for chunk in bounded_stream(source(), max_tokens=4)]
    assert "".join(c.text for c in out) == "a b c d"
    usage = out[-1].usage
    assert out[-1].finish_reason == "length" and usage is not None and usage.completion_tokens == 4


async def test_a_reply_of_exactly_the_budget_keeps_its_own_finish_and_usage() -> None:
    async def source():
        yield StreamChunk(text="a b", pieces=["a", " b"])
        yield StreamChunk(finish_reason="stop", usage=None, model="m")

    out = [chunk async for chunk in bounded_stream(source(), max_tokens=2)]
    assert [c.finish_reason for c in out] == [None, "stop"]
