"""Persistence of generations: open (create or continue) a session, and close it.

Writes go through `database_sync_to_async`, never per token: new sessions that start together
are created in one transaction; while a reply streams, `llm.autosave` saves it every few seconds;
it is stored whole at the end.
`recover_interrupted()` marks sessions whose process died as `interrupted`.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import os
import socket
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from channels.db import database_sync_to_async
from django.db import DataError, IntegrityError, transaction
from django.db.models import Max, Q
from django.utils import timezone

from .exceptions import GenerationInProgress, InternalError, SessionNotFound
from .loops import PerLoop
from .models import Message, Session
from .types import FinishedReply
from .types import Message as MessageDict

logger = logging.getLogger("llm.sessions")

# A streaming session whose process has not saved for this long is taken for dead.
STALE_AFTER = timedelta(seconds=60)


_BOOT = uuid.uuid4().hex[:8]


def worker_id() -> str:
    """This process, as stored on the sessions it streams: host, pid, and a per-start id (a
    restarted container often gets the same pid). Computed per call, so safe across fork."""
    return f"{socket.gethostname()}:{os.getpid()}:{_BOOT}"


def _at(timestamp: float | None) -> datetime | None:
    return None if timestamp is None else datetime.fromtimestamp(timestamp, tz=UTC)


@dataclass
class OpenedSession:
    session_id: str
    history: list[MessageDict]
    reply_position: int


@dataclass(frozen=True, slots=True)
class NewSession:
    """A session to create: its first messages, the provider asked first, and whether the
    sessions API keeps it to staff (`private`)."""

    session_id: str
    messages: list[MessageDict]
    provider: str
    private: bool = False


async def open_session(
    session_id: str,
    messages: list[MessageDict],
    provider: str,
    *,
    create: bool,
    private: bool = False,
) -> OpenedSession:
    """Create the session `session_id`, or claim a stored one for a new turn; store the messages.

    Returns the whole conversation to send upstream (stored history first).
    """
    if create:
        return await _creators.get().create(NewSession(session_id, messages, provider, private))
    return await _continue_session(session_id, messages, provider)


@database_sync_to_async
def _continue_session(session_id: str, messages: list[MessageDict], provider: str) -> OpenedSession:
    now = timezone.now()
    with transaction.atomic():
        # Free to continue unless another reply streams; one whose process stopped saving long
        # ago (killed on another host) is taken over.
        claimed = (
            Session.objects.filter(pk=session_id, private=False)
            .filter(~Q(status=Session.Status.STREAMING) | Q(updated_at__lt=now - STALE_AFTER))
            .update(
                status=Session.Status.STREAMING,
                provider=provider,
                tried=[],
                worker=worker_id(),
                updated_at=now,
                finish_reason="",
                error_code="",
                error_message="",
                prompt_tokens=None,
                completion_tokens=None,
                usage_estimated=False,
                first_token_at=None,
                finished_at=None,
                ttft_ms=None,
                tokens_per_second=None,
                response_format=None,
                output=None,
            )
        )
        if not claimed:
            if Session.objects.filter(pk=session_id, private=False).exists():
                raise GenerationInProgress(f"Session {session_id} is already generating a reply")
            raise SessionNotFound(f"Session {session_id} does not exist")
        session = Session.objects.get(pk=session_id)
        history: list[MessageDict] = [
            {"role": role, "content": content}
            for role, content in session.messages.order_by("position").values_list(
                "role", "content"
            )
        ]
        start = (session.messages.aggregate(last=Max("position"))["last"] or -1) + 1
        Message.objects.bulk_create(
            Message(
                session=session,
                position=start + i,
                role=m["role"],
                content=m["content"],
                created_at=now,
            )
            for i, m in enumerate(messages)
        )
    return OpenedSession(str(session.pk), history, start + len(messages))


class _Creator:
    """The new sessions of one event loop, written together: all that arrive while a write runs
    go in the next one, one transaction and two inserts, so a hundred clients starting at once
    cost the database thread (and the GIL the event loop needs) about what one does."""

    def __init__(self) -> None:
        self._pending: list[tuple[NewSession, asyncio.Future[OpenedSession]]] = []
        self._task: asyncio.Task[None] | None = None

    def create(self, new: NewSession) -> asyncio.Future[OpenedSession]:
        future: asyncio.Future[OpenedSession] = asyncio.get_running_loop().create_future()
        self._pending.append((new, future))
        if self._task is None or self._task.done():
            # A context of its own, as the autosave's: not the thread of the request that came
            # first.
            self._task = asyncio.create_task(self._write_pending(), context=contextvars.Context())
        return future

    async def _write_pending(self) -> None:
        batch: list[tuple[NewSession, asyncio.Future[OpenedSession]]] = []
        try:
            while self._pending:
                batch, self._pending = self._pending, []
                rows = [new for new, _ in batch]
                try:
                    failures = await _create_sessions(rows)
                except Exception as exc:  # the database itself failed: every one of them did
                    failures = [exc] * len(batch)
                for (new, future), failure in zip(batch, failures, strict=True):
                    if future.done():
                        continue
                    if failure is None:
                        future.set_result(OpenedSession(new.session_id, [], len(new.messages)))
                    else:
                        future.set_exception(failure)
        finally:  # cancelled (the loop is closing): no generation waits forever for its session
            for _, future in [*batch, *self._pending]:
                if not future.done():
                    future.set_exception(InternalError("The session could not be stored"))
            self._pending = []


@database_sync_to_async
def _create_sessions(rows: list[NewSession]) -> list[Exception | None]:
    """Create the sessions and their messages; per row, the error that kept it out (or None).

    All in one transaction; should it fail, each row is tried alone, so one bad row (a session id
    taken) never keeps the others out."""
    try:
        with transaction.atomic():
            _insert_sessions(rows)
        return [None] * len(rows)
    except (IntegrityError, DataError):  # a row of its own fault: find which (others re-raise)
        if len(rows) == 1:
            raise
    failures: list[Exception | None] = []
    for row in rows:
        try:
            with transaction.atomic():
                _insert_sessions([row])
            failures.append(None)
        except Exception as exc:
            failures.append(exc)
    return failures


def _insert_sessions(rows: list[NewSession]) -> None:
    now = timezone.now()
    worker = worker_id()
    Session.objects.bulk_create(
        Session(
            pk=new.session_id,
            provider=new.provider,
            private=new.private,
            worker=worker,
            created_at=now,
            updated_at=now,
        )
        for new in rows
    )
    Message.objects.bulk_create(
        Message(
            session_id=new.session_id,
            position=i,
            role=m["role"],
            content=m["content"],
            created_at=now,
        )
        for new in rows
        for i, m in enumerate(new.messages)
    )


@database_sync_to_async
def reveal(session_ids: list[str]) -> int:
    """Show private sessions in the sessions API from now on (what kept them private is over)."""
    return Session.objects.filter(pk__in=session_ids, private=True).update(private=False)


_creators = PerLoop(_Creator)


@database_sync_to_async
def close_session(reply: FinishedReply, position: int) -> None:
    """Store the reply and how it ended: status, finish reason, error, usage, timings."""
    usage = reply.usage
    with transaction.atomic():
        if reply.text:
            Message.objects.update_or_create(
                session_id=reply.session_id,
                position=position,
                defaults={"role": Message.Role.ASSISTANT, "content": reply.text},
            )
        Session.objects.filter(pk=reply.session_id).update(
            status=reply.status,
            provider=reply.provider,
            tried=list(reply.tried),
            model=_fit("model", reply.model),
            finish_reason=_fit("finish_reason", reply.finish_reason),
            error_code=reply.error_code,
            error_message=reply.error_message,
            prompt_tokens=usage.prompt_tokens if usage else None,
            completion_tokens=usage.completion_tokens if usage else None,
            usage_estimated=usage.estimated if usage else False,
            first_token_at=_at(reply.first_token_at),
            finished_at=_at(reply.finished_at),
            ttft_ms=reply.ttft_ms,
            tokens_per_second=reply.tokens_per_second,
            response_format=reply.response_format,
            output=_storable_json(reply.output),
            updated_at=timezone.now(),
        )


def _storable_json(value: Any) -> Any:
    """`value` with NUL characters (in keys and strings) as U+FFFD: PostgreSQL's jsonb refuses
    them, as the text columns do (see `llm.streaming.storable`)."""
    if isinstance(value, str):
        return value.replace("\x00", "\ufffd")
    if isinstance(value, list):
        return [_storable_json(item) for item in value]
    if isinstance(value, dict):
        return {_storable_json(key): _storable_json(item) for key, item in value.items()}
    return value


def _fit(name: str, value: str | None) -> str:
    """An upstream's string (a model name, a finish reason) cut to what its column holds."""
    return (value or "")[: Session._meta.get_field(name).max_length]


