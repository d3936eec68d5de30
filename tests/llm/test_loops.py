"""`llm.loops.PerLoop`: one object per running event loop, rebuilt when no longer usable."""

from __future__ import annotations

import asyncio
import gc
from typing import Any

from llm.loops import PerLoop


class Thing:
    closed = False


def test_one_object_per_loop_and_forgotten_with_its_loop() -> None:
    things = PerLoop(Thing)

    async def twice() -> tuple[Thing, Thing]:
        return things.get(), things.get()

    first, again = asyncio.run(twice())
    other, _ = asyncio.run(twice())
    assert first is again  # the same loop: the same object
    assert other is not first  # another loop: its own
    gc.collect()
    assert len(things._objects) == 0  # both loops are gone, and their objects with them


def test_an_unusable_object_is_replaced_and_pop_forgets_it() -> None:
    things: PerLoop[Any] = PerLoop(Thing, usable=lambda thing: not thing.closed)

    async def run() -> None:
        first = things.get()
        first.closed = True
        second = things.get()
        assert second is not first
        assert things.pop() is second
        assert things.pop() is None
        assert things.get() is not second

    asyncio.run(run())
