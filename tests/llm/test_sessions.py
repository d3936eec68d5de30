"""Stored sessions (issue 3, item 5): what a generation stores, how often, and start-up recovery.

Generations run through `POST /api/v1/llm/generate` against the real-socket fake upstream. The
pipeline writes from worker threads, hence `transaction=True`.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
import uuid
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest
from asgiref.sync import sync_to_async
from django.test import AsyncClient
from django.utils import timezone

import llm.autosave
import llm.generation
import llm.sessions
from llm.models import Message, Session
from testkit.fake_upstream import Reply

GENERATE = "/api/v1/llm/generate"
CONVERSATION = [
    {"role": "system", "content": "You sell bicycles."},
    {"role": "user", "content": "How much for the blue one?"},
]
DEAD_WORKER = f"{socket.gethostname()}:999999"

pytestmark = pytest.mark.usefixtures("close_clients")


async def generate(body: dict[str, Any]) -> Any:
    return await AsyncClient().post(GENERATE, body, content_type="application/json")


async def only_session() -> Session:
    sessions = [s async for s in Session.objects.all()]
    assert len(sessions) == 1, sessions
    return sessions[0]


async def messages_of(session: Session) -> list[tuple[int, str, str]]:
    return [(m.position, m.role, m.content) async for m in session.messages.order_by("position")]


# A completed generation -------------------------------------------------------------------------


@pytest.mark.django_db(transaction=True)
async def test_completed_generation_is_stored_with_usage_timings_and_messages(
    upstream: Any,
) -> None:
    tokens = ["The", " blue", " one", " is", " 150", "."]
    upstream.replies.append(Reply(tokens=tokens, ttft=0.05, delay=0.02))

    before = timezone.now()
    response = await generate({"messages": CONVERSATION})
    after = timezone.now()
    assert response.status_code == 200, response.content
    body = response.json()

    session = await only_session()
    assert str(session.id) == body["session_id"]
    assert session.provider == "lm_studio"
    assert session.model == "fake-model"  # as the upstream reported it, not the configured name
    assert session.status == Session.Status.COMPLETED
    assert session.finish_reason == "stop"
    assert session.error_code == "" and session.error_message == ""
    # LM Studio sends no usage: counted here, and marked so.
    assert session.usage_estimated is True
    assert session.prompt_tokens == body["usage"]["prompt_tokens"] > 0
    assert session.completion_tokens == body["usage"]["completion_tokens"] > 0
    # Timings, in order.
    assert session.first_token_at is not None and session.finished_at is not None
    assert before <= session.created_at < session.first_token_at <= session.finished_at <= after
    assert session.ttft_ms is not None and session.ttft_ms > 0
    assert session.ttft_ms >= 40  # the upstream waited 50 ms before its first token
    assert session.tokens_per_second is not None and session.tokens_per_second > 0

    assert await messages_of(session) == [
        (0, "system", "You sell bicycles."),
        (1, "user", "How much for the blue one?"),
        (2, "assistant", "".join(tokens)),
    ]


@pytest.mark.django_db(transaction=True)
async def test_upstream_usage_is_stored_as_not_estimated(upstream: Any) -> None:
    usage = {"prompt_tokens": 17, "completion_tokens": 3, "total_tokens": 20}
    upstream.replies.append(Reply(tokens=["a", "b", "c"], delay=0.01, usage=usage))

    response = await generate({"messages": CONVERSATION})
    assert response.status_code == 200, response.content

    session = await only_session()
    assert session.status == Session.Status.COMPLETED
    assert (session.prompt_tokens, session.completion_tokens) == (17, 3)
    assert session.usage_estimated is False
    assert session.total_tokens == 20


@pytest.mark.django_db(transaction=True)
async def test_streamed_generation_is_stored_too(upstream: Any) -> None:
    upstream.replies.append(Reply(tokens=["x", "y", "z"], delay=0.01))
    response = await AsyncClient().post(
        GENERATE, {"messages": CONVERSATION, "stream": True}, content_type="application/json"
    )
    assert response.status_code == 200
    body = b"".join([chunk async for chunk in response.streaming_content])
    assert b'"type":"done"' in body.replace(b" ", b"")

    session = await only_session()
    assert session.status == Session.Status.COMPLETED
    assert (await messages_of(session))[-1] == (2, "assistant", "xyz")


# Failures keep their partial text -------------------------------------------------------------


@pytest.mark.django_db(transaction=True)
async def test_cut_stream_is_stored_failed_with_its_partial_text(upstream: Any) -> None:
    tokens = ["one", " two", " three", " four", " five"]
    upstream.replies.append(Reply(tokens=tokens, delay=0.01, cut_after=3))

    response = await generate({"messages": CONVERSATION})
    assert response.status_code == 502
    assert response.json()["error"]["code"] == "LLM_BAD_GATEWAY"

    session = await only_session()
    assert session.status == Session.Status.FAILED
    assert session.error_code == "LLM_BAD_GATEWAY"
    assert session.error_message
    assert session.finished_at is not None
    assert session.model == "fake-model"
    assert await messages_of(session) == [
        (0, "system", "You sell bicycles."),
        (1, "user", "How much for the blue one?"),
        (2, "assistant", "one two three"),
    ]


@pytest.mark.django_db(transaction=True)
async def test_in_stream_error_chunk_is_stored_failed_with_its_partial_text(upstream: Any) -> None:
    upstream.replies.append(Reply(tokens=["al", "pha", "beta"], error_after=2))

    response = await generate({"messages": CONVERSATION})
    assert response.status_code == 502

    session = await only_session()
    assert session.status == Session.Status.FAILED
    assert session.error_code == "LLM_BAD_GATEWAY"
    assert (await messages_of(session))[-1] == (2, "assistant", "alpha")


@pytest.mark.django_db(transaction=True)
async def test_stalled_stream_is_stored_failed_timeout_with_its_partial_text(
    upstream: Any, llm_config: Callable[..., Any]
) -> None:
    llm_config(lm_studio={"base_url": upstream.base_url, "default_model": ""}, idle_timeout=0.3)
    upstream.replies.append(Reply(tokens=["slow", "ly", "never"], stall_after=2))

    response = await generate({"messages": CONVERSATION})
    assert response.status_code == 503
    assert response.json()["error"]["code"] == "LLM_TIMEOUT"

    session = await only_session()
    assert session.status == Session.Status.FAILED
    assert session.error_code == "LLM_TIMEOUT"
    assert (await messages_of(session))[-1] == (2, "assistant", "slowly")


# What an upstream sends that the contract or the database cannot take as it is --------------------


@pytest.mark.django_db(transaction=True)
async def test_a_finish_reason_outside_the_contract_ends_stop_and_is_stored_as_given(
    upstream: Any,
) -> None:
    upstream.default = Reply(finish_reason="content_filter")
    response = await generate({"messages": CONVERSATION})
    assert response.status_code == 200, response.content
    assert response.json()["finish_reason"] == "stop"
    streamed = await generate({"messages": CONVERSATION, "stream": True})
    body = b"".join([part async for part in streamed.streaming_content]).decode()
    frames = [json.loads(event.removeprefix("data: ")) for event in body.split("\n\n") if event]
    assert frames[-1]["type"] == "done" and frames[-1]["finish_reason"] == "stop"
    sessions = [s async for s in Session.objects.all()]
    assert [(s.status, s.finish_reason) for s in sessions] == [("completed", "content_filter")] * 2


@pytest.mark.django_db(transaction=True)
async def test_nul_characters_from_the_upstream_are_stored_as_replacement_characters(
    upstream: Any,
) -> None:
    """PostgreSQL text cannot hold NUL: one in a token (or the model's name) must not cost the
    reply, nor the autosave of every other stream in the process."""
    upstream.default = Reply(tokens=["a\x00b", " c"], model="fake\x00model")
    response = await generate({"messages": CONVERSATION})
    assert response.status_code == 200, response.content
    assert response.json()["content"] == "a\ufffdb c"
    streamed = await generate({"messages": CONVERSATION, "stream": True})
    body = b"".join([part async for part in streamed.streaming_content]).decode()
    assert '"a\\ufffdb"' in body or "a\ufffdb" in body
    sessions = [s async for s in Session.objects.all()]
    assert [(s.status, s.model) for s in sessions] == [("completed", "fake\ufffdmodel")] * 2
    assert [
        m async for m in Message.objects.filter(role="assistant").values_list("content", flat=True)
    ] == ["a\ufffdb c"] * 2


@pytest.mark.django_db(transaction=True)
async def test_usage_that_is_not_a_count_is_estimated_instead(upstream: Any) -> None:
    upstream.replies.append(
        Reply(usage={"prompt_tokens": -1, "completion_tokens": 3, "total_tokens": 2})
    )
    response = await generate({"messages": CONVERSATION})
    assert response.status_code == 200, response.content
    assert response.json()["usage"]["estimated"] is True
    session = await only_session()
    assert session.status == Session.Status.COMPLETED
    assert session.usage_estimated is True and session.prompt_tokens > 0


@pytest.mark.django_db(transaction=True)
async def test_storing_the_end_is_tried_again_after_a_passing_fault(
    upstream: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    real, calls = llm.generation.close_session, []

    async def flaky(*args: Any) -> None:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("database is locked")
        await real(*args)

    monkeypatch.setattr(llm.generation, "close_session", flaky)
    response = await generate({"messages": CONVERSATION})
    assert response.status_code == 200, response.content
    session = await only_session()
    assert len(calls) == 2
    assert session.status == Session.Status.COMPLETED
    assert (await messages_of(session))[-1] == (2, "assistant", "Hello, world!")


@pytest.mark.django_db(transaction=True)
async def test_a_session_whose_end_cannot_be_stored_is_not_left_streaming(
    upstream: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def fails(*args: Any) -> None:
        raise RuntimeError("the database refused the row")

    monkeypatch.setattr(llm.generation, "close_session", fails)
    response = await generate({"messages": CONVERSATION})
    assert response.status_code == 200, response.content  # the client had its reply
    session = await only_session()
    assert session.status == Session.Status.FAILED
    assert session.error_code == "INTERNAL_ERROR" and session.finished_at is not None


# New sessions: created together -----------------------------------------------------------------


@pytest.mark.django_db(transaction=True)
async def test_sessions_starting_together_are_created_in_one_write(
    upstream: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Twenty clients at once: a handful of transactions, not twenty (each holds the one database
    thread, and the GIL the event loop needs to relay tokens)."""
    writes: list[int] = []
    real = llm.sessions._create_sessions

    async def counting(rows: list[Any]) -> Any:
        writes.append(len(rows))
        return await real(rows)

    monkeypatch.setattr(llm.sessions, "_create_sessions", counting)
    responses = await asyncio.gather(*(generate({"messages": CONVERSATION}) for _ in range(20)))
    assert [r.status_code for r in responses] == [200] * 20
    assert sum(writes) == 20 and len(writes) <= 3, writes
    assert await Session.objects.filter(status=Session.Status.COMPLETED).acount() == 20
    assert await Message.objects.acount() == 20 * 3


@pytest.mark.django_db(transaction=True)
async def test_one_session_that_cannot_be_created_keeps_no_other_out() -> None:
    taken = await Session.objects.acreate(provider="lm_studio", status=Session.Status.COMPLETED)
    fresh = str(uuid.uuid4())
    opened = await asyncio.gather(
        llm.sessions.open_session(
            str(taken.pk), [{"role": "user", "content": "a"}], "lm_studio", create=True
        ),
        llm.sessions.open_session(
            fresh, [{"role": "user", "content": "b"}], "lm_studio", create=True
        ),
        return_exceptions=True,
    )
    assert isinstance(opened[0], Exception)  # its id is taken
    assert opened[1] == llm.sessions.OpenedSession(fresh, [], 1)
    session = await Session.objects.aget(pk=fresh)
    assert session.status == Session.Status.STREAMING
    assert [m.content async for m in session.messages.all()] == ["b"]
    await taken.arefresh_from_db()
    assert await taken.messages.acount() == 0 and taken.status == Session.Status.COMPLETED


# Writes: every SAVE_INTERVAL, not per token ----------------------------------------------------


@pytest.fixture
def writes(monkeypatch: Any) -> list[tuple[float, dict[str, str]]]:
    """Every autosave write, as (time, {session_id: text}), with SAVE_INTERVAL at 0.2 s."""
    calls: list[tuple[float, dict[str, str]]] = []
    original = llm.autosave._write

    async def counting(changed: list[tuple[str, int, str, bool]], alive: list[str]) -> None:
        calls.append((time.monotonic(), {sid: text for sid, _, text, _ in changed}))
        await original(changed, alive)

    monkeypatch.setattr(llm.autosave, "_write", counting)
    monkeypatch.setattr(llm.autosave, "SAVE_INTERVAL", 0.2)
    return calls


@pytest.mark.django_db(transaction=True)
async def test_reply_is_saved_periodically_not_per_token(upstream: Any, writes: list[Any]) -> None:
    tokens = [f" t{i}" for i in range(40)]
    upstream.replies.append(Reply(tokens=tokens, delay=0.05))  # about 2 s

    task = asyncio.create_task(generate({"messages": CONVERSATION}))
    seen: list[str] = []  # the stored reply, read from the database while it streams
    try:
        deadline = time.monotonic() + 10
        while not task.done() and time.monotonic() < deadline:
            reply = await Message.objects.filter(role="assistant").afirst()
            session = await Session.objects.afirst()
            if (
                reply is not None
                and session is not None
                and session.status == Session.Status.STREAMING
            ):
                seen.append(reply.content)
            await asyncio.sleep(0.05)
        response = await asyncio.wait_for(task, 10)
    finally:
        task.cancel()
    assert response.status_code == 200, response.content
    final = "".join(tokens)
    assert response.json()["content"] == final

    # A handful of saves for 40 tokens over ~2 s at 0.2 s: not one per token, not none.
    assert 3 <= len(writes) <= 20, len(writes)
    saved_texts = [text for _, changed in writes for text in changed.values()]
    assert saved_texts, "no save carried the reply so far"
    assert all(final.startswith(text) for text in saved_texts)

    # Mid-stream, the database holds a growing prefix of the final reply.
    assert seen, "the reply was never visible in the database while it streamed"
    assert all(final.startswith(text) for text in seen), seen
    assert any(0 < len(text) < len(final) for text in seen), seen
    assert [len(t) for t in seen] == sorted(len(t) for t in seen)

    session = await only_session()
    assert session.status == Session.Status.COMPLETED
    assert (await messages_of(session))[-1] == (2, "assistant", final)


@pytest.mark.django_db(transaction=True)
async def test_concurrent_streams_share_one_write_per_interval(
    upstream: Any, writes: list[Any]
) -> None:
    """Five streams at once cost one write per interval, not five.

    The process saves them together.
    """
    upstream.default = Reply(tokens=[f" t{i}" for i in range(20)], delay=0.05)  # about 1 s each
    responses = await asyncio.gather(*(generate({"messages": CONVERSATION}) for _ in range(5)))
    assert all(r.status_code == 200 for r in responses)
    busy = [changed for _, changed in writes if changed]
    assert busy, "nothing was saved while the replies streamed"
    assert max(len(changed) for changed in busy) == 5  # one write carried all five replies
    assert len(writes) <= 8  # ~1 s at 0.2 s per interval, whatever the number of streams


@pytest.mark.django_db(transaction=True)
async def test_short_generation_is_not_saved_while_streaming(
    upstream: Any, writes: list[Any]
) -> None:
    """A reply shorter than SAVE_INTERVAL is written at its start and its end only."""
    upstream.replies.append(Reply(tokens=[f" w{i}" for i in range(50)]))

    response = await generate({"messages": CONVERSATION})
    assert response.status_code == 200
    assert writes == []
    session = await only_session()
    assert (await messages_of(session))[-1][2] == "".join(f" w{i}" for i in range(50))


# Start-up recovery ---------------------------------------------------------------------------


def make_session(
    status: str, worker: str, age: timedelta = timedelta(0), text: str = "partial"
) -> Session:
    now = timezone.now()
    session = Session.objects.create(
        provider="lm_studio",
        model="fake-model",
        status=status,
        worker=worker,
        created_at=now - age,
        updated_at=now - age,
    )
    Message.objects.create(session=session, position=0, role="user", content="Hi")
    if text:
        Message.objects.create(session=session, position=1, role="assistant", content=text)
    return session


@pytest.mark.django_db
def test_recover_interrupted_marks_dead_and_stale_sessions_only() -> None:
    dead_pid = make_session("streaming", DEAD_WORKER, text="half a rep")
    stale = make_session(
        "streaming",
        "another-host:1234",
        age=llm.sessions.STALE_AFTER + timedelta(seconds=5),
        text="stale text",
    )
    live = make_session("streaming", llm.sessions.worker_id(), text="live text")
    remote_fresh = make_session("streaming", "another-host:1234", text="remote text")
    finished = make_session("completed", DEAD_WORKER, text="done text")

    assert llm.sessions.recover_interrupted() == 2

    for session, text in ((dead_pid, "half a rep"), (stale, "stale text")):
        session.refresh_from_db()
        assert session.status == Session.Status.INTERRUPTED
        assert session.finished_at is not None
        assert session.messages.get(position=1).content == text  # the partial text is kept
    for session, status in (
        (live, "streaming"),
        (remote_fresh, "streaming"),
        (finished, "completed"),
    ):
        session.refresh_from_db()
        assert session.status == status
        assert session.finished_at is None
    assert live.messages.get(position=1).content == "live text"

    # Nothing left to recover: a second run changes nothing.
    assert llm.sessions.recover_interrupted() == 0


@pytest.mark.django_db
def test_recover_interrupted_keeps_a_live_session_of_this_process_even_when_old() -> None:
    """Staleness is by `updated_at`, which a live stream refreshes; a fresh one is left alone."""
    fresh = make_session("streaming", llm.sessions.worker_id(), age=timedelta(seconds=1))
    assert llm.sessions.recover_interrupted() == 0
    fresh.refresh_from_db()
    assert fresh.status == Session.Status.STREAMING


class DummyApp:
    def __init__(self) -> None:
        self.scopes: list[dict[str, Any]] = []

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        self.scopes.append(scope)


@pytest.mark.django_db(transaction=True)
async def test_startup_wrapper_recovers_once_before_the_first_request() -> None:
    from negotiator.asgi import StartUp

    dead = await sync_to_async(make_session)("streaming", DEAD_WORKER, text="kept")
    live = await sync_to_async(make_session)("streaming", llm.sessions.worker_id())
    app = DummyApp()
    wrapper = StartUp(app)

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        pass

    scope = {"type": "http", "path": "/"}
    await wrapper(scope, receive, send)
    assert app.scopes == [scope]  # the request went through

    await dead.arefresh_from_db()
    await live.arefresh_from_db()
    assert dead.status == Session.Status.INTERRUPTED
    assert live.status == Session.Status.STREAMING
    assert (await Message.objects.aget(session=dead, position=1)).content == "kept"

    # Only once: a session left by a dead process after start-up is not this wrapper's business.
    later = await sync_to_async(make_session)("streaming", DEAD_WORKER)
    await wrapper(scope, receive, send)
    assert len(app.scopes) == 2
    await later.arefresh_from_db()
    assert later.status == Session.Status.STREAMING


@pytest.mark.django_db(transaction=True)
async def test_startup_wrapper_answers_the_asgi_lifespan_and_recovers_at_startup() -> None:
    from negotiator.asgi import StartUp

    dead = await sync_to_async(make_session)("streaming", DEAD_WORKER)
    app = DummyApp()
    wrapper = StartUp(app)
    inbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await inbox.put({"type": "lifespan.startup"})
    await inbox.put({"type": "lifespan.shutdown"})
    await asyncio.wait_for(
        wrapper({"type": "lifespan", "asgi": {"version": "3.0"}}, inbox.get, send), 5
    )

    assert sent == [{"type": "lifespan.startup.complete"}, {"type": "lifespan.shutdown.complete"}]
    assert app.scopes == []  # the lifespan is answered here, not passed to Django/Channels
    await dead.arefresh_from_db()
    assert dead.status == Session.Status.INTERRUPTED


def test_application_is_wrapped_in_startup() -> None:
    from negotiator.asgi import StartUp, application

    assert isinstance(application, StartUp)