@database_sync_to_async
def mark_unstored(session_id: str | None) -> None:
    """When the end of a reply could not be stored: at least it is not left `streaming`."""
    Session.objects.filter(pk=session_id, status=Session.Status.STREAMING).update(
        status=Session.Status.FAILED,
        error_code="INTERNAL_ERROR",
        error_message="The end of this reply could not be stored; the error is logged.",
        finished_at=timezone.now(),
        updated_at=timezone.now(),
    )


@database_sync_to_async
def stored_reply(session_id: str) -> tuple[Session, str] | None:
    """The session and the text of its latest reply (empty when the last turn is not a reply)."""
    session = Session.objects.filter(pk=session_id).first()
    if session is None:
        return None
    last = session.messages.order_by("-position").first()
    return session, (
        last.content if last is not None and last.role == Message.Role.ASSISTANT else ""
    )


@database_sync_to_async
def check_continuable(session_id: str) -> None:
    """Raise what `open_session` would for this session, before a stream's response starts."""
    session = (
        Session.objects.filter(pk=session_id, private=False).only("status", "updated_at").first()
    )
    if session is None:
        raise SessionNotFound(f"Session {session_id} does not exist")
    if (
        session.status == Session.Status.STREAMING
        and session.updated_at >= timezone.now() - STALE_AFTER
    ):
        raise GenerationInProgress(f"Session {session_id} is already generating a reply")


def worker_alive(worker: str) -> bool:
    """Whether the process that stored `worker` may still run (on other hosts only staleness
    tells)."""
    host, _, rest = worker.partition(":")
    pid, _, boot = rest.partition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return True
    if int(pid) == os.getpid():
        return boot == _BOOT  # this pid, but an earlier start of it: dead
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def recover_interrupted() -> int:
    """Mark `interrupted` the sessions left `streaming` by a dead process (run at start-up)."""
    streaming = Session.objects.filter(status=Session.Status.STREAMING)
    stale_before = timezone.now() - STALE_AFTER
    dead = [
        pk
        for pk, worker, updated in streaming.values_list("pk", "worker", "updated_at")
        if updated < stale_before or not worker_alive(worker)
    ]
    if not dead:
        return 0
    count = Session.objects.filter(pk__in=dead, status=Session.Status.STREAMING).update(
        status=Session.Status.INTERRUPTED,
        error_code="INTERRUPTED",
        error_message=(
            "The server stopped while this reply was streaming; the text saved so far is kept."
        ),
        finished_at=timezone.now(),
    )
    logger.warning("marked %d session(s) left streaming by a dead process as interrupted", count)
    return count
