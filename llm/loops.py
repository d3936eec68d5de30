"""One object per running event loop: what asyncio objects (clients, tasks, futures) need.

An `httpx.AsyncClient`, a task or a future belongs to the loop it was made on; a process may run
several loops over its life (each test, `async_to_sync` in a management command). `PerLoop`
builds the object on first use in a loop and forgets it with the loop (weakly keyed).
"""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import Callable
from typing import Generic, TypeVar

__all__ = ["PerLoop"]

T = TypeVar("T")


class PerLoop(Generic[T]):
    """`get()` returns the running loop's object, built by `factory` when there is none yet (or
    when `usable` says the one there can no longer serve, e.g. a closed client)."""

    def __init__(self, factory: Callable[[], T], *, usable: Callable[[T], bool] | None = None):
        self._factory = factory
        self._usable = usable
        self._objects: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, T] = (
            weakref.WeakKeyDictionary()
        )

    def get(self) -> T:
        loop = asyncio.get_running_loop()
        found = self._objects.get(loop)
        if found is None or (self._usable is not None and not self._usable(found)):
            found = self._objects[loop] = self._factory()
        return found

    def pop(self) -> T | None:
        """Forget the running loop's object and return it (None when there was none)."""
        return self._objects.pop(asyncio.get_running_loop(), None)
