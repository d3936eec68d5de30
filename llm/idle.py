"""The idle timeout of a stream, at the cost of one timer per stream rather than one per read."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

# How soon a timer that found bytes waiting looks again.
RECHECK = 0.01


class IdleTimer:
    """Cancels the reading task when no token came for `timeout` s while it waited on the upstream.

    `asyncio.timeout()` around every read costs about 4 µs, a fifth of the relay's time per token
    on a fast stream; this timer is armed once and re-armed only when it fires. Time the task
    spends outside reads (with the caller) never counts: `touch()` after handing tokens on.
    """

    def __init__(self, timeout: float, waiting: Callable[[], bool] | None = None) -> None:
        self.timeout = timeout
        # Whether bytes already wait to be read (a busy loop has not got to them): then the
        # upstream is not idle, however long since the last token.
        self.waiting = waiting
        self.reading = False
        self.expired = False
        self._loop = asyncio.get_running_loop()
        self._task = asyncio.current_task()
        self._last = self._loop.time()
        # A TimerHandle, or the plain Handle of `call_soon` while `_expire` waits its turn.
        self._handle: asyncio.Handle = self._loop.call_at(self._last + timeout, self._fire)

    def touch(self) -> None:
        self._last = self._loop.time()

    def stop(self) -> None:
        self._handle.cancel()

    def caused(self, exc: asyncio.CancelledError) -> bool:
        """Whether this timer, and nothing else, cancelled the task.

        Then the cancel is taken back.
        """
        return self.expired and self._task is not None and self._task.uncancel() == 0

    def _fire(self) -> None:
        if not self._silent():
            self._rearm()
        elif self._waiting():
            # Bytes wait that a busy loop has not handed to the reader yet: look again once it has.
            self._handle = self._loop.call_later(RECHECK, self._fire)
        else:
            # Not yet: data the loop has just received wakes the reader in the next iteration;
            # look again after it, so a busy loop never mistakes a late read for a silent upstream.
            self._handle = self._loop.call_soon(self._expire)

    def _expire(self) -> None:
        if self._task is None:
            return
        if self._silent() and not self._waiting():
            self.expired = True
            self._task.cancel()
        else:
            self._fire()

    def _silent(self) -> bool:
        return self.reading and self._loop.time() >= self._last + self.timeout

    def _waiting(self) -> bool:
        return self.waiting is not None and self.waiting()

    def _rearm(self) -> None:
        now, due = self._loop.time(), self._last + self.timeout
        self._handle = self._loop.call_at(due if due > now else now + self.timeout, self._fire)
