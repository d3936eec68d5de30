"""The broadcaster alone, on a channel layer whose sends take a while (as Redis's do)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from llm.broadcast import Broadcaster, frames_group


class SlowLayer:
    """A channel layer whose `group_send` waits until let go, recording what it sent."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, dict[str, Any]]] = []
        self.sending = asyncio.Event()
        self.go = asyncio.Event()

    async def group_send(self, group: str, message: dict[str, Any]) -> None:
        self.sending.set()
        await self.go.wait()
        self.sent.append((group, message))


@pytest.fixture
def layer(monkeypatch: pytest.MonkeyPatch) -> SlowLayer:
    slow = SlowLayer()
    monkeypatch.setattr("llm.broadcast.get_channel_layer", lambda: slow)
    return slow


async def test_a_frame_being_sent_when_the_stream_is_cancelled_still_goes_first(
    layer: SlowLayer,
) -> None:
    broadcaster = Broadcaster("s1", dict)
    broadcaster.watched = True
    token = asyncio.create_task(broadcaster.publish({"type": "token", "text": " t2"}, 4))
    await asyncio.wait_for(layer.sending.wait(), 2)
    token.cancel()  # the client leaves while the token is on its way to the watchers
    with pytest.raises(asyncio.CancelledError):
        await token
    end = asyncio.create_task(broadcaster.publish({"type": "done"}))
    await asyncio.sleep(0.05)
    assert layer.sent == []  # both wait for the layer
    layer.go.set()
    await asyncio.wait_for(end, 2)
    assert [(group, m["frame"]["type"], m["offset"]) for group, m in layer.sent] == [
        (frames_group("s1"), "token", 4),
        (frames_group("s1"), "done", None),
    ]


async def test_stopping_waits_for_a_frame_still_on_its_way(layer: SlowLayer) -> None:
    broadcaster = Broadcaster("s2", dict)
    broadcaster.watched = True
    token = asyncio.create_task(broadcaster.publish({"type": "token", "text": " t"}, 0))
    await asyncio.wait_for(layer.sending.wait(), 2)
    token.cancel()
    stopping = asyncio.create_task(broadcaster.stop())
    await asyncio.sleep(0.05)
    assert not stopping.done()
    layer.go.set()
    await asyncio.wait_for(stopping, 2)
    assert [m["frame"]["type"] for _, m in layer.sent] == ["token"]


async def test_nothing_is_sent_while_nobody_watches(layer: SlowLayer) -> None:
    broadcaster = Broadcaster("s3", dict)
    layer.go.set()
    await broadcaster.publish({"type": "token", "text": " t"}, 0)
    assert layer.sent == []
