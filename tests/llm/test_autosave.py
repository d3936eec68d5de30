"""`llm.autosave`: one saver per event loop.

It never loses a tracked reply nor shortens a stored one.
"""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass, field
from typing import Any

import pytest
from asgiref.sync import SyncToAsync, ThreadSensitiveContext, sync_to_async

import llm.autosave
from llm.autosave import Autosave
from llm.models import Message, Session


@dataclass
class FakeReply:
    session_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    parts: list[str] = field(default_factory=list)

    @property
    def text(self) -> str:
        return "".join(self.parts)

    @property
    def length(self) -> int:
        return len(self.text)


@pytest.fixture
def saves(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """Every write the saver makes (nothing reaches the database), with SAVE_INTERVAL at 0.05 s."""
    calls: list[dict[str, Any]] = []

    async def recording(changed: list[tuple[str, int, str, bool]], alive: list[str]) -> None:
        calls.append(
            {
                "changed": {sid: text for sid, _, text, _ in changed},
                "alive": list(alive),
                "request_context": SyncToAsync.thread_sensitive_context.get(None),
            }
        )

    monkeypatch.setattr(llm.autosave, "_write", recording)
    monkeypatch.setattr(llm.autosave, "SAVE_INTERVAL", 0.05)
    return calls


async def test_a_reply_tracked_as_the_last_one_is_untracked_is_still_saved(
    saves: list[dict[str, Any]],
) -> None:
    """One generation ending in the same loop turn as another starts must not strand the new one
    without saves (and without the heartbeat that tells it from a dead process's)."""
    saver = Autosave()
    ending, starting = FakeReply(parts=["a"]), FakeReply(parts=["b"])
    saver.track(ending, 1)
    await asyncio.sleep(0)  # the saver's task is running, asleep until the next interval
    saver.untrack(ending.session_id)
    saver.track(starting, 1)
    try:
        await asyncio.sleep(0.3)
        assert any(starting.session_id in call["alive"] for call in saves), saves
        assert any(call["changed"].get(starting.session_id) == "b" for call in saves), saves
    finally:
        saver.untrack(starting.session_id)


async def test_saves_do_not_run_in_the_context_of_the_request_that_started_them(
    saves: list[dict[str, Any]],
) -> None:
    """Django runs each HTTP request's sync code on a thread of its own; the saver, shared by all
    requests, must not borrow (and outlive) the thread of whichever request tracked first."""
    saver = Autosave()
    reply = FakeReply(parts=["x"])
    async with ThreadSensitiveContext():
        assert SyncToAsync.thread_sensitive_context.get(None) is not None
        saver.track(reply, 1)
    try:
        await asyncio.sleep(0.2)
        assert saves, "nothing was saved"
        assert all(call["request_context"] is None for call in saves)
    finally:
        saver.untrack(reply.session_id)


@pytest.mark.django_db(transaction=True)
async def test_a_late_save_never_shortens_a_stored_reply() -> None:
    """The end of a reply may be stored (from a request's thread) before a save queued earlier
    on the database thread runs: that save then changes nothing."""
    session = await Session.objects.acreate(provider="lm_studio", status=Session.Status.STREAMING)
    sid = str(session.pk)
    await Message.objects.acreate(session=session, position=0, role="user", content="Hi")
    await llm.autosave._write([(sid, 1, "Hel", False)], [sid])  # the first save creates the row
    await llm.autosave._write([(sid, 1, "Hello", True)], [sid])
    assert (await Message.objects.aget(session=session, position=1)).content == "Hello"

    await Message.objects.filter(session=session, position=1).aupdate(
        content="Hello, world!"
    )  # the end
    await llm.autosave._write([(sid, 1, "Hello, w", True)], [sid])  # a save that was late
    await llm.autosave._write([(sid, 1, "He", False)], [sid])
    assert (await Message.objects.aget(session=session, position=1)).content == "Hello, world!"
    await sync_to_async(session.delete)()


async def test_a_new_turn_tracked_during_a_save_is_saved_as_new(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A session whose reply ends and whose next turn starts while a save is being written: the
    new turn's row does not exist yet, so its first save must create it, not update nothing."""
    calls: list[list[tuple[str, int, str, bool]]] = []
    saver = Autosave()
    first = FakeReply(parts=["first reply"])
    second = FakeReply(session_id=first.session_id, parts=["second"])

    async def writing(changed: list[tuple[str, int, str, bool]], alive: list[str]) -> None:
        calls.append(changed)
        if len(calls) == 1:  # meanwhile, the first turn ends and the next one starts
            saver.untrack(first.session_id)
            saver.track(second, 3)

    monkeypatch.setattr(llm.autosave, "_write", writing)
    saver.track(first, 1)
    await saver.save()
    await saver.save()
    assert calls == [
        [(first.session_id, 1, "first reply", False)],
        [(first.session_id, 3, "second", False)],
    ]
    saver.untrack(first.session_id)
