"""`watch` from another socket: the snapshot, then the live frames, nothing missing or doubled at
the seam; and no task of the relay outlives its sockets."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable
from typing import Any

import pytest
from channels.layers import get_channel_layer

from llm.broadcast import control_group, frames_group
from llm.models import Message, Session
from testkit.fake_upstream import FakeUpstream, Reply
from tests.llm.ws_client import (
    HELLO_REPLY,
    assert_sequence,
    generate,
    generate_ok,
    open_socket,
    recv,
    text_of,
    tokens,
    until_end,
    wait_for_status,
)

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("close_clients")]


async def _read_tokens(comm: Any, count: int) -> list[dict[str, Any]]:
    """start, then token frames until at least `count` reply tokens (" t<i>") have arrived."""
    frames = [await recv(comm)]
    assert frames[0]["type"] == "start", frames
    while text_of(frames).count(" t") < count:
        frames.append(await recv(comm))
        assert frames[-1]["type"] == "token", frames
    return frames


async def _watch(comm: Any, session_id: str) -> dict[str, Any]:
    await comm.send_json_to({"type": "watch", "session_id": session_id})
    return await recv(comm)


# The seam -------------------------------------------------------------------------------------


@pytest.mark.parametrize("after", [0, 1, 2, 7, 15])
async def test_watch_mid_stream_gets_snapshot_then_live_frames_without_gap_or_double(
    upstream: FakeUpstream, after: int
) -> None:
    reply = tokens(30)
    upstream.default = Reply(tokens=reply, delay=0.02)
    a, b = await open_socket(), await open_socket()
    await generate(a)
    frames_a = await _read_tokens(a, after)
    session_id = frames_a[0]["session_id"]

    watching = await _watch(b, session_id)
    assert watching["type"] == "watching", watching
    assert watching["session_id"] == session_id
    assert watching["status"] == "streaming"
    assert "".join(reply).startswith(watching["text"])
    assert text_of(frames_a).startswith(watching["text"]) or watching["text"].startswith(
        text_of(frames_a)
    )

    frames_b = await until_end(b)
    frames_a += await until_end(a)
    assert_sequence(frames_a)
    assert text_of(frames_a) == "".join(reply)
    assert {f["type"] for f in frames_b[:-1]} <= {"token"}, frames_b  # no start, no second watching
    assert watching["text"] + text_of(frames_b) == "".join(
        reply
    )  # nothing missing, nothing doubled
    assert frames_b[-1] == frames_a[-1]  # the same done frame
    assert await b.receive_nothing(timeout=0.1)
    await a.disconnect()
    await b.disconnect()


async def test_two_watchers_both_get_the_whole_reply(upstream: FakeUpstream) -> None:
    reply = tokens(25)
    upstream.default = Reply(tokens=reply, delay=0.02)
    a, b, c = await open_socket(), await open_socket(), await open_socket()
    await generate(a)
    frames_a = await _read_tokens(a, 2)
    session_id = frames_a[0]["session_id"]
    watching_b = await _watch(b, session_id)
    frames_a += [await recv(a), await recv(a), await recv(a)]
    watching_c = await _watch(c, session_id)
    frames_b, frames_c = await until_end(b), await until_end(c)
    frames_a += await until_end(a)
    for watching, frames in ((watching_b, frames_b), (watching_c, frames_c)):
        assert watching["status"] == "streaming"
        assert watching["text"] + text_of(frames) == "".join(reply)
        assert frames[-1] == frames_a[-1]
    for comm in (a, b, c):
        await comm.disconnect()


async def test_watcher_sees_a_cancel_as_done_cancelled(upstream: FakeUpstream) -> None:
    upstream.default = Reply(tokens=tokens(100), delay=0.02)
    a, b = await open_socket(), await open_socket()
    await generate(a)
    frames_a = await _read_tokens(a, 2)
    watching = await _watch(b, frames_a[0]["session_id"])
    await asyncio.sleep(0.1)
    await a.send_json_to({"type": "cancel"})
    frames_a += await until_end(a)
    frames_b = await until_end(b)
    assert frames_a[-1]["finish_reason"] == "cancelled"
    assert frames_b[-1] == frames_a[-1]
    assert watching["text"] + text_of(frames_b) == text_of(frames_a)
    await a.disconnect()
    await b.disconnect()


async def test_watcher_sees_a_fault_as_the_same_error_frame(
    upstream: FakeUpstream, llm_config: Callable[..., Any]
) -> None:
    llm_config(
        lm_studio={"base_url": upstream.base_url, "default_model": ""},
        idle_timeout=0.5,
        max_retries=0,
    )
    reply = tokens(10)
    upstream.default = Reply(tokens=reply, delay=0.02, stall_after=6)
    a, b = await open_socket(), await open_socket()
    await generate(a)
    frames_a = await _read_tokens(a, 2)
    watching = await _watch(b, frames_a[0]["session_id"])
    frames_a += await until_end(a)
    frames_b = await until_end(b)
    assert frames_a[-1]["type"] == "error" and frames_a[-1]["code"] == "LLM_TIMEOUT"
    assert frames_b[-1] == frames_a[-1]
    assert watching["text"] + text_of(frames_b) == "".join(reply[:6]) == text_of(frames_a)
    await a.disconnect()
    await b.disconnect()


async def test_watcher_leaving_does_not_disturb_the_generation(upstream: FakeUpstream) -> None:
    reply = tokens(20)
    upstream.default = Reply(tokens=reply, delay=0.02)
    a, b = await open_socket(), await open_socket()
    await generate(a)
    frames_a = await _read_tokens(a, 1)
    await _watch(b, frames_a[0]["session_id"])
    await recv(b)
    await b.disconnect()
    frames_a += await until_end(a)
    assert_sequence(frames_a)
    assert text_of(frames_a) == "".join(reply)
    assert upstream.disconnects == []
    await a.disconnect()


async def watch_played_by_hand() -> tuple[str, Any, str, Any, dict[str, Any]]:
    """A streaming session whose generating process (on another worker) the test plays, and a
    socket that watches it: (session id, layer, the process's control channel, the watcher's
    socket, the watcher's snapshot request)."""
    session = await Session.objects.acreate(provider="lm_studio", status=Session.Status.STREAMING)
    session_id = str(session.pk)
    layer = get_channel_layer()
    control = await layer.new_channel()
    await layer.group_add(control_group(session_id), control)
    b = await open_socket()
    await b.send_json_to({"type": "watch", "session_id": session_id})
    request = await asyncio.wait_for(layer.receive(control), timeout=2)
    return session_id, layer, control, b, request


async def test_seam_is_exact_however_the_layer_orders_snapshot_and_frames(
    upstream: FakeUpstream,
) -> None:
    """Plays the generating process of another worker: live frames reach the watcher before its
    snapshot (they must wait), some of them already inside the snapshot (dropped), one stale frame
    after it (dropped), then the rest; the watcher shows the reply exactly once."""
    session_id, layer, control, b, request = await watch_played_by_hand()
    assert request["type"] == "llm.watch" and request["reply_to"]

    def token(offset: int, text: str) -> dict[str, Any]:
        return {
            "type": "llm.frame",
            "session_id": session_id,
            "frame": {"type": "token", "text": text},
            "offset": offset,
        }

    done = {
        "type": "done",
        "session_id": session_id,
        "finish_reason": "stop",
        "usage": {"prompt_tokens": 1, "completion_tokens": 5, "total_tokens": 6, "estimated": True},
    }
    group = frames_group(session_id)
    await layer.group_send(group, token(2, "cd"))  # already in the snapshot
    await layer.group_send(group, token(4, "ef"))  # already in the snapshot
    await layer.group_send(group, token(6, "gh"))  # after it: must be shown, after the snapshot
    await layer.send(
        request["reply_to"],
        {
            "type": "llm.snapshot",
            "session_id": session_id,
            "status": "streaming",
            "text": "abcdef",
            "offset": 6,
        },
    )
    await layer.group_send(group, token(4, "ef"))  # a late duplicate
    await layer.group_send(group, token(8, "ij"))
    await layer.group_send(
        group, {"type": "llm.frame", "session_id": session_id, "frame": done, "offset": None}
    )

    watching = await recv(b)
    assert watching == {
        "type": "watching",
        "session_id": session_id,
        "status": "streaming",
        "text": "abcdef",
    }
    frames = await until_end(b)
    assert [f["text"] for f in frames[:-1]] == ["gh", "ij"]
    assert frames[-1] == done
    await layer.group_discard(control_group(session_id), control)
    await b.disconnect()


async def test_a_watcher_that_missed_frames_is_dropped_with_watch_lagged(
    upstream: FakeUpstream,
) -> None:
    """A full watcher queue makes the layer skip frames for it: the gap in offsets shows it, and
    the watcher gets WATCH_LAGGED instead of a reply with a hole in it; its socket stays usable."""
    session_id, layer, control, b, request = await watch_played_by_hand()
    await layer.send(
        request["reply_to"],
        {
            "type": "llm.snapshot",
            "session_id": session_id,
            "status": "streaming",
            "text": "ab",
            "offset": 2,
        },
    )
    group = frames_group(session_id)
    frame = {"type": "llm.frame", "session_id": session_id}
    await layer.group_send(group, frame | {"frame": {"type": "token", "text": "cd"}, "offset": 2})
    await layer.group_send(
        group, frame | {"frame": {"type": "token", "text": "gh"}, "offset": 6}
    )  # "ef" lost

    assert (await recv(b))["type"] == "watching"
    assert await recv(b) == {"type": "token", "text": "cd"}
    lagged = await recv(b)
    assert lagged["type"] == "error" and lagged["code"] == "WATCH_LAGGED"
    assert lagged["session_id"] == session_id
    await layer.group_send(group, frame | {"frame": {"type": "token", "text": "ij"}, "offset": 8})
    assert await b.receive_nothing(timeout=0.2)  # the watch has ended
    await generate_ok(b)  # and the socket still serves
    await layer.group_discard(control_group(session_id), control)
    await b.disconnect()


async def test_a_gap_among_frames_buffered_before_the_snapshot_ends_the_watch_once(
    upstream: FakeUpstream,
) -> None:
    """Frames that came before the snapshot wait for it; once a gap among them ends the watch,
    the rest of them (later tokens, the end frame) are not sent, nor more lag errors."""
    session_id, layer, control, b, request = await watch_played_by_hand()
    group = frames_group(session_id)
    frame = {"type": "llm.frame", "session_id": session_id}
    await layer.group_send(group, frame | {"frame": {"type": "token", "text": "cd"}, "offset": 2})
    await layer.group_send(
        group, frame | {"frame": {"type": "token", "text": "gh"}, "offset": 6}
    )  # "ef" lost
    await layer.group_send(group, frame | {"frame": {"type": "token", "text": "ij"}, "offset": 8})
    await layer.group_send(
        group, frame | {"frame": {"type": "done", "session_id": session_id}, "offset": None}
    )
    await asyncio.sleep(0.1)  # all four wait in the consumer for the snapshot
    await layer.send(
        request["reply_to"],
        {
            "type": "llm.snapshot",
            "session_id": session_id,
            "status": "streaming",
            "text": "ab",
            "offset": 2,
        },
    )

    assert (await recv(b))["type"] == "watching"
    assert await recv(b) == {"type": "token", "text": "cd"}
    assert await recv(b) == {
        "type": "error",
        "session_id": session_id,
        "code": "WATCH_LAGGED",
        "message": "This watcher fell behind and missed frames; send watch again to resume",
    }
    assert await b.receive_nothing(timeout=0.3)
    await generate_ok(b)
    await layer.group_discard(control_group(session_id), control)
    await b.disconnect()


async def test_watch_falls_back_to_the_database_when_no_process_answers(
    upstream: FakeUpstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A session left `streaming` whose process is gone: the watcher still gets a snapshot."""
    monkeypatch.setattr("llm.consumers.SNAPSHOT_TIMEOUT", 0.6)
    session = await Session.objects.acreate(provider="lm_studio", status=Session.Status.STREAMING)
    await Message.objects.acreate(session=session, position=0, role="user", content="Hi")
    await Message.objects.acreate(
        session=session, position=1, role="assistant", content="Half a rep"
    )
    b = await open_socket()
    watching = await _watch(b, str(session.pk))
    assert watching == {
        "type": "watching",
        "session_id": str(session.pk),
        "status": "streaming",
        "text": "Half a rep",
    }
    ended = await recv(b)  # no end frame will come: the watcher is told so
    assert (ended["type"], ended["code"], ended["session_id"]) == (
        "error",
        "WATCH_UNAVAILABLE",
        str(session.pk),
    )
    await generate_ok(b)
    await b.disconnect()


@pytest.mark.parametrize("failing", ["group_add", "group_send"])
async def test_with_the_channel_layer_down_a_watch_answers_from_the_database(
    upstream: FakeUpstream, monkeypatch: pytest.MonkeyPatch, failing: str
) -> None:
    """Redis down: no live frames can come, but the watcher is told what is stored, at once."""
    session = await Session.objects.acreate(provider="lm_studio", status=Session.Status.STREAMING)
    await Message.objects.acreate(session=session, position=0, role="user", content="Hi")
    await Message.objects.acreate(
        session=session, position=1, role="assistant", content="Half a rep"
    )
    layer = get_channel_layer()

    async def down(*args: Any, **kwargs: Any) -> None:
        raise ConnectionError("Redis is down")

    b = await open_socket()
    monkeypatch.setattr(layer, failing, down)
    monkeypatch.setattr(layer, "send", down)
    await b.send_json_to({"type": "watch", "session_id": str(session.pk)})
    assert await recv(b, timeout=2) == {
        "type": "watching",
        "session_id": str(session.pk),
        "status": "streaming",
        "text": "Half a rep",
    }
    assert (await recv(b, timeout=2))["code"] == "WATCH_UNAVAILABLE"
    monkeypatch.undo()
    await generate_ok(b)  # the socket still serves
    await b.disconnect()


# Stored sessions ------------------------------------------------------------------------------


async def test_watch_a_finished_session_gets_its_full_text(upstream: FakeUpstream) -> None:
    a = await open_socket()
    frames = await generate_ok(a)
    session_id = frames[0]["session_id"]
    await wait_for_status(session_id, "completed")
    b = await open_socket()
    watching = await _watch(b, session_id)
    assert watching == {
        "type": "watching",
        "session_id": session_id,
        "status": "completed",
        "text": HELLO_REPLY,
    }
    assert await b.receive_nothing(timeout=0.3)
    await generate_ok(b)  # the watcher's socket serves its own generations too
    await a.disconnect()
    await b.disconnect()


async def test_watch_a_cancelled_session_gets_its_partial_text(upstream: FakeUpstream) -> None:
    upstream.replies.append(Reply(tokens=tokens(100), delay=0.02))
    a = await open_socket()
    await generate(a)
    frames = await _read_tokens(a, 2)
    await a.send_json_to({"type": "cancel"})
    frames += await until_end(a)
    await wait_for_status(frames[0]["session_id"], "cancelled")
    b = await open_socket()
    watching = await _watch(b, frames[0]["session_id"])
    assert (watching["status"], watching["text"]) == ("cancelled", text_of(frames))
    await a.disconnect()
    await b.disconnect()


async def test_watch_unknown_session_is_session_not_found(upstream: FakeUpstream) -> None:
    b = await open_socket()
    error = await _watch(b, str(uuid.uuid4()))
    assert (error["type"], error["code"]) == ("error", "SESSION_NOT_FOUND")
    await generate_ok(b)
    await b.disconnect()


# No task left behind ----------------------------------------------------------------------------


def _relay_tasks(tasks: set[asyncio.Task[Any]]) -> list[asyncio.Task[Any]]:
    """Pending tasks running code of the llm app or of channels' consumers."""
    found = []
    for task in tasks:
        if task.done() or task is asyncio.current_task():
            continue
        coro: Any = task.get_coro()
        names = []
        while coro is not None:
            code = getattr(coro, "cr_code", None) or getattr(coro, "ag_code", None)
            if code is not None:
                names.append(code.co_filename)
            coro = getattr(coro, "cr_await", None) or getattr(coro, "ag_await", None)
        if any("/llm/" in n or "/channels/" in n for n in names):
            found.append(task)
    return found


async def _leftovers(
    before: set[asyncio.Task[Any]], settle: float = 1.0
) -> list[asyncio.Task[Any]]:
    deadline = asyncio.get_running_loop().time() + settle
    while True:
        left = _relay_tasks(asyncio.all_tasks() - before)
        if not left or asyncio.get_running_loop().time() > deadline:
            return left
        await asyncio.sleep(0.02)


async def test_no_task_left_after_cancel_and_close(upstream: FakeUpstream) -> None:
    before = asyncio.all_tasks()
    upstream.default = Reply(tokens=tokens(200), delay=0.02)
    a, b = await open_socket(), await open_socket()

    # Cancelled by frame, with a watcher.
    await generate(a)
    frames = await _read_tokens(a, 2)
    await _watch(b, frames[0]["session_id"])
    await a.send_json_to({"type": "cancel"})
    await until_end(a)
    await until_end(b)

    # Closed mid-stream, with a watcher that then leaves too.
    await generate(a)
    frames = await _read_tokens(a, 2)
    await _watch(b, frames[0]["session_id"])
    await a.disconnect(timeout=5)
    assert await upstream.wait_for_disconnects(2, timeout=1.0)
    await wait_for_status(frames[0]["session_id"], "cancelled")
    await until_end(b)
    await b.disconnect(timeout=5)

    left = await _leftovers(before)
    assert not left, "\n".join(repr(t) for t in left)


async def test_no_task_left_after_close_while_watching(upstream: FakeUpstream) -> None:
    """A watcher that leaves mid-stream, and a generating socket closed before its first token."""
    before = asyncio.all_tasks()
    upstream.default = Reply(tokens=tokens(200), delay=0.02, ttft=0.3)
    a, b = await open_socket(), await open_socket()
    await generate(a)
    start = await recv(a)
    await _watch(b, start["session_id"])
    await b.disconnect(timeout=5)
    await a.disconnect(timeout=5)
    await wait_for_status(start["session_id"], "cancelled")
    left = await _leftovers(before)
    assert not left, "\n".join(repr(t) for t in left)
