"""Lifecycle edges of a generation: a client leaving at awkward moments, unexpected errors, the
idle timeout, stale and dead workers, the watch handshake, and a few small helpers.

Each test pins one fix: it fails on the code before that fix.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
import uuid
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest
from asgiref.sync import sync_to_async
from channels.layers import get_channel_layer
from django.utils import timezone

import llm.consumers
import llm.generation
import llm.sessions
from llm.broadcast import control_group, frames_group
from llm.exceptions import UpstreamTimeout
from llm.generation import Generation, Start, Token
from llm.local_model import LocalModelServer, answers
from llm.models import Message, Session
from llm.providers import get_provider
from llm.streaming import cancel_and_wait
from llm.types import ChatRequest
from testkit.fake_upstream import FakeUpstream, Reply
from tests.llm.ws_client import (
    HI,
    generate,
    generate_ok,
    open_socket,
    recv,
    session_row,
    text_of,
    tokens,
    until_end,
    wait_for_status,
)

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("close_clients")]


async def _status_becomes(session_id: str, status: str, timeout: float = 2.0) -> str:
    """The session's stored status once it is `status`, or the last one seen after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        found = (
            await Session.objects.filter(pk=session_id).values_list("status", flat=True).afirst()
        )
        if found == status or time.monotonic() > deadline:
            return found
        await asyncio.sleep(0.02)


def _llm_tasks(tasks: set[asyncio.Task[Any]]) -> list[asyncio.Task[Any]]:
    """Pending tasks running code of the llm app."""
    found = []
    for task in tasks:
        if task.done() or task is asyncio.current_task():
            continue
        coro: Any = task.get_coro()
        while coro is not None:
            code = getattr(coro, "cr_code", None) or getattr(coro, "ag_code", None)
            if code is not None and "/llm/" in code.co_filename:
                found.append(task)
                break
            coro = getattr(coro, "cr_await", None) or getattr(coro, "ag_await", None)
    return found


async def _llm_leftovers(
    before: set[asyncio.Task[Any]], settle: float = 1.0
) -> list[asyncio.Task[Any]]:
    deadline = time.monotonic() + settle
    while True:
        left = _llm_tasks(asyncio.all_tasks() - before)
        if not left or time.monotonic() > deadline:
            return left
        await asyncio.sleep(0.02)


# 1. A client leaving while the session is being opened ----------------------------------------


@pytest.mark.parametrize("slow", ["before-the-write", "after-the-write"])
async def test_client_leaving_while_the_session_opens_still_ends_it_cancelled(
    upstream: FakeUpstream, monkeypatch: pytest.MonkeyPatch, slow: str
) -> None:
    """Cancelled during `open_session` (before or after its row is written): the session it
    opens is stored `cancelled`, never left `streaming` for a watcher to wait on forever."""
    real = llm.generation.open_session
    opened: list[str] = []

    async def slow_open(*args: Any, **kwargs: Any) -> Any:
        if slow == "before-the-write":
            await asyncio.sleep(0.3)
        result = await real(*args, **kwargs)
        opened.append(result.session_id)
        if slow == "after-the-write":
            await asyncio.sleep(0.3)
        return result

    monkeypatch.setattr(llm.generation, "open_session", slow_open)
    upstream.default = Reply(
        tokens=tokens(50), delay=0.02
    )  # still streaming when the client leaves
    generation = Generation(ChatRequest(messages=HI))

    async def consume() -> None:
        async for _ in generation.events():
            pass

    task = asyncio.create_task(consume())
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task

    deadline = time.monotonic() + 2.0
    while not opened and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    assert opened, "the session was never opened: the client leaving cut open_session short"
    assert await _status_becomes(opened[0], "cancelled") == "cancelled"
    session, messages = await session_row(opened[0])
    assert session.finished_at is not None
    assert messages[0] == ("user", "Hi")
    stored_reply = messages[1][1] if len(messages) > 1 else ""
    assert stored_reply == generation.text  # the partial reply the client got, no more, no less


