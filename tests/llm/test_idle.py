"""`llm.idle.IdleTimer`: the stream's idle timeout, one timer per stream."""

from __future__ import annotations

import asyncio
import time

import pytest

from llm.idle import IdleTimer


async def wait_reading(timer: IdleTimer, seconds: float) -> bool:
    """Sit in a "read" for `seconds`; whether the timer cancelled us for idleness."""
    timer.reading = True
    try:
        await asyncio.sleep(seconds)
    except asyncio.CancelledError as exc:
        if timer.caused(exc):
            return True
        raise
    finally:
        timer.reading = False
    return False


async def test_a_silent_upstream_times_out() -> None:
    timer = IdleTimer(0.1)
    started = time.monotonic()
    assert await wait_reading(timer, 2.0)
    assert 0.09 <= time.monotonic() - started < 0.5
    timer.stop()


async def test_time_spent_with_the_caller_does_not_count() -> None:
    timer = IdleTimer(0.1)
    await asyncio.sleep(0.3)  # not reading: handing tokens on
    timer.touch()
    assert not await wait_reading(timer, 0.05)
    timer.stop()


async def test_bytes_waiting_to_be_read_are_not_idleness() -> None:
    """A loop too busy to hand the reader what already arrived must not call the upstream silent."""
    waiting = True

    async def read() -> bool:  # the timer cancels the task that made it
        timer = IdleTimer(0.1, lambda: waiting)
        try:
            return await wait_reading(timer, 2.0)
        finally:
            timer.stop()

    reading = asyncio.ensure_future(read())
    await asyncio.sleep(0.4)
    assert not reading.done(), "timed out while bytes waited"
    waiting = False  # the reader took them, and nothing more came: now it is idle
    assert await asyncio.wait_for(reading, 1.0)


@pytest.mark.parametrize("delay", [0.0, 0.05])
async def test_a_stopped_timer_never_fires(delay: float) -> None:
    timer = IdleTimer(0.05)
    await asyncio.sleep(delay)
    timer.stop()
    assert not await wait_reading(timer, 0.2)
