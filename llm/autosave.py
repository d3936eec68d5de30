"""Saves the reply of every generation streaming in this process, all in one write per interval.

One transaction every SAVE_INTERVAL seconds for the whole process, instead of one per stream:
a hundred streams cost the database (and the one thread async code reaches it through) what
one does. Each save also marks the sessions alive (`updated_at`), which is how a dead
process's sessions are told from live ones. A crash loses at most SAVE_INTERVAL seconds.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import uuid
from dataclasses import dataclass
from typing import Any, Protocol

from channels.db import database_sync_to_async
from django.db import connection, transaction
from django.utils import timezone

from .loops import PerLoop
from .models import Message, Session

logger = logging.getLogger("llm.autosave")

SAVE_INTERVAL = 2.0


class Reply(Protocol):
    @property
    def session_id(self) -> str | None: ...

    @property
    def length(self) -> int: ...

    @property
    def text(self) -> str: ...


@dataclass
class _Entry:
    reply: Reply
    position: int
    saved: int = 0  # the length of the text last written (0: no row yet)


class Autosave:
    """The saver of one event loop: `track()` a reply while it streams, `untrack()` before its end
    is stored. A save may still land after the end was stored (the end may be written from
    another thread: an HTTP request's own); it then changes nothing, since it only ever lengthens
    a reply."""

    def __init__(self) -> None:
        self._entries: dict[str, _Entry] = {}
        self._task: asyncio.Task[None] | None = None
        self._saving = False

    def track(self, reply: Reply, position: int) -> None:
        assert reply.session_id is not None
        self._entries[reply.session_id] = _Entry(reply, position)
        if self._task is None or self._task.done():
            # In a context of its own: one copied from the request that happened to start it would
            # send every later save through that request's thread (and pin it past its end).
            self._task = asyncio.create_task(self._run(), context=contextvars.Context())

    def untrack(self, session_id: str | None) -> None:
        if session_id is not None:
            self._entries.pop(session_id, None)
        if not self._entries and self._task is not None and not self._saving:
            # Idle: nothing left to save (a save under way finishes first). Forgotten at once, so
            # a reply tracked before the cancelled task has ended gets a task of its own.
            self._task.cancel()
            self._task = None

    async def _run(self) -> None:
        while self._entries:
            await asyncio.sleep(SAVE_INTERVAL)
            self._saving = True
            try:
                await self.save()
            except Exception:
                logger.exception("saving %d streaming replies failed", len(self._entries))
            finally:
                self._saving = False

    async def save(self) -> None:
        """Write what changed since the last save, and mark every tracked session alive."""
        entries = [
            (sid, e, e.reply.text) for sid, e in self._entries.items() if e.reply.length != e.saved
        ]
        alive = list(self._entries)
        if not alive:
            return
        await _write([(sid, e.position, text, e.saved > 0) for sid, e, text in entries], alive)
        for sid, entry, text in entries:
            if self._entries.get(sid) is entry:  # not a new turn of it, tracked during the write
                entry.saved = len(text)


@database_sync_to_async
def _write(changed: list[tuple[str, int, str, bool]], alive: list[str]) -> None:
    """One transaction; the updates go as one `executemany`, which keeps the ORM's per-query
    Python work (held under the GIL, away from the event loop's thread) out of a hundred rows."""
    with transaction.atomic():
        new = [
            Message(session_id=sid, position=pos, role=Message.Role.ASSISTANT, content=text)
            for sid, pos, text, exists in changed
            if not exists
        ]
        Message.objects.bulk_create(new, ignore_conflicts=True)
        updates = [
            (text, _session_key(sid), pos, len(text))
            for sid, pos, text, exists in changed
            if exists
        ]
        if updates:
            with connection.cursor() as cursor:
                cursor.executemany(UPDATE_REPLY, updates)
        Session.objects.filter(pk__in=alive, status=Session.Status.STREAMING).update(
            updated_at=timezone.now()
        )


# A reply only grows while it streams, so a save never shortens what is stored: one that lands
# after the whole reply was written (from another thread) is a no-op.
UPDATE_REPLY = (
    f"UPDATE {Message._meta.db_table} SET content = %s "
    "WHERE session_id = %s AND position = %s AND LENGTH(content) < %s"
)


def _session_key(session_id: str) -> Any:
    """The session id as this database stores it (SQLite: 32 hex digits; PostgreSQL: uuid)."""
    return Session._meta.pk.get_db_prep_value(uuid.UUID(session_id), connection)


_savers = PerLoop(Autosave)


def autosave() -> Autosave:
    """The running event loop's saver."""
    return _savers.get()