# 2. The end is stored and published even if the client's task is cancelled twice ---------------


async def test_second_cancel_while_the_end_is_stored_still_stores_and_publishes_it(
    upstream: FakeUpstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    before = asyncio.all_tasks()
    upstream.default = Reply(tokens=tokens(200), delay=0.02)
    real = llm.generation.close_session
    closing = asyncio.Event()

    async def slow_close(*args: Any) -> Any:
        closing.set()
        await asyncio.sleep(0.3)
        return await real(*args)

    monkeypatch.setattr(llm.generation, "close_session", slow_close)
    generation = Generation(ChatRequest(messages=HI))
    events: list[Any] = []
    started = asyncio.Event()

    async def consume() -> None:
        async for event in generation.events():
            events.append(event)
            if sum(isinstance(e, Token) for e in events) >= 2:
                started.set()

    task = asyncio.create_task(consume())
    await asyncio.wait_for(started.wait(), timeout=3)
    assert isinstance(events[0], Start)
    session_id = events[0].session_id

    watcher = await open_socket()
    await watcher.send_json_to({"type": "watch", "session_id": session_id})
    watching = await recv(watcher)
    assert (watching["type"], watching["status"]) == ("watching", "streaming"), watching

    task.cancel()  # the client leaves
    await asyncio.wait_for(closing.wait(), timeout=2)
    task.cancel()  # and its task is cancelled again while the end is being stored
    with pytest.raises(asyncio.CancelledError):
        await task

    frames = await until_end(watcher, timeout=2)
    done = frames[-1]
    assert done["type"] == "done", frames
    assert done["finish_reason"] == "cancelled"
    assert done["session_id"] == session_id
    session, messages = await wait_for_status(session_id, "cancelled", timeout=2)
    assert session.status == "cancelled"
    assert messages[-1] == ("assistant", watching["text"] + text_of(frames[:-1]))
    await watcher.disconnect()
    left = await _llm_leftovers(before)
    assert not left, "\n".join(repr(t) for t in left)


# 3. The idle timeout does not count the caller's time ---------------------------------------


async def test_idle_timeout_does_not_count_time_the_caller_spends_between_tokens(
    upstream: FakeUpstream, llm_config: Callable[..., Any]
) -> None:
    llm_config(
        idle_timeout=0.3,
        max_retries=0,
        lm_studio={"base_url": upstream.base_url, "default_model": ""},
    )
    # Quick tokens (well inside the idle timeout), each in a packet of its own, so the next read
    # after the caller's pause has to wait on the socket.
    upstream.default = Reply(tokens=["a", "b", "c"], delay=0.05)
    chunks = []
    try:
        async for chunk in get_provider("lm_studio").stream(ChatRequest(messages=HI)):
            chunks.append(chunk)
            if chunk.text:
                await asyncio.sleep(0.5)  # a slow consumer, not a slow upstream
    except UpstreamTimeout as exc:
        pytest.fail(f"the caller's own time was counted as upstream idleness: {exc}")
    assert "".join(c.text for c in chunks) == "abc"
    assert chunks[-1].finish_reason == "stop"


# 4. Unexpected exceptions become INTERNAL_ERROR frames; the socket stays usable ----------------


async def test_unexpected_error_handling_a_frame_is_an_internal_error_frame(
    upstream: FakeUpstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def broken(session_id: str) -> Any:
        raise RuntimeError("database on fire")

    monkeypatch.setattr(llm.consumers, "stored_reply", broken)
    comm = await open_socket()
    await comm.send_json_to({"type": "watch", "session_id": str(uuid.uuid4())})
    error = await recv(comm)  # recv checks there is no traceback in it
    assert (error["type"], error["code"]) == ("error", "INTERNAL_ERROR"), error
    assert "database on fire" not in error["message"]
    await generate_ok(comm)
    await comm.disconnect()


@pytest.mark.parametrize("part", ["bounded_stream", "Broadcaster.start"])
async def test_unexpected_error_inside_the_pipeline_fails_the_session_with_internal_error(
    upstream: FakeUpstream, monkeypatch: pytest.MonkeyPatch, part: str
) -> None:
    """A bug in the pipeline, once the session is open: an INTERNAL_ERROR frame, the session
    stored `failed` with that code (not left `streaming`), and the socket still serves."""
    owner, name = (llm.generation.Broadcaster, "start") if "." in part else (llm.generation, part)
    real = getattr(owner, name)
    calls = 0

    def broken(*args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("a bug in the pipeline")
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, name, broken)
    comm = await open_socket()
    await generate(comm)
    frames = await until_end(comm)
    error = frames[-1]
    assert (error["type"], error["code"]) == ("error", "INTERNAL_ERROR"), frames
    assert "a bug in the pipeline" not in error["message"]
    session, _ = await wait_for_status(error["session_id"], "failed", timeout=2)
    assert (session.status, session.error_code) == ("failed", "INTERNAL_ERROR")
    await generate_ok(comm)  # the socket still serves
    await comm.disconnect()


async def test_unexpected_error_opening_the_session_is_an_internal_error_frame(
    upstream: FakeUpstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The contract: every generate ends with exactly one done or error frame, even when the
    database fails (here a RuntimeError stands for e.g. an OperationalError)."""
    real = llm.generation.open_session
    calls = 0

    async def broken(*args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("database went away")
        return await real(*args, **kwargs)

    monkeypatch.setattr(llm.generation, "open_session", broken)
    comm = await open_socket()
    await generate(comm)
    try:
        # The reply streams while the session is written; a session that could not be stored
        # then ends in an error instead of `done`, so the client knows it cannot continue it.
        frames = await until_end(comm)
        assert frames[-1]["type"] == "error" and frames[-1]["code"] == "INTERNAL_ERROR", frames
        assert "Traceback" not in frames[-1]["message"]
        await generate_ok(comm)
    finally:
        await comm.disconnect()


# 6. Workers: a restarted process with the same pid, and stale streaming sessions ----------------


async def test_worker_id_tells_a_restart_with_the_same_pid_from_this_process() -> None:
    host, pid, boot = llm.sessions.worker_id().split(":")
    assert (host, pid) == (socket.gethostname(), str(os.getpid()))
    assert boot
    earlier = f"{host}:{pid}:{'x' * len(boot)}"  # this pid, another start (ids are hex)
    assert llm.sessions.worker_alive(llm.sessions.worker_id())
    assert not llm.sessions.worker_alive(earlier)

    ours = await Session.objects.acreate(
        provider="lm_studio", status="streaming", worker=llm.sessions.worker_id()
    )
    previous = await Session.objects.acreate(
        provider="lm_studio", status="streaming", worker=earlier
    )
    assert await sync_to_async(llm.sessions.recover_interrupted)() == 1
    await ours.arefresh_from_db()
    await previous.arefresh_from_db()
    assert (ours.status, previous.status) == ("streaming", "interrupted")


async def test_a_stale_streaming_session_can_be_continued_a_fresh_one_cannot(
    upstream: FakeUpstream,
) -> None:
    comm = (
        await open_socket()
    )  # first: the app's start-up recovery would mark the stale one interrupted
    old = timezone.now() - llm.sessions.STALE_AFTER - timedelta(seconds=5)
    stale = await Session.objects.acreate(
        provider="lm_studio", status="streaming", worker="another-host:1:x", updated_at=old
    )
    await Message.objects.acreate(session=stale, position=0, role="user", content="Hi")
    await Message.objects.acreate(session=stale, position=1, role="assistant", content="Half a")
    fresh = await Session.objects.acreate(
        provider="lm_studio", status="streaming", worker="another-host:1:x"
    )

    frames = await generate_ok(comm, session_id=str(stale.pk))
    assert frames[0]["session_id"] == str(stale.pk)
    session, messages = await wait_for_status(str(stale.pk), "completed")
    assert session.status == "completed"
    assert messages[:2] == [("user", "Hi"), ("assistant", "Half a")]

    await generate(comm, session_id=str(fresh.pk))
    error = await recv(comm)
    assert (error["type"], error["code"]) == ("error", "GENERATION_IN_PROGRESS"), error
    await fresh.arefresh_from_db()
    assert fresh.status == "streaming"
    await comm.disconnect()


# 7. The watch handshake survives a generating process that listens late -------------------------


async def test_watcher_asking_before_the_generating_process_listens_gets_its_snapshot(
    upstream: FakeUpstream,
) -> None:
    session = await Session.objects.acreate(provider="lm_studio", status=Session.Status.STREAMING)
    await Message.objects.acreate(session=session, position=0, role="user", content="Hi")
    await Message.objects.acreate(
        session=session, position=1, role="assistant", content="stale db text"
    )
    session_id = str(session.pk)
    layer = get_channel_layer()
    control = await layer.new_channel()
    b = await open_socket()
    await b.send_json_to({"type": "watch", "session_id": session_id})

    await asyncio.sleep(0.8)  # the generating process only now starts listening
    await layer.group_add(control_group(session_id), control)
    try:
        request = await asyncio.wait_for(layer.receive(control), timeout=1.5)
        assert request["type"] == "llm.watch" and request["reply_to"]
        await layer.send(
            request["reply_to"],
            {
                "type": "llm.snapshot",
                "session_id": session_id,
                "status": "streaming",
                "text": "abc",
                "offset": 3,
            },
        )
        group = frames_group(session_id)
        done = {
            "type": "done",
            "session_id": session_id,
            "finish_reason": "stop",
            "usage": {
                "prompt_tokens": 1,
                "completion_tokens": 2,
                "total_tokens": 3,
                "estimated": True,
            },
        }
        await layer.group_send(
            group,
            {
                "type": "llm.frame",
                "session_id": session_id,
                "frame": {"type": "token", "text": "de"},
                "offset": 3,
            },
        )
        await layer.group_send(
            group, {"type": "llm.frame", "session_id": session_id, "frame": done, "offset": None}
        )

        watching = await recv(b, timeout=2)
        assert watching == {
            "type": "watching",
            "session_id": session_id,
            "status": "streaming",
            "text": "abc",
        }
        assert await recv(b, timeout=2) == {"type": "token", "text": "de"}
        assert await recv(b, timeout=2) == done
        assert await b.receive_nothing(timeout=0.2)
    finally:
        await layer.group_discard(control_group(session_id), control)
        await b.disconnect()


# 8. cancel_and_wait does not swallow its caller's own cancellation -------------------------------


async def test_cancel_and_wait_passes_on_a_cancellation_of_its_caller() -> None:
    cleaning = asyncio.Event()

    async def slow_to_stop() -> None:
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            cleaning.set()
            await asyncio.sleep(0.3)  # cleanup that takes a while
            raise

    async def caller() -> str:
        inner = asyncio.create_task(slow_to_stop())
        await asyncio.sleep(0.01)  # let it start
        await cancel_and_wait(inner)
        return "carried on after being cancelled"

    outer = asyncio.create_task(caller())
    await asyncio.wait_for(cleaning.wait(), timeout=1)
    outer.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(outer, timeout=2)

    # The task it stops ending cancelled is not a cancellation of the caller.
    inner = asyncio.create_task(asyncio.sleep(3600))
    await cancel_and_wait(inner)
    assert inner.cancelled()


# 9. The bundled model's URL with an IPv6 host ---------------------------------------------------


def test_local_model_url_with_an_ipv6_host() -> None:
    assert LocalModelServer(host="::1", port=1234).base_url == "http://[::1]:1234/v1"
    assert answers("http://::1:99/v1") is False
